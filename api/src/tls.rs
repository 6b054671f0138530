//! Mutual TLS for every cellplane connection. A process has one identity — a certificate and
//! its key — and trusts one CA: its servers accept only clients that present a certificate
//! of that CA, and its clients accept only servers that do. Plaintext stays the default
//! (`cellplane dev` on loopback says so when it starts).
//!
//! Certificates rotate without a restart: before each new connection, accepted or made, the
//! files are looked at (at most once a second) and, when one changed, read again. New
//! connections use the new files; open ones keep what they were made with. Files that do not
//! load (a rotation half written) leave the previous ones in use, with a warning, until they
//! change again. The handshakes are rustls's, done here rather than by tonic, whose TLS
//! settings are fixed when a server or channel is built.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::Stream;
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::net::{Io, Listener, Network};

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
    #[error("tls.{field}: {}: {reason}", path.display())]
    Invalid {
        field: &'static str,
        path: PathBuf,
        reason: String,
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

    fn fields(&self) -> [(&'static str, &Path); 3] {
        [("ca", &self.ca), ("cert", &self.cert), ("key", &self.key)]
    }
}

/// How often, at most, the files are looked at for a change.
const RELOAD_CHECK: Duration = Duration::from_secs(1);

/// Longest a client may take over its handshake before the server drops it.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Both sides' rustls settings, as loaded from one version of the files.
#[derive(Debug)]
struct Configs {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

/// What tells one version of a file from the next: a rotation by rename changes the inode, an
/// edit in place the modification time or the length.
type Stamp = Option<(std::time::SystemTime, u64, u64)>;

fn stamps(paths: &TlsPaths) -> [Stamp; 3] {
    use std::os::unix::fs::MetadataExt;
    paths.fields().map(|(_, path)| {
        let meta = std::fs::metadata(path).ok()?;
        Some((meta.modified().ok()?, meta.len(), meta.ino()))
    })
}

#[derive(Debug)]
struct Live {
    paths: TlsPaths,
    current: Mutex<Current>,
}

#[derive(Debug)]
struct Current {
    configs: Arc<Configs>,
    stamps: [Stamp; 3],
    checked: Instant,
}

/// How a channel finds out that its connection died without being closed (power lost, a
/// partition that ate the FIN, a middlebox that forgot the flow): once nothing arrived for
/// `interval` it pings, and gives the connection up when the ping goes unanswered for
/// `timeout`; the next call connects anew. Until then every call on it waits out its own
/// timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepAlive {
    pub interval: Duration,
    pub timeout: Duration,
}

impl KeepAlive {
    /// A client of a service: its calls have deadlines of their own and move on to another
    /// server, so a dead connection costs it little until it is found.
    pub const CLIENT: Self = Self {
        interval: Duration::from_secs(10),
        timeout: Duration::from_secs(5),
    };
    /// Between control-plane nodes. A leader's connection to a follower that went dead keeps
    /// the follower behind, answering reads from an old state and no longer counting towards
    /// the quorum, until it is given up: with a client's 15 s, a follower cut off for a
    /// second stayed 12 s behind after the heal, and the next crash of another node left no
    /// quorum for three seconds (docs/simulation.md).
    pub const PEER: Self = Self {
        interval: Duration::from_secs(1),
        timeout: Duration::from_secs(1),
    };
}
/// How long a client remembers a call it gave up on (its stream reset), so that the answer
/// arriving after that is dropped quietly. HTTP/2's default, 1 s, is shorter than the answer
/// to a call abandoned at its 1 s attempt timeout may take; each such late answer then draws
/// a RST_STREAM in reply and counts as a protocol error of the server's. It is measured on the
/// wall clock, which a simulation does not control: the reset or not depended on how loaded
/// the machine was, and a seed's replay diverged. The count of remembered streams stays
/// bounded by HTTP/2's own limit.
const RESET_STREAM_MEMORY: Duration = Duration::from_secs(60);

/// A process's TLS settings for its servers and its clients, and the network its clients
/// dial; the default is plaintext over the operating system's TCP.
#[derive(Debug, Clone, Default)]
pub struct Tls {
    live: Option<Arc<Live>>,
    network: Option<Arc<dyn Network>>,
}

fn read(field: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        field,
        path: path.to_path_buf(),
        source,
    })
}

fn load(paths: &TlsPaths) -> Result<Configs, TlsError> {
    let invalid = |field: &'static str, path: &Path, reason: String| TlsError::Invalid {
        field,
        path: path.to_path_buf(),
        reason,
    };
    let certs =
        |field: &'static str, path: &Path| -> Result<Vec<CertificateDer<'static>>, TlsError> {
            let pem = read(field, path)?;
            let certs = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| invalid(field, path, e.to_string()))?;
            if certs.is_empty() {
                return Err(invalid(field, path, "holds no certificate".into()));
            }
            Ok(certs)
        };
    let mut roots = RootCertStore::empty();
    for ca in certs("ca", &paths.ca)? {
        roots
            .add(ca)
            .map_err(|e| invalid("ca", &paths.ca, e.to_string()))?;
    }
    let roots = Arc::new(roots);
    let chain = certs("cert", &paths.cert)?;
    let key = PrivateKeyDer::from_pem_slice(&read("key", &paths.key)?)
        .map_err(|e| invalid("key", &paths.key, e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| invalid("ca", &paths.ca, e.to_string()))?;
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("cert", &paths.cert, e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(|e| invalid("key", &paths.key, e.to_string()))?;
    server.alpn_protocols = vec![b"h2".to_vec()];
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("cert", &paths.cert, e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| invalid("key", &paths.key, e.to_string()))?;
    client.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Configs {
        server: Arc::new(server),
        client: Arc::new(client),
    })
}

impl Tls {
    pub fn plaintext() -> Self {
        Self::default()
    }

    /// Loads the PEM files `paths` names; they are read again whenever they change.
    pub fn load(paths: &TlsPaths) -> Result<Self, TlsError> {
        let stamps = stamps(paths);
        let configs = Arc::new(load(paths)?);
        Ok(Self {
            network: None,
            live: Some(Arc::new(Live {
                paths: paths.clone(),
                current: Mutex::new(Current {
                    configs,
                    stamps,
                    checked: Instant::now(),
                }),
            })),
        })
    }

    /// Loads `paths` when given, else plaintext.
    pub fn load_optional(paths: Option<&TlsPaths>) -> Result<Self, TlsError> {
        paths.map_or_else(|| Ok(Self::plaintext()), Self::load)
    }

    pub fn is_enabled(&self) -> bool {
        self.live.is_some()
    }

    /// The same settings, with clients dialing over `network` instead of the OS's TCP.
    pub fn over(self, network: Arc<dyn Network>) -> Self {
        Self {
            network: Some(network),
            ..self
        }
    }

    /// The settings for the next connection: the files as they are now.
    fn configs(&self) -> Option<Arc<Configs>> {
        let live = self.live.as_ref()?;
        let mut current = live.current.lock().unwrap_or_else(|p| p.into_inner());
        if current.checked.elapsed() >= RELOAD_CHECK {
            current.checked = Instant::now();
            let now = stamps(&live.paths);
            if now != current.stamps {
                current.stamps = now;
                match load(&live.paths) {
                    Ok(configs) => {
                        current.configs = Arc::new(configs);
                        metrics::counter!("cellplane_tls_reloads_total").increment(1);
                        tracing::info!(cert = %live.paths.cert.display(), "TLS files changed; new connections use them");
                    }
                    Err(error) => {
                        metrics::counter!("cellplane_tls_reload_failures_total").increment(1);
                        tracing::warn!(
                            "TLS files changed but do not load; keeping the previous ones: {error}"
                        );
                    }
                }
            }
        }
        Some(current.configs.clone())
    }

    /// An endpoint for `host:port`. Under TLS the scheme stays `http`: the handshake is made
    /// by this module's connector, not by tonic.
    fn endpoint(
        &self,
        host_port: &str,
        connect_timeout: Duration,
        keep_alive: KeepAlive,
    ) -> Result<Endpoint, TlsError> {
        let endpoint = Endpoint::from_shared(format!("http://{host_port}")).map_err(|e| {
            TlsError::Endpoint {
                endpoint: host_port.to_string(),
                message: e.to_string(),
            }
        })?;
        Ok(endpoint
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(keep_alive.interval)
            .keep_alive_timeout(keep_alive.timeout)
            .keep_alive_while_idle(true)
            .http2_reset_stream_duration(RESET_STREAM_MEMORY))
    }

    /// A lazily connected channel to `host:port`, kept alive as a client's.
    pub fn lazy_channel(
        &self,
        host_port: &str,
        connect_timeout: Duration,
    ) -> Result<Channel, TlsError> {
        self.lazy_channel_keeping(host_port, connect_timeout, KeepAlive::CLIENT)
    }

    /// A lazily connected channel to `host:port` that finds a dead connection as `keep_alive`
    /// says.
    pub fn lazy_channel_keeping(
        &self,
        host_port: &str,
        connect_timeout: Duration,
        keep_alive: KeepAlive,
    ) -> Result<Channel, TlsError> {
        let endpoint = self.endpoint(host_port, connect_timeout, keep_alive)?;
        Ok(if self.uses_connector() {
            endpoint.connect_with_connector_lazy(self.connector())
        } else {
            endpoint.connect_lazy()
        })
    }

    /// A channel to `host:port`, connected before it is returned.
    pub async fn connect(
        &self,
        host_port: &str,
        connect_timeout: Duration,
    ) -> Result<Channel, TlsError> {
        let endpoint = self.endpoint(host_port, connect_timeout, KeepAlive::CLIENT)?;
        let connected = if self.uses_connector() {
            endpoint.connect_with_connector(self.connector()).await
        } else {
            endpoint.connect().await
        };
        connected.map_err(|e| TlsError::Endpoint {
            endpoint: host_port.to_string(),
            message: format!("{e}: {}", source_chain(&e)),
        })
    }

    /// Plaintext over the OS's TCP is tonic's own connector; anything else is this module's.
    fn uses_connector(&self) -> bool {
        self.live.is_some() || self.network.is_some()
    }

    /// Connects over the network, then, under TLS, makes the handshake with the files as they
    /// are now.
    fn connector(
        &self,
    ) -> impl tower::Service<
        Uri,
        Response = TokioIo<Box<dyn Io>>,
        Error = std::io::Error,
        Future = impl Send,
    > + Clone
    + Send
    + 'static {
        let tls = self.clone();
        tower::service_fn(move |uri: Uri| {
            let tls = tls.clone();
            async move {
                let invalid = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, m);
                let host = uri
                    .host()
                    .ok_or_else(|| invalid(format!("{uri}: no host")))?
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string();
                let port = uri
                    .port_u16()
                    .ok_or_else(|| invalid(format!("{uri}: no port")))?;
                let io: Box<dyn Io> = match &tls.network {
                    Some(network) => network.dial(host.clone(), port).await?,
                    None => {
                        let tcp = TcpStream::connect((host.as_str(), port)).await?;
                        tcp.set_nodelay(true)?;
                        Box::new(tcp)
                    }
                };
                let Some(configs) = tls.configs() else {
                    return Ok(TokioIo::new(io));
                };
                let name = ServerName::try_from(host.clone())
                    .map_err(|e| invalid(format!("{host}: {e}")))?;
                let stream = TlsConnector::from(configs.client.clone())
                    .connect(name, io)
                    .await?;
                Ok(TokioIo::new(Box::new(stream) as Box<dyn Io>))
            }
        })
    }

    /// The connections a server accepts on `listener`: under TLS, each once its handshake
    /// succeeded (handshakes run side by side, so a slow client holds up no other). Ends when
    /// the server drops it, which frees the port.
    pub fn incoming<L: Into<Listener>>(
        &self,
        listener: L,
    ) -> impl Stream<Item = std::io::Result<Conn>> + use<L> {
        let mut listener = listener.into();
        let (accepted, incoming) = tokio::sync::mpsc::channel(64);
        let tls = self.clone();
        tokio::spawn(async move {
            loop {
                let (io, addr) = tokio::select! {
                    () = accepted.closed() => return,
                    result = listener.accept() => match result {
                        None => return,
                        Some(Ok(pair)) => pair,
                        Some(Err(error)) => {
                            // Out of file descriptors, say: wait rather than spin.
                            tracing::warn!("accept: {error}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                match tls.configs() {
                    None => {
                        let conn = Conn {
                            io,
                            info: ConnInfo {
                                addr,
                                certs: None,
                                identity: None,
                            },
                        };
                        if accepted.send(Ok(conn)).await.is_err() {
                            return;
                        }
                    }
                    Some(configs) => {
                        let accepted = accepted.clone();
                        tokio::spawn(async move {
                            let acceptor = TlsAcceptor::from(configs.server.clone());
                            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await
                            {
                                Ok(Ok(stream)) => {
                                    let _ = accepted.send(Ok(Conn::tls(stream, addr))).await;
                                }
                                Ok(Err(error)) => {
                                    tracing::debug!(%addr, "TLS handshake refused: {error}");
                                }
                                Err(_) => tracing::debug!(%addr, "TLS handshake timed out"),
                            }
                        });
                    }
                }
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(incoming)
    }
}

/// A client configuration in tonic's own terms, for libraries that make their own channels
/// (etcd-client): the files are read once, here.
pub fn tonic_client_config(
    paths: &TlsPaths,
) -> Result<tonic::transport::ClientTlsConfig, TlsError> {
    load(paths)?; // the same checks as every other identity: a bad file is named now
    Ok(tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(read(
            "ca", &paths.ca,
        )?))
        .identity(tonic::transport::Identity::from_pem(
            read("cert", &paths.cert)?,
            read("key", &paths.key)?,
        )))
}

/// The causes under a transport error, which tonic's own message leaves out.
fn source_chain(error: &dyn std::error::Error) -> String {
    let mut causes = Vec::new();
    let mut next = error.source();
    while let Some(cause) = next {
        causes.push(cause.to_string());
        next = cause.source();
    }
    causes.join(": ")
}

/// One accepted connection, plaintext or TLS, and what its server learned of it.
pub struct Conn {
    io: Box<dyn Io>,
    info: ConnInfo,
}

impl Conn {
    /// A connection whose handshake succeeded: its peer's certificates are read once, here.
    fn tls(stream: tokio_rustls::server::TlsStream<Box<dyn Io>>, addr: SocketAddr) -> Self {
        let certs = stream.get_ref().1.peer_certificates();
        let info = ConnInfo {
            addr,
            identity: certs
                .and_then(|c| c.first())
                .and_then(|der| crate::auth::common_name(der))
                .map(Arc::from),
            certs: certs.map(|certs| Arc::new(certs.to_vec())),
        };
        Self {
            io: Box::new(stream),
            info,
        }
    }
}

/// What a service learns of a connection (in each request's extensions): the peer's address
/// and, under TLS, the certificates it presented and the identity they name, read once per
/// connection rather than once per call.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub addr: SocketAddr,
    pub certs: Option<Arc<Vec<CertificateDer<'static>>>>,
    /// The client certificate's subject common name.
    pub identity: Option<Arc<str>>,
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
