//! Authentication: who a connection is after `hello`, and which rooms it may join.
//!
//! Owns: JWT verification (HS256 with a shared secret, RS256/ES256 with a PEM public
//! key), guest names, the `rooms` claim patterns, and minting HS256 tokens for
//! `hubbub token`. Must not: know about sockets or close codes; the session maps
//! [`AuthError`] to the protocol's replies.

use crate::protocol::valid_guest_name;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::time::{SystemTime, UNIX_EPOCH};

/// Leeway on `exp`, at `hello` and on a live connection. The protocol allows at most
/// 5 s; one second absorbs clock skew between the token's minter and us.
pub const EXP_LEEWAY_SECS: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("invalid token: {0}")]
    InvalidToken(String),
    #[error("token expired")]
    Expired,
    #[error("guest access is disabled on this server; a token is required")]
    GuestsDisabled,
    #[error("hello needs a guest name (1-32 of A-Z a-z 0-9 _ - .) or a token")]
    NoIdentity,
    #[error("tokens are not accepted: this server has no JWT key configured")]
    NoKey,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read JWT public key {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("JWT public key {path} is neither an RSA nor an EC (P-256) public key in PEM")]
    Parse { path: String },
}

/// The claims Hubbub reads from a token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rooms: Option<Vec<String>>,
    /// Token id, for revocation by `jti`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// Issued at (Unix seconds), for revocation of a user's older tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
}

/// An authenticated identity.
#[derive(Debug, Clone)]
pub struct Identity {
    pub user: String,
    pub name: String,
    /// Token expiry (Unix seconds), enforced on the live connection.
    pub exp: Option<u64>,
    pub rooms: RoomAccess,
    /// Which token it was (None for guests): what a revocation matches.
    pub token: Option<TokenId>,
}

/// What a revocation can name of a token (its `jti`, or its user and `iat`), and
/// when it expires (for `token_expiring`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenId {
    pub jti: Option<String>,
    pub iat: Option<u64>,
    pub exp: Option<u64>,
}

/// Which rooms a user may join, from the JWT `rooms` claim.
#[derive(Debug, Clone)]
pub enum RoomAccess {
    All,
    Patterns(Vec<String>),
}

impl RoomAccess {
    /// `*` as a trailing wildcard: `team-*` matches every room starting with `team-`,
    /// a lone `*` matches all, anything else matches exactly.
    pub fn allows(&self, room: &str) -> bool {
        match self {
            RoomAccess::All => true,
            RoomAccess::Patterns(patterns) => patterns.iter().any(|p| match p.strip_suffix('*') {
                Some(prefix) => room.starts_with(prefix),
                None => p == room,
            }),
        }
    }
}

/// What is wrong with a token, said for the person holding it rather than in the
/// JWT library's terms.
fn in_our_words(kind: &jsonwebtoken::errors::ErrorKind) -> &'static str {
    use jsonwebtoken::errors::ErrorKind as K;
    match kind {
        K::InvalidToken | K::Base64(_) | K::Json(_) | K::Utf8(_) => {
            "not a JWT (three base64url parts: header.claims.signature)"
        }
        K::InvalidSignature => "the signature does not match this server's key",
        K::ImmatureSignature => "not valid yet (nbf is in the future)",
        K::ExpiredSignature => "expired",
        K::InvalidAlgorithm | K::InvalidAlgorithmName => {
            "signed with an algorithm this server does not accept"
        }
        K::MissingRequiredClaim(_) => "a required claim is missing (sub)",
        K::InvalidIssuer | K::InvalidAudience | K::InvalidSubject => {
            "a claim does not match what this server expects"
        }
        _ => "the token cannot be verified",
    }
}

/// Verifies `hello` credentials.
/// The user-id prefix of guests on a server that accepts tokens as well.
pub const GUEST_PREFIX: &str = "guest:";

pub struct Authenticator {
    keys: Vec<(DecodingKey, Validation)>,
    guests: bool,
}

impl Authenticator {
    pub fn new(
        secret: Option<&str>,
        public_key_pem: Option<(&str, &[u8])>,
        guests: bool,
    ) -> Result<Self, KeyError> {
        let mut keys = Vec::new();
        if let Some(secret) = secret {
            keys.push((
                DecodingKey::from_secret(secret.as_bytes()),
                validation(&[Algorithm::HS256]),
            ));
        }
        if let Some((path, pem)) = public_key_pem {
            if let Ok(k) = DecodingKey::from_rsa_pem(pem) {
                keys.push((k, validation(&[Algorithm::RS256])));
            } else if let Ok(k) = DecodingKey::from_ec_pem(pem) {
                keys.push((k, validation(&[Algorithm::ES256])));
            } else {
                return Err(KeyError::Parse {
                    path: path.to_owned(),
                });
            }
        }
        Ok(Authenticator { keys, guests })
    }

    /// Authenticate a `hello`: a token wins over a name when both are given.
    pub fn authenticate(
        &self,
        name: Option<&str>,
        token: Option<&str>,
    ) -> Result<Identity, AuthError> {
        if let Some(token) = token {
            return self.verify(token);
        }
        match name {
            Some(name) if valid_guest_name(name) => {
                if !self.guests {
                    return Err(AuthError::GuestsDisabled);
                }
                // With tokens accepted too, guests live in their own namespace, so
                // a guest named like a token user can never become that user
                // (PROTOCOL.md 1.1, "Identities").
                let user = if self.keys.is_empty() {
                    name.to_owned()
                } else {
                    format!("{GUEST_PREFIX}{name}")
                };
                Ok(Identity {
                    user,
                    name: name.to_owned(),
                    exp: None,
                    rooms: RoomAccess::All,
                    token: None,
                })
            }
            _ => Err(AuthError::NoIdentity),
        }
    }

    fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        if self.keys.is_empty() {
            return Err(AuthError::NoKey);
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| AuthError::InvalidToken(in_our_words(e.kind()).to_owned()))?;
        let mut last_err =
            AuthError::InvalidToken(format!("algorithm {:?} not accepted", header.alg));
        for (key, validation) in &self.keys {
            if !validation.algorithms.contains(&header.alg) {
                continue;
            }
            match jsonwebtoken::decode::<Claims>(token, key, validation) {
                Ok(data) => {
                    let c = data.claims;
                    if !crate::protocol::valid_user_id(&c.sub) {
                        return Err(AuthError::InvalidToken(
                            "sub must be 1-256 characters, no control characters, not only spaces"
                                .into(),
                        ));
                    }
                    if self.guests && c.sub.starts_with(GUEST_PREFIX) {
                        return Err(AuthError::InvalidToken(format!(
                            "sub may not start with {GUEST_PREFIX:?} on a server that also admits guests"
                        )));
                    }
                    return Ok(Identity {
                        name: c
                            .name
                            .filter(|n| !n.is_empty())
                            .unwrap_or_else(|| c.sub.clone()),
                        user: c.sub,
                        exp: c.exp,
                        rooms: match c.rooms {
                            None => RoomAccess::All,
                            Some(p) => RoomAccess::Patterns(p),
                        },
                        token: Some(TokenId {
                            jti: c.jti,
                            iat: c.iat,
                            exp: c.exp,
                        }),
                    });
                }
                Err(e) => {
                    last_err = match e.kind() {
                        jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                        kind => AuthError::InvalidToken(in_our_words(kind).to_owned()),
                    };
                }
            }
        }
        Err(last_err)
    }
}

fn validation(algs: &[Algorithm]) -> Validation {
    let mut v = Validation::new(algs[0]);
    v.algorithms = algs.to_vec();
    v.leeway = EXP_LEEWAY_SECS;
    // `exp` is optional in Hubbub tokens, but enforced when present.
    v.required_spec_claims.clear();
    v.required_spec_claims.insert("sub".into());
    v.validate_exp = true;
    // A token not valid yet is refused like an expired one (1.1).
    v.validate_nbf = true;
    v.validate_aud = false;
    v
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Mint an HS256 token (`hubbub token`).
pub fn mint_hs256(
    secret: &str,
    sub: &str,
    name: Option<&str>,
    rooms: Option<Vec<String>>,
    ttl_secs: Option<u64>,
) -> Result<String, jsonwebtoken::errors::Error> {
    let claims = Claims {
        sub: sub.to_owned(),
        name: name.map(str::to_owned),
        exp: ttl_secs.map(|t| now_secs() + t),
        rooms,
        // Minted tokens can be revoked one by one (`jti`) or all of a user's up to
        // a time (`iat`).
        jti: Some(format!("{:032x}", rand::random::<u128>())),
        iat: Some(now_secs()),
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailing_star_is_a_prefix_match() {
        let a = RoomAccess::Patterns(vec!["team-*".into(), "lobby".into()]);
        assert!(a.allows("team-x"));
        assert!(a.allows("lobby"));
        assert!(!a.allows("lobby2"));
        assert!(!a.allows("other"));
        assert!(RoomAccess::Patterns(vec!["*".into()]).allows("anything"));
    }

    #[test]
    fn minted_token_verifies_with_the_same_secret_only() {
        let t = mint_hs256("s3", "alice", Some("Alice"), None, Some(60)).unwrap();
        let ok = Authenticator::new(Some("s3"), None, false).unwrap();
        let id = ok.authenticate(None, Some(&t)).unwrap();
        assert_eq!((id.user.as_str(), id.name.as_str()), ("alice", "Alice"));
        let bad = Authenticator::new(Some("other"), None, false).unwrap();
        assert!(matches!(
            bad.authenticate(None, Some(&t)),
            Err(AuthError::InvalidToken(_))
        ));
    }

    #[test]
    fn expired_token_is_refused() {
        let claims = Claims {
            sub: "a".into(),
            name: None,
            exp: Some(now_secs() - 30),
            rooms: None,
            jti: None,
            iat: None,
        };
        let t = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"k"),
        )
        .unwrap();
        let auth = Authenticator::new(Some("k"), None, false).unwrap();
        assert!(matches!(
            auth.authenticate(None, Some(&t)),
            Err(AuthError::Expired)
        ));
    }

    #[test]
    fn guests_can_be_disabled() {
        let auth = Authenticator::new(None, None, false).unwrap();
        assert!(matches!(
            auth.authenticate(Some("bob"), None),
            Err(AuthError::GuestsDisabled)
        ));
        let auth = Authenticator::new(None, None, true).unwrap();
        assert!(matches!(
            auth.authenticate(Some("bad name"), None),
            Err(AuthError::NoIdentity)
        ));
    }
}
