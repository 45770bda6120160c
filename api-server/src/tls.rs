//! HTTPS: the TLS settings of the API and its certificate, reloaded when its files change.
//!
//! [`Certificate`] is rustls's certificate resolver: every handshake takes the certificate in
//! use, and [`Certificate::reload`] (called every `https.reload_ms`) reads the two PEM files
//! and, when their contents changed and they load (a chain, a key, the key matching the
//! certificate), puts the new one in use for the connections that follow. Files that do not
//! load keep the certificate in use: replacing a certificate cannot take the API down.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

use crate::options::HttpsOptions;

/// Why a certificate could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path:?}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path:?} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path:?} is not a PEM certificate chain")]
    BadCertificate {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{path:?} is not a PEM private key")]
    BadKey {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("the key cannot sign or does not match the certificate")]
    KeyMismatch(#[source] rustls::Error),
    #[error("the TLS settings are refused")]
    Config(#[source] rustls::Error),
}

/// The certificate in use, and where it comes from.
#[derive(Debug)]
pub struct Certificate {
    options: HttpsOptions,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
    /// The contents of the two files last tried, so unchanged files are not parsed again and
    /// bad ones are reported once.
    last_seen: Mutex<(Vec<u8>, Vec<u8>)>,
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

impl Certificate {
    /// Loads the certificate of `options`: an error when the files do not load (a server does
    /// not start without the certificate it was given).
    pub fn open(options: &HttpsOptions) -> Result<Arc<Certificate>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = read(&options.cert_chain_file)?;
        let key = read(&options.key_file)?;
        let certified = certified_key(&provider, options, &chain, &key)?;
        Ok(Arc::new(Certificate {
            options: options.clone(),
            provider,
            current: RwLock::new(Arc::new(certified)),
            last_seen: Mutex::new((chain, key)),
        }))
    }

    /// rustls's settings of the API: TLS 1.2 and 1.3, HTTP/2 and HTTP/1.1 by ALPN, this
    /// certificate.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, TlsError> {
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// The certificate chain in use (its first entry is the server's certificate).
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        self.in_use().cert.clone()
    }

    fn in_use(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reads the files again and, when their contents changed and load, puts the new
    /// certificate in use. `Ok(true)` when it was replaced; an `Err` (the certificate in use is
    /// kept) once per change.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let chain = read(&self.options.cert_chain_file)?;
        let key = read(&self.options.key_file)?;
        {
            let mut seen = self.last_seen.lock().unwrap_or_else(|e| e.into_inner());
            if seen.0 == chain && seen.1 == key {
                return Ok(false);
            }
            *seen = (chain.clone(), key.clone());
        }
        let certified = certified_key(&self.provider, &self.options, &chain, &key)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(certified);
        Ok(true)
    }
}

impl ResolvesServerCert for Certificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.in_use())
    }
}

/// A certificate chain and its key, checked to belong together.
fn certified_key(
    provider: &CryptoProvider,
    options: &HttpsOptions,
    chain: &[u8],
    key: &[u8],
) -> Result<CertifiedKey, TlsError> {
    let certs = CertificateDer::pem_slice_iter(chain)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::BadCertificate {
            path: options.cert_chain_file.clone(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: options.cert_chain_file.clone(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|source| TlsError::BadKey {
        path: options.key_file.clone(),
        source,
    })?;
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(TlsError::KeyMismatch)?;
    let certified = CertifiedKey::new(certs, signing);
    certified.keys_match().map_err(TlsError::KeyMismatch)?;
    Ok(certified)
}
