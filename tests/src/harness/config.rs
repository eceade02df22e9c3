//! [`ConfigBuilder`]: the daemon's TOML config (`dtfed run --config`), with names unique to
//! one test so that tests can share one Kafka broker and one Redis.
//!
//! Every builder has a *namespace* `<test name>-<random>`; from it and the region come
//!
//! | setting | value |
//! | --- | --- |
//! | `kafka.local_topic` | `dtfed.<ns>.<region>.local` |
//! | `kafka.fanout_group` | `dtfed.<ns>.<region>.fanout` |
//! | `redis.key_prefix` | `dtfed:<ns>:<region>` |
//!
//! Daemons of one region in a test use clones of one builder (differing in
//! [`node`](ConfigBuilder::node)); another region of the same test uses
//! [`for_region`](ConfigBuilder::for_region) (same namespace). Everything else starts at
//! the documented defaults (`deploy/examples/region.toml`) with both listeners on
//! `127.0.0.1:0`; [`set`](ConfigBuilder::set) and [`merge_toml`](ConfigBuilder::merge_toml)
//! change any key, including sections this builder does not know.

use anyhow::{Context, Result};
use toml::{Table, Value};

use super::kafka::KafkaBroker;
use super::redis::RedisServer;
use super::util;

/// Builds one daemon's TOML config.
#[derive(Debug, Clone)]
pub struct ConfigBuilder {
    namespace: String,
    table: Table,
}

impl ConfigBuilder {
    /// Defaults for a daemon of `region`, named after `test_name` plus a random suffix.
    /// Kafka and Redis point at the usual local defaults until [`kafka`](Self::kafka) and
    /// [`redis`](Self::redis) are given.
    pub fn new(test_name: &str, region: &str) -> Self {
        let namespace = format!(
            "{}-{}",
            util::sanitize_name(test_name),
            util::random_suffix(6)
        );
        Self::with_namespace(namespace, region)
    }

    /// Like [`new`](Self::new), pointed at the test binary's shared Kafka broker and Redis
    /// (starting them if needed).
    pub fn shared(test_name: &str, region: &str) -> Result<Self> {
        Ok(Self::new(test_name, region)
            .kafka(&KafkaBroker::shared()?.bootstrap())
            .redis(&RedisServer::shared()?.url()))
    }

    fn with_namespace(namespace: String, region: &str) -> Self {
        let table: Table = toml::from_str(DEFAULTS).expect("the default config is valid TOML");
        let mut b = ConfigBuilder { namespace, table };
        b.rename_for(region);
        b
    }

    /// A builder for another region of the same test: same namespace, same Kafka and
    /// Redis addresses and settings, region-specific topic/group/prefix, no `node`.
    pub fn for_region(&self, region: &str) -> Self {
        let mut b = self.clone();
        b.rename_for(region);
        b.unset("", "node")
    }

    fn rename_for(&mut self, region: &str) {
        let ns = &self.namespace;
        let local_topic = format!("dtfed.{ns}.{region}.local");
        let fanout_group = format!("dtfed.{ns}.{region}.fanout");
        let key_prefix = format!("dtfed:{ns}:{region}");
        self.put("", "region", region.into());
        self.put("kafka", "local_topic", local_topic.into());
        self.put("kafka", "fanout_group", fanout_group.into());
        self.put("redis", "key_prefix", key_prefix.into());
    }

    /// The test namespace (`<test name>-<random>`).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// `node = "<node>"`.
    pub fn node(self, node: &str) -> Self {
        self.set("", "node", node)
    }

    /// `kafka.brokers`.
    pub fn kafka(self, brokers: &str) -> Self {
        self.set("kafka", "brokers", brokers)
    }

    /// `redis.url`.
    pub fn redis(self, url: &str) -> Self {
        self.set("redis", "url", url)
    }

    /// `kafka.partitions`.
    pub fn partitions(self, partitions: i64) -> Self {
        self.set("kafka", "partitions", partitions)
    }

    /// No practical per-connection publish limit (`client.publish_rate_per_sec` and
    /// `client.publish_burst` 100,000): for tests that publish as fast as they can.
    pub fn unthrottled(self) -> Self {
        self.set("client", "publish_rate_per_sec", 100_000)
            .set("client", "publish_burst", 100_000)
    }

    /// `client.auth = "jwt"` with `client.jwt_secret`.
    pub fn auth_jwt(self, secret: &str) -> Self {
        self.set("client", "auth", "jwt")
            .set("client", "jwt_secret", secret)
    }

    /// `admin.token`.
    pub fn admin_token(self, token: &str) -> Self {
        self.set("admin", "token", token)
    }

    /// Set `key` in `section` (`""` = top level) to any TOML value: strings, integers,
    /// booleans, arrays (`vec!["a"]`), or a [`toml::Value`].
    pub fn set(mut self, section: &str, key: &str, value: impl Into<Value>) -> Self {
        self.put(section, key, value.into());
        self
    }

    /// Remove `key` from `section` (`""` = top level), e.g. to test a default.
    pub fn unset(mut self, section: &str, key: &str) -> Self {
        if let Some(t) = self.section_mut(section, false) {
            t.remove(key);
        }
        self
    }

    /// Deep-merge a TOML snippet (sections and keys in `snippet` win). Panics with the
    /// parse error if the snippet is not valid TOML (a bug in the test).
    pub fn merge_toml(mut self, snippet: &str) -> Self {
        let extra: Table = toml::from_str(snippet)
            .with_context(|| format!("ConfigBuilder::merge_toml: invalid TOML:\n{snippet}"))
            .unwrap();
        merge(&mut self.table, extra);
        self
    }

    /// A value, e.g. `get("kafka", "local_topic")`.
    pub fn get(&self, section: &str, key: &str) -> Option<&Value> {
        if section.is_empty() {
            self.table.get(key)
        } else {
            self.table.get(section)?.as_table()?.get(key)
        }
    }

    fn get_str(&self, section: &str, key: &str) -> String {
        self.get(section, key)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    }

    /// `region`.
    pub fn region(&self) -> String {
        self.get_str("", "region")
    }

    /// `kafka.local_topic`.
    pub fn local_topic(&self) -> String {
        self.get_str("kafka", "local_topic")
    }

    /// `kafka.fanout_group`.
    pub fn fanout_group(&self) -> String {
        self.get_str("kafka", "fanout_group")
    }

    /// `redis.key_prefix`.
    pub fn key_prefix(&self) -> String {
        self.get_str("redis", "key_prefix")
    }

    /// The whole config as a TOML table.
    pub fn table(&self) -> &Table {
        &self.table
    }

    /// The config file's text.
    pub fn build(&self) -> String {
        toml::to_string(&self.table).expect("a toml::Table always serializes")
    }

    fn put(&mut self, section: &str, key: &str, value: Value) {
        self.section_mut(section, true)
            .expect("created")
            .insert(key.to_string(), value);
    }

    fn section_mut(&mut self, section: &str, create: bool) -> Option<&mut Table> {
        if section.is_empty() {
            return Some(&mut self.table);
        }
        if create && !self.table.contains_key(section) {
            self.table
                .insert(section.to_string(), Value::Table(Table::new()));
        }
        self.table.get_mut(section)?.as_table_mut()
    }
}

fn merge(into: &mut Table, from: Table) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(Value::Table(a)), Value::Table(b)) => merge(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

/// The defaults of `deploy/examples/region.toml`, with loopback port-0 listeners.
const DEFAULTS: &str = r#"
region = "test"

[client]
listen = "127.0.0.1:0"
max_frame_bytes = 65536
max_connections = 10000
outbound_queue = 1024
publish_rate_per_sec = 50
publish_burst = 100
allowed_origins = []
auth = "none"
jwt_secret = ""
jwt_rooms_claim = "rooms"
ping_interval_ms = 20000
idle_timeout_ms = 60000
chat_page = false

[admin]
listen = "127.0.0.1:0"
token = ""

[kafka]
brokers = "127.0.0.1:9092"
local_topic = "dtfed.local"
partitions = 8
replication_factor = 1
publish_timeout_ms = 5000
fanout_group = "dtfed-fanout"
session_timeout_ms = 6000
linger_ms = 0

[redis]
url = "redis://127.0.0.1:6379"
key_prefix = "dtfed"

[history]
max_messages = 1000
max_age_secs = 86400
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_and_overrides() {
        let a = ConfigBuilder::new("mod::some test", "seoul")
            .node("seoul-1")
            .kafka("127.0.0.1:1")
            .set("client", "max_frame_bytes", 1024)
            .set("client", "allowed_origins", vec!["http://x"]);
        let b = a.for_region("tokyo");
        assert_eq!(a.namespace(), b.namespace());
        assert!(a.local_topic().starts_with("dtfed.mod.some-test-"));
        assert!(a.local_topic().ends_with(".seoul.local"));
        assert!(b.fanout_group().ends_with(".tokyo.fanout"));
        assert_ne!(a.key_prefix(), b.key_prefix());
        assert!(b.get("", "node").is_none());
        assert_ne!(
            ConfigBuilder::new("x", "r").local_topic(),
            ConfigBuilder::new("x", "r").local_topic()
        );

        let text = a
            .merge_toml("[kafka]\npartitions = 2\n[federation]\npeers = []\n")
            .build();
        let t: Table = toml::from_str(&text).unwrap();
        assert_eq!(t["region"].as_str(), Some("seoul"));
        assert_eq!(t["node"].as_str(), Some("seoul-1"));
        assert_eq!(t["client"]["max_frame_bytes"].as_integer(), Some(1024));
        assert_eq!(t["kafka"]["partitions"].as_integer(), Some(2));
        assert_eq!(t["kafka"]["brokers"].as_str(), Some("127.0.0.1:1"));
        assert_eq!(t["kafka"]["replication_factor"].as_integer(), Some(1));
        assert!(t["federation"]["peers"].as_array().unwrap().is_empty());
    }

    #[test]
    fn defaults_match_the_documented_example() {
        // The example config must parse to the same keys (values may differ).
        let example =
            std::fs::read_to_string(util::repo_root().join("deploy/examples/region.toml"))
                .expect("deploy/examples/region.toml");
        let example: Table = toml::from_str(&example).expect("example is valid TOML");
        let defaults: Table = toml::from_str(DEFAULTS).unwrap();
        for (section, v) in &defaults {
            if let Value::Table(t) = v {
                let ex = example[section]
                    .as_table()
                    .unwrap_or_else(|| panic!("[{section}] missing in the example"));
                let mut a: Vec<_> = t.keys().collect();
                let mut b: Vec<_> = ex.keys().collect();
                a.sort();
                b.sort();
                assert_eq!(a, b, "keys of [{section}]");
            }
        }
    }
}
