//! TLS to Redis (`rediss://`), with rustls and the ring provider.
//!
//! Every connection the broker makes (the subscriber's, the lanes', the
//! questions to Sentinels) opens its TCP stream in [`super::pubsub::connect`]
//! and wraps it here, so all of them trust the same roots: the PEM file of
//! `SWITCHBOARD_REDIS_CA_FILE` when it is set (a private CA, as managed Redis
//! services and self-signed test servers use), else the system's certificate
//! store.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::BrokerError;

/// The TLS set-up shared by every connection of one broker.
#[derive(Clone)]
pub struct Tls {
    connector: TlsConnector,
    /// The private CA's PEM, handed to redis-rs's cluster client.
    ca_pem: Option<Arc<Vec<u8>>>,
}

impl Tls {
    /// Trusts the certificates in `ca_pem` (PEM), or the system's when `None`.
    pub fn new(ca_pem: Option<Vec<u8>>) -> Result<Self, BrokerError> {
        // Both rustls users here (redis-rs and this module) take the process's provider.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut roots = rustls::RootCertStore::empty();
        match &ca_pem {
            Some(pem) => {
                for cert in CertificateDer::pem_slice_iter(pem) {
                    let cert = cert.map_err(|e| BrokerError::Connect(format!("the Redis CA file: {e}")))?;
                    roots.add(cert).map_err(|e| BrokerError::Connect(format!("the Redis CA file: {e}")))?;
                }
                if roots.is_empty() {
                    return Err(BrokerError::Connect("the Redis CA file holds no certificate".into()));
                }
            }
            None => {
                for cert in rustls_native_certs::load_native_certs().certs {
                    let _ = roots.add(cert);
                }
            }
        }
        let config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
        Ok(Self { connector: TlsConnector::from(Arc::new(config)), ca_pem: ca_pem.map(Arc::new) })
    }

    /// Wraps `tcp` to `host` in TLS, checking the server's certificate for
    /// `host`; errors name the server as `server` (an address without credentials).
    pub async fn connect(&self, server: &str, host: &str, tcp: TcpStream) -> Result<TlsStream<TcpStream>, BrokerError> {
        let name = ServerName::try_from(host.to_owned())
            .map_err(|e| BrokerError::Connect(format!("{server}: not a TLS server name: {e}")))?;
        self.connector.connect(name, tcp).await.map_err(|e| BrokerError::Connect(format!("{server}: TLS: {e}")))
    }

    /// The private CA's PEM, if one is set.
    pub fn ca_pem(&self) -> Option<&[u8]> {
        self.ca_pem.as_deref().map(Vec::as_slice)
    }
}
