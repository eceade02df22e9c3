//! The room digest that regions compare to find divergence: for one room and one origin
//! region, over a range of the origin's offsets, how many of the room's records a region
//! holds and a hash of them. Pure: [`DigestBuilder`] is fed the records in order by whoever
//! reads them (`super::reader` from Kafka); [`RoomDigest`] is what the admin endpoint
//! answers and `dtfed verify` compares.
//!
//! # The definition (so another implementation can compute it)
//!
//! The records are those of the room (Kafka key = the room id) from the origin, with origin
//! offset `o` in `from <= o < to`, in increasing origin offset, each origin offset once (a
//! mirror record repeating an origin offset already seen is skipped, as players' replay
//! does). The origin offset is the Kafka offset in the origin's local topic, and the
//! `dtfed-origin-offset` header in a mirror topic.
//!
//! `hash` is the lowercase hex SHA-256 of the concatenation, record after record, of:
//! the origin offset as 8 bytes big-endian, the value's length in bytes as 8 bytes
//! big-endian, the value's bytes (a record without a value counts as an empty one). No
//! records: the SHA-256 of nothing (`e3b0c442…b855`). `count` is the number of records;
//! `first`/`last` their lowest and highest origin offsets (absent without records).

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// A room's records from one origin over `[from, to)` as one region holds them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomDigest {
    pub origin: String,
    /// The partition of the origin's topic (and of its mirror topic) holding the room.
    pub partition: i32,
    pub from: i64,
    pub to: i64,
    pub count: u64,
    /// Lowercase hex SHA-256, see the module doc.
    pub hash: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<i64>,
}

impl RoomDigest {
    /// Whether two regions hold the same records (same count and hash).
    pub fn same_records(&self, other: &RoomDigest) -> bool {
        self.count == other.count && self.hash == other.hash
    }

    /// The hash as the 32 bytes the region link carries (`None` if `hash` is not 64 hex
    /// digits).
    pub fn sha256(&self) -> Option<[u8; 32]> {
        let bytes = self.hash.as_bytes();
        if bytes.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (o, pair) in out.iter_mut().zip(bytes.chunks(2)) {
            let text = std::str::from_utf8(pair).ok()?;
            *o = u8::from_str_radix(text, 16).ok()?;
        }
        Some(out)
    }
}

/// `sha256` as the lowercase hex [`RoomDigest::hash`] holds.
pub fn hex(sha256: &[u8]) -> String {
    sha256.iter().map(|b| format!("{b:02x}")).collect()
}

/// Builds a [`RoomDigest`] from records given in increasing origin offset.
#[derive(Clone)]
pub struct DigestBuilder {
    sha: Sha256,
    count: u64,
    first: Option<i64>,
    last: Option<i64>,
}

impl Default for DigestBuilder {
    fn default() -> Self {
        DigestBuilder {
            sha: Sha256::new(),
            count: 0,
            first: None,
            last: None,
        }
    }
}

impl DigestBuilder {
    /// Adds the record at origin offset `offset` holding `value`. Offsets must grow; a
    /// repeated or lower one is ignored (a record mirrored twice counts once).
    pub fn add(&mut self, offset: i64, value: &[u8]) -> bool {
        if self.last.is_some_and(|l| offset <= l) {
            return false;
        }
        self.sha.update(offset.to_be_bytes());
        self.sha.update((value.len() as u64).to_be_bytes());
        self.sha.update(value);
        self.count += 1;
        self.first.get_or_insert(offset);
        self.last = Some(offset);
        true
    }

    /// The digest of what was added, for `origin`'s `partition` over `[from, to)`.
    pub fn finish(self, origin: &str, partition: i32, from: i64, to: i64) -> RoomDigest {
        let hash = hex(&self.sha.finalize());
        RoomDigest {
            origin: origin.to_owned(),
            partition,
            from,
            to,
            count: self.count,
            hash,
            first: self.first,
            last: self.last,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(records: &[(i64, &[u8])]) -> RoomDigest {
        let mut b = DigestBuilder::default();
        for (o, v) in records {
            b.add(*o, v);
        }
        b.finish("seoul", 3, 0, 100)
    }

    #[test]
    fn empty_is_the_sha256_of_nothing() {
        let d = digest(&[]);
        assert_eq!(
            d.hash,
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!((d.count, d.first, d.last), (0, None, None));
    }

    #[test]
    fn the_hash_follows_the_documented_encoding() {
        // offset 5 (8 bytes BE), length 2 (8 bytes BE), "hi": computed independently.
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&5i64.to_be_bytes());
        bytes.extend_from_slice(&2u64.to_be_bytes());
        bytes.extend_from_slice(b"hi");
        let expected: String = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let d = digest(&[(5, b"hi")]);
        assert_eq!(d.hash, expected);
        assert_eq!((d.count, d.first, d.last), (1, Some(5), Some(5)));
    }

    #[test]
    fn offset_value_and_boundaries_all_matter() {
        let base = digest(&[(1, b"a"), (2, b"bc")]);
        assert!(base.same_records(&digest(&[(1, b"a"), (2, b"bc")])));
        // Another value at the same offset.
        assert!(!base.same_records(&digest(&[(1, b"a"), (2, b"bd")])));
        // The same value at another offset.
        assert!(!base.same_records(&digest(&[(1, b"a"), (3, b"bc")])));
        // The same bytes split differently between records.
        assert!(!base.same_records(&digest(&[(1, b"ab"), (2, b"c")])));
        // A record missing.
        assert!(!base.same_records(&digest(&[(2, b"bc")])));
    }

    #[test]
    fn the_hash_reads_back_as_bytes() {
        let d = digest(&[(1, b"a")]);
        let bytes = d.sha256().expect("64 hex digits");
        assert_eq!(hex(&bytes), d.hash);
        let bad = RoomDigest {
            hash: "zz".repeat(32),
            ..d
        };
        assert_eq!(bad.sha256(), None);
    }

    #[test]
    fn a_repeated_offset_counts_once() {
        let once = digest(&[(1, b"a"), (2, b"b")]);
        let twice = digest(&[(1, b"a"), (1, b"a"), (2, b"b"), (2, b"x")]);
        assert!(once.same_records(&twice));
        assert_eq!(twice.count, 2);
    }
}
