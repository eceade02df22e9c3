//! Shared helpers of the region link tests: a federation CA, region identities, endpoints
//! on loopback.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use dtfed_regions::{FederationCa, LinkTuning, RegionEndpoint, RegionIdentity};

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "dtfed_regions=debug".into()),
        )
        .with_test_writer()
        .try_init();
}

pub fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

pub fn identity(ca: &FederationCa, region: &str) -> RegionIdentity {
    let issued = ca.issue_region(region).expect("issue");
    RegionIdentity::from_pem(region, ca.cert_pem(), &issued.cert_pem, &issued.key_pem)
        .expect("identity")
}

pub fn peers(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

pub fn endpoint(ca: &FederationCa, region: &str, allowed: &[&str]) -> RegionEndpoint {
    RegionEndpoint::bind(loopback(), identity(ca, region), peers(allowed)).expect("bind")
}

/// Tuning for lossy-link tests: short handshakes are not the point there.
pub fn patient_tuning() -> LinkTuning {
    LinkTuning {
        idle_timeout: Duration::from_secs(30),
        handshake_timeout: Duration::from_secs(30),
        ..LinkTuning::default()
    }
}

pub fn patient_endpoint(ca: &FederationCa, region: &str, allowed: &[&str]) -> RegionEndpoint {
    RegionEndpoint::bind_with(
        loopback(),
        identity(ca, region),
        peers(allowed),
        patient_tuning(),
    )
    .expect("bind")
}
