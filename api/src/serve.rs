//! What every cellplane gRPC server does alike.

use tonic_reflection::server::{v1, v1alpha};

/// Where a supervisor puts its own pid for the child it starts with `--exit-with-parent`.
pub const PARENT_PID_ENV: &str = "CELLPLANE_PARENT_PID";

/// Readies `command` to start a child that exits with this process: `--exit-with-parent`,
/// and this process's pid for the child to compare its parent with.
pub fn exit_with_this_process(command: &mut tokio::process::Command) {
    command
        .arg("--exit-with-parent")
        .env(PARENT_PID_ENV, std::process::id().to_string());
}

/// Resolves on Ctrl-C or SIGTERM, or, with `exit_with_parent`, once the process that started
/// this one is gone: a supervisor killed outright (even `kill -9`) leaves nothing of its own
/// behind holding ports and data directories.
pub async fn shutdown_signal_or_parent_exit(exit_with_parent: bool) {
    let parent = async {
        if exit_with_parent {
            parent_exit(expected_parent()).await
        } else {
            std::future::pending::<()>().await
        }
    };
    tokio::select! {
        () = shutdown_signal() => {}
        () = parent => {}
    }
}

/// The supervisor's pid as it passed it ([`PARENT_PID_ENV`]), else this process's parent now.
/// Reading the parent here is not enough alone: a supervisor that dies between starting this
/// process and this line has already handed it to init, which would pass for the parent for
/// ever.
fn expected_parent() -> u32 {
    std::env::var(PARENT_PID_ENV)
        .ok()
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(std::os::unix::process::parent_id)
}

/// Resolves once this process's parent is no longer `parent` (it was re-parented), checking
/// at once and then every 200 ms.
async fn parent_exit(parent: u32) {
    let mut ticker = tokio::time::interval(std::time::Duration::from_millis(200));
    loop {
        ticker.tick().await;
        if std::os::unix::process::parent_id() != parent {
            tracing::warn!(parent, "the supervising process exited; stopping");
            return;
        }
    }
}

/// Runs `served` — a server that drains its calls once asked to stop — until it finished, or
/// until `grace` after `stopping` turned true, whichever comes first: a client that never
/// lets go of a call cannot keep the process from stopping. Answers `None` when cut short.
pub async fn drain_within<T>(
    served: impl std::future::Future<Output = T>,
    mut stopping: tokio::sync::watch::Receiver<bool>,
    grace: std::time::Duration,
) -> Option<T> {
    let deadline = async move {
        let _ = stopping.wait_for(|stopping| *stopping).await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        served = served => Some(served),
        () = deadline => {
            tracing::warn!(?grace, "calls still in flight after the shutdown grace; stopping anyway");
            None
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM, the two ways a server is asked to stop.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

/// gRPC reflection over every cellplane service and health, in both versions of the protocol:
/// v1, and v1alpha, the only one grpcurl 1.8 and other tools still in use ask for.
#[allow(clippy::type_complexity)]
pub fn reflection() -> Result<
    (
        v1::ServerReflectionServer<impl v1::ServerReflection>,
        v1alpha::ServerReflectionServer<impl v1alpha::ServerReflection>,
    ),
    tonic_reflection::server::Error,
> {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    Ok((builder().build_v1()?, builder().build_v1alpha()?))
}
