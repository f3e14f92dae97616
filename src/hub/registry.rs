//! The registry of connections by user: where a user's direct messages go.
//!
//! Owns: the map from user id to that user's live connections on this node.
//! Must not: know about rooms or presence (that is the channel's). Lock order: a
//! channel's lock may be held when this registry's is taken, never the other way.

use super::{Conn, lock};
use crate::ws::Text;
use smallvec::SmallVec;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A user's connections: nearly always one, held inline (no allocation).
type Conns = SmallVec<[Arc<Conn>; 1]>;

#[derive(Default)]
pub(super) struct Registry {
    /// Keyed by the connections' own `user` (shared, not copied).
    users: Mutex<HashMap<Arc<str>, Conns>>,
}

impl Registry {
    /// Add a connection; true if it is its user's first on this node.
    pub(super) fn add(&self, conn: &Arc<Conn>) -> bool {
        let mut users = lock(&self.users);
        let conns = users.entry(Arc::clone(&conn.user)).or_default();
        conns.push(conn.clone());
        conns.len() == 1
    }

    /// Remove a connection; true if it was its user's last on this node.
    pub(super) fn remove(&self, conn: &Conn) -> bool {
        let mut users = lock(&self.users);
        let Some(v) = users.get_mut(&conn.user) else {
            return false;
        };
        v.retain(|c| c.id != conn.id);
        if v.is_empty() {
            users.remove(&conn.user);
            return true;
        }
        false
    }

    /// Queue a frame for every connection of `user` (made only if there is one);
    /// returns how many took it.
    pub(super) fn send_to(&self, user: &str, frame: impl FnMut() -> Text) -> u64 {
        self.send_to_except(user, None, frame)
    }

    /// [`Registry::send_to`], leaving out connection `except`.
    pub(super) fn send_to_except(
        &self,
        user: &str,
        except: Option<u64>,
        mut frame: impl FnMut() -> Text,
    ) -> u64 {
        let users = lock(&self.users);
        let Some(conns) = users.get(user) else {
            return 0;
        };
        let mut n = 0;
        for c in conns.iter().filter(|c| Some(c.id) != except) {
            if c.send(frame()) {
                n += 1;
            }
        }
        n
    }

    /// How many connections `user` has on this node.
    pub(super) fn count(&self, user: &str) -> usize {
        lock(&self.users).get(user).map_or(0, SmallVec::len)
    }

    /// `user`'s connections on this node.
    pub(super) fn conns(&self, user: &str) -> Vec<Arc<Conn>> {
        lock(&self.users)
            .get(user)
            .map(|v| v.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Every connection on this node for which `f` holds.
    pub(super) fn matching(&self, f: impl Fn(&Conn) -> bool) -> Vec<Arc<Conn>> {
        lock(&self.users)
            .values()
            .flat_map(|v| v.iter())
            .filter(|c| f(c))
            .cloned()
            .collect()
    }
}
