//! `cdp-agent run`: opens the devices and spools, serves the volumes over NBD, runs the
//! initial syncs, the age cutters, the sender and the control socket, and stops them in order.
//!
//! Clean stop: stop accepting NBD clients, seal and make durable every open batch, wait (up
//! to [`DRAIN_TIMEOUT`]) until the replica has acknowledged everything, then stop the rest.
//!
//! File descriptors: at start the soft `RLIMIT_NOFILE` is raised to the hard limit, and the
//! NBD server gets what is left of it once the agent's own needs are set aside
//! ([`nbd_connection_budget`]), so that no number of NBD clients can take the descriptors a
//! write, a flush or the control socket needs.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use cdp_shared::identity::{Fingerprint, Identity};
use cdp_shared::nbd::server::{HANDSHAKE_TIMEOUT_DEFAULT, ServerLimits};
use cdp_shared::types::VolumeId;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::batcher::BatcherConfig;
use crate::config::{AgentConfig, CONFIG_FILE, VolumeConfig};
use crate::control::{self, ControlContext};
use crate::device::{BlockDev, FileDev};
use crate::exports::VolumeExports;
use crate::fsutil;
use crate::groups::GroupSet;
use crate::link::{LinkState, ReplicaLink, SenderConfig, SharedLink};
use crate::maintenance::Maintenance;
use crate::pipeline::{Group, GroupOptions, Volume};
use crate::spool::Spool;
use crate::state::{self, VolumeState};
use crate::status::{self, AgentStatus};

/// How long a clean stop waits for the replica to acknowledge the last batches.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// File descriptors the agent keeps for itself whatever it protects: the standard streams
/// (3), `run.lock`, the runtime's epoll and wakers (about 4), the control socket and the
/// clients it serves at once ([`control::CLIENTS_MAX`] + 1), the QUIC socket (2 across a
/// reconnect), state files being replaced (a temporary file and its directory, a few at
/// once: 8), and room for libraries (name resolution, `/proc` reads: 16).
pub const DESCRIPTORS_RESERVED_BASE: u64 = 48 + control::CLIENTS_MAX as u64;
/// File descriptors each volume keeps: its device twice (the client's I/O, and the
/// uncached reads of syncs and the verifier), its two activity-log files, and its dirty map
/// or state file while it is replaced (2).
pub const DESCRIPTORS_RESERVED_PER_VOLUME: u64 = 6;
/// File descriptors each group keeps: its spool's open segment, the next segment and the
/// spool directory while a segment is cut, and segment files read back by the sender and the
/// trim (a few).
pub const DESCRIPTORS_RESERVED_PER_GROUP: u64 = 6;
/// Fewest NBD connections the agent starts with: fewer means the descriptor limit is far too
/// low for what it protects.
pub const NBD_CONNECTIONS_MIN: usize = 8;

/// Where the NBD server listens.
#[derive(Clone, Debug)]
pub enum Listen {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

pub struct RunOptions {
    pub data_dir: PathBuf,
    pub listen: Listen,
    /// Where to serve `/metrics` (over `metrics` in `agent.toml`); none: not served.
    pub metrics: Option<std::net::SocketAddr>,
}

/// A running agent.
pub struct Agent {
    pub groups: Arc<GroupSet>,
    pub link: SharedLink,
    /// Where the NBD server actually listens (the bound port for TCP).
    pub nbd: Listen,
    /// Where `/metrics` is served (the bound port), if it is.
    pub metrics: Option<std::net::SocketAddr>,
    data_dir: PathBuf,
    nbd_shutdown: CancellationToken,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
    nbd_task: tokio::task::JoinHandle<()>,
    _lock: File,
}

fn lock_data_dir(data_dir: &Path) -> Result<File> {
    let path = data_dir.join("run.lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(rustix::io::Errno::WOULDBLOCK) => bail!(
            "another cdp-agent is already running on {}; stop it first",
            data_dir.display()
        ),
        Err(e) => Err(anyhow!("lock {}: {e}", path.display())),
    }
}

impl Agent {
    /// Starts everything; returns once the NBD server and the control socket accept.
    pub async fn start(opts: RunOptions) -> Result<Agent> {
        let data_dir = opts.data_dir.clone();
        let config = AgentConfig::load(&data_dir)?;
        let lock = lock_data_dir(&data_dir)?;
        let budget = nbd_connection_budget(
            raise_descriptor_limit(),
            config.volumes.len(),
            config.groups().len(),
            config.nbd_connections_max,
        )
        .map_err(anyhow::Error::msg)?;
        let identity = Identity::load(&data_dir)?;
        let replica_fingerprint: Fingerprint =
            config.replica_fingerprint.parse().with_context(|| {
                format!(
                    "{}: replica_fingerprint",
                    data_dir.join(CONFIG_FILE).display()
                )
            })?;
        if config.volumes.is_empty() {
            bail!(
                "no volume is protected in {}: run `cdp-agent protect --data {} --volume NAME --device PATH` first",
                data_dir.display(),
                data_dir.display()
            );
        }
        // Bound before anything starts, so that a taken port stops `run` with a clear error.
        let metrics_listener = match opts.metrics.or(config.metrics) {
            Some(addr) => Some(
                cdp_shared::metrics::bind(addr)
                    .await
                    .map_err(anyhow::Error::msg)?,
            ),
            None => None,
        };
        mark_running(&data_dir)?;
        let groups = open_groups(&data_dir, &config)?;

        let shutdown = CancellationToken::new();
        let nbd_shutdown = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let link: SharedLink = Arc::new(std::sync::Mutex::new(LinkState::default()));

        let limits = nbd_limits(&budget, config.nbd_connections_max);
        let exports = Arc::new(VolumeExports::new(&groups));
        let group_set = GroupSet::new(groups, &shutdown);
        for g in group_set.snapshot() {
            tasks.spawn(g.clone().run_age_cutter(group_set.token(&g.name)));
        }
        let (nbd, nbd_task) = serve_nbd(&opts.listen, &exports, &nbd_shutdown, limits).await?;
        let ctl_listener = bind_control(&data_dir)?;
        let ctx = control_context(&config, &group_set, &exports, &link);
        tasks.spawn(control::serve(ctl_listener, ctx, shutdown.clone()));

        let sender_config = SenderConfig {
            replica: config.replica.clone(),
            replica_fingerprint,
            identity,
            window: config.batches_in_flight,
        };
        let (replica_link, queries) = ReplicaLink::new();
        tasks.spawn(crate::link::run(
            group_set.clone(),
            sender_config,
            link.clone(),
            queries,
            shutdown.clone(),
        ));
        for g in group_set.snapshot() {
            let token = group_set.token(&g.name);
            let m = Maintenance {
                group: g.clone(),
                link: replica_link.clone(),
                link_state: link.clone(),
                data_dir: data_dir.clone(),
                sync_bytes_per_sec_max: config.sync_bytes_per_sec_max,
            };
            tasks.spawn(m.run(token));
        }
        let metrics_addr = match metrics_listener {
            Some((listener, addr)) => {
                let handle = cdp_shared::metrics::recorder().map_err(anyhow::Error::msg)?;
                crate::metrics::describe();
                let (gs, l) = (group_set.clone(), link.clone());
                let router = cdp_shared::metrics::router(handle, move || {
                    let (gs, l) = (gs.clone(), l.clone());
                    async move { crate::metrics::refresh(&gs.snapshot(), &l) }
                });
                tasks.spawn(cdp_shared::metrics::serve(
                    listener,
                    router,
                    shutdown.clone(),
                ));
                tasks.spawn(crate::metrics::observe_lag(
                    group_set.clone(),
                    shutdown.clone(),
                ));
                tracing::info!("serving metrics on http://{addr}/metrics");
                Some(addr)
            }
            None => None,
        };
        // Volumes synced in an earlier run are not marked as syncing.
        Ok(Agent {
            groups: group_set,
            link,
            nbd,
            metrics: metrics_addr,
            data_dir,
            nbd_shutdown,
            shutdown,
            tasks,
            nbd_task,
            _lock: lock,
        })
    }

    pub fn status(&self) -> AgentStatus {
        status::collect(&self.groups.snapshot(), &self.link, &|_| String::new())
    }

    /// Stops cleanly (see the module doc).
    pub async fn stop(mut self) -> Result<()> {
        self.nbd_shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.nbd_task).await;
        let mut sealed = Vec::new();
        for g in &self.groups.snapshot() {
            match g.seal_and_sync().await {
                Ok(seq) => sealed.push((g.clone(), seq)),
                Err(e) => tracing::error!(group = %g.name, "could not seal the last batch: {e}"),
            }
        }
        let connected = self
            .link
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .connected;
        let drain_timeout = if connected {
            DRAIN_TIMEOUT
        } else {
            Duration::ZERO
        };
        let drained = tokio::time::timeout(drain_timeout, async {
            for (g, seq) in &sealed {
                let mut rx = g.acked.subscribe();
                while *rx.borrow_and_update() < *seq {
                    if rx.changed().await.is_err() {
                        break;
                    }
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                "the replica has not acknowledged every batch; they stay in the spool and are sent at the next start"
            );
        }
        self.shutdown.cancel();
        // Every task stops at the token; a task stuck in I/O is aborted after a grace period.
        if tokio::time::timeout(Duration::from_secs(5), async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await
        .is_err()
        {
            tracing::warn!("some tasks did not stop within 5 s; aborting them");
            self.tasks.shutdown().await;
        }
        let _ = std::fs::remove_file(self.data_dir.join(control::SOCKET_NAME));
        if let Listen::Unix(p) = &self.nbd {
            let _ = std::fs::remove_file(p);
        }
        let _ = std::fs::remove_file(self.data_dir.join("state").join("running"));
        Ok(())
    }
}

/// Warns when the previous run did not stop cleanly, and marks this one as running (the mark
/// is removed by a clean stop).
fn mark_running(data_dir: &Path) -> Result<()> {
    let marker = data_dir.join("state").join("running");
    if marker.exists() {
        tracing::warn!(
            "the previous run of this agent did not stop cleanly: writes that were in flight at that moment may be on the devices but not on the replica"
        );
    }
    std::fs::create_dir_all(state::state_dir(data_dir)).context("create the state directory")?;
    fsutil::write_atomic(&marker, b"running\n").context("write the running marker")?;
    Ok(())
}

/// Opens every group of `config`: its devices, spool, activity logs and dirty maps.
fn open_groups(data_dir: &Path, config: &AgentConfig) -> Result<Vec<Arc<Group>>> {
    let options = GroupOptions {
        batcher: BatcherConfig {
            age_max: config.batch_age_max,
            ..BatcherConfig::default()
        },
        spool_bytes_max: config.spool_bytes_max,
        al_capacity: config.activity_log_chunks,
        state_dir: state::state_dir(data_dir),
        rpo_target: config.rpo_target,
    };
    let mut groups = Vec::new();
    for (group_name, vols) in config.groups() {
        let options = GroupOptions {
            rpo_target: config.rpo_target(&group_name),
            ..options.clone()
        };
        groups.push(open_group(data_dir, &group_name, &vols, &options)?);
    }
    Ok(groups)
}

/// Opens group `group_name` of volumes `vols`, recovers its spool (a damaged batch's chunks
/// marked for resync) and queues the initial syncs still due.
fn open_group(
    data_dir: &Path,
    group_name: &str,
    vols: &[VolumeConfig],
    options: &GroupOptions,
) -> Result<Arc<Group>> {
    let (volumes, to_sync) = open_volumes(data_dir, group_name, vols)?;
    let spool_dir = data_dir.join("spool").join(group_name);
    let (spool, recovered) =
        Spool::open(&spool_dir).with_context(|| format!("open the spool of group {group_name}"))?;
    if recovered.truncated_bytes > 0 {
        tracing::warn!(group = %group_name, bytes = recovered.truncated_bytes, "truncated a torn spool tail");
    }
    tracing::info!(group = %group_name, seq = recovered.last_seq.0, "the log of group {group_name} continues after seq {}", recovered.last_seq);
    let (group, found) = Group::new(
        group_name,
        volumes,
        spool,
        options.clone(),
        recovered.last_seq,
        recovered.last_hash,
    )
    .with_context(|| format!("open the activity logs and dirty maps of group {group_name}"))?;
    if let Some(lost) = &recovered.lost {
        let marked = group.mark_lost(lost).with_context(|| {
            format!("mark the chunks of the damaged spool batches of group {group_name} for resync")
        })?;
        tracing::error!(
            group = %group_name,
            chunks = marked,
            "{marked} chunks of the damaged spool batches (seq {} to {} of segment {}) are marked for resync; the group's points are not consistent until it completes",
            lost.first_seq,
            lost.last_seq,
            lost.segment.display()
        );
    }
    if found.al_chunks > 0 {
        tracing::warn!(group = %group_name, chunks = found.al_chunks, "the activity log names {} chunks written just before an unclean stop: they are resynced", found.al_chunks);
    }
    if found.dirty_chunks > 0 {
        tracing::info!(group = %group_name, chunks = found.dirty_chunks, "{} dirty chunks wait for a resync", found.dirty_chunks);
    }
    group.await_initial_sync(to_sync.iter().copied());
    group.pending().initial_sync.extend(to_sync);
    Ok(group)
}

/// Opens the devices of group `group_name`'s volumes in id order; returns them and the ids
/// of those whose initial sync is not complete.
fn open_volumes(
    data_dir: &Path,
    group_name: &str,
    vols: &[VolumeConfig],
) -> Result<(Vec<Arc<Volume>>, Vec<VolumeId>)> {
    let mut volumes = Vec::new();
    let mut sorted = vols.to_vec();
    sorted.sort_by_key(|v| v.id);
    let mut to_sync = Vec::new();
    for (i, v) in sorted.iter().enumerate() {
        if v.id as usize != i {
            bail!(
                "{}: the volume ids of group {group_name} are not 0, 1, 2, ...; the configuration was edited by hand",
                data_dir.join(CONFIG_FILE).display()
            );
        }
        let dev = FileDev::open(&v.device).map_err(|e| {
            if e.kind() == std::io::ErrorKind::ResourceBusy {
                anyhow!("{e}")
            } else {
                anyhow!(
                    "open device {} of volume {}: {e}",
                    v.device.display(),
                    v.name
                )
            }
        })?;
        let st = state::load_volume_state(data_dir, &v.name)?;
        if st.as_ref().is_none_or(|s| s.state == VolumeState::Syncing) {
            to_sync.push(v.id);
        }
        volumes.push(Arc::new(Volume::new(
            v.id,
            &v.name,
            Arc::new(dev) as Arc<dyn BlockDev>,
        )));
    }
    Ok((volumes, to_sync))
}

/// The NBD server's limits from the descriptor budget, logged with how they were reached.
fn nbd_limits(budget: &DescriptorBudget, nbd_connections_max: usize) -> ServerLimits {
    let limits = ServerLimits {
        connections_max: budget.connections_max,
        handshake_timeout: HANDSHAKE_TIMEOUT_DEFAULT,
    };
    tracing::info!(
        connections_max = budget.connections_max,
        descriptors_open = descriptors_open(),
        "NBD: at most {} connections at once (nbd_connections_max {}; the descriptor limit {} less the {} the agent keeps leaves {}), each to finish its handshake within {:?}",
        budget.connections_max,
        nbd_connections_max,
        budget.soft_limit,
        budget.reserved,
        budget.connections_available,
        limits.handshake_timeout
    );
    limits
}

/// Binds the NBD listener and spawns its server; returns where it listens (the bound port
/// for TCP) and the server's task.
async fn serve_nbd(
    listen: &Listen,
    exports: &Arc<VolumeExports>,
    nbd_shutdown: &CancellationToken,
    limits: ServerLimits,
) -> Result<(Listen, tokio::task::JoinHandle<()>)> {
    Ok(match listen {
        Listen::Unix(path) => {
            let _ = std::fs::remove_file(path);
            let listener = tokio::net::UnixListener::bind(path)
                .with_context(|| format!("listen on {}", path.display()))?;
            let t = tokio::spawn(cdp_shared::nbd::server::serve_unix(
                listener,
                exports.clone(),
                nbd_shutdown.clone(),
                limits,
            ));
            (Listen::Unix(path.clone()), t)
        }
        Listen::Tcp(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("listen on {addr}"))?;
            let bound = listener.local_addr()?;
            let t = tokio::spawn(cdp_shared::nbd::server::serve_tcp(
                listener,
                exports.clone(),
                nbd_shutdown.clone(),
                limits,
            ));
            (Listen::Tcp(bound), t)
        }
    })
}

/// Binds the control socket in `data_dir`, replacing one a previous run left.
fn bind_control(data_dir: &Path) -> Result<tokio::net::UnixListener> {
    let ctl_path = data_dir.join(control::SOCKET_NAME);
    let _ = std::fs::remove_file(&ctl_path);
    tokio::net::UnixListener::bind(&ctl_path)
        .with_context(|| format!("listen on {}", ctl_path.display()))
}

/// What the control socket's requests reach: the groups, the exports, the link, and the
/// status (each volume with its configured device).
fn control_context(
    config: &AgentConfig,
    group_set: &Arc<GroupSet>,
    exports: &Arc<VolumeExports>,
    link: &SharedLink,
) -> Arc<ControlContext> {
    let status_groups = group_set.clone();
    let status_link = link.clone();
    let devices: std::collections::BTreeMap<String, String> = config
        .volumes
        .iter()
        .map(|v| (v.name.clone(), v.device.display().to_string()))
        .collect();
    Arc::new(ControlContext {
        groups: group_set.clone(),
        exports: exports.clone(),
        link: link.clone(),
        status: Arc::new(move || {
            status::collect(&status_groups.snapshot(), &status_link, &|name| {
                devices.get(name).cloned().unwrap_or_default()
            })
        }),
    })
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, logs what the agent has, and returns
/// the soft limit in effect (`u64::MAX` when unlimited).
fn raise_descriptor_limit() -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let before = getrlimit(Resource::Nofile);
    let show = |limit: Option<u64>| limit.map_or_else(|| "unlimited".to_owned(), |n| n.to_string());
    if before.current != before.maximum {
        let raised = Rlimit {
            current: before.maximum,
            maximum: before.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => tracing::info!(
                "file descriptors: soft limit raised from {} to the hard limit {}",
                show(before.current),
                show(before.maximum)
            ),
            Err(e) => tracing::warn!(
                "file descriptors: could not raise the soft limit {} to the hard limit {}: {e}",
                show(before.current),
                show(before.maximum)
            ),
        }
    }
    let now = getrlimit(Resource::Nofile);
    if now.current == before.current && before.current == before.maximum {
        tracing::info!(
            "file descriptors: limit {} (soft and hard)",
            show(now.current)
        );
    }
    now.current.unwrap_or(u64::MAX)
}

/// Descriptors this process has open, for the log; `None` where `/proc` cannot tell.
fn descriptors_open() -> Option<usize> {
    std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|entries| entries.count().saturating_sub(1))
}

/// How the descriptor limit is shared out (see [`nbd_connection_budget`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DescriptorBudget {
    /// The soft `RLIMIT_NOFILE` in effect.
    pub soft_limit: u64,
    /// What the agent keeps for itself and for the NBD server's listener and refusals.
    pub reserved: u64,
    /// What the limit leaves for NBD connections.
    pub connections_available: u64,
    /// The NBD server's connection limit: `min(nbd_connections_max, connections_available)`.
    pub connections_max: usize,
}

/// Shares the soft descriptor limit out: the agent's own needs for `volumes` volumes in
/// `groups` groups ([`DESCRIPTORS_RESERVED_BASE`] and the per-volume and per-group
/// reserves), the NBD server's listener and refusals in flight, and what is left for NBD
/// connections, at most `configured`. An error (one sentence for the operator) when fewer
/// than [`NBD_CONNECTIONS_MIN`] are left.
pub fn nbd_connection_budget(
    soft_limit: u64,
    volumes: usize,
    groups: usize,
    configured: usize,
) -> Result<DescriptorBudget, String> {
    let server = ServerLimits {
        connections_max: 0,
        handshake_timeout: HANDSHAKE_TIMEOUT_DEFAULT,
    };
    let reserved = DESCRIPTORS_RESERVED_BASE
        + DESCRIPTORS_RESERVED_PER_VOLUME * volumes as u64
        + DESCRIPTORS_RESERVED_PER_GROUP * groups as u64
        + server.descriptors_max() as u64;
    let connections_available = soft_limit.saturating_sub(reserved);
    if connections_available < NBD_CONNECTIONS_MIN as u64 {
        return Err(format!(
            "the file-descriptor limit of cdp-agent is {soft_limit} and it keeps {reserved} for its {volumes} volume(s) and itself, which leaves {connections_available} for NBD clients where it needs at least {NBD_CONNECTIONS_MIN}: raise the hard limit (`ulimit -Hn`, LimitNOFILE= in a systemd unit) to at least {}",
            reserved + NBD_CONNECTIONS_MIN as u64
        ));
    }
    let connections_max = usize::try_from(connections_available)
        .unwrap_or(usize::MAX)
        .min(configured);
    Ok(DescriptorBudget {
        soft_limit,
        reserved,
        connections_available,
        connections_max,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configured_limit_holds_when_descriptors_are_plenty() {
        let budget = nbd_connection_budget(524_288, 2, 1, 256).expect("budget");
        assert_eq!(budget.connections_max, 256);
        assert_eq!(
            budget.reserved,
            DESCRIPTORS_RESERVED_BASE
                + 2 * DESCRIPTORS_RESERVED_PER_VOLUME
                + DESCRIPTORS_RESERVED_PER_GROUP
                + ServerLimits {
                    connections_max: 0,
                    handshake_timeout: HANDSHAKE_TIMEOUT_DEFAULT
                }
                .descriptors_max() as u64
        );
        assert_eq!(
            nbd_connection_budget(u64::MAX, 1, 1, 256)
                .expect("unlimited")
                .connections_max,
            256
        );
    }

    #[test]
    fn a_low_descriptor_limit_lowers_the_connection_limit() {
        let budget = nbd_connection_budget(512, 1, 1, 100_000).expect("budget");
        assert_eq!(budget.connections_max as u64, 512 - budget.reserved);
        assert!(budget.connections_max >= 256, "{budget:?}");
        // Each volume and group takes its share.
        let more = nbd_connection_budget(512, 10, 5, 100_000).expect("budget");
        assert_eq!(
            budget.connections_max - more.connections_max,
            (9 * DESCRIPTORS_RESERVED_PER_VOLUME + 4 * DESCRIPTORS_RESERVED_PER_GROUP) as usize
        );
    }

    #[test]
    fn too_few_descriptors_fail_with_one_sentence() {
        let reserved = nbd_connection_budget(4096, 1, 1, 1)
            .expect("budget")
            .reserved;
        let just_enough = reserved + NBD_CONNECTIONS_MIN as u64;
        assert_eq!(
            nbd_connection_budget(just_enough, 1, 1, 1000)
                .expect("enough")
                .connections_max,
            NBD_CONNECTIONS_MIN
        );
        let error = nbd_connection_budget(just_enough - 1, 1, 1, 1000).expect_err("too few");
        assert!(error.contains("file-descriptor limit"), "{error}");
        assert!(error.contains(&just_enough.to_string()), "{error}");
        assert_eq!(error.matches(". ").count(), 0, "one sentence: {error}");
        assert!(nbd_connection_budget(10, 1, 1, 1000).is_err());
    }
}
