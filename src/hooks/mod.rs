//! Calls out to the app's backend (SERVER-API.md): the publish check, a synchronous
//! moderation hook asked before a message is stored; the webhooks ([`webhooks`]),
//! every stored entry delivered from a durable queue; and the signature every such
//! request carries.
//!
//! Owns: the outbound HTTP client, request signing (`Hubbub-Timestamp`,
//! `Hubbub-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">`), the
//! publish check's timeout and failure mode, and what its answer may change.
//! Must not: store, sequence or deliver anything (the caller submits the message
//! it allowed), hold a lock across the request, or build JSON by hand (the
//! protocol module has the request and answer shapes).

pub mod webhooks;

use crate::config::{Config, FailureMode};
use crate::hub::Outgoing;
use crate::message::{ChannelKey, EntryKind};
use crate::protocol::api::{PublishCheckRequest, PublishVerdict, parse_publish_verdict};
use crate::protocol::{self, CommandError, ErrorCode, ParseLimits};
use aws_lc_rs::hmac;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("cannot build the HTTP client for the app's backend: {0}")]
    Client(#[from] reqwest::Error),
}

/// Signs request bodies for the app's backend with `--webhook-secret`.
pub struct Signer {
    key: hmac::Key,
}

impl Signer {
    pub fn new(secret: &str) -> Signer {
        Signer {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes()),
        }
    }

    /// `sha256=<hex>` of `"<timestamp>.<body>"`.
    pub fn signature(&self, timestamp: &str, body: &[u8]) -> String {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(timestamp.as_bytes());
        ctx.update(b".");
        ctx.update(body);
        let tag = ctx.sign();
        let mut out = String::with_capacity(7 + 64);
        out.push_str("sha256=");
        for b in tag.as_ref() {
            // Writing to a String cannot fail.
            let _ = write!(out, "{b:02x}");
        }
        out
    }
}

/// A JSON POST of `body` to `url`, with `Hubbub-Timestamp` and `Hubbub-Signature`
/// when there is a signer: the one request shape of the publish check and the
/// webhooks.
fn signed_post(
    client: &reqwest::Client,
    url: &str,
    signer: Option<&Signer>,
    body: String,
) -> reqwest::RequestBuilder {
    let mut req = client.post(url).header("content-type", "application/json");
    if let Some(signer) = signer {
        let ts = (crate::hub::now_ms() / 1000).to_string();
        req = req
            .header("hubbub-signature", signer.signature(&ts, body.as_bytes()))
            .header("hubbub-timestamp", ts);
    }
    req.body(body)
}

/// The publish check (`--publish-check-url`).
pub struct PublishCheck {
    url: String,
    timeout: Duration,
    failure: FailureMode,
    client: reqwest::Client,
    signer: Option<Signer>,
    limits: ParseLimits,
}

/// How one check ended, for the metrics.
#[derive(Clone, Copy)]
enum Outcome {
    Allowed,
    Rewritten,
    Denied,
    Failed,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Rewritten => "rewritten",
            Outcome::Denied => "denied",
            Outcome::Failed => "failed",
        }
    }
}

impl PublishCheck {
    /// The publish check the configuration asks for, if any.
    pub fn from_config(config: &Config) -> Result<Option<PublishCheck>, HookError> {
        let Some(url) = &config.publish_check_url else {
            return Ok(None);
        };
        if config.webhook_secret.is_none() {
            tracing::warn!(
                "--publish-check-url without --webhook-secret: its requests are not signed"
            );
        }
        let client = reqwest::Client::builder()
            .timeout(config.publish_check_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .build()?;
        Ok(Some(PublishCheck {
            url: url.clone(),
            timeout: config.publish_check_timeout,
            failure: config.publish_check_failure,
            client,
            signer: config.webhook_secret.as_deref().map(Signer::new),
            limits: ParseLimits {
                max_text: config.max_text,
            },
        }))
    }

    /// Ask whether `user` may store `out` in `key`; on an allow, `out` carries any
    /// replacement `text`/`meta` the answer gave. A denial is `forbidden` with the
    /// backend's reason; a timeout or failure follows `--publish-check-failure`.
    /// Deletes and reactions are not checked.
    pub async fn check(
        &self,
        user: &str,
        key: &ChannelKey,
        out: &mut Outgoing,
    ) -> Result<(), CommandError> {
        let target = match out.kind {
            EntryKind::Message => None,
            EntryKind::Edit { target } => Some(target),
            EntryKind::Delete { .. } | EntryKind::React { .. } => return Ok(()),
        };
        let (room, dm) = key.target(user);
        let body = protocol::encode(&PublishCheckRequest {
            kind: if target.is_some() { "edit" } else { "message" },
            user,
            room,
            dm,
            target,
            text: &out.text,
            meta: out.meta.as_deref(),
        });
        let started = Instant::now();
        let result = self.ask(body).await;
        metrics::histogram!("hubbub_publish_check_seconds").record(started.elapsed().as_secs_f64());
        let outcome = match result {
            Ok(PublishVerdict::Allow { text, meta }) => {
                let rewritten = text.is_some() || meta.is_some();
                if let Some(text) = text {
                    out.text = text;
                }
                if let Some(meta) = meta {
                    out.meta = meta;
                }
                Ok(if rewritten {
                    Outcome::Rewritten
                } else {
                    Outcome::Allowed
                })
            }
            Ok(PublishVerdict::Deny { reason }) => Err((
                Outcome::Denied,
                CommandError::new(
                    ErrorCode::Forbidden,
                    reason.unwrap_or_else(|| "refused by the publish check".to_owned()),
                ),
            )),
            Err(why) => {
                tracing::warn!(url = %self.url, error = %why, "publish check failed");
                match self.failure {
                    FailureMode::Open => Ok(Outcome::Failed),
                    FailureMode::Closed => Err((
                        Outcome::Failed,
                        CommandError::new(
                            ErrorCode::Unavailable,
                            "the publish check did not answer; retry shortly",
                        ),
                    )),
                }
            }
        };
        let (label, result) = match outcome {
            Ok(o) => (o.label(), Ok(())),
            Err((o, e)) => (o.label(), Err(e)),
        };
        metrics::counter!("hubbub_publish_checks_total", "result" => label).increment(1);
        result
    }

    /// POST `body`, signed, and read the verdict; an error says why there is none.
    async fn ask(&self, body: String) -> Result<PublishVerdict, String> {
        let req = signed_post(&self.client, &self.url, self.signer.as_ref(), body);
        let res = req.send().await.map_err(|e| {
            if e.is_timeout() {
                format!("no answer within {:?}", self.timeout)
            } else {
                e.to_string()
            }
        })?;
        let status = res.status();
        if !status.is_success() {
            return Err(format!("answered {status}"));
        }
        let bytes = res.bytes().await.map_err(|e| e.to_string())?;
        parse_publish_verdict(&bytes, self.limits).map_err(|e| e.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hex_hmac_sha256_of_timestamp_dot_body() {
        // Reference: Python's hmac.new(b"Jefe", b'1700000000.{"a":1}', sha256).
        assert_eq!(
            Signer::new("Jefe").signature("1700000000", br#"{"a":1}"#),
            "sha256=fa5f6481efc59da48b19c9dc10196c9953e5651f8304b3a318b6b87d70272e0a"
        );
    }
}
