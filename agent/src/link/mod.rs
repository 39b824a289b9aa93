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
//!
//! This module is the quinn shell: the connection, the handshake and the connection loop.
//! `catch_up` holds the catch-up decision, `window` the send window, and `answers` what each
//! message of the replica is answered with (acks, nacks, hash replies, pause notices, the
//! verifier's questions and repairs).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use cdp_shared::cause::{Cause, Primary};
use cdp_shared::identity::{self, Fingerprint, Identity};
use cdp_shared::nbd::{ExportError, ExportResult};
use cdp_shared::types::VolumeId;
use cdp_shared::wire::{
    self, Control, FrameDecoder, GroupHello, GroupRefused, GroupWelcome, VolumeInfo,
};
use serde::Serialize;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::pipeline::Group;

mod answers;
mod catch_up;
mod window;

use answers::Ctx;
use catch_up::catch_up;
use window::{SendWindow, send_window};

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
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
    /// Why the link is down (a `disconnected/*` cause); `None` while it is up.
    pub cause: Option<Cause>,
    pub since_ns: i64,
    /// Groups whose ingest the replica paused, with its reason (e.g. its disk is full).
    pub paused: BTreeMap<String, String>,
    /// Groups the replica refuses on the open connection (failed over there), with its
    /// reason and cause; the other groups replicate.
    pub refused: BTreeMap<String, (String, Cause)>,
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

/// Records the link up (`error` `None`) or down, with why (`error` and its cause; a
/// reconnect without a new error keeps the last ones).
fn set_link(link: &SharedLink, connected: bool, error: Option<(String, Cause)>) {
    let mut l = link.lock().unwrap_or_else(|p| p.into_inner());
    if l.connected != connected {
        l.since_ns = crate::clock::now_ns();
    }
    l.connected = connected;
    if connected {
        l.last_error = None;
        l.cause = None;
    } else {
        l.paused.clear();
        l.refused.clear();
        if let Some((e, cause)) = error {
            l.last_error = Some(e);
            l.cause = Some(cause);
        } else if l.cause.is_none() {
            l.cause = Some(Cause::DisconnectedLinkDown);
        }
    }
}

/// The replica refused this agent in the handshake (its `Refused` message).
#[derive(Debug, thiserror::Error)]
#[error("the replica refused this agent: {reason}")]
struct RefusedByReplica {
    reason: String,
    cause: Option<Cause>,
}

/// How the replica ended the connection, as context of the error that ended it (it reads as
/// the replica's reason, which says more than "connection lost").
#[derive(Debug)]
struct CloseReason(quinn::ConnectionError);

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// The named cause of a session's end (see [`cdp_shared::cause`]).
fn link_cause(e: &anyhow::Error) -> Cause {
    for c in e.chain() {
        if let Some(r) = c.downcast_ref::<RefusedByReplica>() {
            return r.cause.unwrap_or(Cause::DisconnectedRefused);
        }
    }
    let close = e.downcast_ref::<CloseReason>().map(|c| &c.0).or_else(|| {
        e.chain()
            .find_map(|c| c.downcast_ref::<quinn::ConnectionError>())
    });
    if let Some(quinn::ConnectionError::ApplicationClosed(a)) = close {
        let code = a.error_code.into_inner();
        if code == u64::from(wire::CLOSE_DEAUTHORIZED) {
            return Cause::DisconnectedUnauthorized;
        }
        if code == u64::from(wire::CLOSE_FORGOTTEN) {
            return Cause::DisconnectedRefused;
        }
    }
    // The TLS handshake's refusals travel as text only: the replica's verifier's sentence,
    // or this agent's own when the replica is not the one it is pinned to.
    let text = format!("{e:#}");
    if text.contains(identity::NOT_AUTHORIZED_MARK) {
        Cause::DisconnectedUnauthorized
    } else if text.contains(identity::REPLICA_MISMATCH_MARK) {
        Cause::DisconnectedReplicaMismatch
    } else {
        Cause::DisconnectedLinkDown
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
    let mut last_logged: Option<String> = None;
    link.lock().unwrap_or_else(|p| p.into_inner()).replica = config.replica.clone();
    let mut changed = group_set.subscribe();
    loop {
        // A session serves the groups of the moment; when one leaves (unprotect), the
        // connection is closed and the next one says hello without it, at once.
        changed.borrow_and_update();
        let groups = group_set.snapshot();
        let result = tokio::select! {
            r = session(&groups, &config, &link, &mut queries, &mut backoff) => r,
            _ = changed.changed() => {
                drop(groups);
                set_link(&link, false, None);
                tracing::info!(replica = %config.replica, "the protected groups changed: reconnecting to the replica");
                continue;
            }
            _ = shutdown.cancelled() => return,
        };
        drop(groups);
        let (msg, cause) = match result {
            Ok(()) => (
                "the replica closed the connection".to_owned(),
                Cause::DisconnectedLinkDown,
            ),
            Err(e) => (format!("{e:#}"), link_cause(&e)),
        };
        set_link(&link, false, Some((msg.clone(), cause)));
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
    backoff: &mut Duration,
) -> Result<()> {
    let addr = resolve(&config.replica).await?;
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let socket = std::net::UdpSocket::bind(bind).context("open a UDP socket for QUIC")?;
    identity::size_udp_buffers(&socket);
    let mut endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .context("open a QUIC endpoint")?;
    endpoint.set_default_client_config(identity::client_config(
        &config.identity,
        config.replica_fingerprint,
    )?);
    let conn = endpoint
        .connect(addr, identity::SERVER_NAME)
        .context("start a QUIC connection")?
        .await
        .with_context(|| format!("connect to the replica at {addr}"))?;
    let result = serve_connection(groups, config, link, &conn, queries, backoff).await;
    let reason = conn.close_reason();
    conn.close(0u32.into(), b"bye");
    endpoint.wait_idle().await;
    match (result, reason) {
        // The replica's reason (e.g. "agent certificate ... is not authorized") says more than
        // "connection lost".
        (Err(e), Some(reason)) => Err(e.context(CloseReason(reason))),
        (r, _) => r,
    }
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

/// What the agent says of one group in a Hello (or a Join): its volumes, head and first seq
/// held.
fn group_hello(g: &Group) -> GroupHello {
    let (head, head_hash) = g.head();
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
        head,
        first_held: g.spool.first_held().unwrap_or(head.next()),
        head_hash: if head.0 == 0 {
            String::new()
        } else {
            blake3::Hash::from_bytes(head_hash).to_hex().to_string()
        },
    }
}

/// The hello that opens a connection: each group's [`group_hello`].
fn hello(groups: &[Arc<Group>]) -> Control {
    Control::Hello {
        protocol: wire::PROTOCOL_VERSION,
        groups: groups.iter().map(|g| group_hello(g)).collect(),
    }
}

/// Sends the hello and reads the replica's welcome; returns what it says of each group it
/// takes, and the groups it refuses. `decoder` keeps what followed the welcome.
async fn handshake(
    groups: &[Arc<Group>],
    ctl_send: &mut quinn::SendStream,
    ctl_recv: &mut quinn::RecvStream,
    decoder: &mut FrameDecoder,
    buf: &mut [u8],
) -> Result<(Vec<GroupWelcome>, Vec<GroupRefused>)> {
    ctl_send
        .write_all(&wire::encode(&hello(groups)))
        .await
        .context("send hello")?;
    let welcome = loop {
        if let Some(msg) = decoder.poll_frame()? {
            break msg;
        }
        match ctl_recv
            .read(buf)
            .await
            .context("read the replica's welcome")?
        {
            Some(n) => decoder.handle_bytes(&buf[..n]),
            None => bail!("the replica closed the control stream during the handshake"),
        }
    };
    match welcome {
        Control::Welcome {
            protocol,
            groups,
            refused,
        } if protocol == wire::PROTOCOL_VERSION => Ok((groups, refused)),
        Control::Welcome { protocol, .. } => bail!(
            "the replica speaks control protocol {protocol}, this agent {}",
            wire::PROTOCOL_VERSION
        ),
        Control::Refused { reason, cause } => Err(RefusedByReplica { reason, cause }.into()),
        other => bail!("unexpected first message from the replica: {other:?}"),
    }
}

/// Catches every welcomed group up with the replica's welcome and opens the send window
/// over them, each from what the replica holds durably (a refused group stays out of the
/// window, spooling); returns the window and every group of the connection by name.
fn catch_up_groups(
    groups: &[Arc<Group>],
    welcome_groups: &[GroupWelcome],
    refused: &[GroupRefused],
    window: usize,
) -> Result<(SendWindow, BTreeMap<String, Arc<Group>>)> {
    let mut window = SendWindow::new(window);
    let mut by_name: BTreeMap<String, Arc<Group>> = BTreeMap::new();
    for g in groups {
        by_name.insert(g.name.clone(), g.clone());
        if refused.iter().any(|r| r.name == g.name) {
            continue;
        }
        let w = welcome_groups
            .iter()
            .find(|w| w.name == g.name)
            .ok_or_else(|| anyhow!("the replica did not answer for group {}", g.name))?;
        join_window(&mut window, g, w)?;
    }
    Ok((window, by_name))
}

/// Catches group `g` up with its Welcome `w` and adds it to the send window.
fn join_window(window: &mut SendWindow, g: &Arc<Group>, w: &GroupWelcome) -> Result<()> {
    let durable = catch_up(g, w)?;
    g.spool.ack(durable);
    g.acked.send_replace(durable);
    window.add_group(&g.name, durable);
    Ok(())
}

/// Which side is primary for a group the replica welcomed (`None`) or refused: the replica
/// when it refuses the group because it is failed over there.
fn primary_of(refused: Option<&GroupRefused>) -> Primary {
    match refused {
        Some(r) if r.cause == Cause::DisconnectedFencedByFailover => Primary::Replica,
        _ => Primary::Agent,
    }
}

/// Records the groups the replica refuses on this connection, each said once.
fn set_refused(link: &SharedLink, refused: &[GroupRefused]) {
    let mut l = link.lock().unwrap_or_else(|p| p.into_inner());
    for r in refused {
        tracing::warn!(
            group = %r.name,
            "the replica refuses group {}: {}; its writes stay in the spool, and the agent's other groups replicate",
            r.name,
            r.reason
        );
        l.refused
            .insert(r.name.clone(), (r.reason.clone(), r.cause));
    }
}

/// A notify woken whenever any group's spool grows, and the tasks that watch the spools
/// (they stop when the set is dropped).
fn watch_spools(groups: &[Arc<Group>]) -> (Arc<Notify>, JoinSet<()>) {
    let wake = Arc::new(Notify::new());
    let mut watchers = JoinSet::new();
    for g in groups {
        let mut rx = g.spool.subscribe_appended();
        let wake = wake.clone();
        watchers.spawn(async move {
            while rx.changed().await.is_ok() {
                wake.notify_one();
            }
        });
    }
    (wake, watchers)
}

async fn serve_connection(
    groups: &[Arc<Group>],
    config: &SenderConfig,
    link: &SharedLink,
    conn: &quinn::Connection,
    queries: &mut mpsc::Receiver<HashQuery>,
    backoff: &mut Duration,
) -> Result<()> {
    let (mut ctl_send, mut ctl_recv) = conn.open_bi().await.context("open the control stream")?;
    let mut decoder = FrameDecoder::new();
    let mut buf = vec![0u8; 64 << 10];
    let (welcome_groups, refused) =
        handshake(groups, &mut ctl_send, &mut ctl_recv, &mut decoder, &mut buf).await?;
    let (mut window, by_name) = catch_up_groups(groups, &welcome_groups, &refused, config.window)?;
    set_link(link, true, None);
    set_refused(link, &refused);
    for g in groups {
        g.set_primary(primary_of(refused.iter().find(|r| r.name == g.name)));
    }
    *backoff = BACKOFF_MIN;
    tracing::info!(replica = %config.replica, "connected to the replica");
    for g in groups {
        g.wake.send_modify(|v| *v += 1);
    }

    // Wake the loop whenever any group's spool grows.
    let (wake, _watchers) = watch_spools(groups);
    let mut sends: JoinSet<Result<()>> = JoinSet::new();
    let mut hash_waiters: HashWaiters = HashMap::new();
    let (replies, mut reply_rx) = mpsc::channel::<Control>(VERIFIES_IN_FLIGHT_MAX);
    let mut verifies = JoinSet::new();
    let mut ctx = Ctx {
        window: &mut window,
        groups: &by_name,
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
    let mut heads = tokio::time::interval(wire::HEAD_INTERVAL);
    heads.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Send what the window allows.
        send_window(ctx.window, ctx.groups, ctx.sends, conn)?;
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
            _ = heads.tick() => {
                // Each group's head and lag, for the replica's status, in one write.
                let frames: Vec<u8> = groups
                    .iter()
                    .flat_map(|g| wire::encode(&Control::Head { group: g.name.clone(), seq: g.last_sealed(), lag_ms: g.rpo_lag_ms(), rpo_target_ms: Some(g.rpo_target_ms()) }))
                    .collect();
                ctl_send.write_all(&frames).await.context("send the heads")?;
            }
            _ = wake_fut => {}
        }
    }
}
