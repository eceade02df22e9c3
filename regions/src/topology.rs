//! Region topology: who this region is linked to, and with which credentials.
//!
//! [`FederationConfig`] is the `[federation]` part of a daemon's config: the QUIC listen
//! address, the federation CA and this region's certificate and key (see [`crate::certs`]),
//! and the peer regions with their addresses. The types only parse (serde, unknown fields
//! rejected); [`FederationConfig::validate`] reports every problem at once so an operator
//! fixes a config in one go.
//!
//! Region names are 1 to 32 characters of `[a-z0-9-]` ([`valid_region_name`]): they end up
//! in DNS names (`<region>.dtfed.region`), Kafka topic names (`dtfed.mirror.<region>`) and
//! metric labels, so they are kept boring.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Longest region name.
pub const MAX_REGION_NAME_LEN: usize = 32;

/// Whether `name` is a valid region name: 1 to 32 characters of `[a-z0-9-]` (the rule
/// lives with the wire types, since link `Hello` frames carry region names).
pub use dtfed_proto::room::valid_region_name;

/// The federation section of a region's config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationConfig {
    /// QUIC (UDP) address the region link listens on.
    pub listen: SocketAddr,
    /// PEM file of the federation CA certificate (the only trust anchor of the links).
    pub ca_cert: PathBuf,
    /// PEM file of this region's certificate (names `<region>.dtfed.region`).
    pub cert: PathBuf,
    /// PEM file of this region's private key.
    pub key: PathBuf,
    /// The other regions this one mirrors from and serves to.
    #[serde(default)]
    pub peers: Vec<PeerRegion>,
    /// Mirror links one peer region may hold to this daemon at once (64; a peer region
    /// needs one per daemon of its own, two for a while after a cut, until the server's
    /// idle timeout closes the old one). Links beyond it are closed with a reason.
    #[serde(default = "default_max_links_per_peer")]
    pub max_links_per_peer: usize,
    /// Mirror streams one peer region may hold to this daemon at once, over all its links
    /// (128; a peer needs one per partition of the local topic, two for a while after a
    /// cut: keep it at least twice `kafka.partitions`). Each stream reads the
    /// local topic with a Kafka consumer of its own, so this bounds what a peer can make
    /// this daemon spend. Streams beyond it are refused with an `unavailable` error naming
    /// the limit.
    #[serde(default = "default_max_streams_per_peer")]
    pub max_streams_per_peer: usize,
    /// Serve the mirror topics of this region's peers to its other peers (relaying, see
    /// `docs/PROTOCOL.md`, "Relays"; default false). A peer never gets its own records
    /// back, and only mirror topics of configured peers are served.
    #[serde(default)]
    pub serve_relay: bool,
    /// How long a direct link must be down (dials failing, or no packet received on it)
    /// before a partition is pulled through a relay peer instead (3000 ms; at least 2500,
    /// above the links' 2 s keep-alive).
    #[serde(default = "default_relay_after_ms")]
    pub relay_after_ms: u64,
    /// Seconds between two background divergence checks of this daemon (300; 0 turns them
    /// off): each compares a few of the mirror partitions it writes, over their most recent
    /// origin offsets, with the origin's digest of the same range, asked over the link.
    #[serde(default = "default_verify_every_secs")]
    pub verify_every_secs: u64,
}

/// Least [`FederationConfig::relay_after_ms`]: above the links' QUIC keep-alive (2 s), so
/// an idle but healthy link never looks silent.
pub const MIN_RELAY_AFTER_MS: u64 = 2500;

/// Default of [`FederationConfig::relay_after_ms`].
pub const DEFAULT_RELAY_AFTER_MS: u64 = 3000;

fn default_relay_after_ms() -> u64 {
    DEFAULT_RELAY_AFTER_MS
}

fn default_true() -> bool {
    true
}

/// Default of [`FederationConfig::verify_every_secs`].
pub const DEFAULT_VERIFY_EVERY_SECS: u64 = 300;
/// Upper bound of [`FederationConfig::verify_every_secs`] (a day).
pub const MAX_VERIFY_EVERY_SECS: u64 = 86_400;

fn default_verify_every_secs() -> u64 {
    DEFAULT_VERIFY_EVERY_SECS
}

/// Default of [`FederationConfig::max_links_per_peer`].
pub const DEFAULT_MAX_LINKS_PER_PEER: usize = 64;
/// Default of [`FederationConfig::max_streams_per_peer`].
pub const DEFAULT_MAX_STREAMS_PER_PEER: usize = 128;
/// Upper bound of both limits.
pub const MAX_PER_PEER_LIMIT: usize = 4096;

fn default_max_links_per_peer() -> usize {
    DEFAULT_MAX_LINKS_PER_PEER
}

fn default_max_streams_per_peer() -> usize {
    DEFAULT_MAX_STREAMS_PER_PEER
}

/// One peer region.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerRegion {
    /// The peer's region name; its certificate must name it.
    pub name: String,
    /// `host:port` QUIC addresses of the peer's daemons (any of them serves any partition).
    pub addrs: Vec<String>,
    /// Partition count the mirror topic of this peer is created with (default: this
    /// region's). The mirror client asks the peer for its real count on every link, grows
    /// the mirror topic when the peer has more, and refuses to mirror when it has fewer
    /// ([`crate::mirror::MirrorClient`], [`crate::mirror::log::MirrorLog::grow_partitions`]).
    #[serde(default)]
    pub partitions: Option<i32>,
    /// The peer's local topic, the one its daemons serve (default `dtfed.local`).
    #[serde(default)]
    pub topic: Option<String>,
    /// Other origins' partitions may be pulled through this peer when their direct link is
    /// down (the peer must set `serve_relay`). Default false.
    #[serde(default)]
    pub relay: bool,
    /// Dial this peer for its own partitions (default true). False: never; its partitions
    /// are always pulled through a `relay` peer.
    #[serde(default = "default_true")]
    pub direct: bool,
}

impl FederationConfig {
    /// Every problem with this config, for region `self_region`; empty when it is valid.
    pub fn validate(&self, self_region: &str) -> Vec<String> {
        let mut problems = Vec::new();
        if !valid_region_name(self_region) {
            problems.push(format!(
                "region name `{self_region}` is invalid: use 1 to {MAX_REGION_NAME_LEN} of [a-z0-9-]"
            ));
        }
        for (field, path) in [
            ("ca_cert", &self.ca_cert),
            ("cert", &self.cert),
            ("key", &self.key),
        ] {
            if path.as_os_str().is_empty() {
                problems.push(format!("federation.{field} is empty"));
            }
        }
        for (field, value) in [
            ("max_links_per_peer", self.max_links_per_peer),
            ("max_streams_per_peer", self.max_streams_per_peer),
        ] {
            if !(1..=MAX_PER_PEER_LIMIT).contains(&value) {
                problems.push(format!(
                    "federation.{field} = {value}: must be 1..={MAX_PER_PEER_LIMIT}"
                ));
            }
        }
        if self.verify_every_secs > MAX_VERIFY_EVERY_SECS {
            problems.push(format!(
                "federation.verify_every_secs = {}: must be 0 (off) to {MAX_VERIFY_EVERY_SECS}",
                self.verify_every_secs
            ));
        }
        let mut seen = HashSet::new();
        for (i, peer) in self.peers.iter().enumerate() {
            let at = format!("federation.peers[{i}] (`{}`)", peer.name);
            if !valid_region_name(&peer.name) {
                problems.push(format!(
                    "{at}: invalid region name: use 1 to {MAX_REGION_NAME_LEN} of [a-z0-9-]"
                ));
            }
            if !seen.insert(peer.name.as_str()) {
                problems.push(format!("{at}: duplicate peer region"));
            }
            if peer.name == self_region {
                problems.push(format!("{at}: a region cannot peer with itself"));
            }
            if peer.addrs.is_empty() {
                problems.push(format!("{at}: no addrs"));
            }
            for addr in &peer.addrs {
                if let Err(why) = parse_host_port(addr) {
                    problems.push(format!("{at}: address `{addr}`: {why}"));
                }
            }
            if let Some(n) = peer.partitions {
                if n < 1 {
                    problems.push(format!("{at}: partitions must be at least 1, not {n}"));
                }
            }
            if !peer.direct && !self.peers.iter().any(|r| r.relay && r.name != peer.name) {
                problems.push(format!(
                    "{at}: direct = false needs another peer with relay = true to pull it through"
                ));
            }
            if peer.relay && !peer.direct {
                problems.push(format!(
                    "{at}: relay = true with direct = false: a relay peer is one this region links to"
                ));
            }
        }
        if !(MIN_RELAY_AFTER_MS..=600_000).contains(&self.relay_after_ms) {
            problems.push(format!(
                "federation.relay_after_ms = {}: must be {MIN_RELAY_AFTER_MS}..=600000 (an idle \
                 link is heard from every 2 s, its QUIC keep-alive)",
                self.relay_after_ms
            ));
        }
        problems
    }

    /// Names of the peer regions: the regions allowed on this region's links.
    pub fn allowed_peers(&self) -> Vec<String> {
        self.peers.iter().map(|p| p.name.clone()).collect()
    }

    /// The peer named `name`.
    pub fn peer(&self, name: &str) -> Option<&PeerRegion> {
        self.peers.iter().find(|p| p.name == name)
    }
}

/// Splits a `host:port` address (`[v6]:port` for IPv6 literals) into host and port, checking
/// the host is an IP literal or a plausible DNS name and the port is not 0.
pub fn parse_host_port(addr: &str) -> Result<(String, u16), String> {
    if let Ok(sa) = addr.parse::<SocketAddr>() {
        if sa.port() == 0 {
            return Err("port 0".into());
        }
        return Ok((sa.ip().to_string(), sa.port()));
    }
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| "expected host:port".to_owned())?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("bad port `{port}`"))
        .and_then(|p| if p == 0 { Err("port 0".into()) } else { Ok(p) })?;
    if host.contains(':') || host.starts_with('[') {
        return Err("IPv6 addresses are written [addr]:port".into());
    }
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if !host_ok {
        return Err(format!("bad host `{host}`"));
    }
    Ok((host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_names() {
        for ok in ["seoul", "us-east-1", "a", &"x".repeat(32)] {
            assert!(valid_region_name(ok), "{ok}");
        }
        for bad in [
            "",
            "Seoul",
            "us_east",
            "a.b",
            "tokyo ",
            &"x".repeat(33),
            "東京",
        ] {
            assert!(!valid_region_name(bad), "{bad}");
        }
    }

    #[test]
    fn host_ports() {
        assert_eq!(
            parse_host_port("10.0.0.1:7000"),
            Ok(("10.0.0.1".into(), 7000))
        );
        assert_eq!(parse_host_port("[::1]:7000"), Ok(("::1".into(), 7000)));
        assert_eq!(
            parse_host_port("tokyo-1.dtfed.internal:7000"),
            Ok(("tokyo-1.dtfed.internal".into(), 7000))
        );
        for bad in [
            "tokyo",
            "tokyo:",
            ":7000",
            "tokyo:0",
            "tokyo:70000",
            "::1:7000",
            "to kyo:1",
            "a..b:1",
        ] {
            assert!(parse_host_port(bad).is_err(), "{bad}");
        }
    }

    const GOOD: &str = r#"
        listen = "0.0.0.0:7100"
        ca_cert = "/etc/dtfed/ca.crt"
        cert = "/etc/dtfed/seoul.crt"
        key = "/etc/dtfed/seoul.key"

        [[peers]]
        name = "tokyo"
        addrs = ["tokyo-1.internal:7100", "10.1.0.2:7100"]
        partitions = 12

        [[peers]]
        name = "frankfurt"
        addrs = ["[fd00::1]:7100"]
    "#;

    #[test]
    fn parses_and_validates() {
        let cfg: FederationConfig = toml::from_str(GOOD).expect("parse");
        assert_eq!(cfg.listen, "0.0.0.0:7100".parse().expect("addr"));
        assert_eq!(cfg.peers.len(), 2);
        assert_eq!(cfg.peers[0].partitions, Some(12));
        assert_eq!(cfg.peers[1].partitions, None);
        assert_eq!(cfg.validate("seoul"), Vec::<String>::new());
        assert_eq!(cfg.allowed_peers(), vec!["tokyo", "frankfurt"]);
        assert!(cfg.peer("tokyo").is_some());
    }

    #[test]
    fn per_peer_limits_default_and_are_bounded() {
        let cfg: FederationConfig = toml::from_str(GOOD).expect("parse");
        assert_eq!(cfg.max_links_per_peer, DEFAULT_MAX_LINKS_PER_PEER);
        assert_eq!(cfg.max_streams_per_peer, DEFAULT_MAX_STREAMS_PER_PEER);
        let text = GOOD.replace(
            "key = \"/etc/dtfed/seoul.key\"",
            "key = \"/etc/dtfed/seoul.key\"\nmax_links_per_peer = 0\nmax_streams_per_peer = 5000",
        );
        let cfg: FederationConfig = toml::from_str(&text).expect("parse");
        let problems = cfg.validate("seoul");
        assert_eq!(problems.len(), 2, "{problems:#?}");
        assert!(problems[0].contains("federation.max_links_per_peer = 0"));
        assert!(problems[1].contains("federation.max_streams_per_peer = 5000"));
    }

    #[test]
    fn relay_settings_default_off_and_are_checked() {
        let cfg: FederationConfig = toml::from_str(GOOD).expect("parse");
        assert!(!cfg.serve_relay);
        assert_eq!(cfg.relay_after_ms, DEFAULT_RELAY_AFTER_MS);
        assert!(cfg.peers.iter().all(|p| p.direct && !p.relay));

        // tokyo only through frankfurt: fine.
        let text = GOOD
            .replace("partitions = 12", "partitions = 12\ndirect = false")
            .replace(
                "addrs = [\"[fd00::1]:7100\"]",
                "addrs = [\"[fd00::1]:7100\"]\nrelay = true",
            );
        let cfg: FederationConfig = toml::from_str(&text).expect("parse");
        assert_eq!(cfg.validate("seoul"), Vec::<String>::new());
        assert!(!cfg.peers[0].direct && cfg.peers[1].relay);

        // No relay to pull tokyo through, a relay never dialled, a silly delay.
        let text = GOOD
            .replace(
                "partitions = 12",
                "partitions = 12\ndirect = false\nrelay = true",
            )
            .replace(
                "key = \"/etc/dtfed/seoul.key\"",
                "key = \"/etc/dtfed/seoul.key\"\nrelay_after_ms = 5\nserve_relay = true",
            );
        let cfg: FederationConfig = toml::from_str(&text).expect("parse");
        let problems = cfg.validate("seoul");
        assert_eq!(problems.len(), 3, "{problems:#?}");
        assert!(problems[0].contains("direct = false needs another peer with relay = true"));
        assert!(problems[1].contains("relay = true with direct = false"));
        assert!(problems[2].contains("federation.relay_after_ms = 5"));
    }

    #[test]
    fn the_verify_interval_defaults_and_is_bounded() {
        let cfg: FederationConfig = toml::from_str(GOOD).expect("parse");
        assert_eq!(cfg.verify_every_secs, DEFAULT_VERIFY_EVERY_SECS);
        for (value, problems) in [(0u64, 0usize), (60, 0), (86_401, 1)] {
            let text = GOOD.replace(
                "key = \"/etc/dtfed/seoul.key\"",
                &format!("key = \"/etc/dtfed/seoul.key\"\nverify_every_secs = {value}"),
            );
            let cfg: FederationConfig = toml::from_str(&text).expect("parse");
            let found = cfg.validate("seoul");
            assert_eq!(found.len(), problems, "{value}: {found:#?}");
            assert!(found
                .iter()
                .all(|p| p.contains("federation.verify_every_secs")));
        }
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let typo = GOOD.replace("partitions = 12", "partition = 12");
        assert!(toml::from_str::<FederationConfig>(&typo).is_err());
        let top = format!("{GOOD}\nextra = 1\n");
        assert!(toml::from_str::<FederationConfig>(&top).is_err());
    }

    #[test]
    fn reports_every_problem() {
        let cfg: FederationConfig = toml::from_str(
            r#"
            listen = "0.0.0.0:7100"
            ca_cert = ""
            cert = "c"
            key = "k"
            [[peers]]
            name = "seoul"
            addrs = ["x:1"]
            [[peers]]
            name = "Tokyo"
            addrs = []
            [[peers]]
            name = "osaka"
            addrs = ["osaka", "osaka:99999"]
            partitions = 0
            [[peers]]
            name = "osaka"
            addrs = ["osaka:1"]
            "#,
        )
        .expect("parse");
        let problems = cfg.validate("seoul");
        let expect = [
            "ca_cert is empty",
            "a region cannot peer with itself",
            "`Tokyo`): invalid region name",
            "`Tokyo`): no addrs",
            "address `osaka`: expected host:port",
            "address `osaka:99999`: bad port",
            "partitions must be at least 1",
            "duplicate peer region",
        ];
        for e in expect {
            assert!(
                problems.iter().any(|p| p.contains(e)),
                "missing {e:?} in {problems:#?}"
            );
        }
        assert_eq!(problems.len(), expect.len(), "{problems:#?}");
        let bad_self = cfg.validate("Bad Name");
        assert!(bad_self[0].contains("region name `Bad Name` is invalid"));
    }
}
