//! The daemon's TOML configuration, its validation (every error at once) and the
//! environment overrides for secrets.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

/// One daemon of one region. See `deploy/examples/region.toml` for a commented example.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This daemon's region, e.g. `seoul`.
    pub region: String,
    /// This daemon's name within the region; defaults to `<hostname>-<pid>`.
    #[serde(default)]
    pub node: Option<String>,
    #[serde(default)]
    pub client: ClientConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    pub kafka: KafkaConfig,
    /// Absent only in `dtfed demo`, where an in-process bus stands in.
    #[serde(default)]
    pub redis: Option<RedisConfig>,
    #[serde(default)]
    pub history: HistoryConfig,
    /// Mirroring to and from other regions over QUIC; absent for a region on its own.
    #[serde(default)]
    pub federation: Option<dtfed_regions::FederationConfig>,
    /// The server API for game servers (API keys); absent: no API.
    #[serde(default)]
    pub api: Option<crate::gateway::api::ApiConfig>,
    /// STOMP over WebSocket at `/stomp` on the client listener (on by default).
    #[serde(default)]
    pub stomp: crate::gateway::stomp::StompConfig,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Anyone may connect; `?name=` names the player (demo).
    #[default]
    None,
    /// `?token=` must be an HS256 JWT signed with `jwt_secret`.
    Jwt,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientConfig {
    pub listen: SocketAddr,
    pub max_frame_bytes: usize,
    pub max_connections: usize,
    /// Frames queued per connection before a reader too slow to keep up is closed.
    pub outbound_queue: usize,
    pub publish_rate_per_sec: u32,
    pub publish_burst: u32,
    /// Browser `Origin` values allowed to connect; empty allows any.
    pub allowed_origins: Vec<String>,
    pub auth: AuthMode,
    pub jwt_secret: String,
    /// JWT claim listing the room patterns a player may use (`*` suffix wildcards).
    pub jwt_rooms_claim: String,
    /// When set, a token must carry this `iss`.
    pub jwt_issuer: Option<String>,
    /// When set, a token must carry this `aud` (or a list holding it). When not set, a token
    /// with an `aud` is refused: it was meant for someone else.
    pub jwt_audience: Option<String>,
    /// The server pings each connection this often (WebSocket Ping).
    pub ping_interval_ms: u64,
    /// A connection from which nothing arrives (no frame, no Pong) for this long is closed.
    pub idle_timeout_ms: u64,
    /// Serve the demo chat page at `/` and `@dtfed/client` at `/dtfed-client/` (the demo
    /// always does).
    pub chat_page: bool,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_frame_bytes: 64 * 1024,
            max_connections: 10_000,
            outbound_queue: 1024,
            publish_rate_per_sec: 50,
            publish_burst: 100,
            allowed_origins: Vec::new(),
            auth: AuthMode::None,
            jwt_secret: String::new(),
            jwt_rooms_claim: "rooms".into(),
            jwt_issuer: None,
            jwt_audience: None,
            ping_interval_ms: 20_000,
            idle_timeout_ms: 60_000,
            chat_page: false,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// Bearer token for the admin endpoints that change state.
    pub token: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            token: String::new(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    pub brokers: String,
    pub local_topic: String,
    /// Partition count used when this daemon creates the local topic.
    pub partitions: i32,
    pub replication_factor: i32,
    /// A publish not acknowledged by Kafka within this time is answered `unavailable`.
    pub publish_timeout_ms: u64,
    pub fanout_group: String,
    pub session_timeout_ms: u64,
    /// The producer's `linger.ms` for players' publishes: 0 sends each publish at once
    /// (lowest ack time); a few ms batch publishes into fewer Kafka requests, which costs
    /// less CPU in the daemon and the broker at high rates. See docs/BENCHMARKS.md.
    pub linger_ms: u64,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            local_topic: "dtfed.local".into(),
            partitions: 8,
            replication_factor: 1,
            publish_timeout_ms: 5_000,
            fanout_group: "dtfed-fanout".into(),
            session_timeout_ms: 6_000,
            linger_ms: 0,
        }
    }
}

impl KafkaConfig {
    pub fn publish_timeout(&self) -> Duration {
        Duration::from_millis(self.publish_timeout_ms)
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    pub url: String,
    /// Prefix of every key and channel, so regions or tests can share one Redis.
    pub key_prefix: String,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379".into(),
            key_prefix: "dtfed".into(),
        }
    }
}

impl RedisConfig {
    /// The URL with any password replaced by `***`, for logs and error messages.
    pub fn url_redacted(&self) -> String {
        redact_url(&self.url)
    }
}

/// `scheme://user:password@host/...` with the password (or a lone user-info secret)
/// replaced by `***`; other URLs unchanged.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    let user = match rest[..at].split_once(':') {
        Some((user, _password)) => format!("{user}:***"),
        None => "***".to_owned(),
    };
    format!("{scheme}://{user}{}", &rest[at..])
}

/// Bounds of a room's hot history in Redis.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    pub max_messages: usize,
    pub max_age_secs: u64,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            max_messages: 1000,
            max_age_secs: 86_400,
        }
    }
}

/// Every problem found in a config file, in file order.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.join("\n"))]
pub struct ConfigErrors(pub Vec<String>);

impl Config {
    /// Reads, parses, applies environment overrides and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigErrors(vec![format!("{}: {e}", path.display())]))?;
        Self::from_toml(&text, |k| std::env::var(k).ok()).map_err(|ConfigErrors(errs)| {
            ConfigErrors(
                errs.into_iter()
                    .map(|e| format!("{}: {e}", path.display()))
                    .collect(),
            )
        })
    }

    /// Parses `text`, applies overrides from `env` and validates.
    pub fn from_toml(
        text: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigErrors> {
        let mut cfg: Config =
            toml::from_str(text).map_err(|e| ConfigErrors(vec![e.to_string()]))?;
        // Who may connect is never left to a default: a file that forgets `auth` would
        // otherwise run open to anyone who can reach the listener.
        let auth_stated = toml::from_str::<toml::Table>(text)
            .ok()
            .and_then(|t| t.get("client").and_then(|c| c.as_table()).cloned())
            .is_some_and(|c| c.contains_key("auth"));
        cfg.apply_env(env);
        let mut errs = Vec::new();
        if !auth_stated {
            errs.push(
                "client.auth must be stated: \"jwt\" (players bring a signed token) or \"none\" \
                 (anyone names themselves; for demos and tests on loopback)"
                    .to_owned(),
            );
        }
        errs.extend(cfg.validate());
        if errs.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigErrors(errs))
        }
    }

    fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) {
        if let Some(api) = &mut self.api {
            api.resolve_secrets(&env);
        }
        if let Some(v) = env("DTFED_JWT_SECRET") {
            self.client.jwt_secret = v;
        }
        if let Some(v) = env("DTFED_ADMIN_TOKEN") {
            self.admin.token = v;
        }
        if let Some(v) = env("DTFED_KAFKA_BROKERS") {
            self.kafka.brokers = v;
        }
        if let Some(v) = env("DTFED_REDIS_URL") {
            self.redis.get_or_insert_with(RedisConfig::default).url = v;
        }
    }

    /// All problems, not just the first.
    pub fn validate(&self) -> Vec<String> {
        let mut errs = Vec::new();
        if !dtfed_proto::room::valid_region_name(&self.region) {
            errs.push(format!(
                "region {:?}: must be 1-32 characters of [a-z0-9-]",
                self.region
            ));
        }
        let c = &self.client;
        if c.max_frame_bytes < 256 || c.max_frame_bytes > 16 * 1024 * 1024 {
            errs.push(format!(
                "client.max_frame_bytes = {}: must be 256..=16777216",
                c.max_frame_bytes
            ));
        }
        if c.max_connections == 0 {
            errs.push("client.max_connections must be at least 1".into());
        }
        if c.outbound_queue < 16 {
            errs.push(format!(
                "client.outbound_queue = {}: must be at least 16",
                c.outbound_queue
            ));
        }
        if c.publish_rate_per_sec == 0 || c.publish_burst == 0 {
            errs.push(
                "client.publish_rate_per_sec and client.publish_burst must be at least 1".into(),
            );
        }
        if c.auth == AuthMode::Jwt && c.jwt_secret.len() < 16 {
            errs.push("client.auth = \"jwt\" needs client.jwt_secret (or DTFED_JWT_SECRET) of at least 16 bytes".into());
        }
        if is_placeholder(&c.jwt_secret) {
            errs.push("client.jwt_secret (or DTFED_JWT_SECRET) is a placeholder from an example: make a real one, e.g. `head -c 32 /dev/urandom | base64`".into());
        }
        if c.jwt_rooms_claim.is_empty() {
            errs.push("client.jwt_rooms_claim must not be empty".into());
        }
        for (key, pinned) in [
            ("jwt_issuer", &c.jwt_issuer),
            ("jwt_audience", &c.jwt_audience),
        ] {
            if pinned.as_deref().is_some_and(|v| v.trim().is_empty()) {
                errs.push(format!(
                    "client.{key} must not be empty (leave it out to not pin it)"
                ));
            }
        }
        if !(100..=600_000).contains(&c.ping_interval_ms) {
            errs.push(format!(
                "client.ping_interval_ms = {}: must be 100..=600000",
                c.ping_interval_ms
            ));
        }
        if c.idle_timeout_ms <= c.ping_interval_ms || c.idle_timeout_ms > 3_600_000 {
            errs.push(format!(
                "client.idle_timeout_ms = {}: must be more than client.ping_interval_ms ({}) and at most 3600000",
                c.idle_timeout_ms, c.ping_interval_ms
            ));
        }
        if c.listen == self.admin.listen && c.listen.port() != 0 {
            errs.push(format!(
                "client.listen and admin.listen are both {}",
                c.listen
            ));
        }
        if is_placeholder(&self.admin.token) {
            errs.push("admin.token (or DTFED_ADMIN_TOKEN) is a placeholder from an example: make a real one, e.g. `head -c 32 /dev/urandom | base64`".into());
        }
        if self.admin.token.is_empty() && !self.admin.listen.ip().is_loopback() {
            errs.push(format!(
                "admin.listen = {} is not loopback and admin.token (DTFED_ADMIN_TOKEN) is empty: \
                 /status and /metrics would be open to the network; set a token, or listen on loopback",
                self.admin.listen
            ));
        }
        let k = &self.kafka;
        if k.brokers.trim().is_empty() {
            errs.push("kafka.brokers must name at least one broker".into());
        }
        if !valid_topic(&k.local_topic) {
            errs.push(format!(
                "kafka.local_topic {:?}: must be 1-249 characters of [A-Za-z0-9._-]",
                k.local_topic
            ));
        }
        if k.partitions < 1 {
            errs.push(format!(
                "kafka.partitions = {}: must be at least 1",
                k.partitions
            ));
        }
        if k.replication_factor < 1 {
            errs.push(format!(
                "kafka.replication_factor = {}: must be at least 1",
                k.replication_factor
            ));
        }
        if k.publish_timeout_ms < 100 {
            errs.push(format!(
                "kafka.publish_timeout_ms = {}: must be at least 100",
                k.publish_timeout_ms
            ));
        }
        if k.fanout_group.is_empty() {
            errs.push("kafka.fanout_group must not be empty".into());
        }
        if !(1_000..=300_000).contains(&k.session_timeout_ms) {
            errs.push(format!(
                "kafka.session_timeout_ms = {}: must be 1000..=300000",
                k.session_timeout_ms
            ));
        }
        if k.linger_ms > 1_000 {
            errs.push(format!(
                "kafka.linger_ms = {}: must be 0..=1000 (every publish waits for it)",
                k.linger_ms
            ));
        }
        if let Some(r) = &self.redis {
            if !(r.url.starts_with("redis://")
                || r.url.starts_with("rediss://")
                || r.url.starts_with("unix://"))
            {
                errs.push(format!(
                    "redis.url {:?}: must start with redis://, rediss:// or unix://",
                    r.url
                ));
            }
            if r.key_prefix.is_empty()
                || r.key_prefix
                    .contains(|ch: char| ch.is_whitespace() || ch == '{' || ch == '}')
            {
                errs.push(format!(
                    "redis.key_prefix {:?}: must be non-empty, without spaces or braces",
                    r.key_prefix
                ));
            }
        }
        errs.extend(self.stomp.validate());
        if self.history.max_messages == 0 {
            errs.push("history.max_messages must be at least 1".into());
        }
        if self.history.max_age_secs == 0 {
            errs.push("history.max_age_secs must be at least 1".into());
        }
        if let Some(api) = &self.api {
            errs.extend(api.validate());
        }
        if let Some(f) = &self.federation {
            errs.extend(f.validate(&self.region));
            if let Some(e) = frame_limit_vs_link(c.max_frame_bytes) {
                errs.push(e);
            }
            if f.max_streams_per_peer < usize::try_from(k.partitions).unwrap_or(0) {
                errs.push(format!(
                    "federation.max_streams_per_peer = {}: must be at least kafka.partitions \
                     ({}): a peer mirrors each partition over a stream of its own",
                    f.max_streams_per_peer, k.partitions
                ));
            }
            let clash = f.listen == self.client.listen || f.listen == self.admin.listen;
            if clash && f.listen.port() != 0 {
                errs.push(format!(
                    "federation.listen {} clashes with another listener",
                    f.listen
                ));
            }
        }
        errs
    }

    /// What is allowed but probably a mistake; `dtfed check-config` prints these and the
    /// daemon logs them at start.
    pub fn warnings(&self) -> Vec<String> {
        let mut warns = Vec::new();
        if self.client.auth == AuthMode::None && !self.client.listen.ip().is_loopback() {
            warns.push(format!(
                "client.auth = \"none\" on {}, which is not loopback: anyone who reaches it can \
                 connect under any name; use auth = \"jwt\" outside demos and tests",
                self.client.listen
            ));
        }
        warns
    }

    /// This daemon's node name.
    pub fn node_name(&self) -> String {
        self.node.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|_| "node".into());
            format!("{host}-{}", std::process::id())
        })
    }
}

/// The placeholder secrets shipped in `deploy/kubernetes/secret.example.yaml` (and
/// anything shaped like them), which must never reach production.
pub(crate) fn is_placeholder(secret: &str) -> bool {
    let s = secret.to_ascii_lowercase();
    s.contains("replace-me") || s.contains("changeme") || s.contains("change-me")
}

/// Room id, player, timestamp and headers a stored record adds to the publish frame's body,
/// bounded from above (room ≤ 128 B, player ≤ 64 B, the link's mirror headers).
const RECORD_OVERHEAD_BOUND: usize = 4 * 1024;

/// A publish as large as `client.max_frame_bytes` must still fit in one link frame once
/// stored, or the record could never be mirrored and its partition's mirror would stop at
/// it for good.
fn frame_limit_vs_link(max_frame_bytes: usize) -> Option<String> {
    let max = dtfed_proto::link::MAX_RECORD_BYTES - RECORD_OVERHEAD_BOUND;
    (max_frame_bytes > max).then(|| {
        format!(
            "client.max_frame_bytes = {max_frame_bytes}: with [federation], must be at most \
             {max} (a stored message must fit in one region link frame of {} bytes)",
            dtfed_proto::link::MAX_FRAME_BYTES
        )
    })
}

fn valid_topic(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 249
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
region = "seoul"
[client]
auth = "none"
[kafka]
brokers = "127.0.0.1:9092"
[redis]
url = "redis://127.0.0.1:6379"
"#;

    #[test]
    fn minimal_config_has_sane_defaults() {
        let cfg = Config::from_toml(MINIMAL, |_| None).expect("valid");
        assert_eq!(cfg.client.max_frame_bytes, 65536);
        assert_eq!(cfg.kafka.local_topic, "dtfed.local");
        assert_eq!(cfg.client.auth, AuthMode::None);
    }

    #[test]
    fn producer_linger_is_bounded() {
        let cfg = Config::from_toml(MINIMAL, |_| None).expect("valid");
        assert_eq!(cfg.kafka.linger_ms, 0, "publishes leave at once by default");
        let text = MINIMAL.replace("[redis]", "linger_ms = 2\n[redis]");
        assert_eq!(
            Config::from_toml(&text, |_| None)
                .expect("valid")
                .kafka
                .linger_ms,
            2
        );
        let text = MINIMAL.replace("[redis]", "linger_ms = 5000\n[redis]");
        let errs = Config::from_toml(&text, |_| None).expect_err("invalid").0;
        assert!(
            errs.iter().any(|e| e.contains("kafka.linger_ms")),
            "{errs:#?}"
        );
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let text = r#"
region = "Seoul!"
[client]
max_frame_bytes = 1
auth = "jwt"
[kafka]
brokers = ""
partitions = 0
[redis]
url = "http://x"
"#;
        let errs = Config::from_toml(text, |_| None).expect_err("invalid").0;
        assert_eq!(errs.len(), 6, "{errs:#?}");
        assert!(errs.iter().any(|e| e.contains("region")));
        assert!(errs.iter().any(|e| e.contains("jwt_secret")));
        assert!(errs.iter().any(|e| e.contains("redis.url")));
    }

    #[test]
    fn keepalive_and_jwt_pinning_are_validated() {
        let cfg = Config::from_toml(MINIMAL, |_| None).expect("valid");
        assert!(cfg.client.idle_timeout_ms > cfg.client.ping_interval_ms);
        let with = |client: &str| {
            MINIMAL.replace("auth = \"none\"", &format!("auth = \"none\"\n{client}"))
        };
        let ok = Config::from_toml(
            &with("ping_interval_ms = 500\nidle_timeout_ms = 1500\njwt_issuer = \"login\""),
            |_| None,
        )
        .expect("valid");
        assert_eq!(ok.client.idle_timeout_ms, 1500);
        assert_eq!(ok.client.jwt_issuer.as_deref(), Some("login"));
        for (bad, key) in [
            ("ping_interval_ms = 0", "client.ping_interval_ms"),
            (
                "ping_interval_ms = 5000\nidle_timeout_ms = 5000",
                "client.idle_timeout_ms",
            ),
            ("idle_timeout_ms = 10", "client.idle_timeout_ms"),
            ("jwt_audience = \"\"", "client.jwt_audience"),
        ] {
            let errs = Config::from_toml(&with(bad), |_| None).expect_err(bad).0;
            assert!(errs.iter().any(|e| e.contains(key)), "{bad}: {errs:#?}");
        }
    }

    #[test]
    fn frame_limit_must_fit_the_region_link() {
        let fed = "[federation]\nlisten = \"127.0.0.1:7000\"\nca_cert = \"ca.crt\"\n\
                   cert = \"c.crt\"\nkey = \"c.key\"\n";
        let big = MINIMAL.replace(
            "auth = \"none\"",
            "auth = \"none\"\nmax_frame_bytes = 10485760",
        );
        // Alone, a region may take large frames; with federation they could never be
        // mirrored. Every other error is still reported beside it.
        assert!(Config::from_toml(&big, |_| None).is_ok());
        let text = format!("{}{fed}", big.replace("[kafka]", "[kafka]\npartitions = 0"));
        let errs = Config::from_toml(&text, |_| None).expect_err("invalid").0;
        assert_eq!(errs.len(), 2, "{errs:#?}");
        assert!(
            errs.iter()
                .any(|e| e.contains("client.max_frame_bytes") && e.contains("region link")),
            "{errs:#?}"
        );
        assert!(
            errs.iter().any(|e| e.contains("kafka.partitions")),
            "{errs:#?}"
        );
        let ok = MINIMAL.replace(
            "auth = \"none\"",
            "auth = \"none\"\nmax_frame_bytes = 4194304",
        );
        assert!(Config::from_toml(&format!("{ok}{fed}"), |_| None).is_ok());
        // A peer mirrors each partition over a stream of its own.
        let few = format!(
            "{}{fed}max_streams_per_peer = 4\n",
            MINIMAL.replace("[kafka]", "[kafka]\npartitions = 8")
        );
        let errs = Config::from_toml(&few, |_| None).expect_err("invalid").0;
        assert!(
            errs.iter()
                .any(|e| e.contains("federation.max_streams_per_peer = 4")),
            "{errs:#?}"
        );
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = Config::from_toml(&format!("{MINIMAL}\n[history]\nmax_mesages = 3\n"), |_| {
            None
        })
        .expect_err("typo");
        assert!(err.to_string().contains("max_mesages"), "{err}");
    }

    #[test]
    fn secrets_come_from_the_environment() {
        let text = MINIMAL.replace("auth = \"none\"", "auth = \"jwt\"");
        let cfg = Config::from_toml(&text, |k| {
            (k == "DTFED_JWT_SECRET").then(|| "0123456789abcdef0123".to_owned())
        })
        .expect("secret from env");
        assert_eq!(cfg.client.jwt_secret, "0123456789abcdef0123");
    }

    #[test]
    fn auth_must_be_stated() {
        let text = MINIMAL.replace("[client]\nauth = \"none\"\n", "");
        let errs = Config::from_toml(&text, |_| None).expect_err("no auth").0;
        assert!(
            errs.iter()
                .any(|e| e.contains("client.auth must be stated")),
            "{errs:#?}"
        );
    }

    #[test]
    fn no_auth_on_a_public_listener_is_a_warning() {
        let cfg = Config::from_toml(MINIMAL, |_| None).expect("valid");
        assert!(cfg.warnings().is_empty(), "loopback: {:?}", cfg.warnings());
        let text = MINIMAL.replace("[client]", "[client]\nlisten = \"0.0.0.0:8080\"");
        let cfg = Config::from_toml(&text, |_| None).expect("allowed");
        let warns = cfg.warnings();
        assert!(
            warns.len() == 1 && warns[0].contains("0.0.0.0:8080"),
            "{warns:?}"
        );
    }

    #[test]
    fn the_shipped_placeholder_secrets_are_refused() {
        let example = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/secret.example.yaml"),
        )
        .expect("deploy/kubernetes/secret.example.yaml");
        let value = |key: &str| {
            example
                .lines()
                .find_map(|l| l.trim().strip_prefix(&format!("{key}:")))
                .map(|v| v.trim().trim_matches('"').to_owned())
                .unwrap_or_else(|| panic!("{key} in the example"))
        };
        let (jwt, admin) = (value("DTFED_JWT_SECRET"), value("DTFED_ADMIN_TOKEN"));
        let text = MINIMAL.replace("auth = \"none\"", "auth = \"jwt\"");
        let errs = Config::from_toml(&text, |k| match k {
            "DTFED_JWT_SECRET" => Some(jwt.clone()),
            "DTFED_ADMIN_TOKEN" => Some(admin.clone()),
            _ => None,
        })
        .expect_err("placeholders")
        .0;
        assert!(
            errs.iter().any(|e| e.contains("client.jwt_secret")),
            "{errs:#?}"
        );
        assert!(errs.iter().any(|e| e.contains("admin.token")), "{errs:#?}");
    }

    #[test]
    fn an_open_admin_listener_needs_a_token() {
        let text = MINIMAL.replace("[kafka]", "[admin]\nlisten = \"0.0.0.0:9090\"\n[kafka]");
        let errs = Config::from_toml(&text, |_| None)
            .expect_err("open admin")
            .0;
        assert!(errs.iter().any(|e| e.contains("admin.listen")), "{errs:#?}");
        Config::from_toml(&text, |k| {
            (k == "DTFED_ADMIN_TOKEN").then(|| "0123456789abcdef0123".to_owned())
        })
        .expect("with a token");
    }

    #[test]
    fn passwords_are_kept_out_of_logged_urls() {
        assert_eq!(
            redact_url("redis://:hunter2@10.0.0.1:6379/0"),
            "redis://:***@10.0.0.1:6379/0"
        );
        assert_eq!(
            redact_url("rediss://app:p@ss@redis.internal"),
            "rediss://app:***@redis.internal"
        );
        assert_eq!(redact_url("redis://tok@h:1"), "redis://***@h:1");
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(
            redact_url("unix:///run/redis.sock"),
            "unix:///run/redis.sock"
        );
    }
}
