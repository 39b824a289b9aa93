//! `forget`: removes a consistency group — or one volume of a group — from the replica with
//! everything it holds of it: the journal segments, the target files, and the catalog rows
//! (batches, records, bookmarks, verifier rows, pins, the failover row, the link, events).
//!
//! # What is forgotten
//! * `--group G`: every volume of G and the group itself: `DIR/journal/G/`, each volume's
//!   `DIR/volumes/V/` (the target file), a committed failover's files, and every row.
//! * `--volume V`: when V is the only volume of its group, the same as `--group`. When the
//!   group holds others, only V: its target file, its record rows, its verifier rows and
//!   pins, the events naming it, its volume row. The group's journal is shared with the other
//!   volumes and stays: its segments hold V's records until the trimmer removes them (no row
//!   points at them any more, so nothing reads or applies them).
//!
//! After a forget the group (or the volume) is new to the replica: when its agent connects
//! again, the group is created afresh — at seq 0, so that the agent, which knows the old
//! group's generation, continues on a fresh chain — and every volume the replica has no image
//! of gets a fresh initial sync.
//!
//! # What refuses it (one sentence naming the holder, nothing changed)
//! * a live pin on a point of the volumes (an export, a restore, a diff, the hash service, the
//!   verifier — [`crate::pins`]); dead pins are deleted with the rest;
//! * a failover of the group that is `active` or `committing` (it holds its point and can
//!   still be undone or must be completed); a `committed` failover is forgotten with the group
//!   (its image is the target file, deleted like any other);
//! * while `serve` runs: the group's agent being connected (named). Stop that agent (or
//!   deauthorize it) first.
//!
//! Without `--yes` nothing is deleted: the command prints what it would delete (volumes, bytes
//! of journal and target files, points) and exits non-zero.
//!
//! # Who carries it out
//! When `serve` is not running, the command itself, holding `serve.lock` for the whole forget
//! (a `serve` starting meanwhile waits for nothing: it fails to take the lock and says another
//! is running). When `serve` runs, the command inserts a `forget_requests` row and waits; serve
//! takes it within [`FORGET_POLL_INTERVAL`]: under its ingest's hello lock it checks that the
//! group's agent is not connected, marks the group as being forgotten (a Hello naming it is
//! refused meanwhile) and stops the group's ingest and trimmer tasks; then it carries out the
//! steps below, and starts the group's tasks again when only a volume was forgotten. A
//! connection welcomed for the group just before is closed within a second (the server checks
//! every connection's groups on its fence tick).
//!
//! # The order of steps (crash-safe)
//! 1. ONE write transaction ([`crate::catalog::WriteLock::forget_rows`]): re-check the holds
//!    above, delete every row, record the group or volume in `forgotten`, and list the files
//!    and directories to delete in `forget_files`.
//! 2. Delete each listed file or directory (a directory with everything in it), fsync its
//!    parent, and delete its `forget_files` row.
//!
//! A kill before step 1 commits leaves the old state. A kill after it leaves no row of the
//! group or volume (`status` and `points` no longer list it) and files listed in
//! `forget_files`: `serve` deletes them when it starts, before it admits any agent (so a group
//! created again never meets old files), and so does the next `forget` (which, for a name
//! already forgotten, says so and succeeds). Deleting a file already gone is not an error, so
//! step 2 is idempotent.

use cdp_shared::types::Seq;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::catalog::OpenMode;
use crate::catalog::{Catalog, FailoverState, ForgetRows, GroupRow, PinRow, VolumeRow};
use crate::clock::now_ns;
use crate::datadir::{self, DataDir, ServeLock};
use crate::error::{ReplicaError, Result};
use crate::failover::FailoverFiles;
use crate::pins;
use crate::points::window;

/// How often serve looks for forget requests.
pub const FORGET_POLL_INTERVAL: Duration = Duration::from_millis(500);
/// How long the command waits for serve to take its request before withdrawing it.
pub const FORGET_TAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// What to forget.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ForgetTarget {
    Group(String),
    Volume(String),
}

impl ForgetTarget {
    fn kind(&self) -> &'static str {
        match self {
            ForgetTarget::Group(_) => "group",
            ForgetTarget::Volume(_) => "volume",
        }
    }
    fn name(&self) -> &str {
        match self {
            ForgetTarget::Group(n) | ForgetTarget::Volume(n) => n,
        }
    }
}

impl std::fmt::Display for ForgetTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.kind(), self.name())
    }
}

/// A forget resolved against the catalog.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForgetPlan {
    pub group: GroupRow,
    /// The volumes forgotten.
    pub volumes: Vec<VolumeRow>,
    /// The group goes too (with its journal).
    pub whole_group: bool,
    /// The volumes of the group that stay (a volume forgotten out of several).
    pub kept: Vec<String>,
}

/// One volume in a [`ForgetReport`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ForgottenVolume {
    pub name: String,
    /// The volume's size (the target file's length).
    pub size: u64,
    /// Bytes the target file takes on disk (it is sparse).
    pub target_bytes: u64,
    /// Recovery points in its window.
    pub points: u64,
    /// The window's first and last points (seq), when it has any.
    pub first_seq: Option<Seq>,
    pub last_seq: Option<Seq>,
}

/// What a forget deletes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ForgetReport {
    pub group: String,
    /// The group's agent (fingerprint hex).
    pub owner: String,
    pub whole_group: bool,
    pub volumes: Vec<ForgottenVolume>,
    /// Journal segment files deleted, and their bytes (0 when only a volume of several is
    /// forgotten: the group keeps its journal).
    pub journal_segments: u64,
    pub journal_bytes: u64,
    /// The volumes of the group that stay.
    pub kept: Vec<String>,
}

impl ForgetReport {
    /// Every byte the forget frees on disk.
    pub fn bytes(&self) -> u64 {
        self.journal_bytes + self.volumes.iter().map(|v| v.target_bytes).sum::<u64>()
    }
}

impl std::fmt::Display for ForgetReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use cdp_shared::types::human_bytes;
        if self.whole_group {
            writeln!(f, "group {} (agent {}):", self.group, self.owner)?;
        } else {
            writeln!(
                f,
                "volume {} of group {} (the group and its volume{} {} stay):",
                self.volumes.first().map_or("?", |v| v.name.as_str()),
                self.group,
                if self.kept.len() == 1 { "" } else { "s" },
                self.kept.join(", ")
            )?;
        }
        for v in &self.volumes {
            let points = match (v.first_seq, v.last_seq) {
                (Some(a), Some(b)) => format!(
                    ", {} point{} (seq {a} to {b})",
                    v.points,
                    if v.points == 1 { "" } else { "s" }
                ),
                _ => ", no recovery point".to_owned(),
            };
            writeln!(
                f,
                "  volume {}: target file of {} ({} on disk){points}",
                v.name,
                human_bytes(v.size),
                human_bytes(v.target_bytes)
            )?;
        }
        if self.whole_group {
            writeln!(
                f,
                "  journal: {} segment{}, {}",
                self.journal_segments,
                if self.journal_segments == 1 { "" } else { "s" },
                human_bytes(self.journal_bytes)
            )?;
            write!(
                f,
                "  and their catalog rows (batches, records, bookmarks, verification results, pins, events)"
            )
        } else {
            write!(
                f,
                "  and its catalog rows (records, verification results, pins, events); its records in the group's journal stay until the trimmer removes them"
            )
        }
    }
}

/// What `forget` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ForgetOutcome {
    /// Without `--yes`: what it would delete; nothing changed.
    WouldDelete(ForgetReport),
    Forgot(ForgetReport),
    /// The name was forgotten before (files a crash left were deleted now, if any).
    AlreadyForgotten {
        target: ForgetTarget,
        at_ns: i64,
    },
}

/// Resolves `target` against the catalog; `Ok(None)` when there is no such group or volume.
pub async fn plan(catalog: &Catalog, target: &ForgetTarget) -> Result<Option<ForgetPlan>> {
    let (group, only) = match target {
        ForgetTarget::Group(name) => match catalog.group_by_name(name).await? {
            Some(g) => (g, None),
            None => return Ok(None),
        },
        ForgetTarget::Volume(name) => match catalog.volume_by_name(name).await? {
            Some(v) => (catalog.group_by_id(v.group_id).await?, Some(v)),
            None => return Ok(None),
        },
    };
    let all = catalog.volumes_of_group(group.id).await?;
    Ok(Some(match only {
        Some(v) if all.len() > 1 => ForgetPlan {
            kept: all
                .iter()
                .filter(|o| o.id != v.id)
                .map(|o| o.name.clone())
                .collect(),
            volumes: vec![v],
            whole_group: false,
            group,
        },
        _ => ForgetPlan {
            group,
            volumes: all,
            whole_group: true,
            kept: Vec::new(),
        },
    }))
}

/// What the forget of `plan` deletes: sizes from the files, points from the catalog.
pub async fn describe(catalog: &Catalog, dir: &DataDir, plan: &ForgetPlan) -> Result<ForgetReport> {
    let mut volumes = Vec::new();
    for v in &plan.volumes {
        let (points, first_seq, last_seq) =
            match window(&mut catalog.clone(), v, &plan.group).await? {
                Ok(w) => (
                    catalog
                        .batch_count_in(plan.group.id, w.start, plan.group.head_seq)
                        .await?,
                    w.start_batch.map(|b| b.seq),
                    Some(plan.group.head_seq),
                ),
                Err(_) => (0, None, None),
            };
        let target = dir.target(&v.name);
        let target_bytes = match std::fs::metadata(&target) {
            Ok(m) => m.blocks() * 512,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(ReplicaError::io("read the size of", target)(e)),
        };
        volumes.push(ForgottenVolume {
            name: v.name.clone(),
            size: v.size,
            target_bytes,
            points,
            first_seq: first_seq.filter(|_| points > 0),
            last_seq: last_seq.filter(|_| points > 0),
        });
    }
    let (mut journal_segments, mut journal_bytes) = (0, 0);
    if plan.whole_group {
        let jdir = dir.journal(&plan.group.name);
        match std::fs::read_dir(&jdir) {
            Ok(entries) => {
                for e in entries {
                    let e = e.map_err(ReplicaError::io("list", &jdir))?;
                    let m = e.metadata().map_err(ReplicaError::io("read", e.path()))?;
                    if m.is_file() {
                        journal_segments += 1;
                        journal_bytes += m.len();
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(ReplicaError::io("list", jdir)(e)),
        }
    }
    Ok(ForgetReport {
        group: plan.group.name.clone(),
        owner: plan.group.owner.clone(),
        whole_group: plan.whole_group,
        volumes,
        journal_segments,
        journal_bytes,
        kept: plan.kept.clone(),
    })
}

fn what(plan: &ForgetPlan) -> String {
    if plan.whole_group {
        format!("group {}", plan.group.name)
    } else {
        format!(
            "volume {}",
            plan.volumes.first().map_or("?", |v| v.name.as_str())
        )
    }
}

/// The sentence refusing the forget of `plan`, if a live pin or a failover holds it (sans-IO
/// but for the liveness of a pin's process). `pins` are the group's pins.
pub fn hold(
    plan: &ForgetPlan,
    pins_of_group: &[PinRow],
    failover: Option<&crate::catalog::FailoverRow>,
    now_ns: i64,
) -> Option<String> {
    let what = what(plan);
    if let Some(f) = failover {
        let group = &plan.group.name;
        match f.state {
            FailoverState::Active => {
                return Some(format!(
                    "{what} is held by its group's failover at seq {} (cdp-replica failover): end it first with `cdp-replica failover --group {group} --undo` (or `--commit`), then run forget again",
                    f.seq
                ));
            }
            FailoverState::Committing => {
                return Some(format!(
                    "{what} is held by a failover commit at seq {} that has not completed: complete it with `cdp-replica failover --group {group} --commit`, then run forget again",
                    f.seq
                ));
            }
            FailoverState::Committed => {}
        }
    }
    let live: Vec<&PinRow> = pins_of_group
        .iter()
        .filter(|p| plan.volumes.iter().any(|v| v.id == p.volume_id))
        .filter(|p| pins::is_live_now(p, now_ns))
        .collect();
    let first = live.first()?;
    let volume = plan
        .volumes
        .iter()
        .find(|v| v.id == first.volume_id)
        .map_or("?", |v| v.name.as_str());
    let more = match live.len() {
        1 => String::new(),
        n => format!(
            " (and {} more reader{})",
            n - 1,
            if n == 2 { "" } else { "s" }
        ),
    };
    Some(format!(
        "{what} is held by a reader: {} (pid {}) holds seq {} of volume {volume}{more}; stop it or let it finish, then run forget again",
        first.holder, first.pid, first.seq
    ))
}

/// The sentence refusing the forget while the group's agent is connected.
pub fn agent_connected(plan: &ForgetPlan, dir: &DataDir) -> String {
    let name = datadir::read_agents(dir)
        .ok()
        .and_then(|l| {
            l.into_iter()
                .find(|a| a.fingerprint.to_string() == plan.group.owner)
        })
        .map(|a| a.name)
        .filter(|n| !n.is_empty())
        .map_or_else(String::new, |n| format!("{n:?} "));
    format!(
        "{} is protected by agent {name}({}), which is connected to the running serve: unprotect it there first (`cdp-agent unprotect`), or stop that agent or `cdp-replica deauthorize` it, then run forget again; if it connects again later, the group is new to the replica and gets a fresh initial sync",
        what(plan),
        plan.group.owner
    )
}

/// Paths relative to the data directory.
fn relative(dir: &DataDir, path: &Path) -> String {
    path.strip_prefix(dir.root())
        .unwrap_or(path)
        .to_string_lossy()
        .into_owned()
}

/// Steps 1 and 2 of the protocol (see the module docs) for `plan`, checking the holds again
/// inside the transaction. The caller keeps `serve` (or, inside serve, the group's tasks and
/// its agent) out.
pub async fn execute(catalog: &Catalog, dir: &DataDir, plan: &ForgetPlan) -> Result<()> {
    delete_rows(catalog, dir, plan).await?;
    complete_pending(catalog, dir).await
}

/// Step 1 of the protocol: the one transaction that checks the holds again and deletes the
/// rows, listing the files to delete in `forget_files` (step 2, [`complete_pending`], deletes
/// them; a forget stopped between the two is completed by the next forget or serve). The
/// caller keeps `serve` (or, inside serve, the group's tasks and its agent) out.
pub async fn delete_rows(catalog: &Catalog, dir: &DataDir, plan: &ForgetPlan) -> Result<()> {
    let mut lock = catalog.write_lock().await?;
    // Everything is read again inside the transaction that deletes.
    let group = match lock.group_by_name(&plan.group.name).await? {
        Some(g) if g.id == plan.group.id => g,
        _ => {
            return Err(ReplicaError::Forget(format!(
                "{} changed while it was being forgotten: run forget again",
                what(plan)
            )));
        }
    };
    let all = lock.volumes_of_group(group.id).await?;
    let forgotten: Vec<&VolumeRow> = all
        .iter()
        .filter(|v| plan.volumes.iter().any(|p| p.id == v.id))
        .collect();
    let others = all.len() - forgotten.len();
    if forgotten.len() != plan.volumes.len() || (plan.whole_group && others != 0) {
        return Err(ReplicaError::Forget(format!(
            "the volumes of group {} changed while it was being forgotten: run forget again",
            group.name
        )));
    }
    let pins = lock.pins_of_group(group.id).await?;
    let failover = lock.failover(group.id).await?;
    if let Some(why) = hold(plan, &pins, failover.as_ref(), now_ns()) {
        return Err(ReplicaError::Forget(why));
    }
    let mut files = Vec::new();
    for v in &plan.volumes {
        if let Some(volume_dir) = dir.target(&v.name).parent() {
            files.push(relative(dir, volume_dir));
        }
        let fo = FailoverFiles::of(dir, &v.name);
        // `<volume>.lock`: the per-volume lock of replicas before group failover.
        let old_lock = fo.map.with_extension("lock");
        for p in [&fo.overlay, &fo.map, &old_lock] {
            files.push(relative(dir, p));
        }
    }
    if plan.whole_group {
        files.push(relative(
            dir,
            &crate::failover::group_lock(dir, &group.name),
        ));
        files.push(relative(dir, &dir.journal(&group.name)));
    }
    let names: Vec<&str> = plan.volumes.iter().map(|v| v.name.as_str()).collect();
    let message = if plan.whole_group {
        format!(
            "forgot group {} (agent {}) and its volumes {} (cdp-replica forget)",
            group.name,
            group.owner,
            names.join(", ")
        )
    } else {
        format!(
            "forgot volume {} of group {} (cdp-replica forget)",
            names.join(", "),
            group.name
        )
    };
    let records = lock
        .forget_rows(&ForgetRows {
            group_id: group.id,
            group: group.name.clone(),
            whole_group: plan.whole_group,
            volumes: plan
                .volumes
                .iter()
                .map(|v| (v.id, v.name.clone()))
                .collect(),
            files,
            message: message.clone(),
            now_ns: now_ns(),
        })
        .await?;
    lock.commit().await?;
    tracing::info!("{message}: {records} record rows deleted");
    Ok(())
}

/// Step 2: deletes every file or directory listed in `forget_files` (a crash may have left
/// some), fsyncing each parent, and its row.
pub async fn complete_pending(catalog: &Catalog, dir: &DataDir) -> Result<()> {
    for rel in catalog.forget_files().await? {
        let path: PathBuf = dir.root().join(&rel);
        let p = path.clone();
        tokio::task::spawn_blocking(move || remove(&p)).await??;
        catalog.forget_file_done(&rel).await?;
        tracing::debug!("deleted {}", path.display());
    }
    Ok(())
}

fn remove(path: &Path) -> Result<()> {
    let result = match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(ReplicaError::io("delete", path)(e)),
    }
    match path.parent() {
        Some(parent) => datadir::sync_dir(parent),
        None => Ok(()),
    }
}

/// `cdp-replica forget` (see the module docs): without `yes`, what it would delete; with it,
/// the forget, carried out here when `serve` is not running and by serve when it is.
pub async fn forget(root: &Path, target: &ForgetTarget, yes: bool) -> Result<ForgetOutcome> {
    let dir = DataDir::existing(root)?;
    let catalog = Catalog::open(&dir.catalog(), OpenMode::Existing).await?;
    let result = forget_in(&dir, &catalog, target, yes).await;
    catalog.close().await;
    result
}

async fn forget_in(
    dir: &DataDir,
    catalog: &Catalog,
    target: &ForgetTarget,
    yes: bool,
) -> Result<ForgetOutcome> {
    // What a crash left is deleted first (only files no row describes any more).
    complete_pending(catalog, dir).await?;
    let Some(plan) = plan(catalog, target).await? else {
        if let Some(at_ns) = catalog.forgotten(target.kind(), target.name()).await? {
            return Ok(ForgetOutcome::AlreadyForgotten {
                target: target.clone(),
                at_ns,
            });
        }
        return Err(match target {
            ForgetTarget::Group(g) => ReplicaError::UnknownGroup {
                group: g.clone(),
                dir: dir.root().to_path_buf(),
            },
            ForgetTarget::Volume(v) => ReplicaError::UnknownVolume {
                volume: v.clone(),
                dir: dir.root().to_path_buf(),
            },
        });
    };
    let report = describe(catalog, dir, &plan).await?;
    let pins = catalog.pins_of_group(plan.group.id).await?;
    let failover = catalog.failover(plan.group.id).await?;
    if let Some(why) = hold(&plan, &pins, failover.as_ref(), now_ns()) {
        return Err(ReplicaError::Forget(why));
    }
    let serving = ServeLock::is_held(dir)?;
    if serving
        && catalog
            .link(plan.group.id)
            .await?
            .is_some_and(|l| l.connected)
    {
        return Err(ReplicaError::Forget(agent_connected(&plan, dir)));
    }
    if !yes {
        return Ok(ForgetOutcome::WouldDelete(report));
    }
    if !serving {
        match ServeLock::acquire(dir) {
            Ok(_lock) => {
                execute(catalog, dir, &plan).await?;
                return Ok(ForgetOutcome::Forgot(report));
            }
            Err(ReplicaError::AlreadyServing { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    through_serve(dir, catalog, target, &plan).await?;
    Ok(ForgetOutcome::Forgot(report))
}

/// Asks the running serve to carry the forget out and waits for the outcome.
async fn through_serve(
    dir: &DataDir,
    catalog: &Catalog,
    target: &ForgetTarget,
    plan: &ForgetPlan,
) -> Result<()> {
    let id = catalog
        .insert_forget_request(target.kind(), target.name(), now_ns())
        .await?;
    let asked = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Some(r) = catalog.forget_request(id).await? else {
            return Err(ReplicaError::Forget(format!(
                "the request to forget {} disappeared from the catalog: run forget again",
                what(plan)
            )));
        };
        let serving = ServeLock::is_held(dir)?;
        let give_up = !serving || asked.elapsed() > FORGET_TAKE_TIMEOUT;
        match r.state.as_str() {
            "done" => return Ok(()),
            "failed" => {
                return Err(ReplicaError::Forget(r.message.unwrap_or_else(|| {
                    format!("serve could not forget {}", what(plan))
                })));
            }
            "running" if !serving => {
                return Err(ReplicaError::Forget(format!(
                    "serve stopped while it was forgetting {}: run forget again to complete it",
                    what(plan)
                )));
            }
            _ => {}
        }
        // Still requested: withdrawn once serve is gone or too slow, unless it takes it at this
        // very moment.
        if r.state == "requested"
            && give_up
            && catalog
                .move_forget_request(id, "requested", "failed", Some("withdrawn"), now_ns())
                .await?
        {
            if !serving {
                // serve stopped: the forget is done here, holding its lock.
                let _lock = ServeLock::acquire(dir)?;
                return execute(catalog, dir, plan).await;
            }
            return Err(ReplicaError::Forget(format!(
                "the running serve did not take the request to forget {} within {} s (nothing was changed): check its log, and run forget again",
                what(plan),
                FORGET_TAKE_TIMEOUT.as_secs()
            )));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{FailoverRow, VolumeState};
    use crate::retention::Retention;

    fn plan() -> ForgetPlan {
        ForgetPlan {
            group: GroupRow {
                id: 1,
                name: "g".into(),
                owner: "ab".into(),
                generation: "x".into(),
                base_seq: Seq(0),
                head_seq: Seq(10),
                head_hash: None,
                retention: Retention::default(),
                trimming_to: None,
                trimmed_end: None,
            },
            volumes: vec![VolumeRow {
                id: 7,
                group_id: 1,
                agent_volume_id: 0,
                name: "v".into(),
                size: 1 << 20,
                state: VolumeState::Protecting,
                sync_done_seq: Some(Seq(2)),
            }],
            whole_group: true,
            kept: Vec::new(),
        }
    }

    fn pin(volume_id: i64, expires_ns: i64) -> PinRow {
        PinRow {
            id: 1,
            group_id: 1,
            volume_id,
            seq: Seq(5),
            segment_min: None,
            holder: "export on /tmp/x.sock".into(),
            pid: 1,
            pid_ns: None,
            created_ns: 0,
            expires_ns,
            done_bytes: 0,
            total_bytes: None,
        }
    }

    #[test]
    fn live_pins_and_open_failovers_hold_a_forget() {
        let p = plan();
        assert_eq!(hold(&p, &[], None, 100), None);
        // An expired pin, and a pin of another volume, hold nothing.
        assert_eq!(hold(&p, &[pin(7, 50), pin(8, 500)], None, 100), None);
        let why = hold(&p, &[pin(7, 500), pin(7, 600)], None, 100).expect("held");
        assert!(
            why.contains("group g is held by a reader: export on /tmp/x.sock (pid 1) holds seq 5 of volume v (and 1 more reader)"),
            "{why}"
        );
        let mut f = FailoverRow {
            group_id: 1,
            seq: Seq(4),
            segment_min: None,
            state: FailoverState::Active,
            started_ns: 0,
            committed_ns: None,
        };
        let why = hold(&p, &[], Some(&f), 100).expect("held");
        assert!(
            why.contains("failover at seq 4") && why.contains("failover --group g --undo"),
            "{why}"
        );
        f.state = FailoverState::Committing;
        let why = hold(&p, &[], Some(&f), 100).expect("held");
        assert!(
            why.contains("has not completed") && why.contains("--commit"),
            "{why}"
        );
        f.state = FailoverState::Committed;
        assert_eq!(hold(&p, &[], Some(&f), 100), None);
    }
}
