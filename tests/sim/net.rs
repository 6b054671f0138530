//! turmoil's simulated TCP as the network the servers and clients under test use: the same
//! tonic servers and channels as in production, over `cellplane_api::net`.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use cellplane_api::net::{Accepted, Dialing, Io, Listener, Network};
use cellplane_api::tls::Tls;

/// Dials over the simulated network of the host the caller runs on.
#[derive(Debug)]
pub struct Simulated;

impl Network for Simulated {
    fn dial(&self, host: String, port: u16) -> Dialing {
        Box::pin(async move {
            let stream = turmoil::net::TcpStream::connect((host.as_str(), port)).await?;
            Ok(Box::new(stream) as Box<dyn Io>)
        })
    }
}

/// Plaintext over the simulated network.
pub fn tls() -> Tls {
    Tls::plaintext().over(Arc::new(Simulated))
}

/// A listener on `port` of the current host.
pub async fn listen(port: u16) -> std::io::Result<Listener> {
    let listener = turmoil::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).await?;
    let accepted: Accepted = Box::pin(futures::stream::unfold(listener, |listener| async {
        let next = listener
            .accept()
            .await
            .map(|(stream, addr)| (Box::new(stream) as Box<dyn Io>, addr));
        Some((next, listener))
    }));
    Ok(Listener::Other(
        accepted,
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
    ))
}
