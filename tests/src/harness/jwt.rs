//! Tokens for `client.auth = "jwt"` tests: a minimal HS256 JWT, made here with `hmac` and
//! `sha2` rather than the daemon's JWT library, so the tests check the daemon against the
//! format, not against itself.

use base64::Engine;
use hmac::Mac;
use serde_json::Value;

/// An HS256 JWT of `claims`, signed with `secret`.
pub fn hs256(secret: &str, claims: &Value) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let head = b64.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let body = b64.encode(claims.to_string());
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(format!("{head}.{body}").as_bytes());
    format!("{head}.{body}.{}", b64.encode(mac.finalize().into_bytes()))
}
