//! Server API keys: the `[api]` config section (`[[api.keys]]`: a name, the environment
//! variable holding the secret, the room patterns the key may use, a publish rate), its
//! validation, and finding the key a caller's bearer secret belongs to.
//!
//! The secret itself is never in the file: `secret_env` names the variable it is read from
//! when the config is loaded ([`ApiConfig::resolve_secrets`]), so a config file can be
//! shared, committed or printed. Room patterns are those of the JWT rooms claim: exact ids,
//! or prefixes ending in `*` (`*` alone is every room).

use std::sync::Mutex;
use std::time::Instant;

use serde::Deserialize;

use crate::gateway::auth::room_allowed;
use crate::gateway::limits::TokenBucket;

/// Longest key name, in bytes (it is part of every idempotency key and log line).
pub const MAX_KEY_NAME_LEN: usize = 64;
/// Shortest secret accepted.
pub const MIN_SECRET_LEN: usize = 16;

/// `[api]`: the server API for game servers, on the client listener. Absent: no API.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// The keys; at least one.
    #[serde(default)]
    pub keys: Vec<ApiKeyConfig>,
}

/// `[[api.keys]]`: one caller (a game server, a bot).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// Who the key is, in logs and in the idempotency of its publishes: 1-64 bytes of
    /// `[A-Za-z0-9._-]`, unique.
    pub name: String,
    /// The environment variable holding the secret (at least 16 bytes).
    pub secret_env: String,
    /// Room patterns the key may read and publish in: `table-7`, `table-*`, or `*`.
    pub rooms: Vec<String>,
    /// Publishes per second this key may make on one daemon, and the burst.
    #[serde(default = "default_rate")]
    pub publish_rate_per_sec: u32,
    #[serde(default = "default_burst")]
    pub publish_burst: u32,
    /// Read from `secret_env` at load time; never from the file.
    #[serde(skip)]
    pub secret: String,
}

fn default_rate() -> u32 {
    50
}

fn default_burst() -> u32 {
    100
}

impl std::fmt::Debug for ApiKeyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeyConfig")
            .field("name", &self.name)
            .field("secret_env", &self.secret_env)
            .field("rooms", &self.rooms)
            .field("publish_rate_per_sec", &self.publish_rate_per_sec)
            .field("publish_burst", &self.publish_burst)
            .field("secret", &"***")
            .finish()
    }
}

impl ApiConfig {
    /// Reads every key's secret from the environment variable it names.
    pub fn resolve_secrets(&mut self, env: impl Fn(&str) -> Option<String>) {
        for key in &mut self.keys {
            key.secret = env(&key.secret_env).unwrap_or_default();
        }
    }

    /// Every problem, each naming the key it is about.
    pub fn validate(&self) -> Vec<String> {
        let mut errs = Vec::new();
        if self.keys.is_empty() {
            errs.push("[api] needs at least one [[api.keys]] (or leave [api] out)".to_owned());
        }
        for (i, key) in self.keys.iter().enumerate() {
            let at = format!("api.keys[{i}] ({:?})", key.name);
            if !valid_key_name(&key.name) {
                errs.push(format!(
                    "{at}: name must be 1-{MAX_KEY_NAME_LEN} bytes of [A-Za-z0-9._-]"
                ));
            }
            if self.keys[..i].iter().any(|k| k.name == key.name) {
                errs.push(format!("{at}: the name is used by another key"));
            }
            let env_ok = !key.secret_env.is_empty()
                && key
                    .secret_env
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
            if !env_ok {
                errs.push(format!(
                    "{at}: secret_env {:?} must be an environment variable name of [A-Z0-9_]",
                    key.secret_env
                ));
            } else if key.secret.is_empty() {
                errs.push(format!(
                    "{at}: the environment variable {} (secret_env) is not set",
                    key.secret_env
                ));
            } else if key.secret.len() < MIN_SECRET_LEN {
                errs.push(format!(
                    "{at}: the secret in {} is shorter than {MIN_SECRET_LEN} bytes",
                    key.secret_env
                ));
            } else if crate::config::is_placeholder(&key.secret) {
                errs.push(format!(
                    "{at}: the secret in {} is a placeholder from an example: make a real one, \
                     e.g. `head -c 32 /dev/urandom | base64`",
                    key.secret_env
                ));
            } else if self.keys[..i]
                .iter()
                .any(|k| !k.secret.is_empty() && k.secret == key.secret)
            {
                errs.push(format!(
                    "{at}: has the same secret as another key (each caller needs its own)"
                ));
            }
            if key.rooms.is_empty() {
                errs.push(format!(
                    "{at}: rooms must list at least one pattern (\"*\" for every room)"
                ));
            }
            for p in &key.rooms {
                if !valid_pattern(p) {
                    errs.push(format!(
                        "{at}: room pattern {p:?} must be a room id, or a room id prefix followed by one `*`"
                    ));
                }
            }
            if key.publish_rate_per_sec == 0 || key.publish_burst == 0 {
                errs.push(format!(
                    "{at}: publish_rate_per_sec and publish_burst must be at least 1"
                ));
            }
        }
        errs
    }
}

fn valid_key_name(name: &str) -> bool {
    (1..=MAX_KEY_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A room id, or a prefix of one followed by a single `*` at the end.
fn valid_pattern(p: &str) -> bool {
    let prefix = p.strip_suffix('*').unwrap_or(p);
    let room_like = |s: &str| {
        s.len() <= dtfed_proto::room::MAX_ROOM_LEN
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
    };
    (p.ends_with('*') || !prefix.is_empty()) && room_like(prefix)
}

/// One configured key, with its rate limits on this daemon.
pub struct ApiKey {
    pub name: String,
    secret: String,
    rooms: Vec<String>,
    pub publish_rate_per_sec: u32,
    publishes: Mutex<TokenBucket>,
    log_reads: Mutex<TokenBucket>,
}

/// Reads that need the Kafka log, per key and daemon: as a player's `sub` with `since`.
const LOG_READS_PER_SEC: u32 = 4;
const LOG_READ_BURST: u32 = 16;

impl ApiKey {
    /// Whether this key may read and publish in `room`.
    pub fn may_use(&self, room: &str) -> bool {
        room_allowed(&self.rooms, room)
    }

    /// Takes a publish from the key's bucket; false when over its rate.
    pub fn take_publish(&self) -> bool {
        take(&self.publishes)
    }

    /// Takes a log read from the key's bucket; false when over its rate.
    pub fn take_log_read(&self) -> bool {
        take(&self.log_reads)
    }
}

fn take(bucket: &Mutex<TokenBucket>) -> bool {
    bucket
        .lock()
        .map(|mut b| b.take(Instant::now()))
        .unwrap_or(false)
}

/// The keys of one daemon.
pub struct ApiKeys {
    keys: Vec<ApiKey>,
}

impl ApiKeys {
    pub fn new(cfg: &ApiConfig) -> ApiKeys {
        ApiKeys {
            keys: cfg
                .keys
                .iter()
                .map(|k| ApiKey {
                    name: k.name.clone(),
                    secret: k.secret.clone(),
                    rooms: k.rooms.clone(),
                    publish_rate_per_sec: k.publish_rate_per_sec,
                    publishes: Mutex::new(TokenBucket::new(
                        k.publish_rate_per_sec,
                        k.publish_burst,
                    )),
                    log_reads: Mutex::new(TokenBucket::new(LOG_READS_PER_SEC, LOG_READ_BURST)),
                })
                .collect(),
        }
    }

    /// The key whose secret is `secret`. Every key is compared, each in time independent
    /// of where the bytes differ, so the answer's timing does not leak a secret's prefix.
    /// An empty or short secret matches nothing, whatever the config held.
    pub fn find(&self, secret: &str) -> Option<&ApiKey> {
        if secret.len() < MIN_SECRET_LEN {
            return None;
        }
        let mut found = None;
        for key in &self.keys {
            if constant_time_eq(key.secret.as_bytes(), secret.as_bytes()) {
                found = Some(key);
            }
        }
        found
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str, env: &str, rooms: &[&str]) -> ApiKeyConfig {
        ApiKeyConfig {
            name: name.into(),
            secret_env: env.into(),
            rooms: rooms.iter().map(|r| (*r).to_owned()).collect(),
            publish_rate_per_sec: 5,
            publish_burst: 5,
            secret: String::new(),
        }
    }

    #[test]
    fn secrets_come_from_the_environment_and_are_checked() {
        let mut cfg = ApiConfig {
            keys: vec![
                key("gm", "GM_KEY", &["table-*"]),
                key("bot", "BOT_KEY", &["*"]),
                key("gm", "lower", &["bad room", "a*b", ""]),
                key("short", "SHORT_KEY", &[]),
            ],
        };
        cfg.resolve_secrets(|k| match k {
            "GM_KEY" => Some("0123456789abcdef-gm".into()),
            "BOT_KEY" => Some("0123456789abcdef-bot".into()),
            "SHORT_KEY" => Some("short".into()),
            _ => None,
        });
        let errs = cfg.validate();
        let has = |what: &str| errs.iter().any(|e| e.contains(what));
        assert!(has("api.keys[2] (\"gm\"): the name is used"), "{errs:#?}");
        assert!(has("secret_env \"lower\""), "{errs:#?}");
        assert!(has("\"bad room\""), "{errs:#?}");
        assert!(has("\"a*b\""), "{errs:#?}");
        assert!(has("pattern \"\""), "{errs:#?}");
        assert!(has("shorter than 16"), "{errs:#?}");
        assert!(has("api.keys[3] (\"short\"): rooms must list"), "{errs:#?}");
        assert_eq!(errs.len(), 7, "{errs:#?}");
        assert!(!format!("{:?}", cfg.keys[0]).contains("0123456789"));

        let keys = ApiKeys::new(&cfg);
        let gm = keys.find("0123456789abcdef-gm").expect("gm's secret");
        assert_eq!(gm.name, "gm");
        assert!(gm.may_use("table-9") && !gm.may_use("lobby"));
        assert!(keys.find("0123456789abcdef-gX").is_none());
        assert!(keys.find("").is_none());
        assert!(keys
            .find("0123456789abcdef-bot")
            .is_some_and(|k| k.may_use("any")));
    }

    #[test]
    fn the_daemon_config_reads_and_checks_api_keys_with_everything_else() {
        let base = "region = \"seoul\"\n[client]\nauth = \"none\"\n[kafka]\nbrokers = \"k:9092\"\n";
        let key = "[[api.keys]]\nname = \"gm\"\nsecret_env = \"GM_KEY\"\nrooms = [\"*\"]\n";
        let cfg = crate::config::Config::from_toml(&format!("{base}{key}"), |k| {
            (k == "GM_KEY").then(|| "0123456789abcdef-gm".to_owned())
        })
        .expect("valid");
        let api = cfg.api.expect("[api]");
        assert_eq!(api.keys[0].secret, "0123456789abcdef-gm");
        // Unset secret and another error: both reported at once.
        let text = format!("{base}partitions = 0\n{key}");
        let errs = crate::config::Config::from_toml(&text, |_| None)
            .expect_err("invalid")
            .0;
        assert!(
            errs.iter()
                .any(|e| e.contains("GM_KEY (secret_env) is not set")),
            "{errs:#?}"
        );
        assert!(
            errs.iter().any(|e| e.contains("kafka.partitions")),
            "{errs:#?}"
        );
        // A secret in the file is not a thing: unknown keys are errors.
        let text = format!("{base}{key}secret = \"in-the-file-0123456789\"\n");
        let err = crate::config::Config::from_toml(&text, |_| None).expect_err("unknown key");
        assert!(err.to_string().contains("secret"), "{err}");
    }

    #[test]
    fn a_section_without_keys_is_refused() {
        assert_eq!(ApiConfig::default().validate().len(), 1);
    }
}
