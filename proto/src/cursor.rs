//! A player's position in a room: for each origin region, the last offset seen.
//!
//! Per (room, origin) offsets only grow, so a cursor is both the resume point and the
//! dedupe key: anything at or below `cursor[origin]` has been seen already.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
