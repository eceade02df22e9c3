//! The federation CA and the region certificates (rcgen).
//!
//! Every region of a federation holds one certificate issued by the federation's CA. The
//! certificate *is* the region's identity on the QUIC links (see [`crate::tls`]):
//!
//! - **Naming.** A region `seoul` gets the DNS subject alternative name
//!   `seoul.dtfed.region` ([`region_dns_name`]) and the subject `CN=seoul`. The SAN is what
//!   the links check; the CN is only for humans reading `openssl x509 -text`. `dtfed.region`
//!   is not a real DNS zone and is never resolved: peer addresses come from the topology
//!   ([`crate::topology`]), the name is only an identity. Using a DNS SAN (rather than, say,
//!   a URI SAN) lets the stock WebPKI verifier of rustls check "this is region X" with the
//!   TLS server name, so no custom name matching sits in the handshake.
//! - **Usage.** The same leaf certificate serves for both directions of a link: it carries
//!   the extended key usages `serverAuth` and `clientAuth`, is not a CA, and is valid for one
//!   year ([`REGION_CERT_VALIDITY`]). The CA (ECDSA P-256, self-signed, path length 0) is
//!   valid for ten years ([`CA_VALIDITY`]).
//!
//! On disk ([`certs_init`], [`certs_issue`], which back `dtfed certs init|issue`), a
//! directory holds `ca.crt` + `ca.key` and one `<region>.crt` + `<region>.key` per region,
//! all PEM. Key files are created with mode `0600`; nothing is overwritten unless `force`.
//! Only `ca.crt` and the region's own pair need to be shipped to a region: `ca.key` stays
//! with whoever issues certificates.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use crate::topology::valid_region_name;

/// DNS suffix of region identities: region `seoul` is `seoul.dtfed.region`.
pub const REGION_DNS_SUFFIX: &str = "dtfed.region";

/// How long a federation CA is valid.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// How long a region certificate is valid.
pub const REGION_CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

/// Certificates start being valid this long before they are made, so a peer whose clock is
/// a little behind does not reject a fresh certificate.
const BACKDATE: Duration = Duration::from_secs(3600);

/// Organization put in every subject, to make the certificates recognisable.
const ORGANIZATION: &str = "dtfed federation";

/// File name of the CA certificate inside a certificate directory.
pub const CA_CERT_FILE: &str = "ca.crt";
/// File name of the CA private key inside a certificate directory.
pub const CA_KEY_FILE: &str = "ca.key";

/// The identity DNS name of a region: `<region>.dtfed.region`.
pub fn region_dns_name(region: &str) -> String {
    format!("{region}.{REGION_DNS_SUFFIX}")
}

/// The region a DNS name identifies, if it is `<valid region name>.dtfed.region`.
pub fn region_from_dns_name(name: &str) -> Option<&str> {
    let region = name
        .strip_suffix(REGION_DNS_SUFFIX)?
        .strip_suffix('.')
        .filter(|r| valid_region_name(r))?;
    Some(region)
}

/// Errors making, loading or writing certificates.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("`{0}` is not a valid region name (1 to 32 of [a-z0-9-])")]
    InvalidRegion(String),
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("the CA private key does not match the CA certificate")]
    KeyMismatch,
    #[error("{0}: no PEM certificate found")]
    NoCertificate(String),
    #[error("{path}: already exists (use --force to overwrite)")]
    Exists { path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CertError + '_ {
    move |source| CertError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A region certificate and its private key, both PEM.
#[derive(Clone)]
pub struct RegionCert {
    /// The region the certificate names.
    pub region: String,
    /// The leaf certificate (PEM).
    pub cert_pem: String,
    /// The PKCS#8 private key (PEM). Secret.
    pub key_pem: String,
}

impl std::fmt::Debug for RegionCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegionCert")
            .field("region", &self.region)
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl RegionCert {
    /// The certificate in DER, as rustls wants it.
    pub fn cert_der(&self) -> Result<CertificateDer<'static>, CertError> {
        first_cert_from_pem(&self.cert_pem, "region certificate")
    }

    /// The private key in DER, as rustls wants it.
    pub fn key_der(&self) -> Result<PrivateKeyDer<'static>, CertError> {
        let key = KeyPair::from_pem(&self.key_pem)?;
        Ok(PrivatePkcs8KeyDer::from(key.serialize_der()).into())
    }
}

/// The federation's certificate authority: issues one certificate per region.
pub struct FederationCa {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for FederationCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FederationCa").finish_non_exhaustive()
    }
}

impl FederationCa {
    /// A new self-signed CA (ECDSA P-256, valid ten years), `CN=<name>`.
    pub fn generate(name: &str) -> Result<FederationCa, CertError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationName, ORGANIZATION);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, CA_VALIDITY);
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        Ok(FederationCa {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA from its certificate and private key (PEM). Fails when the key is not the
    /// certificate's.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<FederationCa, CertError> {
        let cert_der = first_cert_from_pem(cert_pem, "CA certificate")?;
        let key = KeyPair::from_pem(key_pem)?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|_| CertError::Rcgen(rcgen::Error::CouldNotParseCertificate))?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(CertError::KeyMismatch);
        }
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)?;
        Ok(FederationCa {
            cert_pem: cert_pem.to_owned(),
            cert_der,
            key_pem: key_pem.to_owned(),
            issuer,
        })
    }

    /// Loads a CA from `ca.crt` and `ca.key` in `dir`.
    pub fn load_dir(dir: &Path) -> Result<FederationCa, CertError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let cert = fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
        let key = fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
        FederationCa::load(&cert, &key)
    }

    /// The CA certificate and private key, PEM: `(cert_pem, key_pem)`.
    pub fn to_pem(&self) -> (String, String) {
        (self.cert_pem.clone(), self.key_pem.clone())
    }

    /// The CA certificate (PEM), the trust anchor every region is given.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate (DER).
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// Issues the certificate of `region`: a fresh ECDSA P-256 key, SAN
    /// `<region>.dtfed.region`, `CN=<region>`, EKU serverAuth + clientAuth, one year.
    pub fn issue_region(&self, region: &str) -> Result<RegionCert, CertError> {
        if !valid_region_name(region) {
            return Err(CertError::InvalidRegion(region.to_owned()));
        }
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, region);
        dn.push(DnType::OrganizationName, ORGANIZATION);
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::DnsName(region_dns_name(region).try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, REGION_CERT_VALIDITY);
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(RegionCert {
            region: region.to_owned(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Writes `ca.crt` and `ca.key` (mode 0600) into `dir`, creating it if needed.
    pub fn write_ca(&self, dir: &Path, force: bool) -> Result<CertPaths, CertError> {
        let paths = CertPaths {
            cert: dir.join(CA_CERT_FILE),
            key: dir.join(CA_KEY_FILE),
        };
        write_pair(&paths, &self.cert_pem, &self.key_pem, force)?;
        Ok(paths)
    }

    /// Issues `region`'s certificate and writes `<region>.crt` and `<region>.key` (mode 0600)
    /// into `dir`.
    pub fn write_region(
        &self,
        dir: &Path,
        region: &str,
        force: bool,
    ) -> Result<CertPaths, CertError> {
        if !valid_region_name(region) {
            return Err(CertError::InvalidRegion(region.to_owned()));
        }
        let paths = CertPaths {
            cert: dir.join(format!("{region}.crt")),
            key: dir.join(format!("{region}.key")),
        };
        // Refuse before spending a key on it.
        if !force {
            refuse_existing(&paths)?;
        }
        let issued = self.issue_region(region)?;
        write_pair(&paths, &issued.cert_pem, &issued.key_pem, force)?;
        Ok(paths)
    }
}

/// Where a certificate and its key were written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `dtfed certs init --dir DIR [--force]`: makes a new federation CA in `dir`. Prints
/// nothing; returns the paths written. With `force` an existing CA is replaced, and every
/// region certificate it issued stops being trusted by regions given the new `ca.crt`.
pub fn certs_init(dir: &Path, force: bool) -> Result<CertPaths, CertError> {
    if !force {
        refuse_existing(&CertPaths {
            cert: dir.join(CA_CERT_FILE),
            key: dir.join(CA_KEY_FILE),
        })?;
    }
    FederationCa::generate("dtfed federation CA")?.write_ca(dir, force)
}

/// `dtfed certs issue --dir DIR --region NAME [--force]`: issues `NAME`'s certificate with
/// the CA in `dir`. Prints nothing; returns the paths written.
pub fn certs_issue(dir: &Path, region: &str, force: bool) -> Result<CertPaths, CertError> {
    if !valid_region_name(region) {
        return Err(CertError::InvalidRegion(region.to_owned()));
    }
    FederationCa::load_dir(dir)?.write_region(dir, region, force)
}

/// Parses the first certificate of a PEM text.
pub fn first_cert_from_pem(pem: &str, what: &str) -> Result<CertificateDer<'static>, CertError> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .next()
        .and_then(Result::ok)
        .ok_or_else(|| CertError::NoCertificate(what.to_owned()))
}

fn set_validity(params: &mut CertificateParams, validity: Duration) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + validity;
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive, and no leading zero byte to strip.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

fn refuse_existing(paths: &CertPaths) -> Result<(), CertError> {
    for path in [&paths.cert, &paths.key] {
        if path.exists() {
            return Err(CertError::Exists { path: path.clone() });
        }
    }
    Ok(())
}

fn write_pair(paths: &CertPaths, cert: &str, key: &str, force: bool) -> Result<(), CertError> {
    if let Some(dir) = paths.cert.parent() {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    if !force {
        refuse_existing(paths)?;
    }
    // Key first: a crash in between leaves a key without a certificate, never the reverse.
    write_file(&paths.key, key, 0o600, force)?;
    write_file(&paths.cert, cert, 0o644, force)
}

fn write_file(path: &Path, contents: &str, mode: u32, force: bool) -> Result<(), CertError> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true);
    if force {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    let mut file = opts.open(path).map_err(|e| match e.kind() {
        io::ErrorKind::AlreadyExists => CertError::Exists {
            path: path.to_owned(),
        },
        _ => CertError::Io {
            path: path.to_owned(),
            source: e,
        },
    })?;
    // `mode` applies only to new files: tighten an overwritten one too.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io_err(path))?;
    }
    #[cfg(not(unix))]
    let _ = mode;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_dns_names_round_trip() {
        assert_eq!(region_dns_name("seoul"), "seoul.dtfed.region");
        assert_eq!(region_from_dns_name("seoul.dtfed.region"), Some("seoul"));
        assert_eq!(region_from_dns_name("dtfed.region"), None);
        assert_eq!(region_from_dns_name(".dtfed.region"), None);
        assert_eq!(region_from_dns_name("a.b.dtfed.region"), None);
        assert_eq!(region_from_dns_name("Seoul.dtfed.region"), None);
        assert_eq!(region_from_dns_name("seouldtfed.region"), None);
        assert_eq!(region_from_dns_name("seoul.example.com"), None);
    }

    #[test]
    fn issued_certificate_names_the_region() {
        let ca = FederationCa::generate("test CA").expect("ca");
        let cert = ca.issue_region("us-east-1").expect("issue");
        let der = cert.cert_der().expect("der");
        let (_, x509) = x509_parser::parse_x509_certificate(&der).expect("parse");
        let san = x509
            .subject_alternative_name()
            .expect("san ext")
            .expect("san present");
        let names: Vec<String> = san
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(names, vec!["DNSName(us-east-1.dtfed.region)".to_owned()]);
        let cn = x509
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok());
        assert_eq!(cn, Some("us-east-1"));
        let eku = x509
            .extended_key_usage()
            .expect("eku")
            .expect("eku present");
        assert!(eku.value.server_auth && eku.value.client_auth);
        assert!(!x509.is_ca());
        assert!(matches!(
            ca.issue_region("Not Valid"),
            Err(CertError::InvalidRegion(_))
        ));
    }

    #[test]
    fn loaded_ca_issues_certificates_and_rejects_a_foreign_key() {
        let ca = FederationCa::generate("test CA").expect("ca");
        let (cert, key) = ca.to_pem();
        let loaded = FederationCa::load(&cert, &key).expect("load");
        let issued = loaded.issue_region("seoul").expect("issue");
        let der = issued.cert_der().expect("der");
        let (_, x509) = x509_parser::parse_x509_certificate(&der).expect("parse");
        let (_, ca_x509) = x509_parser::parse_x509_certificate(ca.cert_der()).expect("parse");
        assert_eq!(x509.issuer(), ca_x509.subject());

        let other = FederationCa::generate("other").expect("ca");
        let (_, other_key) = other.to_pem();
        assert!(matches!(
            FederationCa::load(&cert, &other_key),
            Err(CertError::KeyMismatch)
        ));
    }

    #[test]
    fn files_are_private_and_not_overwritten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = certs_init(dir.path(), false).expect("init");
        assert_eq!(ca.cert, dir.path().join("ca.crt"));
        assert!(matches!(
            certs_init(dir.path(), false),
            Err(CertError::Exists { .. })
        ));
        let seoul = certs_issue(dir.path(), "seoul", false).expect("issue");
        assert_eq!(seoul.key, dir.path().join("seoul.key"));
        let before = fs::read_to_string(&seoul.cert).expect("read");
        assert!(matches!(
            certs_issue(dir.path(), "seoul", false),
            Err(CertError::Exists { .. })
        ));
        assert_eq!(fs::read_to_string(&seoul.cert).expect("read"), before);
        certs_issue(dir.path(), "seoul", true).expect("forced");
        assert_ne!(fs::read_to_string(&seoul.cert).expect("read"), before);
        assert!(matches!(
            certs_issue(dir.path(), "../evil", false),
            Err(CertError::InvalidRegion(_))
        ));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for key in [&ca.key, &seoul.key] {
                let mode = fs::metadata(key).expect("meta").permissions().mode();
                assert_eq!(mode & 0o777, 0o600, "{}", key.display());
            }
        }
    }
}
