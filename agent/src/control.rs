//! The agent's local control socket (`DIR/ctl.sock`): `cdp-agent bookmark` and
//! `cdp-agent status` talk to the running agent through it, one JSON request and one JSON
//! reply per line.
//!
//! At most [`CLIENTS_MAX`] requests are served at once (one more is answered with an error
//! at once), a request line must arrive within [`REQUEST_TIMEOUT`], and a failed `accept`
//! (out of file descriptors) is retried after [`ACCEPT_ERROR_BACKOFF`], so the socket keeps
//! answering whatever its clients or the NBD clients do.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use cdp_shared::cause::Primary;
use cdp_shared::types::check_name;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::exports::VolumeExports;
use crate::groups::GroupSet;
use crate::link::{SharedLink, link_connected};
use crate::status::AgentStatus;

pub const SOCKET_NAME: &str = "ctl.sock";
/// Longest request line.
const REQUEST_BYTES_MAX: usize = 4096;
/// Control requests served at once (a `bookmark --wait` holds its slot until it returns).
pub const CLIENTS_MAX: usize = 16;
/// How long a client may take to send its request line.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again.
pub const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);
/// At most one log line per interval about failed accepts.
const ACCEPT_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// Seal a named consistent point in every group (or only `group`); with `wait`, reply only
    /// once the replica has made it durable.
    Bookmark {
        name: String,
        group: Option<String>,
        wait: bool,
    },
    Status,
    /// Hash-compare resync of one volume (or every volume); replies when done.
    Resync {
        volume: Option<String>,
    },
    /// Stop serving and recording group `group` (`cdp-agent unprotect`): see [`unprotect`].
    Unprotect {
        group: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Reply {
    Bookmarked {
        points: Vec<BookmarkPoint>,
        durable: bool,
        /// Groups not bookmarked (the replica is their primary: they are failed over there).
        #[serde(default)]
        skipped: Vec<SkippedGroup>,
    },
    Resynced {
        volumes: Vec<ResyncResult>,
    },
    Status(Box<AgentStatus>),
    Unprotected(Unprotected),
    Error {
        message: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct BookmarkPoint {
    pub group: String,
    pub seq: u64,
    /// False when the group was syncing or resyncing: the point is recorded but is not a
    /// consistent recovery point.
    pub consistent: bool,
}

/// A group a bookmark of every group left out, and why.
#[derive(Debug, Serialize, Deserialize)]
pub struct SkippedGroup {
    pub group: String,
    pub reason: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ResyncResult {
    pub volume: String,
    pub chunks_compared: u64,
    pub chunks_sent: u64,
    /// Bytes of resync records sent for the volume since the agent started.
    pub bytes_sent: u64,
}

/// What a running agent did for `unprotect`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Unprotected {
    pub group: String,
    pub volumes: Vec<String>,
    /// The last seq sealed for the group, and the last one the replica acknowledged: batches
    /// between them stay in the spool (see `cdp-agent unprotect`).
    pub last_seq: u64,
    pub acked_seq: u64,
    /// Whether every device, log and spool file of the group was closed.
    pub released: bool,
}

pub struct ControlContext {
    pub groups: Arc<GroupSet>,
    pub exports: Arc<VolumeExports>,
    pub link: SharedLink,
    pub status: Arc<dyn Fn() -> AgentStatus + Send + Sync>,
}

/// How long `unprotect` waits for the group's operations in flight to finish, for the replica
/// to acknowledge its last batch, and for its files to be closed.
pub const UNPROTECT_WAIT: Duration = Duration::from_secs(30);

/// Serves the control socket until `shutdown`.
pub async fn serve(listener: UnixListener, ctx: Arc<ControlContext>, shutdown: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(CLIENTS_MAX));
    let mut accept_failures = 0u64;
    let mut accept_failure_logged: Option<std::time::Instant> = None;
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    accept_failures += 1;
                    if accept_failure_logged.is_none_or(|t| t.elapsed() >= ACCEPT_ERROR_LOG_INTERVAL) {
                        tracing::warn!("control socket accept failed {accept_failures} time(s): {e}; retrying every {ACCEPT_ERROR_BACKOFF:?}");
                        accept_failures = 0;
                        accept_failure_logged = Some(std::time::Instant::now());
                    }
                    tokio::select! {
                        () = tokio::time::sleep(ACCEPT_ERROR_BACKOFF) => continue,
                        () = shutdown.cancelled() => return,
                    }
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let ctx = ctx.clone();
        let shutdown = shutdown.clone();
        let slot = slots.clone().try_acquire_owned();
        tokio::spawn(async move {
            let result = match slot {
                Ok(_slot) => handle(stream, ctx, shutdown).await,
                Err(_) => refuse(stream).await,
            };
            if let Err(e) = result {
                tracing::debug!("control connection: {e:#}");
            }
        });
    }
}

/// Answers a client over [`CLIENTS_MAX`] with an error, without reading its request.
async fn refuse(mut stream: UnixStream) -> Result<()> {
    let reply = Reply::Error {
        message: format!(
            "the agent is serving {CLIENTS_MAX} control requests already; try again in a moment"
        ),
    };
    let mut out = serde_json::to_vec(&reply)?;
    out.push(b'\n');
    tokio::time::timeout(REQUEST_TIMEOUT, stream.write_all(&out))
        .await
        .context("send the refusal")??;
    Ok(())
}

async fn handle(
    stream: UnixStream,
    ctx: Arc<ControlContext>,
    shutdown: CancellationToken,
) -> Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(r.take(REQUEST_BYTES_MAX as u64));
    tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line))
        .await
        .map_err(|_| anyhow!("no request within {REQUEST_TIMEOUT:?}"))??;
    let reply = match serde_json::from_str::<Request>(&line) {
        Err(e) => Reply::Error {
            message: format!("malformed request: {e}"),
        },
        Ok(Request::Status) => Reply::Status(Box::new((ctx.status)())),
        Ok(Request::Bookmark { name, group, wait }) => {
            bookmark(&ctx, &name, group.as_deref(), wait, &shutdown).await
        }
        Ok(Request::Resync { volume }) => resync(&ctx, volume.as_deref(), &shutdown).await,
        Ok(Request::Unprotect { group }) => match unprotect(&ctx, &group).await {
            Ok(u) => Reply::Unprotected(u),
            Err(message) => Reply::Error { message },
        },
    };
    let mut out = serde_json::to_vec(&reply)?;
    out.push(b'\n');
    w.write_all(&out).await?;
    Ok(())
}

async fn bookmark(
    ctx: &ControlContext,
    name: &str,
    group: Option<&str>,
    wait: bool,
    shutdown: &CancellationToken,
) -> Reply {
    if let Err(e) = check_name("bookmark", name) {
        return Reply::Error { message: e };
    }
    let groups: Vec<_> = ctx
        .groups
        .snapshot()
        .into_iter()
        .filter(|g| group.is_none_or(|n| g.name == n))
        .collect();
    if groups.is_empty() {
        return Reply::Error {
            message: format!(
                "no group named {:?} is protected by this agent",
                group.unwrap_or("")
            ),
        };
    }
    // A group failed over on the replica writes its history there: a bookmark cut here
    // would sit in the spool, on a chain the replica does not follow while it is primary
    // (and that a commit of the failover discards).
    let (groups, failed_over): (Vec<_>, Vec<_>) = groups
        .into_iter()
        .partition(|g| g.primary() == Primary::Agent);
    let skipped: Vec<SkippedGroup> = failed_over
        .iter()
        .map(|g| SkippedGroup {
            group: g.name.clone(),
            reason: failed_over_reason(&g.name),
        })
        .collect();
    if groups.is_empty() {
        let reasons: Vec<_> = skipped.iter().map(|s| s.reason.as_str()).collect();
        return Reply::Error {
            message: format!("bookmark {name} not taken: {}", reasons.join("; ")),
        };
    }
    let mut points = Vec::new();
    for g in &groups {
        match g.bookmark(name).await {
            Ok(cut) => points.push((g.clone(), cut.seq, cut.consistent, cut.rebases)),
            Err(e) => {
                return Reply::Error {
                    message: format!("bookmark {name} in group {}: {e}", g.name),
                };
            }
        }
    }
    if wait {
        for (g, seq, _, rebases) in &points {
            let mut acked = g.acked.subscribe();
            let mut wake = g.wake.subscribe();
            // A rebase ends the wait too: the bookmark's batch may be gone, and the new
            // chain may never reach its seq. So does a failover of the group on the replica
            // (it acknowledges nothing of the group meanwhile).
            let done = async {
                while *acked.borrow_and_update() < *seq
                    && g.rebases() == *rebases
                    && g.primary() == Primary::Agent
                {
                    tokio::select! {
                        r = acked.changed() => if r.is_err() { return false },
                        r = wake.changed() => if r.is_err() { return false },
                    }
                }
                true
            };
            let ok = tokio::select! { ok = done => ok, _ = shutdown.cancelled() => false };
            if !ok {
                return Reply::Error {
                    message: format!(
                        "the agent stopped before the replica made bookmark {name} durable"
                    ),
                };
            }
            if *acked.borrow() < *seq && g.primary() == Primary::Replica {
                return Reply::Error {
                    message: format!(
                        "bookmark {name} of group {} is not durable on the replica: {}; it stays in the agent's spool, and reaches the replica only if the failover is undone",
                        g.name,
                        failed_over_reason(&g.name)
                    ),
                };
            }
            if g.rebases() != *rebases {
                // The spool could not bring the replica up to date and was reset: the batch
                // holding the bookmark may be gone, and acks now count a new chain.
                return Reply::Error {
                    message: format!(
                        "bookmark {name} was lost: the agent had to resync group {} with the replica while it waited; take the bookmark again once `cdp-agent status` shows the group protecting",
                        g.name
                    ),
                };
            }
        }
    }
    Reply::Bookmarked {
        points: points
            .into_iter()
            .map(|(g, seq, consistent, _)| BookmarkPoint {
                group: g.name.clone(),
                seq: seq.0,
                consistent,
            })
            .collect(),
        durable: wait,
        skipped,
    }
}

fn failed_over_reason(group: &str) -> String {
    format!(
        "group {group} is failed over on the replica (the replica is its primary, and its history is written there)"
    )
}

async fn resync(ctx: &ControlContext, volume: Option<&str>, shutdown: &CancellationToken) -> Reply {
    let mut targets = Vec::new();
    for g in &ctx.groups.snapshot() {
        for v in &g.volumes {
            if volume.is_none_or(|n| n == v.name) {
                targets.push((g.clone(), v.id, v.name.clone()));
            }
        }
    }
    if targets.is_empty() {
        return Reply::Error {
            message: format!(
                "no volume named {:?} is protected by this agent",
                volume.unwrap_or("")
            ),
        };
    }
    let mut results = Vec::new();
    for (g, v, name) in targets {
        if g.volumes[v as usize]
            .syncing
            .load(std::sync::atomic::Ordering::Relaxed)
            || g.pending().initial_sync.contains(&v)
        {
            return Reply::Error {
                message: format!("volume {name} is in its initial sync; a resync would repeat it"),
            };
        }
        let mut wake = g.wake.subscribe();
        let before = {
            let mut p = g.pending();
            p.compare.insert(v);
            p.compares_done
        };
        g.bump();
        let done = loop {
            {
                let p = g.pending();
                if p.compares_done > before && !p.compare.contains(&v) {
                    break p.last_compare;
                }
            }
            tokio::select! {
                r = wake.changed() => if r.is_err() { return Reply::Error { message: "the agent stopped during the resync".into() } },
                _ = shutdown.cancelled() => return Reply::Error { message: "the agent stopped during the resync".into() },
            }
        };
        let (compared, sent) = match done {
            Some((id, c, s)) if id == v => (c, s),
            _ => (0, 0),
        };
        results.push(ResyncResult {
            volume: name,
            chunks_compared: compared,
            chunks_sent: sent,
            bytes_sent: g.volumes[v as usize]
                .resync_bytes_sent
                .load(std::sync::atomic::Ordering::Relaxed),
        });
    }
    Reply::Resynced { volumes: results }
}

/// Stops serving and recording a group, live: its exports are retired (new clients do not
/// find them; requests on open connections get `ESHUTDOWN`), the operations already admitted
/// finish, the last batch is sealed and made durable (devices synced, activity logs emptied),
/// the replica is given until [`UNPROTECT_WAIT`] to acknowledge it, and the group leaves the
/// agent: its tasks stop, the sender reconnects without it, and once nothing holds it any more
/// its devices (and their claim), logs and spool are closed. What the replica has not
/// acknowledged stays in the spool on disk. The command line then removes the group from
/// `agent.toml`.
async fn unprotect(ctx: &ControlContext, name: &str) -> Result<Unprotected, String> {
    let group = ctx
        .groups
        .get(name)
        .ok_or_else(|| format!("no group named {name} is served by this agent"))?;
    ctx.exports.retire(&group);
    let deadline = tokio::time::Instant::now() + UNPROTECT_WAIT;
    while group.operations_in_flight() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let sealed = group
        .seal_and_sync()
        .await
        .map_err(|e| format!("seal the last batch of group {name}: {e}"))?;
    if link_connected(&ctx.link) {
        let mut acked = group.acked.subscribe();
        let _ = tokio::time::timeout_at(deadline, async {
            while *acked.borrow_and_update() < sealed {
                if acked.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
    }
    let acked_seq = *group.acked.borrow();
    let volumes = group.volumes.iter().map(|v| v.name.clone()).collect();
    ctx.groups.remove(name);
    let weak = Arc::downgrade(&group);
    drop(group);
    while weak.strong_count() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let released = weak.strong_count() == 0;
    tracing::info!(
        group = name,
        sealed = sealed.0,
        acked = acked_seq.0,
        released,
        "the group is no longer protected"
    );
    Ok(Unprotected {
        group: name.to_owned(),
        volumes,
        last_seq: sealed.0,
        acked_seq: acked_seq.0,
        released,
    })
}

/// Sends one request to the running agent in `data_dir`. `None` when no agent is running.
pub async fn request(
    data_dir: &Path,
    req: &Request,
    timeout: Option<Duration>,
) -> Result<Option<Reply>> {
    let path = data_dir.join(SOCKET_NAME);
    let stream = match UnixStream::connect(&path).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e).with_context(|| format!("connect to {}", path.display())),
    };
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    w.write_all(&line).await?;
    let mut reply = String::new();
    let mut reader = BufReader::new(r);
    let read = reader.read_line(&mut reply);
    match timeout {
        Some(t) => tokio::time::timeout(t, read)
            .await
            .map_err(|_| anyhow!("the agent did not answer within {t:?}"))??,
        None => read.await?,
    };
    if reply.is_empty() {
        return Err(anyhow!(
            "the agent closed the control socket without answering"
        ));
    }
    Ok(Some(
        serde_json::from_str(&reply).context("the agent's reply is malformed")?,
    ))
}
