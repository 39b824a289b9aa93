//! The sender: one QUIC connection to the replica (mutual TLS, the replica's fingerprint
//! pinned), a control stream for hello/welcome, acks and hash requests, and each batch on its
//! own unidirectional stream, at most `window` batches per group unacknowledged at once.
//!
//! **The handshake decides the catch-up** (DESIGN 3.3). The replica reports, per group, its last
//! durable seq (and that batch's hash), its generation, and each volume's state. When the
//! spool holds every batch after the replica's seq, the sender resumes from the spool. When it
//! does not (the spool overflowed or was lost, or the replica is behind or ahead of it), the
//! group continues its chain after the replica's seq and every volume gets a hash-compare
//! resync; a volume the replica has no image of gets an initial sync. The link drops and
//! returns without operator action; reconnects back off from 200 ms to 5 s.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use cdp_shared::Seq;
use cdp_shared::identity::{self, Fingerprint, Identity};
use cdp_shared::nbd::{ExportError, ExportResult};
use cdp_shared::types::VolumeId;
use cdp_shared::wire::{self, Control, FrameDecoder, GroupHello, VolumeInfo};
use serde::Serialize;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::pipeline::Group;

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A batch refused this many times in a row means something is wrong on this side: the
/// connection is restarted.
const NACKS_IN_A_ROW_MAX: u32 = 5;
/// Hash requests waiting for the connection, at most.
const HASH_QUERIES_MAX: usize = 16;
/// Verify answers waiting to be written, at most (the replica's verifier asks few at a time).
const VERIFIES_IN_FLIGHT_MAX: usize = 64;

/// The state of the link, for `status`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LinkState {
    pub connected: bool,
    pub replica: String,
    pub last_error: Option<String>,
    pub since_ns: i64,
    /// Groups whose ingest the replica paused, with its reason (e.g. its disk is full).
    pub paused: BTreeMap<String, String>,
}

pub type SharedLink = Arc<Mutex<LinkState>>;

pub fn link_connected(link: &SharedLink) -> bool {
    link.lock().unwrap_or_else(|p| p.into_inner()).connected
}

pub struct SenderConfig {
    pub replica: String,
    pub replica_fingerprint: Fingerprint,
    pub identity: Identity,
    pub window: usize,
    /// Test-only fault injection: flip one bit of this seq's first transmission, so that the
    /// replica must refuse it and the agent must send it again.
    pub corrupt_seq_once: Option<u64>,
}

type HashAnswer = std::result::Result<Vec<[u8; 32]>, String>;
type HashWaiters = HashMap<(String, VolumeId, u64), oneshot::Sender<HashAnswer>>;

/// A request for the replica's chunk hashes.
pub struct HashQuery {
    group: String,
    volume: VolumeId,
    first_chunk: u64,
    count: u32,
    reply: oneshot::Sender<HashAnswer>,
}

/// Asks the replica things through the sender's connection.
#[derive(Clone)]
pub struct ReplicaLink {
    tx: mpsc::Sender<HashQuery>,
}

impl ReplicaLink {
    pub fn new() -> (ReplicaLink, mpsc::Receiver<HashQuery>) {
        let (tx, rx) = mpsc::channel(HASH_QUERIES_MAX);
        (ReplicaLink { tx }, rx)
    }

    /// The blake3 hashes of chunks `first_chunk..first_chunk + count` of the replica's latest
    /// image of a volume. Fails when the link drops before the answer.
    pub async fn hashes(
        &self,
        group: &str,
        volume: VolumeId,
        first_chunk: u64,
        count: u32,
    ) -> ExportResult<Vec<[u8; 32]>> {
        let (reply, rx) = oneshot::channel();
        let q = HashQuery {
            group: group.to_owned(),
            volume,
            first_chunk,
            count,
            reply,
        };
        self.tx.send(q).await.map_err(|_| ExportError::Shutdown)?;
        match rx.await {
            Ok(Ok(h)) => Ok(h),
            Ok(Err(reason)) => Err(ExportError::Io(format!(
                "the replica could not hash chunks: {reason}"
            ))),
            Err(_) => Err(ExportError::Io(
                "the link to the replica dropped before it answered".into(),
            )),
        }
    }
}

fn set_link(link: &SharedLink, connected: bool, error: Option<String>) {
    let mut l = link.lock().unwrap_or_else(|p| p.into_inner());
    if l.connected != connected {
        l.since_ns = crate::clock::now_ns();
    }
    l.connected = connected;
    if !connected {
        l.paused.clear();
    }
    if error.is_some() || connected {
        l.last_error = error;
    }
}

/// Runs until `shutdown` fires. Cancellation-safe: batches stay in the spool until acked.
pub async fn run(
    group_set: Arc<crate::groups::GroupSet>,
    config: SenderConfig,
    link: SharedLink,
    mut queries: mpsc::Receiver<HashQuery>,
    shutdown: CancellationToken,
) {
    let mut backoff = BACKOFF_MIN;
    let mut corrupt = config.corrupt_seq_once;
    let mut last_logged: Option<String> = None;
    link.lock().unwrap_or_else(|p| p.into_inner()).replica = config.replica.clone();
    let mut changed = group_set.subscribe();
    loop {
        // A session serves the groups of the moment; when one leaves (unprotect), the
        // connection is closed and the next one says hello without it, at once.
        changed.borrow_and_update();
        let groups = group_set.snapshot();
        let result = tokio::select! {
            r = session(&groups, &config, &link, &mut queries, &mut corrupt, &mut backoff) => r,
            _ = changed.changed() => {
                drop(groups);
                set_link(&link, false, None);
                tracing::info!(replica = %config.replica, "the protected groups changed: reconnecting to the replica");
                continue;
            }
            _ = shutdown.cancelled() => return,
        };
        drop(groups);
        let msg = match result {
            Ok(()) => "the replica closed the connection".to_owned(),
            Err(e) => format!("{e:#}"),
        };
        set_link(&link, false, Some(msg.clone()));
        if last_logged.as_ref() != Some(&msg) {
            tracing::warn!(replica = %config.replica, "link to the replica is down: {msg}; retrying");
            last_logged = Some(msg);
        }
        // Hash requests cannot be answered while the link is down.
        while let Ok(q) = queries.try_recv() {
            let _ = q.reply.send(Err("the link to the replica is down".into()));
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.cancelled() => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn resolve(addr: &str) -> Result<SocketAddr> {
    tokio::net::lookup_host(addr)
        .await
        .with_context(|| format!("resolve replica address {addr}"))?
        .next()
        .ok_or_else(|| anyhow!("replica address {addr} resolves to nothing"))
}

async fn session(
    groups: &[Arc<Group>],
    config: &SenderConfig,
    link: &SharedLink,
    queries: &mut mpsc::Receiver<HashQuery>,
    corrupt: &mut Option<u64>,
    backoff: &mut Duration,
) -> Result<()> {
    let addr = resolve(&config.replica).await?;
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let mut endpoint = quinn::Endpoint::client(bind).context("open a UDP socket for QUIC")?;
    endpoint.set_default_client_config(identity::client_config(
        &config.identity,
        config.replica_fingerprint,
    )?);
    let conn = endpoint
        .connect(addr, identity::SERVER_NAME)
        .context("start a QUIC connection")?
        .await
        .with_context(|| format!("connect to the replica at {addr}"))?;
    let result = serve_connection(groups, config, link, &conn, queries, corrupt, backoff).await;
    let reason = conn.close_reason();
    conn.close(0u32.into(), b"bye");
    endpoint.wait_idle().await;
    match (result, reason) {
        // The replica's reason (e.g. "agent certificate ... is not authorized") says more than
        // "connection lost".
        (Err(e), Some(reason)) => Err(e.context(format!("{reason}"))),
        (r, _) => r,
    }
}

struct GroupSend {
    group: Arc<Group>,
    next: Seq,
    acked: Seq,
    nacks_in_a_row: u32,
}

fn parse_hash(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut h = [0u8; 32];
    for (i, b) in h.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(h)
}

fn generation_path(g: &Group) -> std::path::PathBuf {
    g.state_dir().join(format!("{}.generation", g.name))
}

/// Decides, from the replica's welcome, how a group catches up (see the module doc):
/// * the replica's copy of the group is another one than last time (its generation changed):
///   continue after its head; volumes it holds are compared by hash, the others synced again;
/// * the replica has no complete image of a volume this agent considers sent: the same;
/// * the spool holds every batch after the replica's seq: resume from it;
/// * otherwise continue after the replica's head and compare every volume by hash.
fn catch_up(g: &Arc<Group>, w: &wire::GroupWelcome) -> Result<Seq> {
    let head = g.last_sealed();
    let durable = Seq(w.durable);
    let first_held = g.spool.first_held().unwrap_or(head.next());
    let gen_path = generation_path(g);
    let known_generation = std::fs::read_to_string(&gen_path)
        .ok()
        .map(|s| s.trim().to_owned());
    let replaced = known_generation
        .as_ref()
        .is_some_and(|k| *k != w.generation);
    // A replica that lists no volumes (an older one) says nothing about them.
    let replica_state = |id: VolumeId| {
        if w.volumes.is_empty() {
            return "protecting";
        }
        w.volumes
            .iter()
            .find(|v| v.id == id)
            .map(|v| v.state.as_str())
            .unwrap_or("new")
    };
    let pending_sync = |id: VolumeId| {
        g.pending().initial_sync.contains(&id)
            && !g.volumes[id as usize]
                .syncing
                .load(std::sync::atomic::Ordering::Relaxed)
    };
    // Volumes the replica has no complete image of, while this agent thinks it has sent one.
    let lost: Vec<VolumeId> = g
        .volumes
        .iter()
        .filter(|v| {
            replica_state(v.id) == "new"
                && !pending_sync(v.id)
                && !v.syncing.load(std::sync::atomic::Ordering::Relaxed)
        })
        .map(|v| v.id)
        .collect();
    let resumable = !replaced && lost.is_empty() && durable <= head && durable.next() >= first_held;
    if !resumable {
        let hash = if durable.0 == 0 {
            [0u8; 32]
        } else {
            parse_hash(&w.head_hash).ok_or_else(|| {
                anyhow!("the replica sent no valid head hash for group {}", g.name)
            })?
        };
        if replaced {
            tracing::warn!(group = %g.name, "the replica's copy of group {} is a new one (generation {} instead of {}): the agent continues after its seq {durable} and resyncs", g.name, w.generation, known_generation.as_deref().unwrap_or("?"));
        } else {
            tracing::warn!(
                group = %g.name,
                "the replica is at seq {durable} but this agent's spool holds seqs {first_held}..={head}: the agent continues after seq {durable} and resyncs"
            );
        }
        let mut pending = g.pending();
        for v in &g.volumes {
            if replica_state(v.id) == "protecting" {
                if !pending.initial_sync.contains(&v.id) {
                    pending.compare.insert(v.id);
                }
            } else {
                tracing::warn!(group = %g.name, volume = %v.name, "the replica has no complete image of volume {}: it is synced again from the start", v.name);
                pending.compare.remove(&v.id);
                pending.initial_sync.insert(v.id);
                g.await_initial_sync([v.id]);
                if v.syncing.load(std::sync::atomic::Ordering::Relaxed) {
                    v.restart_sync
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
        drop(pending);
        // After the flags above: a sync that sees its restart flag never reaches SyncEnd.
        g.rebase(durable, hash).context("reset the spool")?;
    }
    if known_generation.as_deref() != Some(w.generation.as_str()) {
        crate::fsutil::write_atomic(&gen_path, format!("{}\n", w.generation).as_bytes())
            .with_context(|| format!("write {}", gen_path.display()))?;
    }
    Ok(durable)
}

async fn serve_connection(
    groups: &[Arc<Group>],
    config: &SenderConfig,
    link: &SharedLink,
    conn: &quinn::Connection,
    queries: &mut mpsc::Receiver<HashQuery>,
    corrupt: &mut Option<u64>,
    backoff: &mut Duration,
) -> Result<()> {
    let (mut ctl_send, mut ctl_recv) = conn.open_bi().await.context("open the control stream")?;
    let hello = Control::Hello {
        protocol: wire::PROTOCOL_VERSION,
        groups: groups
            .iter()
            .map(|g| {
                let head = g.last_sealed();
                GroupHello {
                    name: g.name.clone(),
                    volumes: g
                        .volumes
                        .iter()
                        .map(|v| VolumeInfo {
                            id: v.id,
                            name: v.name.clone(),
                            size: v.size,
                        })
                        .collect(),
                    head: head.0,
                    first_held: g.spool.first_held().unwrap_or(head.next()).0,
                }
            })
            .collect(),
    };
    ctl_send
        .write_all(&wire::encode(&hello))
        .await
        .context("send hello")?;
    let mut decoder = FrameDecoder::new();
    let mut buf = vec![0u8; 64 << 10];
    let welcome = loop {
        if let Some(msg) = decoder.poll_frame()? {
            break msg;
        }
        match ctl_recv
            .read(&mut buf)
            .await
            .context("read the replica's welcome")?
        {
            Some(n) => decoder.handle_bytes(&buf[..n]),
            None => bail!("the replica closed the control stream during the handshake"),
        }
    };
    let welcome_groups = match welcome {
        Control::Welcome { protocol, groups } if protocol == wire::PROTOCOL_VERSION => groups,
        Control::Welcome { protocol, .. } => bail!(
            "the replica speaks control protocol {protocol}, this agent {}",
            wire::PROTOCOL_VERSION
        ),
        Control::Refused { reason } => bail!("the replica refused this agent: {reason}"),
        other => bail!("unexpected first message from the replica: {other:?}"),
    };
    let mut state: BTreeMap<String, GroupSend> = BTreeMap::new();
    for g in groups {
        let w = welcome_groups
            .iter()
            .find(|w| w.name == g.name)
            .ok_or_else(|| anyhow!("the replica did not answer for group {}", g.name))?;
        let durable = catch_up(g, w)?;
        g.spool.ack(durable);
        g.acked.send_replace(durable);
        state.insert(
            g.name.clone(),
            GroupSend {
                group: g.clone(),
                next: durable.next(),
                acked: durable,
                nacks_in_a_row: 0,
            },
        );
    }
    set_link(link, true, None);
    *backoff = BACKOFF_MIN;
    tracing::info!(replica = %config.replica, "connected to the replica");
    for g in groups {
        g.wake.send_modify(|v| *v += 1);
    }

    // Wake the loop whenever any group's spool grows.
    let wake = Arc::new(Notify::new());
    let mut watchers = JoinSet::new();
    for g in groups {
        let mut rx = g.spool.subscribe_written();
        let wake = wake.clone();
        watchers.spawn(async move {
            while rx.changed().await.is_ok() {
                wake.notify_one();
            }
        });
    }
    let mut sends: JoinSet<Result<()>> = JoinSet::new();
    let mut hash_waiters: HashWaiters = HashMap::new();
    let (replies, mut reply_rx) = mpsc::channel::<Control>(VERIFIES_IN_FLIGHT_MAX);
    let mut verifies = JoinSet::new();
    let mut ctx = Ctx {
        state: &mut state,
        conn,
        sends: &mut sends,
        link,
        hash_waiters: &mut hash_waiters,
        replies,
        verifies: &mut verifies,
    };
    while let Some(msg) = decoder.poll_frame()? {
        ctx.handle(msg)?;
    }
    loop {
        // Send what the window allows.
        for s in ctx.state.values_mut() {
            let written = s.group.spool.written();
            while s.next <= written && (s.next.0 - s.acked.0 - 1) < config.window as u64 {
                let seq = s.next;
                let bytes = s.group.spool.get(seq)?.ok_or_else(|| {
                    anyhow!(
                        "batch {seq} of group {} is missing from the spool",
                        s.group.name
                    )
                })?;
                let bytes = if *corrupt == Some(seq.0) {
                    *corrupt = None;
                    // The last byte lies in the payload (or the header hash of an empty
                    // batch): the header stays readable, so the refusal names the batch.
                    let mut v = bytes.to_vec();
                    let at = v.len() - 1;
                    v[at] ^= 0x10;
                    tracing::warn!(
                        seq = seq.0,
                        "fault injection: sending a corrupted copy of this batch"
                    );
                    bytes::Bytes::from(v)
                } else {
                    bytes
                };
                ctx.sends.spawn(send_batch(conn.clone(), bytes));
                s.next = s.next.next();
            }
        }
        let wake_fut = wake.notified();
        tokio::select! {
            n = ctl_recv.read(&mut buf) => {
                match n.context("read from the replica")? {
                    Some(n) => decoder.handle_bytes(&buf[..n]),
                    None => return Ok(()),
                }
                while let Some(msg) = decoder.poll_frame()? {
                    ctx.handle(msg)?;
                }
            }
            Some(r) = ctx.sends.join_next() => {
                r.map_err(|e| anyhow!("send task failed: {e}"))??;
            }
            Some(q) = queries.recv() => {
                let msg = Control::HashRequest { group: q.group.clone(), volume: q.volume, first_chunk: q.first_chunk, count: q.count };
                ctx.hash_waiters.insert((q.group, q.volume, q.first_chunk), q.reply);
                ctl_send.write_all(&wire::encode(&msg)).await.context("send a hash request")?;
            }
            Some(reply) = reply_rx.recv() => {
                ctl_send.write_all(&wire::encode(&reply)).await.context("answer a verify request")?;
            }
            Some(_) = ctx.verifies.join_next() => {}
            _ = wake_fut => {}
        }
    }
}

struct Ctx<'a> {
    state: &'a mut BTreeMap<String, GroupSend>,
    conn: &'a quinn::Connection,
    sends: &'a mut JoinSet<Result<()>>,
    link: &'a SharedLink,
    hash_waiters: &'a mut HashWaiters,
    /// Answers to the replica's verify requests, written by the connection loop.
    replies: mpsc::Sender<Control>,
    verifies: &'a mut JoinSet<()>,
}

impl Ctx<'_> {
    fn handle(&mut self, msg: Control) -> Result<()> {
        match msg {
            Control::Ack { group, durable } => {
                let s = self
                    .state
                    .get_mut(&group)
                    .ok_or_else(|| anyhow!("ack for unknown group {group}"))?;
                let durable = Seq(durable);
                if durable > s.acked {
                    if durable >= s.next {
                        bail!(
                            "the replica acknowledged seq {durable} of group {group}, which was never sent"
                        );
                    }
                    s.acked = durable;
                    s.nacks_in_a_row = 0;
                    s.group.spool.ack(durable);
                    s.group.acked.send_replace(durable);
                    s.group.bump();
                }
            }
            Control::Nack { group, seq, reason } => {
                let Some(s) = self.state.get_mut(&group) else {
                    // The replica could not tell which batch it refused (its header was
                    // unreadable): start over, which sends every unacknowledged batch again.
                    bail!(
                        "the replica refused a batch it could not attribute ({reason}); reconnecting to send every unacknowledged batch again"
                    );
                };
                tracing::warn!(
                    group,
                    seq,
                    "the replica refused batch {seq}: {reason}; sending it again"
                );
                s.nacks_in_a_row += 1;
                if s.nacks_in_a_row > NACKS_IN_A_ROW_MAX {
                    bail!(
                        "the replica refused batches of group {group} {} times in a row (last: seq {seq}: {reason})",
                        s.nacks_in_a_row
                    );
                }
                let seq = Seq(seq);
                if seq > s.acked && seq < s.next {
                    let bytes = s
                        .group
                        .spool
                        .get(seq)?
                        .ok_or_else(|| anyhow!("batch {seq} is missing from the spool"))?;
                    self.sends.spawn(send_batch(self.conn.clone(), bytes));
                }
            }
            Control::HashReply {
                group,
                volume,
                seq: _,
                first_chunk,
                hashes,
            } => {
                if let Some(reply) = self.hash_waiters.remove(&(group, volume, first_chunk)) {
                    let parsed: Option<Vec<[u8; 32]>> =
                        hashes.iter().map(|h| parse_hash(h)).collect();
                    let _ =
                        reply.send(parsed.ok_or_else(|| "a hash is not 64 hex digits".to_owned()));
                }
            }
            Control::HashError {
                group,
                volume,
                reason,
            } => {
                let keys: Vec<_> = self
                    .hash_waiters
                    .keys()
                    .filter(|(g, v, _)| *g == group && *v == volume)
                    .cloned()
                    .collect();
                for k in keys {
                    if let Some(reply) = self.hash_waiters.remove(&k) {
                        let _ = reply.send(Err(reason.clone()));
                    }
                }
            }
            Control::Paused { group, reason } => {
                tracing::warn!(
                    group,
                    "the replica paused ingest: {reason}; batches stay in the spool until it resumes"
                );
                self.link
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .paused
                    .insert(group, reason);
            }
            Control::Resumed { group } => {
                tracing::info!(group, "the replica resumed ingest");
                self.link
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .paused
                    .remove(&group);
            }
            Control::VerifyRequest {
                id,
                group,
                volume,
                chunk,
            } => {
                let Some(s) = self.state.get(&group) else {
                    let _ = self.replies.try_send(Control::VerifyRefused {
                        id,
                        reason: format!("no group {group} on this agent"),
                    });
                    return Ok(());
                };
                let g = s.group.clone();
                let replies = self.replies.clone();
                self.verifies.spawn(async move {
                    let msg = match g.hash_chunk_at_boundary(volume, chunk).await {
                        Ok((seq, hash)) => Control::VerifyReply {
                            id,
                            seq: seq.0,
                            hash: hash.iter().map(|b| format!("{b:02x}")).collect(),
                        },
                        Err(reason) => Control::VerifyRefused { id, reason },
                    };
                    let _ = replies.send(msg).await;
                });
            }
            Control::RepairRequest {
                id,
                group,
                volume,
                chunks,
            } => {
                let refuse = |reason: String| Control::RepairRefused { id, reason };
                let Some(s) = self.state.get(&group) else {
                    let _ = self
                        .replies
                        .try_send(refuse(format!("no group {group} on this agent")));
                    return Ok(());
                };
                if chunks.len() > cdp_shared::wire::REPAIR_CHUNKS_PER_MESSAGE_MAX {
                    let _ = self.replies.try_send(refuse(format!(
                        "{} chunks in one repair request (at most {})",
                        chunks.len(),
                        cdp_shared::wire::REPAIR_CHUNKS_PER_MESSAGE_MAX
                    )));
                    return Ok(());
                }
                let g = s.group.clone();
                let replies = self.replies.clone();
                self.verifies.spawn(async move {
                    let msg = match g.repair_chunks(volume, &chunks).await {
                        Ok(seq) => Control::RepairStarted { id, seq: seq.0 },
                        Err(reason) => Control::RepairRefused { id, reason },
                    };
                    let _ = replies.send(msg).await;
                });
            }
            other => bail!("unexpected message from the replica: {other:?}"),
        }
        Ok(())
    }
}

async fn send_batch(conn: quinn::Connection, bytes: bytes::Bytes) -> Result<()> {
    let mut stream = conn.open_uni().await.context("open a batch stream")?;
    stream.write_chunk(bytes).await.context("send a batch")?;
    stream.finish().context("finish a batch stream")?;
    Ok(())
}
