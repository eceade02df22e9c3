//! Between dtfed's chat messages and STOMP frames: a `SEND` body as the JSON stored, a
//! stored message (or a replay's gap) as a `MESSAGE`, and the heart-beat negotiation of
//! `CONNECT`. Pure functions; [`super::session`] uses them.

use std::time::Duration;

use dtfed_proto::client::Body;
use dtfed_proto::MsgFrame;

use super::frame::Frame;

/// `CONNECT`'s `heart-beat: cx,cy`.
pub fn parse_heart_beat(v: Option<&str>) -> Result<(u64, u64), String> {
    let Some(v) = v else { return Ok((0, 0)) };
    let bad = || format!("heart-beat {v:?} is not two millisecond counts \"cx,cy\"");
    let (a, b) = v.split_once(',').ok_or_else(bad)?;
    let a = a.trim().parse::<u64>().map_err(|_| bad())?;
    let b = b.trim().parse::<u64>().map_err(|_| bad())?;
    Ok((a, b))
}

/// STOMP's rule: nothing if either side says 0, else the larger of the two.
pub fn negotiate(ours: u64, theirs: u64) -> Option<Duration> {
    (ours != 0 && theirs != 0).then(|| Duration::from_millis(ours.max(theirs)))
}

/// A `SEND` body as the JSON stored: JSON itself with `content-type: application/json`,
/// any other text as a JSON string.
pub fn body_of(frame: &Frame) -> Result<Body, String> {
    let text =
        std::str::from_utf8(&frame.body).map_err(|_| "the body must be UTF-8 text".to_owned())?;
    let json = frame.header("content-type").is_some_and(|t| {
        t.trim()
            .to_ascii_lowercase()
            .starts_with("application/json")
    });
    if json {
        let body = Body::from_json(text).map_err(|e| {
            format!("content-type is application/json but the body is not JSON: {e}")
        })?;
        if body.as_json() == "null" {
            return Err("the body must not be JSON null".into());
        }
        Ok(body)
    } else {
        let quoted = serde_json::to_string(text).map_err(|e| e.to_string())?;
        Body::from_json(&quoted).map_err(|e| e.to_string())
    }
}

/// A message as `MESSAGE`: a JSON string body as that text, anything else as JSON.
pub fn message_frame(subscription: &str, destination: &str, m: &MsgFrame) -> Frame {
    let json = m.body.as_json();
    let (content_type, body) = match serde_json::from_str::<String>(json) {
        Ok(text) => ("text/plain;charset=utf-8", text.into_bytes()),
        Err(_) => ("application/json", json.as_bytes().to_vec()),
    };
    let mut f = Frame::new("MESSAGE")
        .header_value("destination", destination)
        .header_value("subscription", subscription)
        .header_value("message-id", format!("{}:{}", m.origin, m.offset))
        .header_value("content-type", content_type)
        .header_value("dtfed-origin", m.origin.clone())
        .header_value("dtfed-offset", m.offset.to_string());
    if let Some(prev) = m.prev {
        f = f.header_value("dtfed-prev", prev.to_string());
    }
    f.header_value("dtfed-from", m.from.clone())
        .header_value("dtfed-ts", m.ts.to_string())
        .with_body(body)
}

/// A replay's `gap` as a `MESSAGE` without a body: said, never skipped.
pub fn gap_frame(subscription: &str, destination: &str, origin: &str, from: i64, to: i64) -> Frame {
    Frame::new("MESSAGE")
        .header_value("destination", destination)
        .header_value("subscription", subscription)
        .header_value("message-id", format!("gap:{origin}:{from}-{to}"))
        .header_value("dtfed-gap", format!("{from}-{to}"))
        .header_value("dtfed-origin", origin.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heart_beat_negotiation_follows_the_spec() {
        assert_eq!(negotiate(30_000, 10_000), Some(Duration::from_secs(30)));
        assert_eq!(negotiate(30_000, 0), None);
        assert_eq!(negotiate(0, 10_000), None);
        assert_eq!(negotiate(1_000, 45_000), Some(Duration::from_secs(45)));
        assert!(parse_heart_beat(Some("10000,x")).is_err());
        assert_eq!(parse_heart_beat(Some("0, 5")).ok(), Some((0, 5)));
    }

    #[test]
    fn bodies_json_or_text() {
        let f = Frame::new("SEND")
            .header_value("content-type", "application/json;charset=utf-8")
            .with_body(br#"{"t":1}"#.to_vec());
        assert_eq!(body_of(&f).unwrap().as_json(), r#"{"t":1}"#);
        let f = Frame::new("SEND").with_body(b"hi \"you\"".to_vec());
        assert_eq!(body_of(&f).unwrap().as_json(), r#""hi \"you\"""#);
        let f = Frame::new("SEND")
            .header_value("content-type", "application/json")
            .with_body(b"null".to_vec());
        assert!(body_of(&f).is_err());
        let f = Frame::new("SEND")
            .header_value("content-type", "application/json")
            .with_body(b"{".to_vec());
        assert!(body_of(&f).is_err());
        let f = Frame::new("SEND").with_body(vec![0xff]);
        assert!(body_of(&f).is_err());
    }
}
