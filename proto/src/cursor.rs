//! A player's position in a room: for each origin region, the last offset seen.
//!
//! Per (room, origin) offsets only grow, so a cursor is both the resume point and the
//! dedupe key: anything at or below `cursor[origin]` has been seen already.
//!
//! A cursor from a player is read with [`deserialize_bounded`]: at most [`MAX_ORIGINS`]
//! origins, each a valid region name, so one frame cannot make the gateway hold thousands
//! of made-up origins.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use crate::room::valid_region_name;

/// Most origins a player's cursor may name (regions of one federation).
pub const MAX_ORIGINS: usize = 64;

/// `{"<origin>": last_offset_seen, ...}`. An origin that is absent has seen nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Cursor(pub BTreeMap<String, i64>);

impl Cursor {
    pub fn new() -> Self {
        Self::default()
    }

    /// Last offset seen from `origin`, if any.
    pub fn get(&self, origin: &str) -> Option<i64> {
        self.0.get(origin).copied()
    }

    /// True when `(origin, offset)` is at or below the cursor, i.e. already seen.
    pub fn has_seen(&self, origin: &str, offset: i64) -> bool {
        self.get(origin).is_some_and(|last| offset <= last)
    }

    /// Moves the cursor forward to `offset` for `origin`; never moves it back.
    pub fn advance(&mut self, origin: &str, offset: i64) {
        match self.0.get_mut(origin) {
            Some(last) if *last >= offset => {}
            Some(last) => *last = offset,
            None => {
                self.0.insert(origin.to_owned(), offset);
            }
        }
    }

    pub fn origins(&self) -> impl Iterator<Item = (&str, i64)> {
        self.0.iter().map(|(k, v)| (k.as_str(), *v))
    }
}

/// Reads an optional cursor from a player: at most [`MAX_ORIGINS`] origins, each a valid
/// region name. Stops reading at the first origin too many, whatever the frame still holds.
pub fn deserialize_bounded<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Cursor>, D::Error> {
    struct Bounded;
    impl<'de> Visitor<'de> for Bounded {
        type Value = Option<Cursor>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(
                f,
                "a cursor: an object of at most {MAX_ORIGINS} region names to offsets"
            )
        }

        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut origins = BTreeMap::new();
            while let Some(origin) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                if origins.len() == MAX_ORIGINS {
                    return Err(serde::de::Error::custom(format!(
                        "cursor names more than {MAX_ORIGINS} origins"
                    )));
                }
                if !valid_region_name(&origin) {
                    return Err(serde::de::Error::custom(
                        "cursor origin is not a region name (1-32 of [a-z0-9-])",
                    ));
                }
                let offset: i64 = map.next_value()?;
                origins.insert(origin.into_owned(), offset);
            }
            Ok(Some(Cursor(origins)))
        }
    }
    d.deserialize_any(Bounded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Deserialize)]
    struct Since {
        #[serde(default, deserialize_with = "deserialize_bounded")]
        since: Option<Cursor>,
    }

    fn since(json: &str) -> Result<Option<Cursor>, serde_json::Error> {
        serde_json::from_str::<Since>(json).map(|s| s.since)
    }

    #[test]
    fn player_cursors_are_bounded() {
        assert_eq!(since("{}").unwrap(), None);
        assert_eq!(since(r#"{"since":null}"#).unwrap(), None);
        let c = since(r#"{"since":{"seoul":4,"tokyo":-1}}"#)
            .unwrap()
            .unwrap();
        assert_eq!(c.get("seoul"), Some(4));
        let full: BTreeMap<String, i64> = (0..MAX_ORIGINS).map(|i| (format!("r{i}"), 1)).collect();
        let json = format!(r#"{{"since":{}}}"#, serde_json::to_string(&full).unwrap());
        assert_eq!(since(&json).unwrap().unwrap().0.len(), MAX_ORIGINS);
        let bomb: BTreeMap<String, i64> = (0..3500).map(|i| (format!("r{i}"), 1)).collect();
        let json = format!(r#"{{"since":{}}}"#, serde_json::to_string(&bomb).unwrap());
        assert!(since(&json)
            .unwrap_err()
            .to_string()
            .contains("more than 64"));
        for bad in [
            r#"{"since":{"Seoul":1}}"#,
            r#"{"since":{"":1}}"#,
            r#"{"since":{"a\u0000b":1}}"#,
            r#"{"since":{"seoul":"1"}}"#,
            r#"{"since":[1]}"#,
            r#"{"since":3}"#,
        ] {
            assert!(since(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn advance_only_moves_forward() {
        let mut c = Cursor::new();
        assert!(!c.has_seen("seoul", 0));
        c.advance("seoul", 5);
        c.advance("seoul", 3);
        assert_eq!(c.get("seoul"), Some(5));
        assert!(c.has_seen("seoul", 5));
        assert!(!c.has_seen("seoul", 6));
        assert!(!c.has_seen("tokyo", 0));
    }

    proptest! {
        #[test]
        fn json_round_trip(m in proptest::collection::btree_map("[a-z]{1,8}", 0i64..i64::MAX, 0..5)) {
            let c = Cursor(m);
            let json = serde_json::to_string(&c).expect("serialize");
            let back: Cursor = serde_json::from_str(&json).expect("deserialize");
            prop_assert_eq!(back, c);
        }
    }
}
