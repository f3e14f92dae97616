//! Redis Sentinel: find the primary through the sentinels, and follow it when a
//! failover moves it.
//!
//! Owns: the `redis+sentinel://` URL form, the sentinel client, and the switch of
//! the connection to a new primary. Must not: publish, subscribe or keep presence
//! (the Redis broker does, through [`SentinelConn::manager`]).
//!
//! A `ConnectionManager` reconnects to the address it was built with, which after
//! a failover is the old primary (gone, or back as a read-only replica). So the
//! broker's link check asks [`SentinelConn::follow`] where the primary is: on every
//! check while the link is down, and every few seconds while it is up (a demoted
//! primary can still answer PING). When the primary moved, a new manager replaces
//! the old one; the broker then subscribes again and catches up from the store, as
//! after any reconnection.

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{ProtocolVersion, RedisConnectionInfo};
use std::sync::RwLock;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum SentinelError {
    #[error("redis sentinel: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis sentinel did not answer within {0:?}")]
    Timeout(Duration),
}

/// The URL scheme of a primary found through sentinels.
pub const SCHEME: &str = "redis+sentinel://";

/// `redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE`: the sentinels' addresses
/// and the name of the primary they watch (`sentinel monitor SERVICE ...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentinelUrl {
    pub sentinels: Vec<String>,
    pub service: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "a sentinel URL is redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE (the sentinels and the name of the primary they monitor): {0}"
)]
pub struct SentinelUrlError(&'static str);

impl SentinelUrl {
    pub fn parse(url: &str) -> Result<SentinelUrl, SentinelUrlError> {
        let rest = url
            .strip_prefix(SCHEME)
            .ok_or(SentinelUrlError("it must start with redis+sentinel://"))?;
        let (hosts, service) = rest
            .split_once('/')
            .ok_or(SentinelUrlError("the service name is missing"))?;
        let service = service.trim_end_matches('/');
        if service.is_empty() || service.contains('/') {
            return Err(SentinelUrlError("the service name is missing or has a '/'"));
        }
        let sentinels: Vec<String> = hosts
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(|h| {
                if h.rsplit_once(':')
                    .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
                {
                    Ok(h.to_owned())
                } else {
                    Err(SentinelUrlError("each sentinel is HOST:PORT"))
                }
            })
            .collect::<Result<_, _>>()?;
        if sentinels.is_empty() {
            return Err(SentinelUrlError("no sentinel address"));
        }
        Ok(SentinelUrl {
            sentinels,
            service: service.to_owned(),
        })
    }
}

/// The connection to whichever server the sentinels say is the primary.
pub struct SentinelConn {
    client: tokio::sync::Mutex<SentinelClient>,
    /// The primary's address and the manager connected to it. Cloned out of the
    /// lock before any await.
    current: RwLock<(String, ConnectionManager)>,
    config: ConnectionManagerConfig,
}

impl SentinelConn {
    /// Ask the sentinels for the primary and connect to it.
    pub async fn connect(
        url: &SentinelUrl,
        config: ConnectionManagerConfig,
        timeout: Duration,
    ) -> Result<SentinelConn, SentinelError> {
        let sentinels: Vec<String> = url
            .sentinels
            .iter()
            .map(|h| format!("redis://{h}"))
            .collect();
        // RESP3 to the primary: the broker's pub/sub arrives as push messages.
        let node = SentinelNodeConnectionInfo::default().set_redis_connection_info(
            RedisConnectionInfo::default().set_protocol(ProtocolVersion::RESP3),
        );
        let mut client = SentinelClient::build(
            sentinels,
            url.service.clone(),
            Some(node),
            SentinelServerType::Master,
        )?;
        let found = find(&mut client, timeout).await?;
        let (addr, manager) = connect(found, &config, timeout).await?;
        tracing::info!(primary = %addr, service = %url.service, "Redis primary found through the sentinels");
        Ok(SentinelConn {
            client: tokio::sync::Mutex::new(client),
            current: RwLock::new((addr, manager)),
            config,
        })
    }

    /// The connection to the primary as last known.
    pub fn manager(&self) -> ConnectionManager {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .clone()
    }

    /// Ask the sentinels where the primary is now; when it moved, connect to it
    /// and return its address.
    pub async fn follow(&self, timeout: Duration) -> Result<Option<String>, SentinelError> {
        let found = find(&mut *self.client.lock().await, timeout).await?;
        let addr = found.get_connection_info().addr().to_string();
        if self.current.read().unwrap_or_else(|p| p.into_inner()).0 == addr {
            return Ok(None);
        }
        // The client the sentinels just named: no second round trip to them.
        let (addr, manager) = connect(found, &self.config, timeout).await?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = (addr.clone(), manager);
        Ok(Some(addr))
    }
}

/// Ask the sentinels for the primary (they check it answers as one).
async fn find(
    client: &mut SentinelClient,
    timeout: Duration,
) -> Result<redis::Client, SentinelError> {
    tokio::time::timeout(timeout, client.async_get_client())
        .await
        .map_err(|_| SentinelError::Timeout(timeout))?
        .map_err(SentinelError::from)
}

/// A connection manager for the primary `found`, and its address.
async fn connect(
    found: redis::Client,
    config: &ConnectionManagerConfig,
    timeout: Duration,
) -> Result<(String, ConnectionManager), SentinelError> {
    let addr = found.get_connection_info().addr().to_string();
    let manager = tokio::time::timeout(
        timeout,
        ConnectionManager::new_with_config(found, config.clone()),
    )
    .await
    .map_err(|_| SentinelError::Timeout(timeout))??;
    Ok((addr, manager))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sentinel_url_names_the_sentinels_and_the_service() {
        let u = SentinelUrl::parse("redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/mymaster")
            .expect("parses");
        assert_eq!(u.sentinels, ["10.0.0.1:26379", "10.0.0.2:26379"]);
        assert_eq!(u.service, "mymaster");
    }

    #[test]
    fn a_sentinel_url_without_a_service_is_refused() {
        let e = SentinelUrl::parse("redis+sentinel://h:26379").expect_err("refused");
        assert_eq!(e, SentinelUrlError("the service name is missing"));
    }

    #[test]
    fn a_sentinel_without_a_port_is_refused() {
        let e = SentinelUrl::parse("redis+sentinel://h/mymaster").expect_err("refused");
        assert_eq!(e, SentinelUrlError("each sentinel is HOST:PORT"));
    }
}
