//! A data directory's catalog and journal as the tests look at them.
#![allow(dead_code)]

use std::path::Path;

use cdp_replica::catalog::{Catalog, GroupRow, OpenMode};
use cdp_replica::datadir::DataDir;
use cdp_replica::journal::segment_name;
use cdp_replica::journal::{DIRECT_ALIGN, SegmentSpan};

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
        let file = std::fs::File::open(&seg).expect("the committed end's segment");
        let len = file.metadata().expect("stat").len();
        // A direct write pads its batch with zeros to the next multiple of DIRECT_ALIGN;
        // anything else past the committed end is a half batch.
        let padded = end.end().div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
        let mut tail = vec![0u8; len.saturating_sub(end.end()).min(DIRECT_ALIGN) as usize];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut tail, end.end()).expect("read");
        assert!(
            len >= end.end() && len <= padded && tail.iter().all(|&b| b == 0),
            "segment {} is {len} bytes long but its last committed batch ends at {} (zero \
             padding allowed up to {padded})",
            end.segment,
            end.end()
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
