//! The `[stomp]` config section and its destination table: which STOMP destinations a client
//! may SUBSCRIBE or SEND to, and the room each one names. Start with [`StompConfig`] and
//! [`DestinationTable::resolve`].
//!
//! A destination pattern is a literal path with exactly one `{id}` placeholder, which
//! matches one segment: 1 or more characters without `/` (`/sub/chat/room/{id}`). The room
//! template says what room that is, with the same `{id}` (`{id}`, `aichat.{id}`). The
//! result must be a valid room id, else the destination is refused like one outside the
//! table. The first entry that matches (for the frame's use) wins.

use dtfed_proto::RoomId;
use serde::Deserialize;

/// What a destination may be used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DestinationUse {
    Subscribe,
    Send,
    Both,
}

impl DestinationUse {
    fn allows(self, want: DestinationUse) -> bool {
        self == DestinationUse::Both || self == want
    }
}

/// One row of the table.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Destination {
    /// e.g. `/sub/chat/room/{id}`.
    pub pattern: String,
    /// e.g. `{id}` or `aichat.{id}`.
    pub room: String,
    #[serde(rename = "use")]
    pub usage: DestinationUse,
}

/// `[stomp]`: STOMP 1.0–1.2 over WebSocket at `/stomp` on the client listener.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StompConfig {
    pub enabled: bool,
    /// What `CONNECTED` offers: the server sends a heart-beat every `[0]` ms at least and
    /// wants one every `[1]` ms (each 0 for none); STOMP's negotiation takes the larger of
    /// this and the client's.
    pub heart_beat_ms: [u64; 2],
    pub destinations: Vec<Destination>,
}

impl Default for StompConfig {
    fn default() -> Self {
        let row = |pattern: &str, room: &str, usage| Destination {
            pattern: pattern.into(),
            room: room.into(),
            usage,
        };
        StompConfig {
            enabled: true,
            heart_beat_ms: [30_000, 30_000],
            destinations: vec![
                row("/sub/chat/room/{id}", "{id}", DestinationUse::Subscribe),
                row("/pub/chat/room/{id}", "{id}", DestinationUse::Send),
                row(
                    "/sub/aichat/room/{id}",
                    "aichat.{id}",
                    DestinationUse::Subscribe,
                ),
                row("/pub/aichat/room/{id}", "aichat.{id}", DestinationUse::Send),
            ],
        }
    }
}

const PLACEHOLDER: &str = "{id}";
/// Longest destination accepted at all (longer ones are refused before matching).
pub const MAX_DESTINATION_LEN: usize = 512;

impl StompConfig {
    /// Every problem with the section, as `stomp....` messages.
    pub fn validate(&self) -> Vec<String> {
        let mut errs = Vec::new();
        for (i, hb) in self.heart_beat_ms.iter().enumerate() {
            if *hb != 0 && !(100..=3_600_000).contains(hb) {
                errs.push(format!(
                    "stomp.heart_beat_ms[{i}] = {hb}: must be 0 (none) or 100..=3600000"
                ));
            }
        }
        if self.enabled && self.destinations.is_empty() {
            errs.push("stomp.destinations is empty: a STOMP client could use no room (set stomp.enabled = false instead)".into());
        }
        for (i, d) in self.destinations.iter().enumerate() {
            let at = format!("stomp.destinations[{i}]");
            if !d.pattern.starts_with('/') || d.pattern.len() > MAX_DESTINATION_LEN {
                errs.push(format!(
                    "{at}.pattern {:?}: must start with / and be at most {MAX_DESTINATION_LEN} bytes",
                    d.pattern
                ));
            }
            if d.pattern.matches(PLACEHOLDER).count() != 1 {
                errs.push(format!(
                    "{at}.pattern {:?}: must hold {PLACEHOLDER} exactly once",
                    d.pattern
                ));
            } else if let Some((_, after)) = d.pattern.split_once(PLACEHOLDER) {
                if !(after.is_empty() || after.starts_with('/')) {
                    errs.push(format!(
                        "{at}.pattern {:?}: {PLACEHOLDER} must be a whole path segment (followed by / or the end)",
                        d.pattern
                    ));
                }
            }
            if d.room.matches(PLACEHOLDER).count() != 1 {
                errs.push(format!(
                    "{at}.room {:?}: must hold {PLACEHOLDER} exactly once",
                    d.room
                ));
            } else if RoomId::parse(&d.room.replace(PLACEHOLDER, "x")).is_err() {
                errs.push(format!(
                    "{at}.room {:?}: with {PLACEHOLDER} filled in it must be a room id (1-128 bytes of [A-Za-z0-9._:-])",
                    d.room
                ));
            }
        }
        errs
    }

    pub fn table(&self) -> DestinationTable {
        DestinationTable {
            rows: self.destinations.clone(),
        }
    }
}

/// The validated table, as the sessions use it.
#[derive(Clone, Debug)]
pub struct DestinationTable {
    rows: Vec<Destination>,
}

/// Why a destination names no room.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DestinationError {
    #[error("destination {0:?} is not one this server serves for {1}")]
    Unknown(String, &'static str),
    #[error("destination {0:?} names room {1:?}, which is not a valid room id")]
    BadRoom(String, String),
}

impl DestinationTable {
    /// The room `destination` names for `usage` (`Subscribe` or `Send`).
    pub fn resolve(
        &self,
        destination: &str,
        usage: DestinationUse,
    ) -> Result<RoomId, DestinationError> {
        let what = match usage {
            DestinationUse::Send => "SEND",
            _ => "SUBSCRIBE",
        };
        let unknown = || {
            let mut shown = destination.to_owned();
            if shown.len() > 128 {
                let mut end = 128;
                while !shown.is_char_boundary(end) {
                    end -= 1;
                }
                shown.truncate(end);
            }
            DestinationError::Unknown(shown, what)
        };
        if destination.len() > MAX_DESTINATION_LEN {
            return Err(unknown());
        }
        for row in self.rows.iter().filter(|r| r.usage.allows(usage)) {
            let Some((before, after)) = row.pattern.split_once(PLACEHOLDER) else {
                continue;
            };
            let Some(id) = destination
                .strip_prefix(before)
                .and_then(|rest| rest.strip_suffix(after))
            else {
                continue;
            };
            if id.is_empty() || id.contains('/') {
                continue;
            }
            let room = row.room.replace(PLACEHOLDER, id);
            return RoomId::parse(&room)
                .map_err(|_| DestinationError::BadRoom(destination.to_owned(), room));
        }
        Err(unknown())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_map_the_seed_destinations() {
        let cfg = StompConfig::default();
        assert!(cfg.validate().is_empty());
        let t = cfg.table();
        let sub = DestinationUse::Subscribe;
        let send = DestinationUse::Send;
        assert_eq!(t.resolve("/sub/chat/room/42", sub).unwrap().as_str(), "42");
        assert_eq!(t.resolve("/pub/chat/room/42", send).unwrap().as_str(), "42");
        assert_eq!(
            t.resolve("/sub/aichat/room/7", sub).unwrap().as_str(),
            "aichat.7"
        );
        assert_eq!(
            t.resolve("/pub/aichat/room/7", send).unwrap().as_str(),
            "aichat.7"
        );
        // Wrong use, outside the table, empty or nested id, not a room.
        assert!(t.resolve("/pub/chat/room/42", sub).is_err());
        assert!(t.resolve("/sub/chat/room/42", send).is_err());
        assert!(t.resolve("/topic/42", sub).is_err());
        assert!(t.resolve("/sub/chat/room/", sub).is_err());
        assert!(t.resolve("/sub/chat/room/a/b", sub).is_err());
        assert!(matches!(
            t.resolve("/sub/chat/room/a b", sub),
            Err(DestinationError::BadRoom(..))
        ));
    }

    #[test]
    fn validation_reports_every_bad_row() {
        let cfg: StompConfig = toml::from_str(
            r#"
            heart_beat_ms = [5, 0]
            [[destinations]]
            pattern = "no-slash/{id}"
            room = "{id}"
            use = "both"
            [[destinations]]
            pattern = "/a/{id}{id}"
            room = "r"
            use = "send"
            [[destinations]]
            pattern = "/a/{id}x"
            room = "bad room {id}"
            use = "subscribe"
            "#,
        )
        .unwrap();
        let errs = cfg.validate();
        assert_eq!(errs.len(), 6, "{errs:#?}");
        assert!(toml::from_str::<StompConfig>(
            "[[destinations]]\npattern=\"/a/{id}\"\nroom=\"{id}\"\nuse=\"read\""
        )
        .is_err());
        assert!(toml::from_str::<StompConfig>("unknown = 1").is_err());
    }

    /// The example config documents the defaults as they are: the two cannot drift.
    #[test]
    fn the_example_config_states_the_defaults() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/region.toml");
        let text = std::fs::read_to_string(&path).expect("deploy/examples/region.toml");
        let table: toml::Table = toml::from_str(&text).expect("the example is TOML");
        let stomp: StompConfig = table
            .get("stomp")
            .expect("[stomp] in the example")
            .clone()
            .try_into()
            .expect("[stomp] of the example");
        assert!(stomp.validate().is_empty());
        assert_eq!(stomp, StompConfig::default());
    }

    #[test]
    fn middle_placeholder_and_both() {
        let cfg: StompConfig = toml::from_str(
            "[[destinations]]\npattern=\"/game/{id}/chat\"\nroom=\"g.{id}\"\nuse=\"both\"",
        )
        .unwrap();
        assert!(cfg.validate().is_empty());
        let t = cfg.table();
        assert_eq!(
            t.resolve("/game/7/chat", DestinationUse::Send)
                .unwrap()
                .as_str(),
            "g.7"
        );
        assert_eq!(
            t.resolve("/game/7/chat", DestinationUse::Subscribe)
                .unwrap()
                .as_str(),
            "g.7"
        );
        assert!(t.resolve("/game/7/chatter", DestinationUse::Send).is_err());
    }
}
