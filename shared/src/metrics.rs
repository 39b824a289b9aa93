//! The Prometheus endpoint both binaries serve (`cdp-agent run --metrics ADDR`,
//! `cdp-replica serve --http ADDR`): one process-wide `metrics` recorder
//! (metrics-exporter-prometheus, rendering on demand, nothing pushed), and an axum route
//! `/metrics` that first brings the gauges up to date from the binary's own state (its
//! `refresh`, run per scrape) and then renders the text exposition format.
//!
//! Names follow the Prometheus conventions: the `cdp_agent_` / `cdp_replica_` prefix, base
//! units (`_seconds`, `_bytes`), `_total` on counters; every metric is described (HELP, TYPE)
//! by the binary before the first scrape. A histogram named `…_lag_observed_seconds` gets the
//! buckets of [`LAG_BUCKETS_SECONDS`] (others would render as summaries).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

/// Buckets of the RPO lag histograms, in seconds: from a batch's age to an hour-long outage.
pub const LAG_BUCKETS_SECONDS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

/// The content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's recorder, installed at the first call (later calls return the same one).
pub fn recorder() -> Result<PrometheusHandle, String> {
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("_lag_observed_seconds".to_owned()),
            LAG_BUCKETS_SECONDS,
        )
        .map_err(|e| format!("configure the metrics recorder: {e}"))?
        .build_recorder();
    let handle = recorder.handle();
    // Only the first caller installs; a concurrent second one finds the first's handle.
    if HANDLE.set(handle.clone()).is_ok() {
        metrics::set_global_recorder(recorder)
            .map_err(|e| format!("install the metrics recorder: {e}"))?;
        Ok(handle)
    } else {
        HANDLE
            .get()
            .cloned()
            .ok_or_else(|| "the metrics recorder vanished".to_owned())
    }
}

/// The `/metrics` route: `refresh` brings the gauges up to date, then the exposition is
/// rendered from the recorder.
pub fn router<F, Fut>(handle: PrometheusHandle, refresh: F) -> axum::Router
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let handle = handle.clone();
            let refresh = refresh.clone();
            async move {
                refresh().await;
                (
                    [(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)],
                    handle.render(),
                )
            }
        }),
    )
}

/// Binds `addr` (before anything else starts, so that a taken port stops the command with a
/// clear error) and returns the listener with the address it got (port 0 picks one).
pub async fn bind(addr: SocketAddr) -> Result<(tokio::net::TcpListener, SocketAddr), String> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("listen for HTTP on {addr}: {e}"))?;
    let local = listener
        .local_addr()
        .map_err(|e| format!("the address of the HTTP listener on {addr}: {e}"))?;
    Ok((listener, local))
}

/// Serves `router` on `listener` until `token` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    token: CancellationToken,
) {
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    if let Err(e) = axum::serve(listener, router)
        .with_graceful_shutdown(token.cancelled_owned())
        .await
    {
        tracing::error!("the HTTP server on {addr} stopped: {e}");
    }
}

/// Seconds from milliseconds, for a gauge.
pub fn seconds_of_ms(ms: u64) -> f64 {
    ms as f64 / 1000.0
}
