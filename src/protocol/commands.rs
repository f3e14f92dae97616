//! Client commands: parsing one frame into a validated [`Command`] and its `id`.
//!
//! Owns: the command shapes of docs/PROTOCOL.md ("Commands") and the per-field
//! checks (names, text length, `meta`, `client_id`, counts). Must not: decide
//! permissions or touch state; that is the session's and the hub's.

use super::{
    CommandError, CommandId, DEFAULT_HISTORY, ErrorCode, MAX_CLIENT_ID_CHARS, MAX_HISTORY,
    MAX_META_BYTES, MAX_PRESENCE_PAGE, MAX_USER_ID_CHARS, valid_room_name,
};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// `since` of a `join`: where the client's copy of a room's history ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Since {
    pub seq: u64,
    pub epoch: String,
}

/// The channel a command names: `room` or `dm` (`history`, `edit`, `delete`,
/// `react`, `read`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HistoryTarget {
    Room(String),
    Dm(String),
}

/// A parsed, validated client command.
#[derive(Debug, Clone)]
pub enum Command {
    Hello {
        name: Option<String>,
        token: Option<String>,
        batch: bool,
    },
    Join {
        room: String,
        since: Option<Since>,
        history: u64,
        /// Make the room one of the user's rooms (1.1).
        persist: bool,
    },
    Leave {
        room: String,
        /// The room is no longer one of the user's rooms (1.1).
        persist: bool,
    },
    Send {
        room: String,
        text: String,
        meta: Option<Box<RawValue>>,
        client_id: Option<String>,
    },
    Direct {
        to: String,
        text: String,
        meta: Option<Box<RawValue>>,
        client_id: Option<String>,
    },
    History {
        target: HistoryTarget,
        before: Option<u64>,
        limit: u64,
        /// Messages only, each in its current state (1.1).
        current: bool,
    },
    /// A new text for one's own message at `target` (1.1).
    Edit {
        channel: HistoryTarget,
        target: u64,
        text: String,
        client_id: Option<String>,
    },
    /// Take back one's own message at `target` (1.1).
    Delete {
        channel: HistoryTarget,
        target: u64,
        client_id: Option<String>,
    },
    /// Add (`on`) or remove a reaction to the message at `target` (1.1).
    React {
        channel: HistoryTarget,
        target: u64,
        emoji: String,
        on: bool,
        client_id: Option<String>,
    },
    /// The user has read `channel` up to `seq` (1.1).
    Read {
        channel: HistoryTarget,
        seq: u64,
    },
    /// The user's channels with unread counts (1.1).
    Unread,
    /// Swap the connection's token without reconnecting (1.1).
    Refresh {
        token: String,
    },
    Presence {
        room: String,
        /// Only members whose user id sorts after this one (the previous page's
        /// `next`).
        after: Option<String>,
        /// Page size, 1..=[`MAX_PRESENCE_PAGE`] (clamped; default the maximum).
        limit: usize,
    },
    Typing {
        room: String,
    },
    Ping,
}

impl Command {
    /// The command's `type`, for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::Hello { .. } => "hello",
            Command::Join { .. } => "join",
            Command::Leave { .. } => "leave",
            Command::Send { .. } => "send",
            Command::Direct { .. } => "direct",
            Command::History { .. } => "history",
            Command::Edit { .. } => "edit",
            Command::Delete { .. } => "delete",
            Command::React { .. } => "react",
            Command::Read { .. } => "read",
            Command::Unread => "unread",
            Command::Refresh { .. } => "refresh",
            Command::Presence { .. } => "presence",
            Command::Typing { .. } => "typing",
            Command::Ping => "ping",
        }
    }
}

/// Why a frame could not become a command. `id` is kept whenever the frame had one,
/// so that the `error` reply can carry it.
#[derive(Debug, Clone)]
pub struct ParseFailure {
    pub id: Option<CommandId>,
    pub error: CommandError,
}

/// Limits that parsing enforces (they come from the configuration).
#[derive(Debug, Clone, Copy)]
pub struct ParseLimits {
    pub max_text: usize,
}

/// Parse one client frame (one JSON object) into a command and its `id`.
pub fn parse_command(
    frame: &str,
    limits: ParseLimits,
) -> Result<(Option<CommandId>, Command), ParseFailure> {
    let value: Value = serde_json::from_str(frame).map_err(|e| ParseFailure {
        id: None,
        error: CommandError::bad_request(format!("invalid JSON: {e}")),
    })?;
    let Value::Object(obj) = value else {
        return Err(ParseFailure {
            id: None,
            error: CommandError::bad_request("a message must be a JSON object"),
        });
    };
    let id = match obj.get("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(CommandId::Str(s.clone())),
        Some(Value::Number(n)) if n.is_i64() => n.as_i64().map(CommandId::Int),
        Some(Value::Number(n)) if n.is_u64() => {
            return Err(ParseFailure {
                id: None,
                error: CommandError::bad_request(format!("id {n} is out of range")),
            });
        }
        Some(_) => {
            return Err(ParseFailure {
                id: None,
                error: CommandError::bad_request("id must be a string or an integer"),
            });
        }
    };
    let fields = Fields {
        obj: &obj,
        raw: frame.as_bytes(),
    };
    match fields.parse(limits) {
        Ok(cmd) => Ok((id, cmd)),
        Err(error) => Err(ParseFailure { id, error }),
    }
}

/// A message posted through the server API (`POST .../messages`): the same
/// checks on `text` and `meta` as `send`, plus the author `from` (a user id);
/// unknown fields are ignored.
#[derive(Debug)]
pub struct ApiPost {
    pub text: String,
    pub meta: Option<Box<RawValue>>,
    pub from: Option<String>,
}

/// Parse an API message body (a JSON object).
pub fn parse_api_post(body: &[u8], limits: ParseLimits) -> Result<ApiPost, CommandError> {
    let obj = api_object(body)?;
    let f = Fields {
        obj: &obj,
        raw: body,
    };
    let from = match obj.get("from") {
        None | Some(Value::Null) => None,
        Some(_) => Some(f.user_id("from")?),
    };
    Ok(ApiPost {
        text: f.text(limits)?,
        meta: f.meta()?,
        from,
    })
}

/// An API body that only carries an optional `reason` (kick, remove): at most
/// [`MAX_REASON_CHARS`] characters. An empty body is no reason.
pub fn parse_api_reason(body: &[u8]) -> Result<Option<String>, CommandError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let obj = api_object(body)?;
    let f = Fields {
        obj: &obj,
        raw: body,
    };
    let reason = f.opt_str("reason")?.map(str::to_owned);
    if reason
        .as_ref()
        .is_some_and(|r| r.chars().count() > MAX_REASON_CHARS)
    {
        return Err(CommandError::new(
            ErrorCode::TooLarge,
            format!("reason must be at most {MAX_REASON_CHARS} characters"),
        ));
    }
    Ok(reason)
}

/// The body of `POST /users/{user}/ban`: optional `until` (ms since the epoch, in
/// the future) and `reason`. An empty body bans until lifted, without a reason.
pub fn parse_api_ban(
    body: &[u8],
    now_ms: i64,
) -> Result<(Option<i64>, Option<String>), CommandError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok((None, None));
    }
    let reason = parse_api_reason(body)?;
    let obj = api_object(body)?;
    let until = match obj.get("until") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_i64() {
            Some(t) if t > now_ms => Some(t),
            _ => {
                return Err(CommandError::bad_request(
                    "until must be a time in the future, in ms since the Unix epoch",
                ));
            }
        },
        Some(_) => return Err(CommandError::bad_request("until must be a number (ms)")),
    };
    Ok((until, reason))
}

/// What `POST /tokens/revoke` names: one token, or a user's tokens issued before
/// a time (Unix seconds, like `iat`).
#[derive(Debug, PartialEq, Eq)]
pub enum Revocation {
    Jti(String),
    User { user: String, issued_before: i64 },
}

/// Parse `{jti}` or `{user, issued_before}` (exactly one of the two forms).
pub fn parse_api_revoke(body: &[u8]) -> Result<Revocation, CommandError> {
    let obj = api_object(body)?;
    let f = Fields {
        obj: &obj,
        raw: body,
    };
    match (obj.get("jti"), obj.get("user")) {
        (Some(_), Some(_)) => Err(CommandError::bad_request(
            "give either jti, or user and issued_before, not both",
        )),
        (Some(_), None) => {
            let jti = f.req_str("jti")?;
            if jti.is_empty() || jti.chars().count() > MAX_USER_ID_CHARS {
                return Err(CommandError::bad_request(format!(
                    "jti must be 1-{MAX_USER_ID_CHARS} characters"
                )));
            }
            Ok(Revocation::Jti(jti.to_owned()))
        }
        (None, Some(_)) => {
            let user = f.user_id("user")?;
            let issued_before = match obj.get("issued_before") {
                Some(Value::Number(n)) => n.as_i64().filter(|t| *t > 0),
                _ => None,
            }
            .ok_or_else(|| {
                CommandError::bad_request(
                    "issued_before must be a time in Unix seconds (tokens with an earlier iat are revoked)",
                )
            })?;
            Ok(Revocation::User {
                user,
                issued_before,
            })
        }
        (None, None) => Err(CommandError::bad_request(
            "missing field: jti, or user and issued_before",
        )),
    }
}

/// Longest reaction `emoji`, in Unicode code points (a flag or a family emoji
/// takes several).
pub const MAX_EMOJI_CHARS: usize = 16;

/// Longest `reason` an API call may give (it reaches clients in `closing`/`left`).
pub const MAX_REASON_CHARS: usize = 200;

fn api_object(body: &[u8]) -> Result<Map<String, Value>, CommandError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(obj)) => Ok(obj),
        Ok(_) => Err(CommandError::bad_request("the body must be a JSON object")),
        Err(e) => Err(CommandError::bad_request(format!("invalid JSON: {e}"))),
    }
}

/// A user id from a URL path: 1-256 characters, no control characters, not only
/// whitespace (the rule for a token's `sub`).
pub fn valid_user_id(user: &str) -> bool {
    let chars = user.chars().count();
    (1..=MAX_USER_ID_CHARS).contains(&chars)
        && !user.chars().any(char::is_control)
        && !user.trim().is_empty()
}

struct Fields<'a> {
    /// The JSON text the fields came from: `meta` is kept as written (a number
    /// too large for an f64 keeps its digits).
    raw: &'a [u8],
    obj: &'a Map<String, Value>,
}

impl Fields<'_> {
    fn parse(&self, limits: ParseLimits) -> Result<Command, CommandError> {
        let kind = match self.obj.get("type") {
            Some(Value::String(s)) => s.as_str(),
            Some(_) => return Err(CommandError::bad_request("type must be a string")),
            None => return Err(CommandError::bad_request("missing field: type")),
        };
        Ok(match kind {
            "hello" => Command::Hello {
                name: self.opt_str("name")?.map(str::to_owned),
                token: self.opt_str("token")?.map(str::to_owned),
                batch: self.opt_bool("batch")?.unwrap_or(false),
            },
            "join" => Command::Join {
                room: self.room("room")?,
                since: self.since()?,
                history: self.count("history")?,
                persist: self.opt_bool("persist")?.unwrap_or(false),
            },
            "leave" => Command::Leave {
                room: self.room("room")?,
                persist: self.opt_bool("persist")?.unwrap_or(false),
            },
            "send" => Command::Send {
                room: self.room("room")?,
                text: self.text(limits)?,
                meta: self.meta()?,
                client_id: self.client_id()?,
            },
            "direct" => Command::Direct {
                to: self.user_id("to")?,
                text: self.text(limits)?,
                meta: self.meta()?,
                client_id: self.client_id()?,
            },
            "history" => Command::History {
                target: self.channel()?,
                before: self.opt_u64("before")?,
                limit: self.count("limit")?,
                current: self.opt_bool("current")?.unwrap_or(false),
            },
            "edit" => Command::Edit {
                channel: self.channel()?,
                target: self.target()?,
                text: self.text(limits)?,
                client_id: self.client_id()?,
            },
            "delete" => Command::Delete {
                channel: self.channel()?,
                target: self.target()?,
                client_id: self.client_id()?,
            },
            "react" => Command::React {
                channel: self.channel()?,
                target: self.target()?,
                emoji: self.emoji()?,
                on: self.opt_bool("on")?.ok_or_else(|| {
                    CommandError::bad_request("missing field: on (true or false)")
                })?,
                client_id: self.client_id()?,
            },
            "read" => Command::Read {
                channel: self.channel()?,
                seq: self
                    .opt_u64("seq")?
                    .ok_or_else(|| CommandError::bad_request("missing field: seq"))?,
            },
            "unread" => Command::Unread,
            "refresh" => Command::Refresh {
                token: self.req_str("token")?.to_owned(),
            },
            "presence" => Command::Presence {
                room: self.room("room")?,
                after: match self.obj.get("after") {
                    None | Some(Value::Null) => None,
                    Some(_) => Some(self.user_id("after")?),
                },
                limit: self.opt_u64("limit")?.map_or(MAX_PRESENCE_PAGE, |n| {
                    usize::try_from(n)
                        .unwrap_or(usize::MAX)
                        .clamp(1, MAX_PRESENCE_PAGE)
                }),
            },
            "typing" => Command::Typing {
                room: self.room("room")?,
            },
            "ping" => Command::Ping,
            other => {
                return Err(CommandError::bad_request(format!(
                    "unknown type {:?}",
                    truncate(other, 64)
                )));
            }
        })
    }

    /// `room` or `dm`, exactly one of them.
    fn channel(&self) -> Result<HistoryTarget, CommandError> {
        match (self.obj.get("room"), self.obj.get("dm")) {
            (Some(_), Some(_)) => Err(CommandError::bad_request(
                "give either room or dm, not both",
            )),
            (Some(_), None) => Ok(HistoryTarget::Room(self.room("room")?)),
            (None, Some(_)) => Ok(HistoryTarget::Dm(self.user_id("dm")?)),
            (None, None) => Err(CommandError::bad_request("missing field: room or dm")),
        }
    }

    /// `target`: the seq of the message an edit, delete or reaction acts on.
    fn target(&self) -> Result<u64, CommandError> {
        match self.opt_u64("target")? {
            Some(t) if t > 0 => Ok(t),
            Some(_) => Err(CommandError::bad_request(
                "target must be the seq of a message (1 or more)",
            )),
            None => Err(CommandError::bad_request("missing field: target")),
        }
    }

    /// A reaction's `emoji`: 1-[`MAX_EMOJI_CHARS`] characters, no control
    /// characters, not only whitespace.
    fn emoji(&self) -> Result<String, CommandError> {
        let emoji = self.req_str("emoji")?;
        if emoji.trim().is_empty() || emoji.chars().any(char::is_control) {
            return Err(CommandError::bad_request(
                "emoji must be 1-16 visible characters",
            ));
        }
        let chars = emoji.chars().count();
        if chars > MAX_EMOJI_CHARS {
            return Err(CommandError::new(
                ErrorCode::TooLarge,
                format!("emoji is {chars} characters; the limit is {MAX_EMOJI_CHARS}"),
            ));
        }
        Ok(emoji.to_owned())
    }

    fn opt_str(&self, key: &str) -> Result<Option<&str>, CommandError> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(CommandError::bad_request(format!("{key} must be a string"))),
        }
    }

    fn req_str(&self, key: &str) -> Result<&str, CommandError> {
        self.opt_str(key)?
            .ok_or_else(|| CommandError::bad_request(format!("missing field: {key}")))
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>, CommandError> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(CommandError::bad_request(format!(
                "{key} must be a boolean"
            ))),
        }
    }

    fn opt_u64(&self, key: &str) -> Result<Option<u64>, CommandError> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => n.as_u64().map(Some).ok_or_else(|| {
                CommandError::bad_request(format!("{key} must be a non-negative integer"))
            }),
            Some(_) => Err(CommandError::bad_request(format!(
                "{key} must be a non-negative integer"
            ))),
        }
    }

    /// A `history`/`limit` count: default 50, clamped to 500 (never refused for size).
    fn count(&self, key: &str) -> Result<u64, CommandError> {
        Ok(self
            .opt_u64(key)?
            .unwrap_or(DEFAULT_HISTORY)
            .min(MAX_HISTORY))
    }

    fn room(&self, key: &str) -> Result<String, CommandError> {
        let room = self.req_str(key)?;
        if !valid_room_name(room) {
            return Err(CommandError::bad_request(format!(
                "bad room name {:?}: 1-64 characters from A-Z a-z 0-9 _ - . :",
                truncate(room, 80)
            )));
        }
        Ok(room.to_owned())
    }

    /// A user id: the rule for a token's `sub` ([`valid_user_id`]), which every
    /// user id the server hands out (a `sub`, a guest's name) follows, so nothing
    /// else can name a user.
    fn user_id(&self, key: &str) -> Result<String, CommandError> {
        let user = self.req_str(key)?;
        if !valid_user_id(user) {
            return Err(CommandError::bad_request(format!(
                "{key} must be a user id: 1-{MAX_USER_ID_CHARS} characters, no control characters, not only spaces"
            )));
        }
        Ok(user.to_owned())
    }

    fn text(&self, limits: ParseLimits) -> Result<String, CommandError> {
        let text = self.req_str("text")?;
        if text.is_empty() {
            return Err(CommandError::bad_request("text must not be empty"));
        }
        // Byte length bounds the char count from above: skip the count for short text.
        if text.len() > limits.max_text {
            let chars = text.chars().count();
            if chars > limits.max_text {
                return Err(CommandError::new(
                    ErrorCode::TooLarge,
                    format!(
                        "text is {chars} characters; the limit is {}",
                        limits.max_text
                    ),
                ));
            }
        }
        Ok(text.to_owned())
    }

    fn meta(&self) -> Result<Option<Box<RawValue>>, CommandError> {
        match self.obj.get("meta") {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(_)) if self.meta_as_written().is_some() => {
                let raw = self.meta_as_written().unwrap_or_default();
                if raw.len() > MAX_META_BYTES {
                    return Err(CommandError::new(
                        ErrorCode::TooLarge,
                        format!(
                            "meta is {} bytes as sent; the limit is {MAX_META_BYTES}",
                            raw.len()
                        ),
                    ));
                }
                RawValue::from_string(raw.to_owned())
                    .map(Some)
                    .map_err(|_| CommandError::bad_request("meta must be a JSON object"))
            }
            Some(v @ Value::Object(_)) => {
                let s = serde_json::to_string(v)
                    .map_err(|e| CommandError::bad_request(format!("meta: {e}")))?;
                if s.len() > MAX_META_BYTES {
                    return Err(CommandError::new(
                        ErrorCode::TooLarge,
                        format!(
                            "meta is {} bytes serialized; the limit is {MAX_META_BYTES}",
                            s.len()
                        ),
                    ));
                }
                RawValue::from_string(s)
                    .map(Some)
                    .map_err(|e| CommandError::bad_request(format!("meta: {e}")))
            }
            Some(_) => Err(CommandError::bad_request("meta must be a JSON object")),
        }
    }

    /// `meta`'s text exactly as it appears in the frame (None if it cannot be
    /// told apart, e.g. the key appears twice: the parsed value is used then).
    fn meta_as_written(&self) -> Option<&str> {
        #[derive(serde::Deserialize)]
        struct MetaOnly<'b> {
            #[serde(borrow)]
            meta: Option<&'b RawValue>,
        }
        let text = std::str::from_utf8(self.raw).ok()?;
        let m: MetaOnly<'_> = serde_json::from_str(text).ok()?;
        m.meta.map(RawValue::get)
    }

    fn client_id(&self) -> Result<Option<String>, CommandError> {
        let Some(cid) = self.opt_str("client_id")? else {
            return Ok(None);
        };
        if cid.is_empty() || cid.chars().count() > MAX_CLIENT_ID_CHARS {
            return Err(CommandError::bad_request(format!(
                "client_id must be 1-{MAX_CLIENT_ID_CHARS} characters"
            )));
        }
        Ok(Some(cid.to_owned()))
    }

    fn since(&self) -> Result<Option<Since>, CommandError> {
        match self.obj.get("since") {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(o)) => {
                let seq = o.get("seq").and_then(Value::as_u64).ok_or_else(|| {
                    CommandError::bad_request("since.seq must be a non-negative integer")
                })?;
                let epoch = o
                    .get("epoch")
                    .and_then(Value::as_str)
                    .ok_or_else(|| CommandError::bad_request("since.epoch must be a string"))?;
                Ok(Some(Since {
                    seq,
                    epoch: epoch.to_owned(),
                }))
            }
            Some(_) => Err(CommandError::bad_request(
                "since must be an object {\"seq\": N, \"epoch\": \"E\"}",
            )),
        }
    }
}

fn truncate(s: &str, max_chars: usize) -> &str {
    match s.char_indices().nth(max_chars) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::valid_guest_name;

    const LIMITS: ParseLimits = ParseLimits { max_text: 10 };

    fn err_of(frame: &str) -> ParseFailure {
        parse_command(frame, LIMITS).expect_err("should fail")
    }

    #[test]
    fn invalid_json_is_bad_request_without_id() {
        let f = err_of("{nope");
        assert_eq!(f.error.code, ErrorCode::BadRequest);
        assert_eq!(f.id, None);
    }

    #[test]
    fn missing_field_keeps_the_id() {
        let f = err_of(r#"{"type":"join","id":7}"#);
        assert_eq!(f.error.code, ErrorCode::BadRequest);
        assert_eq!(f.id, Some(CommandId::Int(7)));
        assert!(f.error.message.contains("room"));
    }

    #[test]
    fn unknown_type_is_bad_request() {
        let f = err_of(r#"{"type":"dance","id":"x"}"#);
        assert_eq!(f.error.code, ErrorCode::BadRequest);
        assert_eq!(f.id, Some(CommandId::Str("x".into())));
    }

    #[test]
    fn text_over_max_text_code_points_is_too_large() {
        // 11 code points, each 2 bytes.
        let f = err_of(r#"{"type":"send","id":1,"room":"r","text":"ééééééééééé"}"#);
        assert_eq!(f.error.code, ErrorCode::TooLarge);
        // Exactly 10 code points of 2 bytes each passes although it is 20 bytes.
        assert!(parse_command(r#"{"type":"send","room":"r","text":"éééééééééé"}"#, LIMITS).is_ok());
    }

    #[test]
    fn a_user_id_with_a_control_character_or_only_spaces_is_bad_request() {
        for frame in [
            r#"{"type":"direct","to":"a\u0001b","text":"x"}"#,
            r#"{"type":"direct","to":"   ","text":"x"}"#,
            r#"{"type":"presence","room":"r","after":"a\nb"}"#,
            r#"{"type":"history","dm":"a\u007fb"}"#,
        ] {
            let f = err_of(frame);
            assert_eq!(f.error.code, ErrorCode::BadRequest, "{frame}");
            assert!(
                f.error.message.contains("user id"),
                "{frame}: {}",
                f.error.message
            );
        }
    }

    #[test]
    fn an_api_post_from_a_user_id_with_a_control_character_is_bad_request() {
        let e =
            parse_api_post(br#"{"text":"x","from":"a\u0001b"}"#, LIMITS).expect_err("should fail");
        assert_eq!(e.code, ErrorCode::BadRequest);
        assert!(e.message.contains("from"), "{}", e.message);
        assert!(parse_api_post(br#"{"text":"x","from":"guest:bob"}"#, LIMITS).is_ok());
    }

    #[test]
    fn history_counts_are_clamped_not_refused() {
        let (_, cmd) =
            parse_command(r#"{"type":"history","room":"r","limit":100000}"#, LIMITS).unwrap();
        assert!(matches!(cmd, Command::History { limit: 500, .. }));
    }

    #[test]
    fn room_names_follow_the_rules() {
        assert!(valid_room_name("team-a:dev.1_x"));
        assert!(!valid_room_name(""));
        assert!(!valid_room_name("has space"));
        assert!(!valid_room_name(&"a".repeat(65)));
        assert!(valid_room_name(&"a".repeat(64)));
        assert!(!valid_room_name("émoji"));
    }

    #[test]
    fn guest_names_exclude_colon_and_space() {
        assert!(valid_guest_name("alice_1.x-y"));
        assert!(!valid_guest_name("a:b"));
        assert!(!valid_guest_name("a b"));
        assert!(!valid_guest_name(&"a".repeat(33)));
    }

    #[test]
    fn meta_must_be_a_small_object() {
        let f = err_of(r#"{"type":"send","room":"r","text":"x","meta":[1]}"#);
        assert_eq!(f.error.code, ErrorCode::BadRequest);
        let big = format!(
            r#"{{"type":"send","room":"r","text":"x","meta":{{"k":"{}"}}}}"#,
            "a".repeat(1100)
        );
        assert_eq!(err_of(&big).error.code, ErrorCode::TooLarge);
    }

    #[test]
    fn meta_keeps_numbers_as_written() {
        let frame = r#"{"type":"send","room":"r","text":"x","meta":{"id":123456789012345678901234567890,"f":1.50}}"#;
        let (_, cmd) = parse_command(frame, LIMITS).expect("parses");
        let Command::Send { meta, .. } = cmd else {
            panic!("a send");
        };
        assert_eq!(
            meta.expect("meta").get(),
            r#"{"id":123456789012345678901234567890,"f":1.50}"#
        );
    }

    #[test]
    fn client_id_over_64_chars_is_bad_request() {
        let frame = format!(
            r#"{{"type":"send","room":"r","text":"x","client_id":"{}"}}"#,
            "c".repeat(65)
        );
        assert_eq!(err_of(&frame).error.code, ErrorCode::BadRequest);
    }

    #[test]
    fn an_edit_names_its_channel_target_and_new_text() {
        let (_, cmd) = parse_command(
            r#"{"type":"edit","dm":"bob","target":4,"text":"fixed"}"#,
            LIMITS,
        )
        .expect("parses");
        let Command::Edit {
            channel,
            target,
            text,
            ..
        } = cmd
        else {
            panic!("expected edit, got {cmd:?}");
        };
        assert_eq!(channel, HistoryTarget::Dm("bob".into()));
        assert_eq!((target, text.as_str()), (4, "fixed"));
    }

    #[test]
    fn an_edit_keeps_the_text_limit() {
        let f = err_of(r#"{"type":"edit","room":"r","target":1,"text":"ééééééééééé"}"#);
        assert_eq!(f.error.code, ErrorCode::TooLarge);
    }

    #[test]
    fn target_zero_or_missing_is_bad_request() {
        for frame in [
            r#"{"type":"delete","room":"r","target":0}"#,
            r#"{"type":"delete","room":"r"}"#,
            r#"{"type":"delete","room":"r","target":"3"}"#,
        ] {
            assert_eq!(err_of(frame).error.code, ErrorCode::BadRequest, "{frame}");
        }
    }

    #[test]
    fn an_emoji_is_one_to_sixteen_visible_characters() {
        let react = |emoji: &str| {
            let frame = serde_json::json!({
                "type": "react", "room": "r", "target": 1, "emoji": emoji, "on": true
            });
            parse_command(&frame.to_string(), LIMITS)
        };
        assert!(react("👍").is_ok());
        assert!(react(&"x".repeat(16)).is_ok());
        let long = react(&"x".repeat(17)).expect_err("too long");
        assert_eq!(long.error.code, ErrorCode::TooLarge);
        for bad in ["", "  ", "a\u{0}"] {
            let f = react(bad).expect_err("refused");
            assert_eq!(f.error.code, ErrorCode::BadRequest, "{bad:?}");
        }
    }

    #[test]
    fn a_reaction_must_say_on_or_off() {
        let f = err_of(r#"{"type":"react","room":"r","target":1,"emoji":"x"}"#);
        assert_eq!(f.error.code, ErrorCode::BadRequest);
        assert!(f.error.message.contains("on"));
    }

    #[test]
    fn read_needs_a_seq_and_one_channel() {
        assert!(parse_command(r#"{"type":"read","room":"r","seq":3}"#, LIMITS).is_ok());
        let f = err_of(r#"{"type":"read","room":"r"}"#);
        assert_eq!(f.error.code, ErrorCode::BadRequest);
        let f = err_of(r#"{"type":"read","room":"r","dm":"b","seq":1}"#);
        assert_eq!(f.error.code, ErrorCode::BadRequest);
    }

    #[test]
    fn presence_pages_default_to_the_largest_and_clamp_limits() {
        let page = |frame: &str| match parse_command(frame, LIMITS).expect("parses").1 {
            Command::Presence { after, limit, .. } => (after, limit),
            other => panic!("expected presence, got {other:?}"),
        };
        assert_eq!(
            page(r#"{"type":"presence","room":"r"}"#),
            (None, MAX_PRESENCE_PAGE)
        );
        assert_eq!(page(r#"{"type":"presence","room":"r","limit":0}"#).1, 1);
        assert_eq!(
            page(r#"{"type":"presence","room":"r","limit":99999}"#).1,
            MAX_PRESENCE_PAGE
        );
        assert_eq!(
            page(r#"{"type":"presence","room":"r","after":"bob","limit":2}"#),
            (Some("bob".to_owned()), 2)
        );
        let f = err_of(r#"{"type":"presence","room":"r","after":""}"#);
        assert_eq!(f.error.code, ErrorCode::BadRequest);
        let f = err_of(r#"{"type":"presence","room":"r","limit":-1}"#);
        assert_eq!(f.error.code, ErrorCode::BadRequest);
    }
}
