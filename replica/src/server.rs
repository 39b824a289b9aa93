//! The QUIC shell of `serve`: accepts agent connections (mutual TLS through
//! `cdp_shared::identity`, agents authorized by `authorized_agents.toml`, re-read at every
//! handshake), speaks the control protocol and feeds batch streams to [`IngestService`].
//! It only moves bytes: every decision is made in `ingest`.
//!
//! Per connection: the agent opens one bidirectional control stream and sends `Hello`; the
//! replica answers `Welcome` or `Refused`, then writes `Ack`/`Nack`, `Paused`/`Resumed` and
//! the answers to `HashRequest`s on that stream (one writer task per connection). Every batch
//! arrives alone on its own unidirectional stream. Hash requests are answered by tasks beside
//! the connection loop ([`crate::hashes`]), at most [`HASH_REQUESTS_PER_CONNECTION_MAX`] at
//! once: while that many run, the control stream is not read (the agent waits), and batch
//! streams are still taken.
//!
//! # Questions to the agent (the verifier)
//! The replica also asks, through [`crate::agent_ports`]: the connection that holds a group's
//! link registers its control stream there after the Welcome, routes the answers by `id`, and
//! unregisters when it ends.
//!
//! # Authorization
//! The TLS layer admits only agents in `authorized_agents.toml`, re-read at every handshake.
//! An open connection re-reads it every [`FENCE_CHECK_INTERVAL`] too: once its agent is no
//! longer listed (`cdp-replica deauthorize`), the connection is closed with code
//! [`CLOSE_DEAUTHORIZED`] and a reason the agent logs, and one warning line names the agent.
//! Each Hello and each end of a connection is recorded in the catalog (`agents`: when the
//! agent was last seen).
//!
//! # Fences
//! A group with a failover row (see `failover`) is fenced alone: its Hello is answered in the
//! Welcome's `refused` list (the agent's other groups are welcomed), a served group that is
//! failed over later is told `Fenced` within [`FENCE_CHECK_INTERVAL`] (its link and port
//! released), and a refused group whose failover ended is told `Rejoin`, to which the agent
//! answers `Join` (admitted like a Hello, answered `Joined`). The connection stays up
//! throughout, so the agent's other groups keep replicating.
//!
//! # Forget
//! A connection holds its groups' links ([`crate::agent_ports::Links`]) from its Welcome to
//! its end: the forget service of `serve` refuses a forget while the group's agent holds one.
//! A connection welcomed for a group that is forgotten afterwards is closed on its next check
//! (code [`CLOSE_FORGOTTEN`]).
//!
//! The shell is started and stopped by the supervisor, `serve` (its token is the serve's).
//! Connection and stream tasks only wait on the network and are cancelled freely; disk writes
//! happen in the group tasks of `ingest`, which finish the commit they are in before stopping.

use std::collections::HashSet;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use cdp_shared::batch::{self, BATCH_BYTES_MAX};
use cdp_shared::identity::{self, AuthorizeFn, Fingerprint, Identity};
use cdp_shared::types::Seq;
use cdp_shared::wire::{self, Control, FrameDecoder};
use quinn::{Endpoint, EndpointConfig, TokioRuntime};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::agent_ports::{AgentPort, AgentPorts, Links};
use crate::catalog::Catalog;
use crate::clock::now_ns;
use crate::datadir::read_agents;
use crate::error::{Refusal, ReplicaError, Result};
use crate::hashes;
use crate::ingest::{CONTROL_OUTBOX_MAX, IngestService};

/// How long an agent has, once connected, to open its control stream and say hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a refusal waits for the agent to read it before the connection is closed.
pub const REFUSAL_LINGER: Duration = Duration::from_secs(2);
/// How long shutdown waits for connections to close cleanly.
pub const SHUTDOWN_LINGER: Duration = Duration::from_secs(2);
/// Control stream read buffer.
const CONTROL_READ_BYTES: usize = 64 << 10;
/// How often a connection checks whether one of its groups was failed over meanwhile (the
/// fence, see `failover`; ingest itself commits nothing of a failed-over group at once), and
/// whether its agent is still authorized (`cdp-replica deauthorize`).
pub const FENCE_CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// The QUIC application close codes (the reason, one sentence, goes with them): its agent was
/// deauthorized, one of its groups was failed over or forgotten (`forget`) after its Welcome.
pub use cdp_shared::wire::{CLOSE_DEAUTHORIZED, CLOSE_FORGOTTEN};
/// Hash requests of one connection answered at once (each reads up to
/// `HASHES_PER_MESSAGE_MAX` MiB of image), so that they never starve ingest.
pub const HASH_REQUESTS_PER_CONNECTION_MAX: usize = 2;

/// What the connections of the shell talk to (one per serve).
struct Shared {
    ingest: IngestService,
    catalog: Catalog,
    token: CancellationToken,
    /// Which connection holds each group's link.
    links: Links,
    /// The connected agents' control streams, for the verifier's questions.
    ports: AgentPorts,
}

/// What the shell's connections use, from the supervisor (`serve`).
pub(crate) struct ShellParts {
    pub ingest: IngestService,
    pub catalog: Catalog,
    pub ports: AgentPorts,
    pub links: Links,
    /// Stops the shell (and, cancelled by a fatal ingest error, the whole serve).
    pub token: CancellationToken,
}

/// The QUIC shell of a serve: its bound endpoint and what its connections talk to.
pub(crate) struct Shell {
    endpoint: Endpoint,
    local_addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Shell {
    /// Makes the endpoint on the bound `socket`, with the replica's `identity`; the TLS layer
    /// admits the agents listed in the data directory's `authorized_agents.toml`, re-read at
    /// every handshake.
    pub(crate) fn bind(identity: &Identity, socket: UdpSocket, parts: ShellParts) -> Result<Shell> {
        let agents_dir = parts.ingest.data_dir().clone();
        let authorize: AuthorizeFn =
            Arc::new(move |fp: &Fingerprint| match read_agents(&agents_dir) {
                Ok(list) => list.iter().any(|a| a.fingerprint == *fp),
                Err(e) => {
                    tracing::warn!("{e}");
                    false
                }
            });
        let server_config = identity::server_config(identity, authorize)?;
        identity::size_udp_buffers(&socket);
        let addr = socket.local_addr().map_err(|source| ReplicaError::Listen {
            addr: "the given socket".into(),
            source,
        })?;
        let endpoint = Endpoint::new(
            EndpointConfig::default(),
            Some(server_config),
            socket,
            Arc::new(TokioRuntime),
        )
        .map_err(|source| ReplicaError::Listen {
            addr: addr.to_string(),
            source,
        })?;
        let local_addr = endpoint
            .local_addr()
            .map_err(|source| ReplicaError::Listen {
                addr: addr.to_string(),
                source,
            })?;
        let shared = Arc::new(Shared {
            ingest: parts.ingest,
            catalog: parts.catalog,
            token: parts.token,
            links: parts.links,
            ports: parts.ports,
        });
        Ok(Shell {
            endpoint,
            local_addr,
            shared,
        })
    }

    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Accepts connections until the token is cancelled; then closes the endpoint and waits
    /// until every connection task has ended (they wait only on the network: cancelled freely).
    pub(crate) async fn accept_until_cancelled(&self) {
        let connections = TaskTracker::new();
        let mut next_id = 0u64;
        loop {
            let incoming = tokio::select! {
                _ = self.shared.token.cancelled() => break,
                i = self.endpoint.accept() => match i { Some(i) => i, None => break },
            };
            next_id += 1;
            connections.spawn(handle_connection(incoming, self.shared.clone(), next_id));
        }
        self.endpoint.close(0u32.into(), b"replica shutting down");
        connections.close();
        connections.wait().await;
    }

    /// Once everything behind the shell has stopped: lets the endpoint tell the peers that it
    /// closed, for at most [`SHUTDOWN_LINGER`].
    pub(crate) async fn linger(self) {
        let _ = tokio::time::timeout(SHUTDOWN_LINGER, self.endpoint.wait_idle()).await;
    }
}

fn peer_fingerprint(conn: &quinn::Connection) -> Option<Fingerprint> {
    let any = conn.peer_identity()?;
    let certs = any
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    certs.first().map(|c| Fingerprint::of_der(c.as_ref()))
}

async fn handle_connection(incoming: quinn::Incoming, shared: Arc<Shared>, id: u64) {
    let remote = incoming.remote_address();
    let conn = tokio::select! {
        _ = shared.token.cancelled() => return,
        c = incoming => match c {
            Ok(c) => c,
            // An unauthorized agent was already logged by the TLS layer.
            Err(e) => {
                tracing::debug!(%remote, "handshake failed: {e}");
                return;
            }
        },
    };
    let Some(agent) = peer_fingerprint(&conn) else {
        tracing::warn!(%remote, "closed a connection without a client certificate");
        conn.close(1u32.into(), b"no client certificate");
        return;
    };
    tracing::info!(%agent, %remote, "agent connected");
    let result = serve_connection(&conn, agent, &shared, id).await;
    conn.close(0u32.into(), b"bye");
    record_seen(&shared, &agent, remote).await;
    match result {
        Ok(()) => tracing::info!(%agent, %remote, "agent disconnected"),
        Err(e) => tracing::warn!(%agent, %remote, "agent disconnected: {e}"),
    }
}

/// Records that the agent was seen now (at its Hello and when its connection ends), for
/// `cdp-replica agents`; a failure (a full disk) is only logged.
async fn record_seen(shared: &Arc<Shared>, agent: &Fingerprint, remote: SocketAddr) {
    if let Err(e) = shared
        .catalog
        .agent_seen(&agent.to_string(), &remote.to_string(), now_ns())
        .await
    {
        tracing::warn!(%agent, "could not record when the agent was seen: {e}");
    }
}

/// Why the connection of `agent` must close now that it is no longer authorized
/// (`cdp-replica deauthorize`), if it is not; `None` while it is, or when the list cannot be
/// read (the next handshake decides then).
fn deauthorized(shared: &Arc<Shared>, agent: &Fingerprint) -> Option<String> {
    match crate::agents::is_authorized(shared.ingest.data_dir(), agent) {
        Some(false) => Some(format!(
            "agent {agent} was deauthorized on the replica (cdp-replica deauthorize); it is refused until it is authorized again"
        )),
        _ => None,
    }
}

async fn write_frame(
    send: &mut quinn::SendStream,
    msg: &Control,
) -> std::result::Result<(), String> {
    send.write_all(&wire::encode(msg))
        .await
        .map_err(|e| format!("control stream write failed: {e}"))
}

/// Refuses the agent: `Refused { reason }` written and given [`REFUSAL_LINGER`] to be read.
/// Returns how the connection ends (its error).
async fn refuse(
    send: &mut quinn::SendStream,
    agent: &Fingerprint,
    refusal: impl Into<Refusal>,
) -> String {
    let Refusal(reason) = refusal.into();
    tracing::warn!(%agent, "refused the agent: {reason}");
    if let Err(e) = write_frame(
        send,
        &Control::Refused {
            reason: reason.clone(),
            cause: None,
        },
    )
    .await
    {
        return e;
    }
    let _ = send.finish();
    let _ = tokio::time::timeout(REFUSAL_LINGER, send.stopped()).await;
    format!("refused: {reason}")
}

/// Reads frames from the control stream until one is complete.
async fn read_frame(
    recv: &mut quinn::RecvStream,
    decoder: &mut FrameDecoder,
    buf: &mut [u8],
) -> std::result::Result<Option<Control>, String> {
    loop {
        if let Some(frame) = decoder.poll_frame().map_err(|e| e.to_string())? {
            return Ok(Some(frame));
        }
        match recv.read(buf).await {
            Ok(Some(n)) => decoder.handle_bytes(&buf[..n]),
            Ok(None) => return Ok(None),
            Err(e) => return Err(format!("control stream read failed: {e}")),
        }
    }
}

/// A connection past its Hello: the agent's groups admitted and welcomed.
struct Welcomed {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
    buf: Vec<u8>,
    agent_name: String,
    welcomes: Vec<wire::GroupWelcome>,
    /// The groups of the Hello refused on this connection (fenced), by name.
    refused: Vec<String>,
    /// The group names the Hello announced.
    announced: Arc<HashSet<String>>,
}

/// Serves one authenticated connection: the Hello ([`welcome`]), then the session until the
/// connection ends or is closed (deauthorized, forgotten, fenced) or serve stops.
async fn serve_connection(
    conn: &quinn::Connection,
    agent: Fingerprint,
    shared: &Arc<Shared>,
    id: u64,
) -> std::result::Result<(), String> {
    match welcome(conn, &agent, shared).await? {
        Some(w) => session(conn, agent, shared, id, w).await,
        None => Ok(()),
    }
}

/// The control stream and the Hello: the agent's groups admitted by ingest and the Welcome
/// written, or the agent refused (`Err`). `None`: serve is stopping.
async fn welcome(
    conn: &quinn::Connection,
    agent: &Fingerprint,
    shared: &Arc<Shared>,
) -> std::result::Result<Option<Welcomed>, String> {
    let accepted = tokio::select! {
        _ = shared.token.cancelled() => return Ok(None),
        r = tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi()) => r,
    };
    let (mut send, mut recv) = match accepted {
        Ok(Ok(streams)) => streams,
        Ok(Err(e)) => return Err(format!("no control stream: {e}")),
        Err(_) => return Err(format!("no control stream within {HELLO_TIMEOUT:?}")),
    };
    let agent_name = crate::datadir::read_agents(shared.ingest.data_dir())
        .ok()
        .and_then(|list| list.into_iter().find(|a| a.fingerprint == *agent))
        .map(|a| a.name)
        .unwrap_or_default();
    let mut decoder = FrameDecoder::new();
    let mut buf = vec![0u8; CONTROL_READ_BYTES];
    let hello =
        match tokio::time::timeout(HELLO_TIMEOUT, read_frame(&mut recv, &mut decoder, &mut buf))
            .await
        {
            Ok(Ok(Some(frame))) => frame,
            Ok(Ok(None)) => return Err("the control stream ended before Hello".into()),
            Ok(Err(e)) => {
                return Err(refuse(
                    &mut send,
                    agent,
                    format!("the control stream is malformed: {e}"),
                )
                .await);
            }
            Err(_) => return Err(format!("no Hello within {HELLO_TIMEOUT:?}")),
        };
    record_seen(shared, agent, conn.remote_address()).await;
    let Control::Hello { protocol, groups } = hello else {
        return Err(refuse(
            &mut send,
            agent,
            "the first control message must be Hello".to_owned(),
        )
        .await);
    };
    let admitted = match shared.ingest.hello(agent, protocol, &groups).await {
        Ok(Ok(a)) => a,
        Ok(Err(refusal)) => return Err(refuse(&mut send, agent, refusal).await),
        Err(e) => {
            tracing::error!(%agent, "could not admit the agent's groups: {e}");
            return Err(refuse(
                &mut send,
                agent,
                format!("the replica could not admit the groups: {e}"),
            )
            .await);
        }
    };
    for r in &admitted.refused {
        tracing::warn!(%agent, group = %r.name, "refused a group of the agent: {}", r.reason);
    }
    write_frame(
        &mut send,
        &Control::Welcome {
            protocol: wire::PROTOCOL_VERSION,
            groups: admitted.welcomes.clone(),
            refused: admitted.refused.clone(),
        },
    )
    .await?;
    let announced = Arc::new(groups.iter().map(|g| g.name.clone()).collect());
    Ok(Some(Welcomed {
        send,
        recv,
        decoder,
        buf,
        agent_name,
        welcomes: admitted.welcomes,
        refused: admitted.refused.into_iter().map(|r| r.name).collect(),
        announced,
    }))
}

/// The groups a welcomed connection serves, and those of its Hello it refuses (fenced).
struct Joined {
    /// Catalog id, name and forget epoch of each group served.
    served: Vec<(i64, String, u64)>,
    /// Groups of the Hello refused on this connection, each with whether the agent was told
    /// that it may join again (`Rejoin`).
    refused: std::collections::BTreeMap<String, bool>,
}

impl Joined {
    fn group_ids(&self) -> Vec<i64> {
        self.served.iter().map(|(gid, _, _)| *gid).collect()
    }
}

/// A welcomed connection: its links held, its port registered and its groups attached for
/// their news, then batch streams, hash requests and answers taken until it ends; every
/// [`FENCE_CHECK_INTERVAL`] the connection checks that it may go on ([`must_close`]) and
/// whether one of its groups was failed over or its failover ended ([`check_fences`]).
async fn session(
    conn: &quinn::Connection,
    agent: Fingerprint,
    shared: &Arc<Shared>,
    id: u64,
    w: Welcomed,
) -> std::result::Result<(), String> {
    let Welcomed {
        mut send,
        mut recv,
        mut decoder,
        mut buf,
        agent_name,
        welcomes,
        refused,
        announced,
    } = w;
    let mut joined = Joined {
        served: Vec::new(),
        refused: refused.into_iter().map(|n| (n, false)).collect(),
    };
    for w in &welcomes {
        if let Some(gid) = shared.ingest.group_id(&w.name).await {
            joined
                .served
                .push((gid, w.name.clone(), shared.ingest.forget_epoch(&w.name)));
        }
    }
    set_links(shared, &joined.group_ids(), id, true, &agent).await;
    tracing::info!(%agent, groups = ?welcomes.iter().map(|w| (&w.name, w.durable)).collect::<Vec<_>>(), refused = ?joined.refused.keys().collect::<Vec<_>>(), "welcomed the agent");

    let (outbox, mut outbox_rx) = mpsc::channel::<Control>(CONTROL_OUTBOX_MAX);
    let writer = tokio::spawn(async move {
        while let Some(msg) = outbox_rx.recv().await {
            if write_frame(&mut send, &msg).await.is_err() {
                break;
            }
        }
    });
    for w in &welcomes {
        shared.ingest.attach(&w.name, &outbox).await;
    }
    let port = AgentPort::new(id, outbox.clone());
    shared.ports.register(&joined.group_ids(), &port);
    let streams = TaskTracker::new();
    let mut hash_jobs: JoinSet<()> = JoinSet::new();
    let mut control_open = true;
    let mut fence_check = tokio::time::interval(FENCE_CHECK_INTERVAL);
    fence_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = loop {
        tokio::select! {
            _ = shared.token.cancelled() => break Ok(()),
            _ = fence_check.tick() => {
                if let Some(end) = must_close(conn, &agent, &agent_name, shared, &joined).await {
                    break end;
                }
                check_fences(shared, &agent, id, &outbox, &mut joined).await;
            }
            s = conn.accept_uni() => match s {
                Ok(stream) => {
                    streams.spawn(take_batch(stream, shared.ingest.clone(), agent, announced.clone(), outbox.clone()));
                }
                Err(quinn::ConnectionError::ApplicationClosed(_) | quinn::ConnectionError::LocallyClosed) => break Ok(()),
                Err(e) => break Err(e.to_string()),
            },
            r = read_frame(&mut recv, &mut decoder, &mut buf), if control_open && hash_jobs.len() < HASH_REQUESTS_PER_CONNECTION_MAX => match r {
                Ok(Some(Control::HashRequest { group, volume, first_chunk, count })) => {
                    let ingest = shared.ingest.clone();
                    let outbox = outbox.clone();
                    let announced = announced.clone();
                    hash_jobs.spawn(async move {
                        let reply = answer_hashes(&ingest, &agent, &announced, group, volume, first_chunk, count).await;
                        let _ = outbox.send(reply).await;
                    });
                }
                Ok(Some(Control::Head { group, seq, lag_ms, rpo_target_ms })) => {
                    if announced.contains(&group) {
                        shared.ingest.report_head(&group, seq, lag_ms, rpo_target_ms);
                    }
                }
                Ok(Some(Control::Join { group })) => {
                    join(shared, &agent, id, &port, &outbox, &mut joined, group).await;
                }
                Ok(Some(msg)) => route_answer(&port, &agent, msg),
                Ok(None) => control_open = false,
                Err(e) => break Err(e),
            },
            Some(_) = hash_jobs.join_next(), if !hash_jobs.is_empty() => {}
        }
    };
    hash_jobs.abort_all();
    let group_ids = joined.group_ids();
    shared.ports.unregister(&group_ids, id);
    // Askers still waiting learn that the connection is gone.
    port.hang_up();
    set_links(shared, &group_ids, id, false, &agent).await;
    conn.close(0u32.into(), b"bye");
    streams.close();
    streams.wait().await;
    writer.abort();
    result
}

/// Whether a welcomed connection must close now, and how its session ends: its agent was
/// deauthorized, or one of its groups was forgotten since its Welcome. The connection is
/// closed here with the code and reason the agent logs. (A failed-over group is fenced alone:
/// [`check_fences`].)
async fn must_close(
    conn: &quinn::Connection,
    agent: &Fingerprint,
    agent_name: &str,
    shared: &Arc<Shared>,
    joined: &Joined,
) -> Option<std::result::Result<(), String>> {
    if let Some(reason) = deauthorized(shared, agent) {
        tracing::warn!(%agent, name = %agent_name, "closing the connection of agent {agent_name:?} ({agent}): it was deauthorized");
        conn.close(CLOSE_DEAUTHORIZED.into(), reason.as_bytes());
        // Said above; the end of the connection is logged as usual.
        return Some(Ok(()));
    }
    if let Some((_, group, _)) = joined
        .served
        .iter()
        .find(|(_, g, e)| shared.ingest.forget_epoch(g) != *e)
    {
        let reason = format!(
            "group {group} was forgotten on the replica (cdp-replica forget); the next connection starts it afresh"
        );
        tracing::warn!(%agent, "closing the agent's connection: {reason}");
        conn.close(CLOSE_FORGOTTEN.into(), reason.as_bytes());
        return Some(Err(reason));
    }
    None
}

/// The per-group fence of a connection (see `failover`): a served group that was failed over
/// since is refused from now on (`Fenced`: its link released, its port unregistered; ingest
/// commits none of its batches anyway), and a refused group whose failover ended is told it
/// may join again (`Rejoin`, once). The connection's other groups go on untouched.
async fn check_fences(
    shared: &Arc<Shared>,
    agent: &Fingerprint,
    id: u64,
    outbox: &mpsc::Sender<Control>,
    joined: &mut Joined,
) {
    let mut i = 0;
    while i < joined.served.len() {
        let (gid, name) = (joined.served[i].0, joined.served[i].1.clone());
        match crate::ingest::fence_of_group(&shared.catalog, gid, &name).await {
            Ok(Some(refused)) => {
                tracing::warn!(%agent, group = %name, "fencing a group of the agent: {}", refused.reason);
                joined.served.remove(i);
                joined.refused.insert(name, false);
                shared.ports.unregister(&[gid], id);
                set_links(shared, &[gid], id, false, agent).await;
                let _ = outbox.send(Control::Fenced(refused)).await;
            }
            Ok(None) => i += 1,
            Err(e) => {
                tracing::debug!("could not check the fence of group {name}: {e}");
                i += 1;
            }
        }
    }
    for (name, told) in joined.refused.iter_mut().filter(|(_, told)| !**told) {
        if let Ok(None) = crate::ingest::fence_of(&shared.catalog, name).await {
            tracing::info!(%agent, group = %name, "a refused group of the agent may replicate again: asking it to join");
            *told = true;
            let _ = outbox
                .send(Control::Rejoin {
                    group: name.clone(),
                })
                .await;
        }
    }
}

/// The agent's `Join` of a group this connection refused: admitted by ingest (`Joined`, and
/// the group served from now on) or refused again (`Fenced`). A Join of a group the
/// connection does not refuse is ignored.
async fn join(
    shared: &Arc<Shared>,
    agent: &Fingerprint,
    id: u64,
    port: &AgentPort,
    outbox: &mpsc::Sender<Control>,
    joined: &mut Joined,
    gh: wire::GroupHello,
) {
    if joined.refused.get(&gh.name) != Some(&true) {
        tracing::debug!(%agent, group = %gh.name, "ignored a Join of a group not asked to join");
        return;
    }
    let name = gh.name.clone();
    let refused_again = |reason: String| {
        Control::Fenced(wire::GroupRefused {
            name: name.clone(),
            reason,
            cause: cdp_shared::cause::Cause::DisconnectedRefused,
        })
    };
    let answer = match shared.ingest.join(agent, &gh).await {
        Ok(Ok(Ok(w))) => match shared.ingest.group_id(&name).await {
            Some(gid) => {
                joined.refused.remove(&name);
                joined
                    .served
                    .push((gid, name.clone(), shared.ingest.forget_epoch(&name)));
                set_links(shared, &[gid], id, true, agent).await;
                shared.ingest.attach(&name, outbox).await;
                shared.ports.register(&[gid], port);
                tracing::info!(%agent, group = %name, durable = w.durable.0, "the agent's group joined again");
                Control::Joined { group: w }
            }
            None => refused_again(format!("group {name} is not running on the replica")),
        },
        Ok(Ok(Err(refused))) => {
            // Fenced again before it could join: asked again once the fence goes.
            joined.refused.insert(name.clone(), false);
            Control::Fenced(refused)
        }
        Ok(Err(Refusal(reason))) => {
            tracing::warn!(%agent, group = %name, "refused the agent's group: {reason}");
            refused_again(reason)
        }
        Err(e) => {
            tracing::error!(%agent, group = %name, "could not admit the agent's group: {e}");
            joined.refused.insert(name.clone(), false);
            refused_again(format!("the replica could not admit the group: {e}"))
        }
    };
    let _ = outbox.send(answer).await;
}

/// One batch stream: read whole and submitted to ingest (which answers on `outbox`), or
/// refused when longer than a batch can be.
async fn take_batch(
    mut stream: quinn::RecvStream,
    ingest: IngestService,
    agent: Fingerprint,
    announced: Arc<HashSet<String>>,
    outbox: mpsc::Sender<Control>,
) {
    match read_batch(&mut stream).await {
        Ok(bytes) => ingest.submit(&agent, &announced, bytes, &outbox).await,
        Err(ReadBatchError::TooLong) => {
            let reason = format!("a batch stream is longer than {BATCH_BYTES_MAX} bytes");
            tracing::warn!(%agent, "refused a batch: {reason}");
            let _ = outbox
                .send(Control::Nack {
                    group: None,
                    seq: Seq::ZERO,
                    reason,
                })
                .await;
        }
        Err(ReadBatchError::Read(e)) => {
            tracing::debug!(%agent, "a batch stream ended early: {e}")
        }
    }
}

/// An answer to one of the replica's questions, routed by its id to the asker waiting on
/// `port`; any other message is ignored.
fn route_answer(port: &AgentPort, agent: &Fingerprint, msg: Control) {
    let id = match &msg {
        Control::VerifyReply { id, .. }
        | Control::VerifyRefused { id, .. }
        | Control::RepairStarted { id, .. }
        | Control::RepairRefused { id, .. } => *id,
        _ => {
            tracing::debug!(%agent, ?msg, "ignored a control message");
            return;
        }
    };
    if !port.answer(id, msg) {
        tracing::debug!(%agent, id, "ignored an answer nobody waits for");
    }
}

/// The answer to one `HashRequest`: `HashReply`, or `HashError` with one sentence.
async fn answer_hashes(
    ingest: &IngestService,
    agent: &Fingerprint,
    announced: &HashSet<String>,
    group: String,
    volume: u32,
    first_chunk: u64,
    count: u32,
) -> Control {
    let refuse = |group: String, reason: String| {
        tracing::debug!(%agent, group, volume, "refused a hash request: {reason}");
        Control::HashError {
            group,
            volume,
            reason,
        }
    };
    if !announced.contains(&group) {
        let reason = format!("group {group} was not announced in this connection's hello");
        return refuse(group, reason);
    }
    match hashes::chunk_hashes(
        ingest.data_dir(),
        ingest.catalog(),
        &group,
        volume,
        first_chunk,
        count,
    )
    .await
    {
        Ok(Ok(h)) => Control::HashReply {
            hashes: h.hex(),
            group,
            volume,
            seq: h.seq,
            first_chunk,
        },
        Ok(Err(reason)) => refuse(group, reason.0),
        Err(e) => {
            tracing::error!(%agent, group, volume, "could not hash chunks {first_chunk}.. of a volume: {e}");
            let reason = format!("the replica could not read the image of volume {volume}: {e}");
            refuse(group, reason)
        }
    }
}

/// Records the link of each group as up or down (down only if this connection still holds it).
async fn set_links(
    shared: &Arc<Shared>,
    group_ids: &[i64],
    conn: u64,
    up: bool,
    agent: &Fingerprint,
) {
    let changed = if up {
        shared.links.hold(group_ids, conn);
        group_ids.to_vec()
    } else {
        shared.links.release(group_ids, conn)
    };
    for gid in changed {
        if let Err(e) = shared
            .catalog
            .set_link(gid, up, &agent.to_string(), now_ns())
            .await
        {
            tracing::warn!(%agent, "could not record the agent link: {e}");
        }
    }
}

enum ReadBatchError {
    TooLong,
    Read(quinn::ReadError),
}

/// Reads a whole batch stream into one buffer, allocated once at the size its header
/// announces (`batch::announced_len`, which refuses more than `BATCH_BYTES_MAX`; `submit`
/// checks the rest, and refuses a batch whose announcement was refused). Unlike
/// `read_to_end`, the bytes are copied once and the buffer never grows by reallocation.
async fn read_batch(
    stream: &mut quinn::RecvStream,
) -> std::result::Result<Vec<u8>, ReadBatchError> {
    let mut buf: Vec<u8> = Vec::new();
    let mut sized = false;
    while let Some(chunk) = stream
        .read_chunk(usize::MAX, true)
        .await
        .map_err(ReadBatchError::Read)?
    {
        if buf.len() + chunk.bytes.len() > BATCH_BYTES_MAX {
            return Err(ReadBatchError::TooLong);
        }
        buf.extend_from_slice(&chunk.bytes);
        if !sized {
            match batch::announced_len(&buf) {
                Ok(announced) => {
                    sized = true;
                    buf.reserve_exact(announced.saturating_sub(buf.len()));
                }
                Err(batch::BatchError::Truncated(_)) => {}
                // Not sized: read on within the stream's bound, for `submit` to refuse.
                Err(_) => sized = true,
            }
        }
    }
    Ok(buf)
}
