//! One consumed record turned into a [`LogRecord`] for the bus ([`decode_record`]), or the
//! reason it is stepped over ([`Skip`]): the origin from the topic, never from a header.

use dtfed_proto::record::{LogValue, HEADER_ORIGIN, HEADER_ORIGIN_OFFSET};
use dtfed_proto::room::valid_region_name;
use dtfed_proto::{LogRecord, RoomId};
use rdkafka::message::{BorrowedMessage, Headers, Message};

use crate::mirror::MIRROR_TOPIC_PREFIX;

pub(super) fn header<'a>(m: &'a BorrowedMessage<'_>, key: &str) -> Option<&'a [u8]> {
    let headers = m.headers()?;
    headers
        .iter()
        .filter(|h| h.key == key)
        .last()
        .and_then(|h| h.value)
}

/// Why a consumed record was stepped over instead of applied.
#[derive(Debug)]
pub(super) struct Skip {
    /// Metric label (`fanout_skipped{reason}`).
    pub(super) reason: &'static str,
    pub(super) detail: String,
}

impl Skip {
    pub(super) fn not_a_message(detail: impl Into<String>) -> Skip {
        Skip {
            reason: SKIP_NOT_A_MESSAGE,
            detail: detail.into(),
        }
    }
}

/// `fanout_skipped` reasons.
pub(super) const SKIP_NOT_A_MESSAGE: &str = "not_a_message";
pub(super) const SKIP_ORIGIN_MISMATCH: &str = "origin_mismatch";
pub(super) const SKIP_QUARANTINED: &str = "quarantined";

/// The origin region whose records topic `topic` holds: this region for the local topic,
/// `O` for the mirror topic `dtfed.mirror.<O>`. Never a record's own say: a peer (or
/// anyone who can write its local topic) controls the record's headers, and an origin
/// taken from them could name another region, or this one, with offsets that would make
/// the bus step drop that origin's genuine messages as already applied.
pub(super) fn topic_origin<'a>(
    topic: &'a str,
    local_topic: &str,
    region: &'a str,
) -> Option<&'a str> {
    if topic == local_topic {
        return Some(region);
    }
    topic
        .strip_prefix(MIRROR_TOPIC_PREFIX)
        .filter(|o| valid_region_name(o) && *o != region)
}

/// Turns one consumed record into a [`LogRecord`], or says why it is not one.
pub(super) fn decode_record(
    m: &BorrowedMessage<'_>,
    local_topic: &str,
    region: &str,
) -> Result<LogRecord, Skip> {
    let origin = topic_origin(m.topic(), local_topic, region)
        .ok_or_else(|| Skip::not_a_message(format!("topic {} names no origin", m.topic())))?;
    let key = m
        .key()
        .ok_or_else(|| Skip::not_a_message("no key (a room id is required)"))?;
    let key = std::str::from_utf8(key).map_err(|_| Skip::not_a_message("key is not UTF-8"))?;
    let room = RoomId::parse(key).map_err(|e| Skip::not_a_message(format!("key {key:?}: {e}")))?;
    let payload = m.payload().ok_or_else(|| Skip::not_a_message("no value"))?;
    let value =
        LogValue::from_json(payload).map_err(|e| Skip::not_a_message(format!("value: {e}")))?;
    let offset = if m.topic() == local_topic {
        m.offset()
    } else {
        // The mirror client writes the origin header from the peer's certificate region; a
        // record saying otherwise was not written by it (or was written before that rule)
        // and is not trusted with any origin.
        let claims = m.headers().into_iter().flat_map(|h| h.iter());
        for claimed in claims.filter(|h| h.key == HEADER_ORIGIN).map(|h| h.value) {
            let claimed = claimed.unwrap_or_default();
            if claimed != origin.as_bytes() {
                return Err(Skip {
                    reason: SKIP_ORIGIN_MISMATCH,
                    detail: format!(
                        "dtfed-origin {:?} in the mirror topic of {origin}",
                        String::from_utf8_lossy(claimed)
                    ),
                });
            }
        }
        header(m, HEADER_ORIGIN_OFFSET)
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.parse::<i64>().ok())
            .filter(|o| *o >= 0)
            .ok_or_else(|| {
                Skip::not_a_message("mirror record without a valid dtfed-origin-offset")
            })?
    };
    Ok(LogRecord {
        room,
        origin: origin.to_owned(),
        partition: m.partition(),
        offset,
        value,
    })
}
