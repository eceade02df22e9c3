//! Room ids: 1 to 128 bytes of `[A-Za-z0-9._:-]`.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

/// Longest room id, in bytes.
pub const MAX_ROOM_LEN: usize = 128;

/// A validated room id. Construct with [`RoomId::parse`]; deserializing validates too.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct RoomId(String);

/// Why a string is not a room id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoomIdError {
    #[error("room id is empty")]
    Empty,
    #[error("room id is {0} bytes, the limit is {MAX_ROOM_LEN}")]
    TooLong(usize),
    #[error("room id has a character outside [A-Za-z0-9._:-] at byte {0}")]
    BadChar(usize),
}

impl RoomId {
    /// Checks `s` against the room id rules.
    pub fn parse(s: &str) -> Result<Self, RoomIdError> {
        if s.is_empty() {
            return Err(RoomIdError::Empty);
        }
        if s.len() > MAX_ROOM_LEN {
            return Err(RoomIdError::TooLong(s.len()));
        }
        if let Some(i) = s.bytes().position(|b| !is_room_byte(b)) {
            return Err(RoomIdError::BadChar(i));
        }
        Ok(RoomId(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Region names: 1 to 32 bytes of `[a-z0-9-]`, so they fit in DNS names and metric labels.
pub fn valid_region_name(s: &str) -> bool {
    (1..=32).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn is_room_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-')
}

impl fmt::Display for RoomId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for RoomId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for RoomId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        RoomId::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_and_refuses() {
        assert!(RoomId::parse("table-1:goblins_den.v2").is_ok());
        assert_eq!(RoomId::parse(""), Err(RoomIdError::Empty));
        assert_eq!(RoomId::parse("a b"), Err(RoomIdError::BadChar(1)));
        assert_eq!(RoomId::parse("방"), Err(RoomIdError::BadChar(0)));
        assert!(RoomId::parse(&"x".repeat(128)).is_ok());
        assert_eq!(
            RoomId::parse(&"x".repeat(129)),
            Err(RoomIdError::TooLong(129))
        );
    }

    proptest! {
        #[test]
        fn valid_ids_round_trip(s in "[A-Za-z0-9._:-]{1,128}") {
            let id = RoomId::parse(&s).expect("valid by construction");
            let json = serde_json::to_string(&id).expect("serialize");
            let back: RoomId = serde_json::from_str(&json).expect("deserialize");
            prop_assert_eq!(back, id);
        }

        #[test]
        fn parse_never_panics(s in ".*") {
            let _ = RoomId::parse(&s);
        }
    }
}
