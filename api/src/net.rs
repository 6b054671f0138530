//! The network a process dials and listens on: the operating system's TCP by default, or one a
//! caller supplies — the deterministic simulation runs every node of a cluster in one process
//! on a simulated network, through the same servers and clients.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_stream::{Stream, StreamExt};

/// A connected byte stream, of whichever network.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A dial in progress.
pub type Dialing = Pin<Box<dyn Future<Output = std::io::Result<Box<dyn Io>>> + Send>>;

/// A network other than the operating system's, for clients to dial.
pub trait Network: std::fmt::Debug + Send + Sync + 'static {
    /// Connects to `host:port`.
    fn dial(&self, host: String, port: u16) -> Dialing;
}

/// Connections accepted on a network other than the operating system's.
pub type Accepted = Pin<Box<dyn Stream<Item = std::io::Result<(Box<dyn Io>, SocketAddr)>> + Send>>;

/// Where a server takes its connections from.
pub enum Listener {
    Tcp(TcpListener),
    /// Connections of another network, and the address they arrive at.
    Other(Accepted, SocketAddr),
}

impl From<TcpListener> for Listener {
    fn from(listener: TcpListener) -> Self {
        Self::Tcp(listener)
    }
}

impl Listener {
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match self {
            Self::Tcp(listener) => listener.local_addr(),
            Self::Other(_, addr) => Ok(*addr),
        }
    }

    /// The next connection and its peer's address; `None` once the network closed it.
    pub(crate) async fn accept(&mut self) -> Option<std::io::Result<(Box<dyn Io>, SocketAddr)>> {
        match self {
            Self::Tcp(listener) => Some(listener.accept().await.map(|(tcp, addr)| {
                // Small answers would otherwise wait for the peer's delayed ACK.
                let _ = tcp.set_nodelay(true);
                (Box::new(tcp) as Box<dyn Io>, addr)
            })),
            Self::Other(accepted, _) => accepted.next().await,
        }
    }
}
