//! Mutual TLS for every cellplane connection. A process has one identity — a certificate and
//! its key — and trusts one CA: its servers accept only clients that present a certificate
//! of that CA, and its clients accept only servers that do. Plaintext stays the default
//! (`cellplane dev` on loopback says so when it starts).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig,
};

/// Where a process's CA, certificate and key are (PEM files): the `[tls]` table of each
/// config, or `--tls-ca`, `--tls-cert`, `--tls-key`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsPaths {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls.{field}: reading {}: {source}", path.display())]
    Read {
        field: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tls: give all of ca, cert and key, or none; {0} is missing")]
    Incomplete(&'static str),
    #[error("endpoint {endpoint:?}: {message}")]
    Endpoint { endpoint: String, message: String },
}

impl TlsPaths {
    /// The three paths, or none of them: anything in between is a mistake worth naming.
    pub fn from_parts(
        ca: Option<PathBuf>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
    ) -> Result<Option<Self>, TlsError> {
        match (ca, cert, key) {
            (None, None, None) => Ok(None),
            (Some(ca), Some(cert), Some(key)) => Ok(Some(Self { ca, cert, key })),
            (None, ..) => Err(TlsError::Incomplete("ca")),
            (_, None, _) => Err(TlsError::Incomplete("cert")),
            (.., None) => Err(TlsError::Incomplete("key")),
        }
    }
}

fn read(field: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        field,
        path: path.to_path_buf(),
        source,
    })
}

/// A process's TLS settings for its servers and its clients; the default is plaintext.
#[derive(Debug, Clone, Default)]
pub struct Tls {
    loaded: Option<Arc<Loaded>>,
}

#[derive(Debug)]
struct Loaded {
    server: ServerTlsConfig,
    client: ClientTlsConfig,
}

impl Tls {
    pub fn plaintext() -> Self {
        Self::default()
    }

    /// Loads the PEM files `paths` names.
    pub fn load(paths: &TlsPaths) -> Result<Self, TlsError> {
        let ca = Certificate::from_pem(read("ca", &paths.ca)?);
        let identity = Identity::from_pem(read("cert", &paths.cert)?, read("key", &paths.key)?);
        Ok(Self {
            loaded: Some(Arc::new(Loaded {
                server: ServerTlsConfig::new()
                    .identity(identity.clone())
                    .client_ca_root(ca.clone()),
                client: ClientTlsConfig::new().ca_certificate(ca).identity(identity),
            })),
        })
    }

    /// Loads `paths` when given, else plaintext.
    pub fn load_optional(paths: Option<&TlsPaths>) -> Result<Self, TlsError> {
        paths.map_or_else(|| Ok(Self::plaintext()), Self::load)
    }

    pub fn is_enabled(&self) -> bool {
        self.loaded.is_some()
    }

    /// What a server requires of its clients: a certificate of the CA.
    pub fn server(&self) -> Option<ServerTlsConfig> {
        self.loaded.as_ref().map(|l| l.server.clone())
    }

    /// An endpoint for `host:port`: `https` with this identity, or plaintext `http`.
    pub fn endpoint(&self, host_port: &str) -> Result<Endpoint, TlsError> {
        let bad = |message: String| TlsError::Endpoint {
            endpoint: host_port.to_string(),
            message,
        };
        match &self.loaded {
            None => {
                Endpoint::from_shared(format!("http://{host_port}")).map_err(|e| bad(e.to_string()))
            }
            Some(loaded) => Endpoint::from_shared(format!("https://{host_port}"))
                .map_err(|e| bad(e.to_string()))?
                .tls_config(loaded.client.clone())
                .map_err(|e| bad(e.to_string())),
        }
    }

    /// A lazily connected channel to `host:port`.
    pub fn lazy_channel(
        &self,
        host_port: &str,
        connect_timeout: std::time::Duration,
    ) -> Result<Channel, TlsError> {
        Ok(self
            .endpoint(host_port)?
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true)
            .connect_lazy())
    }
}
