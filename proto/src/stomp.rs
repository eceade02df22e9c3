//! STOMP frames on the wire, sans IO: [`FrameDecoder`] turns bytes (however the WebSocket
//! messages split them) into [`Frame`]s and heart-beats, bounded in memory whatever a peer
//! sends; [`Frame::encode`] writes one. Start with [`FrameDecoder::push`]. The daemon's
//! STOMP sessions (`daemon/src/gateway/stomp/`) use it; the `stomp_frame` fuzz target
//! (`proto/fuzz/bodies/stomp_frame.rs`) checks it.
//!
//! The format (STOMP 1.2 §"STOMP Frames"): a command line, header lines `name:value`, an
//! empty line, the body, a NUL octet. Lines end with LF or CRLF (CR only from 1.2 on; this
//! decoder accepts CRLF whatever the version, as 1.1 servers commonly do). A `content-length`
//! header gives the body's size (and lets it hold NULs); without one the body ends at the
//! first NUL. EOLs between frames are heart-beats. Header names and values are escaped
//! (`\\`, `\c`, `\n`, `\r`) from 1.1 on, except in `CONNECT` and `CONNECTED`; an unknown
//! escape is a bad frame. A repeated header: the first one counts.

use std::fmt;

/// The protocol version a session speaks (negotiated in `CONNECT`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Version {
    V10,
    V11,
    V12,
}

impl Version {
    pub fn as_str(self) -> &'static str {
        match self {
            Version::V10 => "1.0",
            Version::V11 => "1.1",
            Version::V12 => "1.2",
        }
    }

    pub fn parse(s: &str) -> Option<Version> {
        match s.trim() {
            "1.0" => Some(Version::V10),
            "1.1" => Some(Version::V11),
            "1.2" => Some(Version::V12),
            _ => None,
        }
    }

    /// Whether header names and values of `command` are escaped in this version.
    fn escapes(self, command: &str) -> bool {
        self != Version::V10 && command != "CONNECT" && command != "CONNECTED"
    }
}

/// What the decoder keeps at most, so one connection's memory is bounded.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Bytes of the command line and headers together.
    pub max_header_bytes: usize,
    /// Header lines per frame.
    pub max_headers: usize,
    /// Bytes of one body.
    pub max_body_bytes: usize,
}

/// One frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub command: String,
    /// In the order sent, repeats included (use [`Frame::header`], which takes the first).
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// What the decoder found.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Frame(Frame),
    /// An EOL between frames.
    HeartBeat,
}

/// Why bytes are not a STOMP frame. The connection cannot go on after either.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("{0}")]
    TooLarge(String),
    #[error("malformed frame: {0}")]
    Malformed(String),
}

impl Frame {
    pub fn new(command: &str) -> Frame {
        Frame {
            command: command.to_owned(),
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    pub fn header_value(mut self, name: &str, value: impl Into<String>) -> Frame {
        self.headers.push((name.to_owned(), value.into()));
        self
    }

    pub fn with_body(mut self, body: Vec<u8>) -> Frame {
        self.body = body;
        self
    }

    /// The first header called `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The frame's bytes. Adds `content-length` when the frame has a body (and none given).
    pub fn encode(&self, version: Version) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.body.len());
        out.extend_from_slice(self.command.as_bytes());
        out.push(b'\n');
        let escape = version.escapes(&self.command);
        let mut has_length = false;
        for (name, value) in &self.headers {
            has_length |= name == "content-length";
            write_header_part(&mut out, name, escape, version);
            out.push(b':');
            write_header_part(&mut out, value, escape, version);
            out.push(b'\n');
        }
        if !self.body.is_empty() && !has_length {
            out.extend_from_slice(format!("content-length:{}\n", self.body.len()).as_bytes());
        }
        out.push(b'\n');
        out.extend_from_slice(&self.body);
        out.push(0);
        out
    }
}

fn write_header_part(out: &mut Vec<u8>, s: &str, escape: bool, version: Version) {
    if !escape {
        // 1.0 (and CONNECT/CONNECTED) cannot carry these; they would break the frame.
        out.extend(
            s.bytes()
                .map(|b| if b == b'\n' || b == b'\r' { b' ' } else { b }),
        );
        return;
    }
    for b in s.bytes() {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b':' => out.extend_from_slice(b"\\c"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' if version == Version::V12 => out.extend_from_slice(b"\\r"),
            b'\r' => out.push(b' '),
            _ => out.push(b),
        }
    }
}

/// Incremental decoder: [`FrameDecoder::push`] bytes, then [`FrameDecoder::next`] until it
/// says `None`. Holds at most one frame's worth of bytes (headers plus body limits).
pub struct FrameDecoder {
    buf: Vec<u8>,
    limits: Limits,
    version: Version,
}

impl fmt::Debug for FrameDecoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrameDecoder")
            .field("buffered", &self.buf.len())
            .field("version", &self.version)
            .finish()
    }
}

impl FrameDecoder {
    /// A decoder for a session that has not negotiated a version yet (1.2 rules apply to the
    /// `CONNECT` frame, which is never escaped anyway).
    pub fn new(limits: Limits) -> FrameDecoder {
        FrameDecoder {
            buf: Vec::new(),
            limits,
            version: Version::V12,
        }
    }

    /// Bytes held (at most one incomplete frame after every frame was taken).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Most bytes one frame may take on the wire, and so the most
    /// [`FrameDecoder::buffered`] holds once every complete frame was taken.
    pub fn max_frame_bytes(&self) -> usize {
        self.limits.max_header_bytes + self.limits.max_body_bytes + 4
    }

    pub fn set_version(&mut self, version: Version) {
        self.version = version;
    }

    /// Adds received bytes; take every frame ([`FrameDecoder::next`]) before the next push.
    /// What stays buffered after that is at most one incomplete frame within the limits
    /// (`next` refuses anything longer), so a push fails only for a chunk far beyond them.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), FrameError> {
        let waiting = self.buf.len() + bytes.len();
        if waiting > 3 * self.max_frame_bytes() {
            self.buf.clear();
            return Err(FrameError::TooLarge(format!(
                "{waiting} bytes at once; a frame is at most {} bytes (body at most {})",
                self.max_frame_bytes(),
                self.limits.max_body_bytes
            )));
        }
        self.buf.extend_from_slice(bytes);
        Ok(())
    }

    /// The next frame or heart-beat, `Ok(None)` when more bytes are needed.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<Decoded>, FrameError> {
        match self.scan() {
            Ok(Some((decoded, used))) => {
                self.buf.drain(..used);
                if self.buf.is_empty() && self.buf.capacity() > 4096 {
                    // Give back what a large frame took.
                    self.buf = Vec::new();
                }
                Ok(Some(decoded))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                self.buf.clear();
                Err(e)
            }
        }
    }

    /// Parses the buffer's first frame without consuming it: the result and the bytes used.
    fn scan(&self) -> Result<Option<(Decoded, usize)>, FrameError> {
        let buf = &self.buf[..];
        match buf.first() {
            None => return Ok(None),
            Some(b'\n') => return Ok(Some((Decoded::HeartBeat, 1))),
            Some(b'\r') => {
                return match buf.get(1) {
                    None => Ok(None),
                    Some(b'\n') => Ok(Some((Decoded::HeartBeat, 2))),
                    Some(_) => Err(FrameError::Malformed("CR not followed by LF".into())),
                }
            }
            Some(_) => {}
        }
        // The header section ends at the first empty line.
        let Some(head_end) = find_blank_line(buf) else {
            if buf.len() > self.limits.max_header_bytes {
                return Err(FrameError::TooLarge(format!(
                    "command and headers longer than {} bytes",
                    self.limits.max_header_bytes
                )));
            }
            return Ok(None);
        };
        let (head_len, body_start) = head_end;
        if head_len > self.limits.max_header_bytes {
            return Err(FrameError::TooLarge(format!(
                "command and headers longer than {} bytes",
                self.limits.max_header_bytes
            )));
        }
        let head = std::str::from_utf8(&buf[..head_len])
            .map_err(|_| FrameError::Malformed("command and headers must be UTF-8".into()))?;
        let mut lines = head.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
        let command = lines.next().unwrap_or_default();
        if command.is_empty() || !command.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(FrameError::Malformed(format!(
                "command {:?} is not a STOMP command",
                truncate(command, 32)
            )));
        }
        let escape = self.version.escapes(command);
        let mut headers = Vec::new();
        for line in lines {
            if headers.len() == self.limits.max_headers {
                return Err(FrameError::TooLarge(format!(
                    "more than {} headers",
                    self.limits.max_headers
                )));
            }
            let Some((name, value)) = line.split_once(':') else {
                return Err(FrameError::Malformed(format!(
                    "header line {:?} has no colon",
                    truncate(line, 32)
                )));
            };
            let (name, value) = if escape {
                (unescape(name)?, unescape(value)?)
            } else {
                (name.to_owned(), value.to_owned())
            };
            headers.push((name, value));
        }
        let length = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .map(|(_, v)| {
                v.trim().parse::<usize>().map_err(|_| {
                    FrameError::Malformed(format!(
                        "content-length {:?} is not a byte count",
                        truncate(v, 32)
                    ))
                })
            })
            .transpose()?;
        let rest = &buf[body_start..];
        let body_len = match length {
            Some(n) => {
                if n > self.limits.max_body_bytes {
                    return Err(FrameError::TooLarge(format!(
                        "body of {n} bytes; the limit is {}",
                        self.limits.max_body_bytes
                    )));
                }
                match rest.get(n) {
                    None => return Ok(None),
                    Some(0) => n,
                    Some(_) => {
                        return Err(FrameError::Malformed(
                            "no NUL after content-length bytes of body".into(),
                        ))
                    }
                }
            }
            None => match rest.iter().position(|&b| b == 0) {
                Some(n) if n > self.limits.max_body_bytes => {
                    return Err(FrameError::TooLarge(format!(
                        "body of {n} bytes; the limit is {}",
                        self.limits.max_body_bytes
                    )))
                }
                Some(n) => n,
                None if rest.len() > self.limits.max_body_bytes => {
                    return Err(FrameError::TooLarge(format!(
                        "body longer than {} bytes",
                        self.limits.max_body_bytes
                    )))
                }
                None => return Ok(None),
            },
        };
        let frame = Frame {
            command: command.to_owned(),
            headers,
            body: rest[..body_len].to_vec(),
        };
        Ok(Some((Decoded::Frame(frame), body_start + body_len + 1)))
    }
}

/// Where the header section ends: (its length without the blank line, where the body starts).
fn find_blank_line(buf: &[u8]) -> Option<(usize, usize)> {
    let mut i = 0;
    while let Some(p) = buf[i..].iter().position(|&b| b == b'\n') {
        let lf = i + p;
        match buf.get(lf + 1) {
            Some(b'\n') => return Some((strip_cr(buf, lf), lf + 2)),
            Some(b'\r') if buf.get(lf + 2) == Some(&b'\n') => {
                return Some((strip_cr(buf, lf), lf + 3))
            }
            _ => i = lf + 1,
        }
    }
    None
}

fn strip_cr(buf: &[u8], lf: usize) -> usize {
    if lf > 0 && buf[lf - 1] == b'\r' {
        lf - 1
    } else {
        lf
    }
}

fn unescape(s: &str) -> Result<String, FrameError> {
    if !s.contains('\\') {
        return Ok(s.to_owned());
    }
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('\\') => out.push('\\'),
            Some('c') => out.push(':'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            other => {
                return Err(FrameError::Malformed(format!(
                    "undefined escape \\{} in a header",
                    other.map(String::from).unwrap_or_default()
                )))
            }
        }
    }
    Ok(out)
}

fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_header_bytes: 1024,
        max_headers: 16,
        max_body_bytes: 256,
    };

    fn decode_all(dec: &mut FrameDecoder) -> Result<Vec<Decoded>, FrameError> {
        let mut out = Vec::new();
        while let Some(d) = dec.next()? {
            out.push(d);
        }
        Ok(out)
    }

    fn one(bytes: &[u8]) -> Result<Frame, FrameError> {
        let mut dec = FrameDecoder::new(LIMITS);
        dec.push(bytes)?;
        match dec.next()? {
            Some(Decoded::Frame(f)) => Ok(f),
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    #[test]
    fn reads_a_frame_with_and_without_content_length() {
        let f = one(b"SEND\ndestination:/pub/chat/room/1\n\nhello\0").unwrap();
        assert_eq!(f.command, "SEND");
        assert_eq!(f.header("destination"), Some("/pub/chat/room/1"));
        assert_eq!(f.body, b"hello");
        let f = one(b"SEND\r\ncontent-length:3\r\n\r\na\0b\0").unwrap();
        assert_eq!(f.body, b"a\0b");
    }

    #[test]
    fn heart_beats_between_frames() {
        let mut dec = FrameDecoder::new(LIMITS);
        dec.push(b"\n\r\nCONNECT\naccept-version:1.2\n\n\0\n")
            .unwrap();
        let got = decode_all(&mut dec).unwrap();
        assert_eq!(got.len(), 4);
        assert_eq!(got[0], Decoded::HeartBeat);
        assert_eq!(got[1], Decoded::HeartBeat);
        assert!(matches!(&got[2], Decoded::Frame(f) if f.command == "CONNECT"));
        assert_eq!(got[3], Decoded::HeartBeat);
    }

    #[test]
    fn unescapes_headers_from_1_1_but_not_in_1_0_nor_connect() {
        let f = one(b"SEND\na\\cb:x\\ny\\\\z\\r\n\n\0").unwrap();
        assert_eq!(f.header("a:b"), Some("x\ny\\z\r"));
        assert!(matches!(
            one(b"SEND\na:\\t\n\n\0"),
            Err(FrameError::Malformed(_))
        ));
        let f = one(b"CONNECT\nlogin:a\\cb\n\n\0").unwrap();
        assert_eq!(f.header("login"), Some("a\\cb"));
        let mut dec = FrameDecoder::new(LIMITS);
        dec.set_version(Version::V10);
        dec.push(b"SEND\na:\\t\n\n\0").unwrap();
        assert!(matches!(dec.next(), Ok(Some(Decoded::Frame(f))) if f.header("a") == Some("\\t")));
    }

    #[test]
    fn first_repeated_header_wins() {
        let f = one(b"SEND\nfoo:1\nfoo:2\n\n\0").unwrap();
        assert_eq!(f.header("foo"), Some("1"));
    }

    #[test]
    fn encode_round_trips_with_escapes() {
        for version in [Version::V11, Version::V12] {
            let f = Frame::new("MESSAGE")
                .header_value("destination", "/sub/chat/room/1")
                .header_value("odd", "a:b\\c\nd")
                .with_body(b"x\0y".to_vec());
            let bytes = f.encode(version);
            let mut dec = FrameDecoder::new(LIMITS);
            dec.set_version(version);
            dec.push(&bytes).unwrap();
            let Some(Decoded::Frame(back)) = dec.next().unwrap() else {
                panic!("no frame")
            };
            assert_eq!(back.header("odd"), Some("a:b\\c\nd"));
            assert_eq!(back.body, b"x\0y");
        }
        let bytes = Frame::new("CONNECTED")
            .header_value("version", "1.2")
            .encode(Version::V12);
        assert_eq!(bytes, b"CONNECTED\nversion:1.2\n\n\0");
    }

    #[test]
    fn any_split_of_the_stream_gives_the_same_frames() {
        let stream: &[u8] = b"CONNECT\naccept-version:1.2\nhost:x\n\n\0\nSUBSCRIBE\r\nid:0\r\ndestination:/sub/chat/room/a\r\n\r\n\0\n\nSEND\ndestination:/pub/chat/room/a\ncontent-length:5\n\nhe\0lo\0SEND\ndestination:/pub/chat/room/a\n\n{\"t\":1}\0";
        let mut whole = FrameDecoder::new(LIMITS);
        whole.push(stream).unwrap();
        let expected = decode_all(&mut whole).unwrap();
        assert_eq!(expected.len(), 7);
        // A deterministic pseudo-random walk over split points.
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..500 {
            let mut dec = FrameDecoder::new(LIMITS);
            let mut got = Vec::new();
            let mut at = 0;
            while at < stream.len() {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let n = 1 + (seed % 9) as usize;
                let end = (at + n).min(stream.len());
                dec.push(&stream[at..end]).unwrap();
                got.extend(decode_all(&mut dec).unwrap());
                at = end;
            }
            assert_eq!(got, expected);
        }
    }

    #[test]
    fn limits_hold_against_hostile_input() {
        // A body without NUL grows no further than the limit.
        let mut dec = FrameDecoder::new(LIMITS);
        dec.push(b"SEND\ndestination:/x\n\n").unwrap();
        let mut failed = false;
        for _ in 0..100 {
            match dec.push(&[b'a'; 64]).and_then(|()| dec.next().map(|_| ())) {
                Ok(()) => assert!(dec.buf.len() <= dec.max_frame_bytes()),
                Err(FrameError::TooLarge(_)) => {
                    failed = true;
                    break;
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(failed, "an endless body must be refused");
        // Headers without an end.
        let mut dec = FrameDecoder::new(LIMITS);
        dec.push(b"SEND\n").unwrap();
        let err = (0..100)
            .find_map(|_| {
                dec.push(b"h:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\n")
                    .and_then(|()| dec.next())
                    .err()
            })
            .expect("endless headers must be refused");
        assert!(matches!(err, FrameError::TooLarge(_)));
        // Too many headers, a huge content-length, a bad one, no NUL where it must be.
        let many: Vec<u8> = std::iter::once(b"SEND\n".to_vec())
            .chain((0..20).map(|i| format!("h{i}:v\n").into_bytes()))
            .chain(std::iter::once(b"\n\0".to_vec()))
            .flatten()
            .collect();
        assert!(matches!(one(&many), Err(FrameError::TooLarge(_))));
        assert!(matches!(
            one(b"SEND\ncontent-length:999999999999\n\n\0"),
            Err(FrameError::TooLarge(_))
        ));
        assert!(matches!(
            one(b"SEND\ncontent-length:-1\n\n\0"),
            Err(FrameError::Malformed(_))
        ));
        assert!(matches!(
            one(b"SEND\ncontent-length:2\n\nabc\0"),
            Err(FrameError::Malformed(_))
        ));
        assert!(matches!(one(b"send\n\n\0"), Err(FrameError::Malformed(_))));
        assert!(matches!(
            one(b"SEND\nnocolon\n\n\0"),
            Err(FrameError::Malformed(_))
        ));
        assert!(matches!(
            one(b"SEND\nh:\xff\n\n\0"),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn garbage_never_panics_and_stays_bounded() {
        let mut seed: u64 = 42;
        for _ in 0..2000 {
            let mut dec = FrameDecoder::new(LIMITS);
            for _ in 0..8 {
                let mut chunk = Vec::new();
                for _ in 0..(seed % 200) {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    // Mostly bytes that matter to the grammar.
                    let pick = b"SEND\n:\\c\r\0abcontent-length:12";
                    chunk.push(pick[(seed % pick.len() as u64) as usize]);
                }
                if dec.push(&chunk).is_err() {
                    break;
                }
                let _ = decode_all(&mut dec);
                assert!(dec.buf.len() <= dec.max_frame_bytes());
            }
        }
    }
}
