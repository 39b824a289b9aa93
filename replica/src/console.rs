//! The replica's web console, next to `/metrics` on `cdp-replica serve --http ADDR`: one
//! self-contained page at `/` (no external assets, so it works on an isolated management
//! network) that polls a small JSON API every two seconds.
//!
//! * `/api/status`: the [`StatusReport`](crate::status::StatusReport), as `status --json`.
//! * `/api/lag`: the RPO lag of every agent head report of the last hour, by group
//!   ([`crate::metrics::lag_history`]).
//! * `/api/bookmarks`: the newest bookmarks in each group's window, by group.
//! * `/api/verify`: the verifier's coverage of each volume ([`crate::metrics::coverage`]).
//! * `/api/events`: the newest events of the catalog, all groups.
//!
//! Everything is read-only: the console shows, the CLI acts. An error answers 500 with
//! `{"error": "…"}` and the page shows it above the last good data.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;

use crate::catalog::{Catalog, EventRow, OpenMode, PointsFilter};
use crate::datadir::DataDir;
use crate::error::Result;
use crate::points::PointInfo;

/// The page, with its style and script inline.
const PAGE: &str = include_str!("console/index.html");

/// Bookmarks shown per group (newest first).
pub const BOOKMARKS_MAX: u64 = 20;

/// Events shown (newest first).
pub const EVENTS_MAX: u32 = 50;

/// The console's routes on the data directory `root`.
pub fn router(root: PathBuf) -> axum::Router {
    axum::Router::new()
        .route("/", get(page))
        .route("/api/status", get(api_status))
        .route("/api/lag", get(api_lag))
        .route("/api/bookmarks", get(api_bookmarks))
        .route("/api/verify", get(api_verify))
        .route("/api/events", get(api_events))
        .with_state(Arc::new(root))
}

async fn page() -> impl IntoResponse {
    ([(header::CACHE_CONTROL, "no-store")], Html(PAGE))
}

/// A JSON answer, or 500 with the error's sentence.
fn answer<T: serde::Serialize>(what: &str, r: Result<T>) -> Response {
    match r {
        Ok(v) => ([(header::CACHE_CONTROL, "no-store")], Json(v)).into_response(),
        Err(e) => {
            tracing::warn!("console: {what}: {e}");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(serde_json::json!({ "error": format!("{what}: {e}") })),
            )
                .into_response()
        }
    }
}

async fn api_status(State(root): State<Arc<PathBuf>>) -> Response {
    answer("status", crate::status::status(&root).await)
}

async fn api_lag() -> Response {
    answer("lag", Ok(crate::metrics::lag_history()))
}

async fn api_bookmarks(State(root): State<Arc<PathBuf>>) -> Response {
    answer("bookmarks", bookmarks(&root).await)
}

async fn api_verify(State(root): State<Arc<PathBuf>>) -> Response {
    answer("verifier coverage", crate::metrics::coverage(&root).await)
}

async fn api_events(State(root): State<Arc<PathBuf>>) -> Response {
    answer("events", events(&root).await)
}

/// The newest [`BOOKMARKS_MAX`] bookmarks in each group's window (one volume's window
/// stands for its group's: a group's points are shared by its volumes).
async fn bookmarks(root: &std::path::Path) -> Result<BTreeMap<String, Vec<PointInfo>>> {
    let mut first = BTreeMap::new();
    {
        let dir = DataDir::existing(root)?;
        let catalog = Catalog::open(&dir.catalog(), OpenMode::Existing).await?;
        let listed = async {
            for v in catalog.volumes().await? {
                if let std::collections::btree_map::Entry::Vacant(e) = first.entry(v.group_id) {
                    e.insert((catalog.group_by_id(v.group_id).await?.name, v.name));
                }
            }
            Ok::<_, crate::error::ReplicaError>(())
        }
        .await;
        catalog.close().await;
        listed?;
    }
    let filter = PointsFilter {
        bookmarks_only: true,
        newest_first: true,
        limit: Some(BOOKMARKS_MAX),
        ..PointsFilter::default()
    };
    let mut out = BTreeMap::new();
    for (group, volume) in first.into_values() {
        let points = crate::points::points_filtered(root, &volume, &filter).await?;
        out.insert(group, points);
    }
    Ok(out)
}

async fn events(root: &std::path::Path) -> Result<Vec<EventRow>> {
    let dir = DataDir::existing(root)?;
    let catalog = Catalog::open(&dir.catalog(), OpenMode::Existing).await?;
    let rows = catalog.events(None, EVENTS_MAX).await;
    catalog.close().await;
    rows
}
