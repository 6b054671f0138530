//! The operator's gRPC health endpoint (`grpc.health.v1`), which Kubernetes probes natively:
//! SERVING while the process runs, leader or not.

use std::net::SocketAddr;

use super::Error;

pub async fn spawn(
    addr: SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Health(format!("binding {addr}: {e}")))?;
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        if let Err(error) = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
        {
            tracing::error!(%error, "health endpoint stopped");
        }
    });
    Ok(())
}
