//! What every cellplane gRPC server does alike.

use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::{Stream, StreamExt};

/// Accepted connections with Nagle's algorithm off: small answers (Raft acks, route lookups,
/// send acknowledgements) would otherwise wait for the peer's delayed ACK, tens of milliseconds.
pub fn nodelay_incoming(listener: TcpListener) -> impl Stream<Item = std::io::Result<TcpStream>> {
    TcpListenerStream::new(listener).map(|accepted| {
        let stream = accepted?;
        stream.set_nodelay(true)?;
        Ok(stream)
    })
}
