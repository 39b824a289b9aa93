//! `serve`, and the signals that stop a command serving until interrupted (`serve`, `export`,
//! `failover`).

use std::net::SocketAddr;
use std::path::PathBuf;

use super::CliError;

pub(crate) async fn serve(data: PathBuf, listen: Option<SocketAddr>) -> Result<(), CliError> {
    let listen = match listen {
        Some(l) => l,
        None => cdp_replica::configured_listen(&data)?,
    };
    let handle = cdp_replica::Server::start(&data, listen).await?;
    cdp_shared::outln!(
        "listening on {} (fingerprint {})",
        handle.local_addr(),
        handle.fingerprint()
    );
    let token = handle.token();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("stopping");
        token.cancel();
    });
    handle.wait().await?;
    Ok(())
}

/// A future that completes at SIGINT or SIGTERM, both caught from the moment it is made.
pub(crate) fn signal_waiter() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => wait_for_signal().await,
        }
    }
}

pub(crate) async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
