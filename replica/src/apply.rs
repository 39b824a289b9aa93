//! Applying journal records to the target files: every record of a group with seq in
//! (base, to], in (seq, index) order — what the trimmer does in steps (b) and (c) of the trim
//! protocol (`trimmer`), and what a failover commit applies (`failover`). Data records are
//! read from their segment and checked against their index row and their hash; zero and trim
//! records punch a hole (or write zeros). A damaged record is left out with an error line and
//! an event (the verifier reports the chunks it leaves wrong), and the work goes on.

use cdp_shared::batch::RecordKind;
use cdp_shared::types::Seq;

use crate::catalog::{Catalog, EventLevel, RecordRow, VolumeRow};
use crate::datadir::DataDir;
use crate::error::{ReplicaError, Result};
use crate::reconstruct::{RecordLoader, RecordRef};
use crate::target::TargetFile;

/// Applies every journal record of group `group_id` (named `name`) with seq in (base, to] to
/// its target file in (seq, index) order, and fsyncs the files written when `sync` (steps (b)
/// and (c); also what a failover commit applies). Returns the number of target files written.
pub(crate) async fn apply_journal(
    catalog: &Catalog,
    dir: &DataDir,
    group_id: i64,
    name: &str,
    base: Seq,
    to: Seq,
    sync: bool,
) -> Result<usize> {
    let mut work: Vec<(VolumeRow, Vec<RecordRow>)> = Vec::new();
    for v in catalog.volumes_of_group(group_id).await? {
        let rows = catalog.records_in_seq_order(v.id, base, to).await?;
        if !rows.is_empty() {
            work.push((v, rows));
        }
    }
    let dir = dir.clone();
    let journal_dir = dir.journal(name);
    let (written, damaged) =
        tokio::task::spawn_blocking(move || -> Result<(usize, Vec<(String, String)>)> {
            let mut loader = RecordLoader::new(&journal_dir)?;
            let mut data = Vec::new();
            let mut targets = Vec::with_capacity(work.len());
            let mut damaged = Vec::new();
            for (v, rows) in &work {
                let mut target = TargetFile::open(&dir.target(&v.name), v.size)?;
                for row in rows {
                    let r = RecordRef::from_row(row)?;
                    match r.kind {
                        RecordKind::Data => match loader.load(&r, v.agent_volume_id, &mut data) {
                            Ok(range) => target.write_at(r.offset, &data[range])?,
                            // A damaged record (the verifier reports the chunk; a repair
                            // resends it in a later batch): its bytes are not applied, and
                            // trimming goes on instead of stopping the replica.
                            Err(ReplicaError::JournalCorrupt(why)) => {
                                damaged.push((v.name.clone(), why))
                            }
                            Err(e) => return Err(e),
                        },
                        _ => target.zero(r.offset, u64::from(r.length))?,
                    }
                }
                targets.push(target);
            }
            if sync {
                for t in &mut targets {
                    t.sync_all()?;
                }
            }
            Ok((targets.len(), damaged))
        })
        .await??;
    for (volume, why) in damaged {
        let msg = format!(
            "a damaged journal record was left out when trimming: {why}; `cdp-replica verify run --volume {volume} --full` finds the chunks it leaves wrong and `verify repair` resends them"
        );
        tracing::error!(group = %name, volume = %volume, "{msg}");
        catalog
            .event(
                EventLevel::Error,
                Some(name),
                Some(&volume),
                &msg,
                crate::clock::now_ns(),
            )
            .await?;
    }
    Ok(written)
}
