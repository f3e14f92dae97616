//! Hubbub: a real-time chat and messaging server.
//!
//! The map of the crate, in the order a message travels:
//!
//! - [`server`]: the listener and HTTP surface (`/ws`, `/healthz`, `/readyz`,
//!   `/metrics`), and graceful shutdown.
//! - [`accept`]: accepting TCP connections, backing off at the open-file limit.
//! - [`ws`]: RFC 6455 framing (handshake checks, client frames in, server frames
//!   out with one vectored write per batch), written for small idle connections.
//! - [`app`]: the state every session and handler shares.
//! - [`session`]: one connection's task: hello, commands, heartbeat, writing its
//!   outgoing queue, closing with the right code.
//! - [`protocol`]: every wire type (docs/PROTOCOL.md): parsing commands, encoding
//!   events, error and close codes.
//! - [`message`]: what a message is, whatever stores, carries or shows it.
//! - [`chat`]: chat state (1.1): a user's rooms, read positions and unread
//!   counts, and the rules of edits, deletes and reactions (submitted to the hub
//!   as entries of a channel's stream, like messages).
//! - [`hooks`]: calls out to the app's backend: the publish check (moderation
//!   before a message is stored), signed.
//! - [`auth`]: JWT and guest identities, room permissions.
//! - [`limits`]: the per-connection rate limit.
//! - [`hub`]: rooms, DM pairs, presence, sequencing, group commit and fan-out,
//!   and the upkeep tasks it owns.
//! - [`broker`]: the one way to the other nodes: stored messages, presence and
//!   typing (one node: nothing to do; several: a pub/sub broker between nodes).
//! - [`store`]: durable history, by who numbers messages: local (SQLite, or the
//!   in-memory store; the hub numbers) or shared (PostgreSQL, which numbers).
//! - [`metrics`]: Prometheus metric names and handles.
//! - [`config`]: flags, environment and config file.
//! - [`web`]: the embedded chat page and JavaScript SDK.
//! - [`tls`]: rustls termination with certificate reload.
//!
//! The docs are the developers' (`cargo doc --document-private-items`, checked by
//! `scripts/test`): a module's `//!` names the private modules and items it owns,
//! so links to private items are meant.
#![allow(rustdoc::private_intra_doc_links)]

pub mod accept;
pub mod api;
pub mod app;
pub mod auth;
pub mod broker;
pub mod chat;
pub mod config;
pub mod handshake;
pub mod hooks;
pub mod hub;
pub mod limits;
pub mod message;
pub mod metrics;
pub mod protocol;
pub mod server;
pub mod session;
pub mod stats;
pub mod store;
pub mod tls;
pub mod web;
pub mod ws;
