//! Command handling for one session: `hello` first, then the room, DM, history,
//! presence, typing and ping commands, each answered with its reply or an `error`
//! carrying the command's `id`.
//!
//! Owns: the per-command checks that need the session (permissions from the
//! token, joined rooms, the rate limit) and the reply to each command. Must not:
//! build JSON by hand (events come from the protocol module) or keep shared state
//! (that is the hub's).
//!
//! A command error never closes the connection; only the session-level rules do
//! (no/second `hello` -> 4000, bad credentials -> 4001, persistent flooding -> 4029).

use super::{Exit, Session};
use crate::auth::{AuthError, EXP_LEEWAY_SECS, now_secs};
use crate::chat;
use crate::hub::{Conn, Outgoing};
use crate::limits::Verdict;
use crate::message::EntryKind;
use crate::message::{ChannelKey, Current, keep_newest_within};
use crate::metrics::ConnState;
use crate::protocol::events::{
    CurrentHistory, CurrentRef, History, Left, Limits, Pong, Presence, Refreshed, Welcome,
    message_refs,
};
use crate::protocol::{
    self, Command, CommandError, CommandId, ErrorCode, HistoryTarget, ParseLimits, close,
};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Bytes of a `history` or `joined` reply that cost one more rate-limit token.
const REPLY_BYTES_PER_TOKEN: usize = 64 * 1024;

impl Session {
    pub(super) fn reply(&self, frame: String) {
        self.state.metrics.out("reply", 1);
        self.outbox.push(frame.into());
    }

    pub(super) fn reply_error(&self, id: Option<&CommandId>, err: &CommandError) {
        self.state.metrics.out("error", 1);
        self.outbox.push(protocol::error_event(id, err).into());
    }

    /// Refuse a `hello` as unauthorized: the `error`, then 4001 with the same
    /// reason in the close frame (docs/PROTOCOL.md). A client that reconnects with
    /// a token that expired meanwhile reads "token expired" there and asks for a
    /// new one (the bundled SDK does); a bare "unauthorized" left it closed.
    fn refuse_hello(&self, id: Option<&CommandId>, why: String) -> Exit {
        self.reply_error(id, &CommandError::new(ErrorCode::Unauthorized, why.clone()));
        Exit::close(close::UNAUTHORIZED, why)
    }

    fn rate_limited(&self, id: Option<&CommandId>) {
        self.state.metrics.rate_limited.increment(1);
        self.reply_error(
            id,
            &CommandError::new(
                ErrorCode::RateLimited,
                format!(
                    "rate limit: {} commands per second (burst {})",
                    self.state.config.rate_limit,
                    self.state.config.rate_limit * 2
                ),
            ),
        );
    }

    /// A reply of `bytes` of messages costs one more token per 64 KiB (taken
    /// after the fact, so the next commands wait): a connection cannot pull
    /// large pages of history faster than about a megabyte a second.
    fn charge_reply(&mut self, bytes: usize) {
        let extra = bytes / REPLY_BYTES_PER_TOKEN;
        if extra > 0 {
            self.bucket.charge(Instant::now().into_std(), extra as f64);
        }
    }

    fn rate_limit_close(&self) -> Exit {
        self.state.metrics.rate_limited.increment(1);
        Exit::announced(close::RATE_LIMITED, "rate limit exceeded persistently")
    }

    /// Handle one text frame. Returns how to end the session, if it must end.
    pub(super) async fn on_text(&mut self, text: &str) -> Option<Exit> {
        let limits = ParseLimits {
            max_text: self.state.config.max_text,
        };
        let (id, cmd) = match protocol::parse_command(text, limits) {
            Ok(parsed) => parsed,
            Err(f) => {
                self.state.metrics.command("invalid");
                if self.conn.is_none() {
                    self.reply_error(f.id.as_ref(), &f.error);
                    return Some(Exit::close(close::NO_HELLO, "expected hello"));
                }
                // A frame that fails to parse costs a token like a command, so a
                // stream of garbage is limited and, kept up, closed (4029).
                return match self.bucket.check(Instant::now().into_std()) {
                    Verdict::Allowed => {
                        self.reply_error(f.id.as_ref(), &f.error);
                        None
                    }
                    Verdict::Refused => {
                        self.rate_limited(f.id.as_ref());
                        None
                    }
                    Verdict::Close => Some(self.rate_limit_close()),
                };
            }
        };
        self.state.metrics.command(cmd.kind());
        let id = id.as_ref();

        if self.conn.is_none() {
            return match cmd {
                Command::Hello { name, token, batch } => {
                    self.hello(id, name.as_deref(), token.as_deref(), batch)
                        .await
                }
                _ => {
                    self.reply_error(
                        id,
                        &CommandError::bad_request("the first message must be hello"),
                    );
                    Some(Exit::close(close::NO_HELLO, "expected hello"))
                }
            };
        }
        if let Command::Hello { .. } = cmd {
            self.reply_error(id, &CommandError::bad_request("hello was already said"));
            return Some(Exit::close(close::NO_HELLO, "second hello"));
        }

        let now = Instant::now().into_std();
        if matches!(cmd, Command::Leave { .. } | Command::Ping) {
            // Not limited by the protocol: answered even when the bucket is empty,
            // at a tenth of a token each, so only a flood closes the connection.
            if self.bucket.check_cost(now, 0.1) == Verdict::Close {
                return Some(self.rate_limit_close());
            }
        } else {
            match self.bucket.check(now) {
                Verdict::Allowed => {}
                Verdict::Refused => {
                    if matches!(cmd, Command::Typing { .. }) {
                        self.state.metrics.rate_limited.increment(1);
                    } else {
                        self.rate_limited(id);
                    }
                    return None;
                }
                Verdict::Close => return Some(self.rate_limit_close()),
            }
        }

        if let Err(e) = self.dispatch(id, cmd).await {
            self.reply_error(id, &e);
        }
        None
    }

    async fn hello(
        &mut self,
        id: Option<&CommandId>,
        name: Option<&str>,
        token: Option<&str>,
        batch: bool,
    ) -> Option<Exit> {
        let identity = match self.state.auth.authenticate(name, token) {
            Ok(identity) => identity,
            Err(AuthError::NoIdentity) => {
                self.reply_error(
                    id,
                    &CommandError::bad_request(AuthError::NoIdentity.to_string()),
                );
                return Some(Exit::close(close::NO_HELLO, "no valid hello"));
            }
            Err(e) => {
                let remote = self.state.session_ip(self.id);
                tracing::info!(conn = self.id, remote = ?remote, error = %e, "hello refused");
                return Some(self.refuse_hello(id, e.to_string()));
            }
        };
        tracing::Span::current().record("user", identity.user.as_str());
        // The user and name move into the hub's `Conn`; the session keeps only what
        // it checks later (one copy of each string per connection, not two).
        let crate::auth::Identity {
            user,
            name,
            exp,
            rooms: access,
            token,
        } = identity;
        let conn = Arc::new(Conn {
            id: self.id,
            user: user.into(),
            name: name.into(),
            outbox: self.outbox.clone(),
            token: std::sync::Mutex::new(token.map(Box::new)),
        });
        self.deadline = exp.map(|exp| {
            let left = (exp + EXP_LEEWAY_SECS).saturating_sub(now_secs());
            Instant::now() + Duration::from_secs(left)
        });
        self.outbox.set_batch(batch);
        self.warned = false;
        // Reachable for direct messages (on every node) before `welcome` goes out.
        self.state.hub.register(&conn).await;
        // Checked once registered: a ban that lands meanwhile either is seen here or
        // finds this connection registered and closes it.
        if let Some(why) = self.state.hub.banned(&conn.user).or_else(|| {
            self.state
                .hub
                .revoked(&conn)
                .then(|| "token revoked".to_owned())
        }) {
            self.state.hub.unregister(&conn, std::iter::empty::<&str>());
            let remote = self.state.session_ip(self.id);
            tracing::info!(conn = self.id, remote = ?remote, why = %why, "hello refused");
            return Some(self.refuse_hello(id, why));
        }
        let cfg = &self.state.config;
        let closed = self
            .state
            .hub
            .enforce_connection_limit(&conn.user, cfg.max_connections_per_user);
        if closed > 0 {
            tracing::info!(
                conn = self.id,
                closed,
                "closed a user's oldest connection at --max-connections-per-user"
            );
        }
        // The user's rooms and DM peers with unread counts: one store query.
        let states = match chat::channel_states(&self.state.hub, &conn.user).await {
            Ok(states) => states,
            Err(e) => {
                tracing::warn!(conn = self.id, error = %e.message, "welcome without chat state");
                Vec::new()
            }
        };
        self.reply(protocol::reply(
            "welcome",
            id,
            Welcome {
                protocol: protocol::VERSION,
                user: &conn.user,
                name: &conn.name,
                conn: self.id.to_string(),
                heartbeat_ms: u64::try_from(cfg.heartbeat.as_millis()).unwrap_or(u64::MAX),
                limits: Limits {
                    max_message: cfg.max_message,
                    max_text: cfg.max_text,
                    max_meta: protocol::MAX_META_BYTES,
                    max_client_id: protocol::MAX_CLIENT_ID_CHARS,
                    max_history: protocol::MAX_HISTORY,
                    max_rooms_per_conn: cfg.max_rooms_per_conn,
                    rate_limit: cfg.rate_limit,
                    rate_burst: cfg.rate_limit.saturating_mul(2),
                    send_queue: cfg.send_queue,
                },
                state: chat::unread_lists(&states, &conn.user),
            },
        ));
        self.state
            .metrics
            .conn_state(Some(ConnState::AwaitingHello), Some(ConnState::Active));
        self.conn = Some(conn);
        self.access = Some(access);
        None
    }

    fn may_join(&self, room: &str) -> Result<(), CommandError> {
        match &self.access {
            Some(a) if a.allows(room) => Ok(()),
            _ => Err(CommandError::new(
                ErrorCode::Forbidden,
                format!("your token does not allow room {room:?}"),
            )),
        }
    }

    fn in_room(&self, room: &str) -> bool {
        self.rooms.iter().any(|r| &**r == room)
    }

    fn joined(&self, room: &str) -> Result<(), CommandError> {
        if self.in_room(room) {
            Ok(())
        } else {
            Err(CommandError::new(
                ErrorCode::NotJoined,
                format!("join room {room:?} first"),
            ))
        }
    }

    /// `refresh`: hold a new token of the same user from now on. Subscriptions and
    /// presence stay; rooms the new token no longer allows are left (`left` with
    /// `reason: forbidden`) before the `refreshed` reply. A refusal keeps the
    /// connection on its old token.
    fn refresh(
        &mut self,
        conn: &Arc<Conn>,
        id: Option<&CommandId>,
        token: &str,
    ) -> Result<(), CommandError> {
        if conn.token().is_none() {
            return Err(CommandError::bad_request(
                "a guest connection has no token to refresh; say hello with a token",
            ));
        }
        let identity = self
            .state
            .auth
            .authenticate(None, Some(token))
            .map_err(|e| CommandError::new(ErrorCode::Unauthorized, e.to_string()))?;
        if identity.user != *conn.user {
            return Err(CommandError::new(
                ErrorCode::Forbidden,
                "the new token is for another user (its sub differs); the connection keeps its token",
            ));
        }
        let new = identity.token.unwrap_or(crate::auth::TokenId {
            jti: None,
            iat: None,
            exp: identity.exp,
        });
        if self.state.hub.token_revoked(&conn.user, &new) {
            return Err(CommandError::new(
                ErrorCode::Unauthorized,
                "that token is revoked; the connection keeps its token",
            ));
        }
        conn.set_token(new);
        self.deadline = identity.exp.map(|exp| {
            let left = (exp + EXP_LEEWAY_SECS).saturating_sub(now_secs());
            Instant::now() + Duration::from_secs(left)
        });
        self.warned = false;
        let access = identity.rooms;
        let gone: Vec<Box<str>> = self
            .rooms
            .iter()
            .filter(|r| !access.allows(r))
            .cloned()
            .collect();
        for room in gone {
            self.state.hub.leave(conn, &room);
            self.rooms.retain(|r| *r != room);
            self.state.metrics.out("left", 1);
            self.outbox.push(
                protocol::reply(
                    "left",
                    None,
                    Left {
                        room: &room,
                        reason: Some("forbidden"),
                    },
                )
                .into(),
            );
        }
        self.access = Some(access);
        self.reply(protocol::reply(
            "refreshed",
            id,
            Refreshed { exp: identity.exp },
        ));
        Ok(())
    }

    /// The channel a reading command names (`history`, `read`): a room the user may
    /// join, or a DM with someone else.
    fn readable(&self, conn: &Conn, target: &HistoryTarget) -> Result<ChannelKey, CommandError> {
        match target {
            HistoryTarget::Room(room) => {
                self.may_join(room)?;
                Ok(ChannelKey::Room(room.clone()))
            }
            HistoryTarget::Dm(peer) => {
                if **peer == *conn.user {
                    return Err(CommandError::bad_request(
                        "there are no direct messages with yourself",
                    ));
                }
                Ok(ChannelKey::dm(&conn.user, peer))
            }
        }
    }

    /// The channel a writing command names (`edit`, `delete`, `react`): a room this
    /// connection has joined (like `send`), or a DM with someone else.
    fn writable(&self, conn: &Conn, target: &HistoryTarget) -> Result<ChannelKey, CommandError> {
        if let HistoryTarget::Room(room) = target {
            self.joined(room)?;
        }
        self.readable(conn, target)
    }

    async fn dispatch(&mut self, id: Option<&CommandId>, cmd: Command) -> Result<(), CommandError> {
        let Some(conn) = self.conn.clone() else {
            return Err(CommandError::bad_request("say hello first"));
        };
        let hub = self.state.hub.clone();
        match cmd {
            Command::Hello { .. } => Err(CommandError::bad_request("hello was already said")),
            Command::Join {
                room,
                since,
                history,
                persist,
            } => {
                self.may_join(&room)?;
                let max = self.state.config.max_rooms_per_conn;
                if !self.in_room(&room) && self.rooms.len() >= max {
                    return Err(CommandError::new(
                        ErrorCode::TooLarge,
                        format!("a connection may join at most {max} rooms"),
                    ));
                }
                if persist {
                    // Before `joined`: a client that sees the reply finds the room in
                    // its next `welcome` or `unread`.
                    chat::set_member(&hub, &conn.user, &room, true).await?;
                }
                let bytes = hub.join(&conn, id, &room, since, history).await?;
                self.charge_reply(bytes);
                if !self.in_room(&room) {
                    self.rooms.push(room.into_boxed_str());
                }
                Ok(())
            }
            Command::Leave { room, persist } => {
                if persist {
                    // One of the user's rooms may be left from a device that has not
                    // joined it.
                    chat::set_member(&hub, &conn.user, &room, false).await?;
                } else {
                    self.joined(&room)?;
                }
                hub.leave(&conn, &room);
                self.rooms.retain(|r| **r != *room);
                self.reply(protocol::reply(
                    "left",
                    id,
                    Left {
                        room: &room,
                        reason: None,
                    },
                ));
                Ok(())
            }
            Command::Send {
                room,
                text,
                meta,
                client_id,
            } => {
                self.joined(&room)?;
                let mut out = Outgoing::message(text, meta, client_id);
                let key = ChannelKey::Room(room);
                self.state.check_publish(&conn.user, &key, &mut out).await?;
                hub.submit(&conn, id.cloned(), key, out).await
            }
            Command::Direct {
                to,
                text,
                meta,
                client_id,
            } => {
                if *to == *conn.user {
                    return Err(CommandError::bad_request(
                        "a direct message to yourself is not allowed",
                    ));
                }
                let key = ChannelKey::dm(&conn.user, &to);
                let mut out = Outgoing::message(text, meta, client_id);
                self.state.check_publish(&conn.user, &key, &mut out).await?;
                hub.submit(&conn, id.cloned(), key, out).await
            }
            Command::History {
                target,
                before,
                limit,
                current,
            } => {
                let key = self.readable(&conn, &target)?;
                let (room, dm) = key.target(&conn.user);
                let budget = self.state.config.max_reply_bytes;
                if current {
                    let mut cur = chat::current_history(&hub, &key, before, limit).await?;
                    let more = keep_newest_within(&mut cur, budget, Current::reply_size);
                    self.charge_reply(cur.iter().map(Current::reply_size).sum());
                    let messages = cur
                        .iter()
                        .map(|cur| CurrentRef {
                            cur,
                            viewer: &conn.user,
                        })
                        .collect();
                    self.reply(protocol::reply(
                        "history",
                        id,
                        CurrentHistory {
                            room,
                            dm,
                            messages,
                            more,
                        },
                    ));
                    return Ok(());
                }
                let mut msgs = hub.history(&key, before, limit).await?;
                let more = keep_newest_within(&mut msgs, budget, |m| m.reply_size());
                self.charge_reply(msgs.iter().map(|m| m.reply_size()).sum());
                let messages = message_refs(&msgs, &conn.user);
                self.reply(protocol::reply(
                    "history",
                    id,
                    History {
                        room,
                        dm,
                        messages,
                        more,
                    },
                ));
                Ok(())
            }
            Command::Edit {
                channel,
                target,
                text,
                client_id,
            } => {
                let key = self.writable(&conn, &channel)?;
                let kind = EntryKind::Edit { target };
                let out = Outgoing {
                    text,
                    meta: None,
                    client_id,
                    kind,
                };
                chat::act(&self.state, &conn, id.cloned(), key, out).await
            }
            Command::Delete {
                channel,
                target,
                client_id,
            } => {
                let key = self.writable(&conn, &channel)?;
                let out = Outgoing {
                    text: String::new(),
                    meta: None,
                    client_id,
                    kind: EntryKind::Delete { target },
                };
                chat::act(&self.state, &conn, id.cloned(), key, out).await
            }
            Command::React {
                channel,
                target,
                emoji,
                on,
                client_id,
            } => {
                let key = self.writable(&conn, &channel)?;
                let out = Outgoing {
                    text: String::new(),
                    meta: None,
                    client_id,
                    kind: EntryKind::React { target, emoji, on },
                };
                chat::act(&self.state, &conn, id.cloned(), key, out).await
            }
            Command::Read { channel, seq } => {
                let key = self.readable(&conn, &channel)?;
                chat::mark_read(&hub, &conn, id, &key, seq).await
            }
            Command::Refresh { token } => self.refresh(&conn, id, &token),
            Command::Unread => {
                let states = chat::channel_states(&hub, &conn.user).await?;
                self.reply(protocol::reply(
                    "unread",
                    id,
                    chat::unread_lists(&states, &conn.user),
                ));
                Ok(())
            }
            Command::Presence { room, after, limit } => {
                self.may_join(&room)?;
                let page = hub.presence(&room, after.as_deref(), limit);
                self.reply(protocol::reply(
                    "presence",
                    id,
                    Presence {
                        room: &room,
                        members: page.members,
                        member_count: page.count,
                        next: page.next,
                    },
                ));
                Ok(())
            }
            Command::Typing { room } => {
                self.joined(&room)?;
                hub.typing(&conn, &room);
                Ok(())
            }
            Command::Ping => {
                self.reply(protocol::reply("pong", id, Pong {}));
                Ok(())
            }
        }
    }
}
