//! TLS termination: `wss://` and `https://` on Hubbub's own listener (rustls, TLS 1.2
//! and 1.3 only), with the certificate reloaded on SIGHUP.
//!
//! Owns: loading the PEM certificate chain and key, the current `ServerConfig`, and
//! [`TlsListener`], an `axum::serve::Listener` that accepts TCP and runs each TLS
//! handshake in its own task (a slow or hostile handshake never holds up accepting
//! others). Must not: know about HTTP or WebSockets. A reload affects new
//! connections only; established ones keep the session they negotiated.

use crate::accept::Acceptor;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

/// A handshake that has not finished after this long is abandoned.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Finished handshakes waiting for the HTTP server to take them.
const READY_QUEUE: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: String,
        source: rustls_pki_types::pem::Error,
    },
    #[error("{path} holds no certificate")]
    NoCertificate { path: String },
    #[error("certificate and key do not make a valid TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// The certificate files and the configuration built from them.
pub struct TlsCerts {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<ServerConfig>>,
}

impl TlsCerts {
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<TlsCerts>, TlsError> {
        let config = build(cert, key)?;
        Ok(Arc::new(TlsCerts {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current: RwLock::new(config),
        }))
    }

    /// Re-read the files (SIGHUP). On error the old configuration stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = build(&self.cert, &self.key)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = config;
        Ok(())
    }

    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

fn build(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Read {
            what: "certificate",
            path: cert.display().to_string(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert.display().to_string(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::Read {
        what: "private key",
        path: key.display().to_string(),
        source,
    })?;
    // TLS 1.2 and 1.3 only: older versions are refused at the handshake.
    let mut config = ServerConfig::builder_with_protocol_versions(&[
        &rustls::version::TLS13,
        &rustls::version::TLS12,
    ])
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Accepts TCP connections and hands over those that completed a TLS handshake.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    /// For the first request after the TLS handshake (`crate::handshake`).
    handshake_timeout: std::time::Duration,
}

impl TlsListener {
    /// Start accepting on `listener`; stops when `stop` is cancelled.
    pub fn new(
        listener: TcpListener,
        certs: Arc<TlsCerts>,
        stop: CancellationToken,
        handshake_timeout: std::time::Duration,
    ) -> io::Result<TlsListener> {
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(READY_QUEUE);
        tokio::spawn(async move {
            let mut acceptor = Acceptor::new();
            loop {
                let (tcp, addr) = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = acceptor.accept(&listener) => r,
                };
                let tls = certs.acceptor();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, addr)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%addr, error = %e, "TLS handshake refused"),
                        Err(_) => tracing::debug!(%addr, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener {
            ready,
            local,
            handshake_timeout,
        })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = crate::handshake::Guarded<TlsStream<TcpStream>>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some((io, addr)) => (
                crate::handshake::Guarded::new(io, self.handshake_timeout),
                addr,
            ),
            // The acceptor stopped (shutdown): accept nothing more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}
