//! The server API for app backends (SERVER-API.md, "Access" and "Routes"): HTTP
//! and JSON under `/api/v1/`, on the same listener as `/ws`.
//!
//! Owns: API keys and their per-key rate limits, the error shape, body and query
//! checks, and turning each route into a call on the hub. Must not: reach the
//! store or the broker except through the hub, build WebSocket events, or keep
//! state of its own beyond the rate limits (everything it changes, the hub owns).
//!
//! A message posted here takes the same path as a WebSocket `send`: the same
//! checks, the same sequence, committed and published before the 201 (the
//! committer answers it as it would an `ack`). `Idempotency-Key` is the message's
//! `client_id` (per author), so a repeat within 10 minutes answers the original.

mod routes;

use crate::app::AppState;
use crate::limits::{TokenBucket, Verdict};
use crate::protocol::api::{error_body, status_of};
use crate::protocol::{CommandError, ErrorCode};
use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Largest request body: 413 beyond it.
pub const MAX_BODY: usize = 64 * 1024;
/// The OpenAPI 3.1 document of every route (served at `/api/v1/openapi.json`).
pub const OPENAPI: &str = include_str!("openapi.json");

#[derive(Clone)]
struct Api {
    state: Arc<AppState>,
    keys: Arc<[String]>,
    /// One bucket per key, in the order of `keys`.
    buckets: Arc<Mutex<Vec<TokenBucket>>>,
}

/// An API error: the documented status and `{"error": {"code", "message"}}`.
#[derive(Debug)]
pub struct ApiError(pub CommandError);

impl ApiError {
    fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError(CommandError::new(code, message))
    }
}

impl From<CommandError> for ApiError {
    fn from(e: CommandError) -> Self {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(status_of(self.0.code))
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        json(status, error_body(&self.0))
    }
}

/// A JSON response with `status`.
fn json(status: StatusCode, body: String) -> Response {
    let mut r = (status, body).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// The `/api/v1` router (nested by the server). Without keys every path answers
/// 404: the API is off.
pub fn routes<S: Clone + Send + Sync + 'static>(state: Arc<AppState>) -> Router<S> {
    let keys: Arc<[String]> = state.config.api_keys.clone().into();
    if keys.is_empty() {
        return Router::new().fallback(|| async {
            ApiError::new(
                ErrorCode::NotFound,
                "the server API is off: start hubbub with --api-key to turn it on",
            )
        });
    }
    let now = Instant::now();
    let buckets = keys
        .iter()
        .map(|_| TokenBucket::new(state.config.api_rate_limit, now))
        .collect();
    let api = Api {
        state,
        keys,
        buckets: Arc::new(Mutex::new(buckets)),
    };
    // A route is a method and a path (SERVER-API.md's table): a method the path
    // does not take is an unknown route too, 404 with the error body, not axum's
    // bodiless 405 (the contract's errors all carry the body, and 405 has no code).
    routes::router()
        .fallback(|| async { ApiError::new(ErrorCode::NotFound, "no such route") })
        .method_not_allowed_fallback(|method: axum::http::Method| async move {
            ApiError::new(
                ErrorCode::NotFound,
                format!("no such route: this path does not take {method}"),
            )
        })
        .layer(middleware::from_fn_with_state(api.clone(), guard))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(api)
}

/// Every call but the OpenAPI document needs a key, and spends one of its tokens.
async fn guard(State(api): State<Api>, req: Request<Body>, next: Next) -> Response {
    if req.uri().path() == "/openapi.json" {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(given) = given else {
        return ApiError::new(
            ErrorCode::Unauthorized,
            "missing API key: send Authorization: Bearer <key>",
        )
        .into_response();
    };
    let Some(index) = key_index(&api.keys, given) else {
        return ApiError::new(ErrorCode::Unauthorized, "unknown API key").into_response();
    };
    let verdict = {
        let mut buckets = api.buckets.lock().unwrap_or_else(|p| p.into_inner());
        match buckets.get_mut(index) {
            Some(b) => b.check(Instant::now()),
            None => Verdict::Allowed,
        }
    };
    if verdict != Verdict::Allowed {
        api.state.metrics.rate_limited.increment(1);
        let limit = api.state.config.api_rate_limit;
        let mut r = ApiError::new(
            ErrorCode::RateLimited,
            format!(
                "rate limit: {limit} requests per second per key (burst {})",
                2 * limit
            ),
        )
        .into_response();
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return r;
    }
    next.run(req).await
}

/// Which configured key `given` is. Every key is compared, each in constant time,
/// so the time taken does not say how much of a key was right (it may say how
/// long the keys are, which is not secret).
fn key_index(keys: &[String], given: &str) -> Option<usize> {
    let mut found = None;
    for (i, k) in keys.iter().enumerate() {
        if constant_time_eq::constant_time_eq(k.as_bytes(), given.as_bytes()) {
            found = Some(i);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_found_only_when_equal() {
        let keys = ["k-one-0123456789".to_owned(), "k-two-0123456789".to_owned()];
        assert_eq!(key_index(&keys, "k-two-0123456789"), Some(1));
        assert_eq!(key_index(&keys, "k-two-012345678"), None);
        assert_eq!(key_index(&keys, ""), None);
    }

    #[test]
    fn the_openapi_document_lists_exactly_the_served_routes() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("openapi.json is JSON");
        let paths = doc["paths"].as_object().expect("paths");
        let mut documented: Vec<String> = Vec::new();
        for (path, ops) in paths {
            for method in ops.as_object().expect("operations").keys() {
                if ["get", "post", "delete", "put", "patch"].contains(&method.as_str()) {
                    documented.push(format!("{} {path}", method.to_uppercase()));
                }
            }
        }
        documented.sort();
        let mut served: Vec<String> = routes::ROUTES
            .iter()
            .map(|(m, p)| format!("{m} {p}"))
            .collect();
        served.sort();
        assert_eq!(documented, served);
    }
}
