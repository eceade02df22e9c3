//! dtfed federation: region topology, certificates, and QUIC links with mutual TLS between
//! regions (see `docs/ARCHITECTURE.md`, "Federation: the mirror flow").
//!
//! Start reading at [`endpoint`]: a [`RegionEndpoint`] is a region's one QUIC endpoint; it
//! accepts links from peer regions and dials them, and yields only [`PeerConnection`]s to
//! authenticated, allowed peers. Then:
//!
//! - [`topology`]: the `[federation]` config (listen address, CA and certificate files,
//!   peer regions) and region-name rules.
//! - [`certs`]: the federation CA and region certificates (what `dtfed certs` makes) and
//!   how a certificate names its region (`<region>.dtfed.region`).
//! - [`tls`]: rustls/quinn configuration (TLS 1.3, mutual auth, no 0-RTT) and
//!   [`LinkTuning`], the transport numbers of a mirroring link.
//! - [`error`]: [`LinkError`], why a link could not be set up.
//! - [`relay`]: a userspace WAN emulator (delay, jitter, loss, reordering, duplication,
//!   cuts) for tests and ops drills, since the test machines have no `tc netem`; the
//!   `dtfed-wan-relay` binary wraps it.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod certs;
pub mod endpoint;
pub mod error;
pub mod mirror;
pub mod relay;
pub mod tls;
pub mod topology;

pub use certs::{certs_init, certs_issue, CertError, CertPaths, FederationCa, RegionCert};
pub use endpoint::{PeerConnection, RegionEndpoint};
pub use error::LinkError;
pub use relay::{RelayError, RelayStats, WanProfile, WanRelay};
pub use tls::{LinkTuning, RegionIdentity};
pub use topology::{valid_region_name, FederationConfig, PeerRegion};
