//! `[broker] tls`: HTTPS on the listener, for deployments with no proxy in front to terminate it.
//!
//! rustls (with the aws-lc-rs provider the HTTP client already uses). The certificate chain and key
//! are PEM files; SIGHUP reads them again, so a renewed certificate needs no restart: connections
//! accepted from then on get the new one, open ones keep theirs. A renewal that does not load (a
//! missing file, a key that does not match the certificate) is logged and the running certificate
//! stays.

use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::config::TlsConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("[broker] tls: cannot read the certificate chain {path}: {message}")]
    Cert { path: String, message: String },
    #[error("[broker] tls: cannot read the private key {path}: {message}")]
    Key { path: String, message: String },
    #[error("[broker] tls: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The listener's TLS: the acceptor, and the certificate it presents (replaceable).
pub struct Tls {
    acceptor: TlsAcceptor,
    current: Arc<Current>,
    config: TlsConfig,
    provider: Arc<CryptoProvider>,
}

/// The certificate presented to new connections.
#[derive(Debug)]
struct Current(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("config", &self.config).finish()
    }
}

impl Tls {
    /// Read the files; an error names the file and what is wrong with it.
    pub fn load(config: &TlsConfig) -> Result<Arc<Self>, TlsError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let key = certified_key(config, &provider)?;
        let current = Arc::new(Current(RwLock::new(Arc::new(key))));
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        // The front speaks HTTP/1.1 only.
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(Self {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            current,
            config: config.clone(),
            provider,
        }))
    }

    /// Read the files again (SIGHUP); on error the running certificate stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let key = certified_key(&self.config, &self.provider)?;
        *self.current.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
        Ok(())
    }

    pub async fn accept(&self, tcp: TcpStream) -> std::io::Result<TlsStream<TcpStream>> {
        self.acceptor.accept(tcp).await
    }
}

fn certified_key(config: &TlsConfig, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    let cert_err = |message: String| TlsError::Cert {
        path: config.cert.display().to_string(),
        message,
    };
    let certs = CertificateDer::pem_file_iter(&config.cert)
        .map_err(|e| cert_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(cert_err("no CERTIFICATE in it".into()));
    }
    let key = PrivateKeyDer::from_pem_file(&config.key).map_err(|e| TlsError::Key {
        path: config.key.display().to_string(),
        message: e.to_string(),
    })?;
    Ok(CertifiedKey::from_der(certs, key, provider)?)
}
