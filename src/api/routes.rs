//! The routes of the server API, one handler each, in one table that the router
//! and the OpenAPI test both read.
//!
//! Owns: each route's checks of its path, query and body, and its answer. Must not:
//! authenticate or rate-limit (the guard in `api` did, before any handler runs), or
//! answer an error in any shape but [`ApiError`]'s.

use super::{Api, ApiError, json};
use crate::chat::{self, Actor};
use crate::hub::{Outgoing, Receipt, Submitter};
use crate::message::{ChannelKey, Current, EntryKind, keep_newest_within};
use crate::protocol::api::{
    Banned, Closed, Deleted, Removed, Revoked, RoomEntry, RoomsPage, Unbanned, UserStatus,
};
use crate::protocol::events::{Ack, CurrentHistory, CurrentRef, History, Presence, message_refs};
use crate::protocol::{
    self, ApiPost, DEFAULT_HISTORY, ErrorCode, MAX_CLIENT_ID_CHARS, MAX_HISTORY, MAX_PRESENCE_PAGE,
    ParseLimits, valid_room_name, valid_user_id,
};
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{MethodRouter, delete, get, post};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::oneshot;

/// The author of API messages that do not name one.
pub const SYSTEM_USER: &str = "hubbub";
/// How long a revocation is kept after the newest token it can name was issued:
/// the longest token lifetime Hubbub expects (a token living longer would be
/// accepted again after this).
const REVOCATION_KEEP_MS: i64 = 30 * 24 * 3600 * 1000;
/// Rooms per page of `GET /rooms`, by default and at most.
const DEFAULT_ROOMS_PAGE: usize = 100;
const MAX_ROOMS_PAGE: usize = 1000;

/// Every route: method, path (under `/api/v1`), handler.
fn table() -> Vec<(&'static str, &'static str, MethodRouter<Api>)> {
    vec![
        ("GET", "/openapi.json", get(openapi)),
        ("GET", "/stats", get(stats)),
        ("GET", "/rooms", get(list_rooms)),
        ("POST", "/rooms/{room}/messages", post(post_to_room)),
        ("GET", "/rooms/{room}/messages", get(room_history)),
        (
            "DELETE",
            "/rooms/{room}/messages/{seq}",
            delete(delete_message),
        ),
        ("GET", "/rooms/{room}/presence", get(room_presence)),
        ("GET", "/users/{user}", get(user_status)),
        ("POST", "/users/{user}/messages", post(post_direct)),
        ("POST", "/users/{user}/disconnect", post(disconnect)),
        (
            "POST",
            "/rooms/{room}/members/{user}/remove",
            post(remove_member),
        ),
        ("POST", "/users/{user}/ban", post(ban)),
        ("DELETE", "/users/{user}/ban", delete(unban)),
        ("POST", "/tokens/revoke", post(revoke)),
    ]
}

#[cfg(test)]
pub static ROUTES: std::sync::LazyLock<Vec<(&'static str, &'static str)>> =
    std::sync::LazyLock::new(|| table().into_iter().map(|(m, p, _)| (m, p)).collect());

pub(super) fn router() -> Router<Api> {
    table()
        .into_iter()
        .fold(Router::new(), |r, (_, path, handler)| {
            r.route(path, handler)
        })
}

type Query_ = Result<Query<HashMap<String, String>>, QueryRejection>;

async fn openapi() -> Response {
    json(StatusCode::OK, super::OPENAPI.to_owned())
}

fn room_of(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(room) = path.map_err(|e| ApiError::new(ErrorCode::BadRequest, e.body_text()))?;
    if !valid_room_name(&room) {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            "room names are 1-64 characters from A-Z a-z 0-9 _ - . :",
        ));
    }
    Ok(room)
}

fn user_of(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(user) = path.map_err(|e| ApiError::new(ErrorCode::BadRequest, e.body_text()))?;
    if !valid_user_id(&user) {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            "user ids are 1-256 characters, no control characters, not only spaces",
        ));
    }
    Ok(user)
}

fn body_of(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                ErrorCode::TooLarge,
                format!("the body is over {} bytes", super::MAX_BODY),
            )
        } else {
            ApiError::new(ErrorCode::BadRequest, e.body_text())
        }
    })
}

fn query_of(q: Query_) -> Result<HashMap<String, String>, ApiError> {
    q.map(|Query(m)| m)
        .map_err(|e| ApiError::new(ErrorCode::BadRequest, e.body_text()))
}

/// A whole-number query parameter, if given.
fn number(q: &HashMap<String, String>, key: &str) -> Result<Option<u64>, ApiError> {
    q.get(key)
        .map(|v| {
            v.parse::<u64>().map_err(|_| {
                ApiError::new(
                    ErrorCode::BadRequest,
                    format!("{key} must be a whole number, not {v:?}"),
                )
            })
        })
        .transpose()
}

/// `limit`: default `default`, clamped to `min..=max` as the WebSocket `history`
/// (0 is no messages) and `presence` (0 counts as 1) commands clamp theirs
/// (SERVER-API.md: the same limits give the same answers). Only what is not a
/// whole number is 400.
fn limit(q: &HashMap<String, String>, default: u64, min: u64, max: u64) -> Result<u64, ApiError> {
    Ok(number(q, "limit")?.unwrap_or(default).clamp(min, max))
}

/// `Idempotency-Key`, at most 64 characters: the message's `client_id`.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let v = v.to_str().map_err(|_| {
        ApiError::new(
            ErrorCode::BadRequest,
            "Idempotency-Key must be printable ASCII",
        )
    })?;
    if v.is_empty() || v.chars().count() > MAX_CLIENT_ID_CHARS {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            format!("Idempotency-Key must be 1-{MAX_CLIENT_ID_CHARS} characters"),
        ));
    }
    Ok(Some(v.to_owned()))
}

/// A message body and its `Idempotency-Key`, checked as a `send` would be.
fn parse_post(
    api: &Api,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(ApiPost, Option<String>), ApiError> {
    let body = body_of(body)?;
    let limits = ParseLimits {
        max_text: api.state.config.max_text,
    };
    let post = protocol::parse_api_post(&body, limits)?;
    Ok((post, idempotency_key(headers)?))
}

/// Store and publish `post` as `from` into `key`; 201 with what an `ack` says,
/// once both are done.
async fn post_message(
    api: &Api,
    from: &str,
    key: ChannelKey,
    post: ApiPost,
    client_id: Option<String>,
) -> Result<Response, ApiError> {
    let (tx, rx) = oneshot::channel();
    let author: Arc<str> = Arc::from(from);
    let to = Submitter::Api {
        user: author.clone(),
        name: author,
        reply: tx,
    };
    let mut out = Outgoing::message(post.text, post.meta, client_id);
    api.state.check_publish(from, &key, &mut out).await?;
    api.state.hub.submit_as(to, key.clone(), out).await?;
    api.state.metrics.command("api_post");
    let Receipt { seq, ts } = receipt(rx).await?;
    let (room, dm) = key.target(from);
    let body = Ack { room, dm, seq, ts };
    Ok(json(StatusCode::CREATED, protocol::encode(&body)))
}

async fn post_to_room(
    State(api): State<Api>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let room = room_of(path)?;
    let (mut post, client_id) = parse_post(&api, &headers, body)?;
    let from = post.from.take().unwrap_or_else(|| SYSTEM_USER.to_owned());
    post_message(&api, &from, ChannelKey::Room(room), post, client_id).await
}

async fn post_direct(
    State(api): State<Api>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let to = user_of(path)?;
    let (mut post, client_id) = parse_post(&api, &headers, body)?;
    let Some(from) = post.from.take() else {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            "missing field: from (the user the direct message is from)",
        ));
    };
    if from == to {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            "a direct message to yourself is not allowed",
        ));
    }
    post_message(&api, &from, ChannelKey::dm(&from, &to), post, client_id).await
}

async fn room_history(
    State(api): State<Api>,
    path: Result<Path<String>, PathRejection>,
    q: Query_,
) -> Result<Response, ApiError> {
    let room = room_of(path)?;
    let q = query_of(q)?;
    let before = number(&q, "before")?;
    let limit = limit(&q, DEFAULT_HISTORY, 0, MAX_HISTORY)?;
    // `current=true`: messages only, each in its current state (PROTOCOL.md 1.1).
    let current = match q.get("current").map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(v) => {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                format!("current must be true or false, not {v:?}"),
            ));
        }
    };
    let key = ChannelKey::Room(room.clone());
    // Bounded in bytes as the `history` command is (`more: true` when cut).
    let budget = api.state.config.max_reply_bytes;
    if current {
        let mut cur = chat::current_history(&api.state.hub, &key, before, limit).await?;
        let more = keep_newest_within(&mut cur, budget, Current::reply_size);
        let body = CurrentHistory {
            room: Some(&room),
            dm: None,
            messages: cur
                .iter()
                .map(|cur| CurrentRef { cur, viewer: "" })
                .collect(),
            more,
        };
        return Ok(json(StatusCode::OK, protocol::encode(&body)));
    }
    let mut msgs = api.state.hub.history(&key, before, limit).await?;
    let more = keep_newest_within(&mut msgs, budget, |m| m.reply_size());
    let body = History {
        room: Some(&room),
        dm: None,
        messages: message_refs(&msgs, ""),
        more,
    };
    Ok(json(StatusCode::OK, protocol::encode(&body)))
}

/// Delete a message as the server (`from` = `hubbub`): the `delete` entry of
/// PROTOCOL.md 1.1, stored and published like any entry before the 200.
async fn delete_message(
    State(api): State<Api>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path((room, seq)) =
        path.map_err(|e| ApiError::new(ErrorCode::BadRequest, e.body_text()))?;
    let room = room_of(Ok(Path(room)))?;
    let target = seq.parse::<u64>().ok().filter(|s| *s > 0).ok_or_else(|| {
        ApiError::new(
            ErrorCode::BadRequest,
            format!("seq must be a message's seq (1 or more), not {seq:?}"),
        )
    })?;
    let key = ChannelKey::Room(room.clone());
    let kind = EntryKind::Delete { target };
    chat::check_target(&api.state.hub, &key, &kind, Actor::Operator).await?;
    let (tx, rx) = oneshot::channel();
    let author: Arc<str> = Arc::from(chat::API_AUTHOR);
    let to = Submitter::Api {
        user: author.clone(),
        name: author,
        reply: tx,
    };
    let out = Outgoing {
        text: String::new(),
        meta: None,
        client_id: None,
        kind,
    };
    api.state.hub.submit_as(to, key, out).await?;
    api.state.metrics.command("api_delete");
    let Receipt { seq, .. } = receipt(rx).await?;
    tracing::info!(room, target, seq, "message deleted through the server API");
    let body = Deleted {
        room: &room,
        seq,
        target,
    };
    Ok(json(StatusCode::OK, protocol::encode(&body)))
}

/// Wait for a submitted entry to be stored and published.
async fn receipt(
    rx: oneshot::Receiver<Result<Receipt, protocol::CommandError>>,
) -> Result<Receipt, ApiError> {
    match rx.await {
        Ok(result) => Ok(result?),
        Err(_) => Err(ApiError::new(
            ErrorCode::Unavailable,
            "the server is shutting down; retry on another node",
        )),
    }
}

async fn room_presence(
    State(api): State<Api>,
    path: Result<Path<String>, PathRejection>,
    q: Query_,
) -> Result<Response, ApiError> {
    let room = room_of(path)?;
    let q = query_of(q)?;
    let max = MAX_PRESENCE_PAGE as u64;
    let limit = usize::try_from(limit(&q, max, 1, max)?).unwrap_or(MAX_PRESENCE_PAGE);
    let after = q.get("after").map(String::as_str);
    let page = api.state.hub.presence_page(&room, after, limit).await?;
    let body = Presence {
        room: &room,
        members: page.members,
        member_count: page.count,
        next: page.next,
    };
    Ok(json(StatusCode::OK, protocol::encode(&body)))
}

async fn list_rooms(State(api): State<Api>, q: Query_) -> Result<Response, ApiError> {
    let q = query_of(q)?;
    let prefix = q.get("prefix").map_or("", String::as_str);
    let after = q.get("after").map_or("", String::as_str);
    for (key, v) in [("prefix", prefix), ("after", after)] {
        let ok = v.is_empty() || valid_room_name(v);
        if !ok {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                format!(
                    "{key} must be (the start of) a room name: up to 64 of A-Z a-z 0-9 _ - . :"
                ),
            ));
        }
    }
    let limit = limit(&q, DEFAULT_ROOMS_PAGE as u64, 1, MAX_ROOMS_PAGE as u64)?;
    let limit = usize::try_from(limit).unwrap_or(MAX_ROOMS_PAGE);
    let page = api.state.hub.rooms_page(prefix, after, limit).await?;
    let body = RoomsPage {
        rooms: page
            .rooms
            .into_iter()
            .map(|(room, seq, member_count)| RoomEntry {
                room,
                seq,
                member_count,
            })
            .collect(),
        next: page.next,
    };
    Ok(json(StatusCode::OK, protocol::encode(&body)))
}

async fn user_status(
    State(api): State<Api>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let user = user_of(path)?;
    let (connections, rooms) = api.state.hub.user_status_everywhere(&user).await?;
    let body = UserStatus {
        user: &user,
        online: connections > 0 || !rooms.is_empty(),
        connections,
        rooms,
    };
    Ok(json(StatusCode::OK, protocol::encode(&body)))
}

async fn disconnect(
    State(api): State<Api>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let user = user_of(path)?;
    let body = body_of(body)?;
    let reason = protocol::parse_api_reason(&body)?
        .unwrap_or_else(|| "disconnected by the server".to_owned());
    let closed = api.state.hub.disconnect_user(&user, &reason).await?;
    tracing::info!(user, closed, "disconnected through the server API");
    Ok(json(StatusCode::OK, protocol::encode(&Closed { closed })))
}

async fn ban(
    State(api): State<Api>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let user = user_of(path)?;
    let body = body_of(body)?;
    let (until, reason) = protocol::parse_api_ban(&body, crate::hub::now_ms())?;
    let closed = api
        .state
        .hub
        .ban(&user, until, reason.as_deref().unwrap_or(""))
        .await?;
    tracing::info!(user, ?until, closed, "banned through the server API");
    let body = Banned {
        user: &user,
        until,
        closed,
    };
    Ok(json(StatusCode::OK, protocol::encode(&body)))
}

async fn unban(
    State(api): State<Api>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let user = user_of(path)?;
    let lifted = api.state.hub.unban(&user).await?;
    tracing::info!(user, lifted, "ban lifted through the server API");
    let body = Unbanned {
        user: &user,
        lifted,
    };
    Ok(json(StatusCode::OK, protocol::encode(&body)))
}

async fn remove_member(
    State(api): State<Api>,
    path: Result<Path<(String, String)>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Path((room, user)) =
        path.map_err(|e| ApiError::new(ErrorCode::BadRequest, e.body_text()))?;
    let room = room_of(Ok(Path(room)))?;
    let user = user_of(Ok(Path(user)))?;
    let body = body_of(body)?;
    let reason =
        protocol::parse_api_reason(&body)?.unwrap_or_else(|| "removed by the server".to_owned());
    let removed = api.state.hub.remove_member(&room, &user, &reason).await?;
    tracing::info!(
        room,
        user,
        removed,
        "removed from a room through the server API"
    );
    Ok(json(StatusCode::OK, protocol::encode(&Removed { removed })))
}

async fn stats(State(api): State<Api>) -> Result<Response, ApiError> {
    let mine = api.state.node_stats();
    // A node is gone when its figures are older than the node timeout (they are
    // refreshed every second).
    let max_age = i64::try_from(api.state.config.node_timeout.as_millis()).unwrap_or(i64::MAX);
    let all = api.state.hub.cluster_stats(mine, max_age).await?;
    Ok(json(StatusCode::OK, protocol::encode(&all)))
}

async fn revoke(
    State(api): State<Api>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_of(body)?;
    let now = crate::hub::now_ms();
    let (key, issued_before, kept_until) = match protocol::parse_api_revoke(&body)? {
        protocol::Revocation::Jti(jti) => (format!("j:{jti}"), None, now + REVOCATION_KEEP_MS),
        protocol::Revocation::User {
            user,
            issued_before,
        } => {
            let issued_ms = issued_before.saturating_mul(1000).min(now);
            (
                format!("u:{user}"),
                Some(issued_before),
                issued_ms.saturating_add(REVOCATION_KEEP_MS),
            )
        }
    };
    let closed = api
        .state
        .hub
        .revoke(&key, issued_before, kept_until)
        .await?;
    tracing::info!(closed, "tokens revoked through the server API");
    Ok(json(
        StatusCode::OK,
        protocol::encode(&Revoked { closed, kept_until }),
    ))
}
