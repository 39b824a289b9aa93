//! `serve`, and the signals that stop a command serving until interrupted (`serve`, `export`,
//! `failover`).

use std::net::SocketAddr;
use std::path::PathBuf;

use super::CliError;

pub(crate) async fn serve(
    data: PathBuf,
    listen: Option<SocketAddr>,
    http: Option<SocketAddr>,
) -> Result<(), CliError> {
    let listen = match listen {
        Some(l) => l,
        None => cdp_replica::configured_listen(&data)?,
    };
    let http = match http {
        Some(h) => Some(h),
        None => cdp_replica::configured_http(&data)?,
    };
    // Bound first, so that a taken port stops `serve` before it starts anything.
    let http_listener = match http {
        Some(addr) => Some(
            cdp_shared::metrics::bind(addr)
                .await
                .map_err(CliError::msg)?,
        ),
        None => None,
    };
    let handle = cdp_replica::Server::start(&data, listen).await?;
    cdp_shared::outln!(
        "listening on {} (fingerprint {})",
        handle.local_addr(),
        handle.fingerprint()
    );
    let token = handle.token();
    if let Some((listener, addr)) = http_listener {
        let recorder = cdp_shared::metrics::recorder().map_err(CliError::msg)?;
        cdp_replica::metrics::describe();
        let root = data.clone();
        let router = cdp_shared::metrics::router(recorder, move || {
            let root = root.clone();
            async move { cdp_replica::metrics::refresh(&root).await }
        })
        .merge(cdp_replica::console::router(data.clone()));
        tokio::spawn(cdp_shared::metrics::serve(listener, router, token.clone()));
        cdp_shared::outln!("metrics on http://{addr}/metrics");
        cdp_shared::outln!("console on http://{addr}/");
    }
    let signals = signal_waiter();
    tokio::spawn(async move {
        signals.await;
        tracing::info!("stopping");
        cdp_shared::notify::stopping();
        token.cancel();
    });
    // Listening, with the signals caught: ready for systemd (`Type=notify`).
    cdp_shared::notify::ready("serving agents");
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
