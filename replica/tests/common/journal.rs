//! A data directory's catalog and journal as the tests look at them.
#![allow(dead_code)]

use std::path::Path;

use cdp_replica::catalog::{Catalog, GroupRow, OpenMode};
use cdp_replica::datadir::DataDir;
use cdp_replica::journal::SegmentSpan;
use cdp_replica::journal::segment_name;

/// Opens the catalog of an existing data directory (not creating it, read-write).
pub async fn open_catalog(root: &Path) -> (DataDir, Catalog) {
    let dir = DataDir::existing(root).expect("data dir");
    let catalog = Catalog::open(&dir.catalog(), OpenMode::Existing)
        .await
        .expect("catalog");
    (dir, catalog)
}

/// The catalog's row of group `name`, which must exist.
pub async fn group_row(catalog: &Catalog, name: &str) -> GroupRow {
    catalog
        .group_by_name(name)
        .await
        .expect("query")
        .expect("group")
}

/// The journal holds no half batch: the segment of the last journaled batch ends exactly
/// where that batch does, and no newer segment exists. Returns that batch's span (None: the
/// journal holds no batch).
pub async fn assert_journal_ends_at_its_commit(
    dir: &DataDir,
    catalog: &Catalog,
    group: &str,
    g: &GroupRow,
) -> Option<SegmentSpan> {
    let last = catalog.last_journaled(g.id).await.expect("query");
    if let Some(end) = &last {
        let seg = dir.journal(group).join(segment_name(end.segment));
        assert_eq!(
            std::fs::metadata(&seg)
                .expect("the committed end's segment")
                .len(),
            end.end(),
            "segment {} does not end where its last committed batch does",
            end.segment
        );
        assert!(
            !dir.journal(group)
                .join(segment_name(end.segment + 1))
                .exists(),
            "an uncommitted newer segment survived recovery"
        );
    }
    last
}
