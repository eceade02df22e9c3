//! Who a connection is: `?name=` in auth mode `none`, an HS256 JWT in `?token=` in mode
//! `jwt`. The JWT's `sub` is the player; an optional claim (default `rooms`) lists the room
//! patterns the player may use (`table-7`, or `table-*` for a prefix).
//!
//! A token is refused before its `nbf` and after its `exp` (both with [`LEEWAY_SECS`] for
//! clock skew), when `iss`/`aud` do not match the pinned ones (`client.jwt_issuer`,
//! `client.jwt_audience`), and when `sub` holds control characters. A session ends when its
//! token expires ([`Player::expires_at`]).

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::config::{AuthMode, ClientConfig};

/// Longest player name, in bytes.
pub const MAX_PLAYER_LEN: usize = 64;

/// Clock skew tolerated on `exp` and `nbf`, in seconds.
pub const LEEWAY_SECS: u64 = 5;

/// An authenticated player.
#[derive(Clone, Debug)]
pub struct Player {
    pub name: String,
    /// Room patterns the player may use; `None` allows every room.
    rooms: Option<Vec<String>>,
    /// When the credentials stop being valid (the JWT's `exp` plus [`LEEWAY_SECS`]);
    /// `None` in auth mode `none`.
    pub expires_at: Option<std::time::SystemTime>,
}

impl Player {
    /// Whether the player may subscribe to or publish in `room`.
    pub fn may_use(&self, room: &str) -> bool {
        match &self.rooms {
            None => true,
            Some(patterns) => room_allowed(patterns, room),
        }
    }
}

/// Whether one of `patterns` (exact room ids, or prefixes ending in `*`) allows `room`:
/// the JWT rooms claim and the server API's keys use the same rule.
pub fn room_allowed(patterns: &[String], room: &str) -> bool {
    patterns.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => room.starts_with(prefix),
        None => p == room,
    })
}

/// A player name: 1-[`MAX_PLAYER_LEN`] bytes without control characters.
pub fn valid_player_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_PLAYER_LEN && !name.chars().any(char::is_control)
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("no token: connect with ?token=<JWT>")]
    MissingToken,
    #[error("bad token: {0}")]
    BadToken(String),
    #[error("bad player name: 1-{MAX_PLAYER_LEN} bytes of printable characters")]
    BadName,
}

/// Checks the credentials of new connections.
pub struct Authenticator {
    mode: AuthMode,
    key: DecodingKey,
    validation: Validation,
    rooms_claim: String,
}

impl Authenticator {
    pub fn new(cfg: &ClientConfig) -> Authenticator {
        let mut validation = Validation::new(Algorithm::HS256);
        let mut required = vec!["exp", "sub"];
        validation.validate_nbf = true;
        validation.leeway = LEEWAY_SECS;
        if let Some(iss) = &cfg.jwt_issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        if let Some(aud) = &cfg.jwt_audience {
            validation.set_audience(&[aud]);
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);
        Authenticator {
            mode: cfg.auth,
            key: DecodingKey::from_secret(cfg.jwt_secret.as_bytes()),
            validation,
            rooms_claim: cfg.jwt_rooms_claim.clone(),
        }
    }

    /// Authenticates from the query parameters of the upgrade request.
    pub fn authenticate(
        &self,
        name: Option<&str>,
        token: Option<&str>,
    ) -> Result<Player, AuthError> {
        match self.mode {
            AuthMode::None => {
                let name = name.unwrap_or("guest");
                if !valid_player_name(name) {
                    return Err(AuthError::BadName);
                }
                Ok(Player {
                    name: name.to_owned(),
                    rooms: None,
                    expires_at: None,
                })
            }
            AuthMode::Jwt => {
                let token = token.ok_or(AuthError::MissingToken)?;
                let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
                    token,
                    &self.key,
                    &self.validation,
                )
                .map_err(|e| AuthError::BadToken(e.to_string()))?;
                let claims = data.claims;
                let name = claims
                    .get("sub")
                    .and_then(|v| v.as_str())
                    .filter(|s| valid_player_name(s))
                    .ok_or_else(|| {
                        AuthError::BadToken(format!(
                            "sub must be a player name of 1-{MAX_PLAYER_LEN} bytes of printable characters"
                        ))
                    })?
                    .to_owned();
                // Validation checked `exp` is a number in the future.
                let expires_at = claims
                    .get("exp")
                    .and_then(serde_json::Value::as_f64)
                    .filter(|exp| exp.is_finite() && *exp >= 0.0)
                    .map(|exp| {
                        std::time::UNIX_EPOCH
                            + std::time::Duration::from_secs_f64(exp.min(1e12))
                            + std::time::Duration::from_secs(LEEWAY_SECS)
                    });
                let rooms = match claims.get(&self.rooms_claim) {
                    None => None,
                    Some(v) => Some(Vec::<String>::deserialize(v).map_err(|_| {
                        AuthError::BadToken(format!(
                            "claim {:?} must be a list of room patterns",
                            self.rooms_claim
                        ))
                    })?),
                };
                Ok(Player {
                    name,
                    rooms,
                    expires_at,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    const SECRET: &str = "0123456789abcdef0123456789";

    fn jwt_auth() -> Authenticator {
        Authenticator::new(&ClientConfig {
            auth: AuthMode::Jwt,
            jwt_secret: SECRET.into(),
            ..ClientConfig::default()
        })
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn token(claims: serde_json::Value, alg: Algorithm, secret: &str) -> String {
        encode(
            &Header::new(alg),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn valid_token_names_the_player_and_limits_rooms() {
        let t = token(
            json!({"sub":"ann","exp":now()+60,"rooms":["table-*","lobby"]}),
            Algorithm::HS256,
            SECRET,
        );
        let p = jwt_auth().authenticate(None, Some(&t)).unwrap();
        assert_eq!(p.name, "ann");
        assert!(p.may_use("table-9"));
        assert!(p.may_use("lobby"));
        assert!(!p.may_use("lobby2"));
        assert!(!p.may_use("other"));
    }

    #[test]
    fn refuses_expired_wrong_key_wrong_alg_and_none() {
        let a = jwt_auth();
        let expired = token(
            json!({"sub":"ann","exp":now()-600}),
            Algorithm::HS256,
            SECRET,
        );
        assert!(matches!(
            a.authenticate(None, Some(&expired)),
            Err(AuthError::BadToken(_))
        ));
        let wrong_key = token(
            json!({"sub":"ann","exp":now()+60}),
            Algorithm::HS256,
            "another-secret-that-is-long",
        );
        assert!(matches!(
            a.authenticate(None, Some(&wrong_key)),
            Err(AuthError::BadToken(_))
        ));
        let hs512 = token(
            json!({"sub":"ann","exp":now()+60}),
            Algorithm::HS512,
            SECRET,
        );
        assert!(matches!(
            a.authenticate(None, Some(&hs512)),
            Err(AuthError::BadToken(_))
        ));
        // alg=none: header {"alg":"none","typ":"JWT"}, no signature.
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhbm4iLCJleHAiOjk5OTk5OTk5OTl9.";
        assert!(matches!(
            a.authenticate(None, Some(none)),
            Err(AuthError::BadToken(_))
        ));
        assert_eq!(
            a.authenticate(None, None).unwrap_err(),
            AuthError::MissingToken
        );
        let no_exp = token(json!({"sub":"ann"}), Algorithm::HS256, SECRET);
        assert!(matches!(
            a.authenticate(None, Some(&no_exp)),
            Err(AuthError::BadToken(_))
        ));
    }

    #[test]
    fn refuses_not_yet_valid_tokens_and_control_characters_in_sub() {
        let a = jwt_auth();
        let early = token(
            json!({"sub":"ann","exp":now()+600,"nbf":now()+300}),
            Algorithm::HS256,
            SECRET,
        );
        assert!(
            matches!(a.authenticate(None, Some(&early)), Err(AuthError::BadToken(ref m)) if m.contains("ImmatureSignature")),
            "{:?}",
            a.authenticate(None, Some(&early))
        );
        let valid_now = token(
            json!({"sub":"ann","exp":now()+600,"nbf":now()-1}),
            Algorithm::HS256,
            SECRET,
        );
        let p = a
            .authenticate(None, Some(&valid_now))
            .expect("nbf in the past");
        let left = p
            .expires_at
            .expect("a JWT session expires")
            .duration_since(std::time::SystemTime::now())
            .expect("in the future")
            .as_secs();
        assert!((600..=600 + LEEWAY_SECS).contains(&left), "{left}");
        for sub in ["ann\u{1b}[2J", "a\nb", "\u{7f}", "\u{85}x"] {
            let t = token(json!({"sub":sub,"exp":now()+60}), Algorithm::HS256, SECRET);
            assert!(
                matches!(a.authenticate(None, Some(&t)), Err(AuthError::BadToken(_))),
                "{sub:?}"
            );
        }
    }

    #[test]
    fn pinned_issuer_and_audience_are_required() {
        let a = Authenticator::new(&ClientConfig {
            auth: AuthMode::Jwt,
            jwt_secret: SECRET.into(),
            jwt_issuer: Some("login.example".into()),
            jwt_audience: Some("dtfed".into()),
            ..ClientConfig::default()
        });
        let ok = |claims: serde_json::Value| {
            a.authenticate(None, Some(&token(claims, Algorithm::HS256, SECRET)))
                .is_ok()
        };
        let exp = now() + 60;
        assert!(ok(
            json!({"sub":"ann","exp":exp,"iss":"login.example","aud":"dtfed"})
        ));
        assert!(ok(
            json!({"sub":"ann","exp":exp,"iss":"login.example","aud":["other","dtfed"]})
        ));
        assert!(!ok(
            json!({"sub":"ann","exp":exp,"iss":"evil","aud":"dtfed"})
        ));
        assert!(!ok(
            json!({"sub":"ann","exp":exp,"iss":"login.example","aud":"other"})
        ));
        assert!(!ok(json!({"sub":"ann","exp":exp,"aud":"dtfed"})));
        assert!(!ok(json!({"sub":"ann","exp":exp,"iss":"login.example"})));
        // Not pinned: any issuer, but a token meant for another audience is still refused.
        let open = jwt_auth();
        let t = |c| token(c, Algorithm::HS256, SECRET);
        assert!(open
            .authenticate(None, Some(&t(json!({"sub":"ann","exp":exp,"iss":"any"}))))
            .is_ok());
        assert!(open
            .authenticate(None, Some(&t(json!({"sub":"ann","exp":exp,"aud":"other"}))))
            .is_err());
    }

    #[test]
    fn open_mode_takes_the_name() {
        let a = Authenticator::new(&ClientConfig::default());
        assert_eq!(a.authenticate(Some("bob"), None).unwrap().name, "bob");
        assert_eq!(a.authenticate(None, None).unwrap().name, "guest");
        assert_eq!(
            a.authenticate(Some("a\nb"), None).unwrap_err(),
            AuthError::BadName
        );
    }
}
