//! The supervisor of `cdp-replica serve`: it alone knows what runs inside a serve, starts it
//! in order, and stops it in the reverse order under one `CancellationToken`.
//!
//! # Start, in order
//! 1. The data directory's serve lock (one serve per directory), its identity, the catalog
//!    (migrated).
//! 2. What a forget cut short is completed (its files deleted) and old forget requests are
//!    failed, before any group is opened.
//! 3. Ingest ([`IngestService`]): every group's journal recovered, its ingest task and its
//!    trimmer started. Ingest owns its groups' tasks: a group created by a Hello gets both at
//!    that moment, and a forget stops and starts them (each group has a child token).
//! 4. The services, on one `TaskTracker`: the verifier (it asks agents through
//!    [`AgentPorts`] and waits for durable heads on ingest's watch,
//!    [`IngestService::heads`]) and the forget service (the CLI's `forget_requests`).
//! 5. The QUIC shell ([`crate::server`]), which feeds ingest and registers agents' ports.
//!
//! # Stop, in reverse
//! The token is cancelled by [`ServerHandle::shutdown`], or by a fatal error of ingest or a
//! trimmer. Then: the shell stops accepting and closes its connections (they only wait on the
//! network); the services end (the verifier writes only catalog rows; a forget in progress
//! completes first, or its files are deleted at the next start); ingest stops (each group
//! finishes the commit or trim round it is in); the endpoint tells its peers; the agent links
//! are marked down and the catalog is closed; the serve lock is released last.

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;

use cdp_shared::identity::Fingerprint;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::agent_ports::{AgentPorts, Links};
use crate::catalog::{Catalog, ForgetRequestRow, OpenMode};
use crate::clock::now_ns;
use crate::datadir::{DataDir, ServeLock};
use crate::error::{Decided, ReplicaError, Result};
use crate::forget::{self, ForgetTarget};
use crate::ingest::{IngestOptions, IngestService};
use crate::server::{Shell, ShellParts};

/// Starts a serve.
pub struct Server;

/// A running serve: where it listens, and how to stop it.
pub struct ServerHandle {
    local_addr: SocketAddr,
    fingerprint: Fingerprint,
    token: CancellationToken,
    task: JoinHandle<Result<()>>,
}

impl ServerHandle {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The replica's certificate fingerprint (what agents pin).
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// A token that stops the serve when cancelled.
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Stops accepting, closes connections, lets group commits in progress finish, and
    /// returns the error that stopped ingest, if any.
    pub async fn shutdown(self) -> Result<()> {
        self.token.cancel();
        self.task.await?
    }

    /// Waits until the serve stops by itself (a fatal ingest error) or through its token.
    pub async fn wait(self) -> Result<()> {
        self.task.await?
    }
}

impl Server {
    /// Binds `listen` (UDP) and starts serving the data directory `root`.
    pub async fn start(root: &Path, listen: SocketAddr) -> Result<ServerHandle> {
        let socket = UdpSocket::bind(listen).map_err(|source| ReplicaError::Listen {
            addr: listen.to_string(),
            source,
        })?;
        Server::start_with_socket(root, socket).await
    }

    /// Serves `root` on an already-bound UDP socket (tests bind 127.0.0.1:0): steps 1–5 of
    /// the module docs.
    pub async fn start_with_socket(root: &Path, socket: UdpSocket) -> Result<ServerHandle> {
        // 1.
        let dir = DataDir::existing(root)?;
        let lock = ServeLock::acquire(&dir)?;
        let identity = dir.identity()?;
        let catalog = Catalog::open(&dir.catalog(), OpenMode::Migrate).await?;
        // 2.
        forget::complete_pending(&catalog, &dir).await?;
        match catalog
            .fail_unfinished_forgets("serve stopped before it carried the forget out", now_ns())
            .await
        {
            Err(e) if e.is_disk_full() => tracing::warn!("could not fail old forget requests: {e}"),
            other => other?,
        }
        // 3.
        let config = crate::datadir::load_config(&dir)?;
        let token = CancellationToken::new();
        let ingest = IngestService::start_with(
            &dir,
            catalog.clone(),
            token.clone(),
            IngestOptions::from_config(&config),
        )
        .await?;
        // 4.
        let ports = AgentPorts::new();
        let links = Links::new();
        let services = TaskTracker::new();
        let verifier = match crate::verifier::start(
            dir.clone(),
            catalog.clone(),
            ports.clone(),
            ingest.heads(),
            config.verifier,
            token.clone(),
        )
        .await
        {
            Ok(v) => v,
            Err(e) => {
                token.cancel();
                ingest.shutdown().await;
                catalog.close().await;
                return Err(e);
            }
        };
        services.spawn(async move {
            let _ = verifier.await;
        });
        services.spawn(forget_requests(ForgetService {
            ingest: ingest.clone(),
            catalog: catalog.clone(),
            links: links.clone(),
            token: token.clone(),
        }));
        services.close();
        // 5.
        let shell = Shell::bind(
            &identity,
            socket,
            ShellParts {
                ingest: ingest.clone(),
                catalog: catalog.clone(),
                ports,
                links,
                token: token.clone(),
            },
        );
        let shell = match shell {
            Ok(s) => s,
            Err(e) => {
                // Nothing was served: stop what started, in order.
                token.cancel();
                services.wait().await;
                ingest.shutdown().await;
                catalog.close().await;
                return Err(e);
            }
        };
        let local_addr = shell.local_addr();
        tracing::info!(listen = %local_addr, fingerprint = %identity.fingerprint(), "replica serving {}", dir.root().display());
        let task = tokio::spawn(supervise(shell, services, ingest, catalog, lock));
        Ok(ServerHandle {
            local_addr,
            fingerprint: identity.fingerprint(),
            token,
            task,
        })
    }
}

/// Runs the serve until its token is cancelled, then stops it in order (see the module docs).
async fn supervise(
    shell: Shell,
    services: TaskTracker,
    ingest: IngestService,
    catalog: Catalog,
    lock: ServeLock,
) -> Result<()> {
    shell.accept_until_cancelled().await;
    services.wait().await;
    ingest.shutdown().await;
    shell.linger().await;
    let reset = match catalog.reset_links(now_ns()).await {
        // The next start marks them down; a full disk must not make a clean stop fail.
        Err(e) if e.is_disk_full() => {
            tracing::warn!("could not mark the agent links down: {e}");
            Ok(())
        }
        other => other,
    };
    catalog.close().await;
    drop(lock);
    if let Some(e) = ingest.fatal_error() {
        return Err(ReplicaError::Ingest(e));
    }
    reset
}

/// What the forget service needs.
struct ForgetService {
    ingest: IngestService,
    catalog: Catalog,
    links: Links,
    token: CancellationToken,
}

/// Carries out the forgets the CLI asks for (`forget_requests`), one at a time, polling every
/// [`forget::FORGET_POLL_INTERVAL`] until the serve stops (see `forget`).
async fn forget_requests(svc: ForgetService) {
    let mut tick = tokio::time::interval(forget::FORGET_POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = svc.token.cancelled() => return,
            _ = tick.tick() => {}
        }
        let requests = match svc.catalog.requested_forgets().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("could not read the forget requests: {e}");
                continue;
            }
        };
        for r in requests {
            match svc
                .catalog
                .move_forget_request(r.id, "requested", "running", None, now_ns())
                .await
            {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    tracing::warn!("could not take a forget request: {e}");
                    continue;
                }
            }
            let (state, message) = match serve_forget(&svc, &r).await {
                Ok(Ok(msg)) => ("done", msg),
                Ok(Err(why)) => ("failed", why.0),
                Err(e) => {
                    tracing::error!("could not forget {} {}: {e}", r.kind, r.name);
                    ("failed", e.to_string())
                }
            };
            if let Err(e) = svc
                .catalog
                .move_forget_request(r.id, "running", state, Some(&message), now_ns())
                .await
            {
                tracing::warn!("could not record the outcome of a forget: {e}");
            }
        }
    }
}

/// One forget inside serve: refused while the group's agent holds its link; otherwise the
/// group's tasks are stopped around [`forget::execute`]. `Ok(Err)`: refused.
async fn serve_forget(svc: &ForgetService, r: &ForgetRequestRow) -> Decided<String> {
    let target = match r.kind.as_str() {
        "group" => ForgetTarget::Group(r.name.clone()),
        _ => ForgetTarget::Volume(r.name.clone()),
    };
    let dir = svc.ingest.data_dir().clone();
    let Some(plan) = forget::plan(&svc.catalog, &target).await? else {
        return Ok(Err(format!(
            "there is no {target} on this replica any more"
        )
        .into()));
    };
    let gid = plan.group.id;
    let name = plan.group.name.clone();
    match svc
        .ingest
        .begin_forget(&name, || {
            if svc.links.held(gid) {
                Err(forget::agent_connected(&plan, &dir))
            } else {
                Ok(())
            }
        })
        .await?
    {
        Ok(()) => {}
        Err(why) => return Ok(Err(why)),
    }
    let result = forget::execute(&svc.catalog, &dir, &plan).await;
    // With files left to delete the group stays refused until a forget completes them.
    let done = match svc.catalog.forget_files().await {
        Ok(left) => left.is_empty(),
        Err(_) => false,
    };
    svc.ingest.end_forget(&name, done).await?;
    match result {
        Ok(()) => {
            tracing::info!("forgot {target} (requested by cdp-replica forget)");
            Ok(Ok(format!("forgot {target}")))
        }
        Err(ReplicaError::Forget(why)) => Ok(Err(why.into())),
        Err(e) => Err(e),
    }
}
