//! The ingest service: one task per group, `submit`, `attach`, forget's stop and start.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use cdp_shared::batch::CheckedHeader;
use cdp_shared::identity::Fingerprint;
use cdp_shared::types::Seq;
use cdp_shared::wire::Control;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::group::{GroupMsg, run_group};
use super::{GroupIngest, INGEST_QUEUE_BATCHES, IngestOptions, Received, Reply};
use crate::catalog::Catalog;
use crate::clock::now_ns;
use crate::datadir::DataDir;
use crate::error::{Decided, ReplicaError, Result};
use crate::pause_board::PauseBoard;
use crate::retention::Retention;
use crate::trimmer::{self, Trimmer};

pub(super) struct GroupSlot {
    pub(super) id: i64,
    pub(super) tx: mpsc::Sender<GroupMsg>,
    /// Stops the group's ingest and trimmer tasks (a child of the service's token).
    pub(super) token: CancellationToken,
    pub(super) tasks: Vec<tokio::task::JoinHandle<()>>,
}

pub(super) struct ServiceInner {
    pub(super) dir: DataDir,
    pub(super) catalog: Catalog,
    /// Held across a whole hello, so hellos are serialized.
    pub(super) groups: tokio::sync::Mutex<HashMap<String, GroupSlot>>,
    pub(super) token: CancellationToken,
    pub(super) tasks: TaskTracker,
    pub(super) fatal: Mutex<Option<String>>,
    pub(super) board: Arc<PauseBoard>,
    /// The retention of groups created from now on (`replica.toml`).
    pub(super) retention_default: Retention,
    pub(super) options: IngestOptions,
    /// Groups being forgotten (`forget`): a Hello naming one is refused.
    pub(super) forgetting: Mutex<HashSet<String>>,
    /// How many times each group name was forgotten by this serve: a connection welcomed
    /// before a forget of one of its groups is closed.
    pub(super) forget_epochs: Mutex<HashMap<String, u64>>,
    /// Every open group's durable head (see [`super::Heads`]).
    pub(super) heads: watch::Sender<HashMap<i64, Seq>>,
}

impl ServiceInner {
    /// A task failed: one error line, the fatal error noted, everything stopped.
    pub(super) fn stop(&self, what: &str, verb: &str, e: &ReplicaError) {
        tracing::error!("{what}: {verb}: {e}");
        if let Ok(mut fatal) = self.fatal.lock() {
            fatal.get_or_insert_with(|| format!("{what}: {e}"));
        }
        self.token.cancel();
    }
}

/// The ingest side of a running replica (see the module docs). Cheap to clone.
#[derive(Clone)]
pub struct IngestService {
    pub(super) inner: Arc<ServiceInner>,
}

impl IngestService {
    /// Recovers every group's journal and starts its task. `token` stops everything; a fatal
    /// ingest error cancels it too (see [`IngestService::fatal_error`]).
    pub async fn start(
        dir: &DataDir,
        catalog: Catalog,
        token: CancellationToken,
    ) -> Result<IngestService> {
        IngestService::start_with(dir, catalog, token, IngestOptions::default()).await
    }

    /// [`IngestService::start`] with explicit options. Every group gets its ingest task and its
    /// trimmer task (`trimmer`).
    pub async fn start_with(
        dir: &DataDir,
        catalog: Catalog,
        token: CancellationToken,
        options: IngestOptions,
    ) -> Result<IngestService> {
        let retention_default = crate::datadir::load_config(dir)?.retention;
        // On a full disk this write fails: serve starts anyway (its groups pause at their
        // first commit, and resume when space returns).
        match catalog.reset_links(now_ns()).await {
            Err(e) if e.is_disk_full() => {
                tracing::warn!("could not mark the agent links down at start: {e}")
            }
            other => other?,
        }
        let service = IngestService {
            inner: Arc::new(ServiceInner {
                dir: dir.clone(),
                catalog: catalog.clone(),
                groups: tokio::sync::Mutex::new(HashMap::new()),
                token,
                tasks: TaskTracker::new(),
                fatal: Mutex::new(None),
                board: Arc::new(PauseBoard::open(dir)),
                retention_default,
                options,
                forgetting: Mutex::new(HashSet::new()),
                forget_epochs: Mutex::new(HashMap::new()),
                heads: watch::Sender::new(HashMap::new()),
            }),
        };
        // Agents' head reports reach `status` through the board, at most once a second.
        let (board, token) = (service.inner.board.clone(), service.inner.token.clone());
        service.inner.tasks.spawn(async move {
            let mut tick = tokio::time::interval(cdp_shared::wire::HEAD_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tick.tick() => board.flush_heads(),
                }
            }
        });
        let mut groups = service.inner.groups.lock().await;
        for g in catalog.groups().await? {
            let slot = service.spawn_group(g.id).await?;
            groups.insert(g.name.clone(), slot);
        }
        drop(groups);
        Ok(service)
    }

    pub fn catalog(&self) -> &Catalog {
        &self.inner.catalog
    }

    /// Notes the head and RPO lag `group`'s agent reported (`Control::Head`), for `status`.
    pub fn report_head(
        &self,
        group: &str,
        seq: Seq,
        lag_ms: Option<u64>,
        rpo_target_ms: Option<u64>,
    ) {
        crate::metrics::observe_lag(group, lag_ms);
        self.inner.board.set_head(
            group,
            crate::pause_board::Head {
                seq: seq.0,
                lag_ms,
                at_ns: now_ns(),
                rpo_target_ms,
            },
        );
    }

    /// Every open group's durable head, as its task commits (see [`super::Heads`]).
    pub fn heads(&self) -> super::Heads {
        self.inner.heads.subscribe()
    }

    pub(super) async fn spawn_group(&self, group_id: i64) -> Result<GroupSlot> {
        let g = GroupIngest::open(
            &self.inner.catalog,
            &self.inner.dir,
            group_id,
            self.inner.board.clone(),
            &self.inner.options,
        )
        .await?;
        let name = g.name.clone();
        let group = self.inner.catalog.group_by_id(group_id).await?;
        let trimmer = Trimmer::new(&self.inner.catalog, &self.inner.dir, &group, g.trim_link());
        let (tx, rx) = mpsc::channel(INGEST_QUEUE_BATCHES);
        let token = self.inner.token.child_token();
        let inner = self.inner.clone();
        let group_token = token.clone();
        let heads = self.inner.heads.clone();
        let ingest = self.inner.tasks.spawn(async move {
            if let Err(e) = run_group(g, rx, group_token, heads).await {
                inner.stop(&format!("group {name}"), "ingest stopped", &e);
            }
        });
        let inner = self.inner.clone();
        let name = group.name.clone();
        let group_token = token.clone();
        let trim = self.inner.tasks.spawn(async move {
            if let Err(e) = trimmer::run(trimmer, group_token).await {
                inner.stop(&format!("group {name}"), "trimming stopped", &e);
            }
        });
        Ok(GroupSlot {
            id: group_id,
            tx,
            token,
            tasks: vec![ingest, trim],
        })
    }

    /// Before a forget of group `name` (see `forget`): under the hello lock, `check` (the
    /// agent is not connected: `Err` is the refusal), then the group is marked as being
    /// forgotten (Hellos naming it are refused, connections welcomed for it are told to close
    /// through [`IngestService::forget_epoch`]) and its ingest and trimmer tasks are stopped
    /// (a commit or trim round in progress completes first). `Ok(Err)`: refused, nothing
    /// changed.
    pub async fn begin_forget(
        &self,
        name: &str,
        check: impl FnOnce() -> std::result::Result<(), String>,
    ) -> Decided<()> {
        let mut groups = self.inner.groups.lock().await;
        if let Err(why) = check() {
            return Ok(Err(why.into()));
        }
        if let Ok(mut f) = self.inner.forgetting.lock() {
            f.insert(name.to_owned());
        }
        if let Ok(mut e) = self.inner.forget_epochs.lock() {
            *e.entry(name.to_owned()).or_insert(0) += 1;
        }
        let slot = groups.remove(name);
        drop(groups);
        if let Some(slot) = slot {
            slot.token.cancel();
            for t in slot.tasks {
                let _ = t.await;
            }
        }
        self.inner.board.set(name, None);
        self.inner.board.remove_head(name);
        Ok(Ok(()))
    }

    /// After a forget of group `name`: its tasks start again if the group is still in the
    /// catalog (only a volume of it was forgotten, or the forget was refused), and Hellos
    /// naming it are admitted again. `done` false (the forget stopped with files left to
    /// delete): the group stays marked, refused until a forget completes.
    pub async fn end_forget(&self, name: &str, done: bool) -> Result<()> {
        if !done {
            return Ok(());
        }
        let mut groups = self.inner.groups.lock().await;
        let result = match self.inner.catalog.group_by_name(name).await {
            Ok(Some(g)) if !groups.contains_key(name) => match self.spawn_group(g.id).await {
                Ok(slot) => {
                    groups.insert(name.to_owned(), slot);
                    Ok(())
                }
                Err(e) => Err(e),
            },
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        };
        if let Ok(mut f) = self.inner.forgetting.lock() {
            f.remove(name);
        }
        result
    }

    /// How many times group `name` was forgotten by this serve (see
    /// [`IngestService::begin_forget`]).
    pub fn forget_epoch(&self, name: &str) -> u64 {
        self.inner
            .forget_epochs
            .lock()
            .ok()
            .and_then(|e| e.get(name).copied())
            .unwrap_or(0)
    }

    /// The error that stopped ingest, if one did.
    pub fn fatal_error(&self) -> Option<String> {
        self.inner.fatal.lock().ok().and_then(|f| f.clone())
    }
}

impl IngestService {
    /// Subscribes a connection (its control stream's outbox) to the `Paused`/`Resumed` news
    /// of `group`, after its Welcome; it hears `Paused` at once when the group is paused.
    pub async fn attach(&self, group: &str, reply: &Reply) {
        let tx = match self.inner.groups.lock().await.get(group) {
            Some(slot) => slot.tx.clone(),
            None => return,
        };
        let _ = tx.send(GroupMsg::Attach(reply.clone())).await;
    }

    /// The data directory served.
    pub fn data_dir(&self) -> &DataDir {
        &self.inner.dir
    }

    /// The catalog id of a group that has a running task.
    pub async fn group_id(&self, name: &str) -> Option<i64> {
        self.inner.groups.lock().await.get(name).map(|s| s.id)
    }

    /// Checks one batch, once, into a [`CheckedBatch`](cdp_shared::batch::CheckedBatch) (header, header hash, exact length,
    /// payload hash — which covers every byte of every record — and every record's
    /// structure) and hands it to its group's task, which reads its header and records from
    /// that check and never decodes the batch again. A batch that fails is refused right here
    /// with a Nack on `reply` and one warning line. `announced` are the groups of the agent's
    /// hello: the header is checked first, on this task, so a batch of a group not announced
    /// is refused before its payload is hashed; the rest runs on the blocking pool.
    ///
    /// Record data hashes are not checked here but where record data is decoded: a syncing
    /// volume's data records when the group commit writes them to its target
    /// (`GroupIo::write`; a failure refuses that batch with a Nack and undoes the commit,
    /// [`ReplicaError::BadRecord`]), every journal read in reconstruction. Decoding every record here as
    /// well cost more CPU than all the rest of ingest together (`make bench`, section 7).
    ///
    /// Cancellation-safe: it writes nothing to disk; dropping it drops the batch.
    pub async fn submit(
        &self,
        agent: &Fingerprint,
        announced: &HashSet<String>,
        bytes: Vec<u8>,
        reply: &Reply,
    ) {
        let received_ns = now_ns();
        let refuse = |group: Option<&str>, seq: Seq, reason: String| {
            tracing::warn!(group, seq = seq.0, agent = %agent, "refused a batch: {reason}");
            Control::Nack {
                group: group.map(str::to_owned),
                seq,
                reason,
            }
        };
        let unchecked = match CheckedHeader::new(Bytes::from(bytes)) {
            Ok(h) => h,
            Err(e) => {
                let _ = reply
                    .send(refuse(
                        None,
                        Seq::ZERO,
                        format!("unreadable batch header: {e}"),
                    ))
                    .await;
                return;
            }
        };
        let group = unchecked.header().group.clone();
        let seq = unchecked.header().seq;
        if !announced.contains(&group) {
            let reason = format!("group {group} was not announced in this connection's hello");
            let _ = reply.send(refuse(Some(&group), seq, reason)).await;
            return;
        }
        let checked = tokio::task::spawn_blocking(move || unchecked.check_payload()).await;
        let batch = match checked {
            Ok(Ok(batch)) => batch,
            Ok(Err(e)) => {
                let _ = reply.send(refuse(Some(&group), seq, e.to_string())).await;
                return;
            }
            Err(e) => {
                let _ = reply
                    .send(refuse(
                        Some(&group),
                        seq,
                        format!("internal error while checking: {e}"),
                    ))
                    .await;
                return;
            }
        };
        let tx = match self.inner.groups.lock().await.get(&group) {
            Some(slot) => slot.tx.clone(),
            None => return,
        };
        let msg = GroupMsg::Batch(Box::new(Received {
            batch,
            received_ns,
            agent: *agent,
            reply: reply.clone(),
        }));
        if tx.send(msg).await.is_err() {
            tracing::debug!(
                group,
                seq = seq.0,
                "dropped a batch: its group is shutting down"
            );
        }
    }

    /// Stops every group task and waits for them (commits in progress complete first).
    pub async fn shutdown(&self) {
        self.inner.token.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }
}
