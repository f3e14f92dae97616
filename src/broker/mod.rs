//! The broker seam: where a committed message leaves the committer on its way to
//! every receiver, on this node and (with a cross-node broker) on others.
//!
//! Owns: the choice of how a stored message reaches the nodes. Today there is one
//! node, so [`Broker::Local`] hands the message straight to [`Hub::deliver`]. A Redis
//! broker will publish here and call [`Hub::deliver`] from its subscriber on every
//! node, so local and remote fan-out keep one path. Must not: store, sequence or
//! encode messages for clients.

use crate::hub::{Channel, Hub};
use crate::store::StoredMessage;
use std::sync::Arc;

pub enum Broker {
    /// Single node: publishing is delivering.
    Local,
}

impl Broker {
    pub fn publish(&self, hub: &Hub, channel: &Channel, msg: &Arc<StoredMessage>) {
        match self {
            Broker::Local => hub.deliver(channel, msg),
        }
    }
}
