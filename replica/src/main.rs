//! The `cdp-replica` command line: a thin layer over the library. Errors are printed as one
//! `error: ...` line on stderr with exit code 1; logs go to stderr (RUST_LOG, default info).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use cdp_replica::retention::{format_size, parse_duration, parse_size};
use cdp_replica::{
    AgentInfo, DiffReport, Endpoint, PointInfo, PointSpec, PointsFilter, ReplicaError, Retention,
    RetentionChange, StatusReport,
};
use cdp_shared::identity::Fingerprint;
use clap::{Parser, Subcommand};

/// cdp-replica: keeps target disks and journals of protected volumes, restores any point.
#[derive(Parser, Debug)]
#[command(name = "cdp-replica", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a new replica data directory and its identity; prints its fingerprint.
    Init {
        /// Data directory to create (or an empty one to fill).
        #[arg(long)]
        data: PathBuf,
        /// UDP address `serve` will listen on (written to replica.toml).
        #[arg(long, default_value = "127.0.0.1:7400")]
        listen: SocketAddr,
        /// Window of new groups: how far back points are kept, in agent time before the
        /// group's newest batch (30s, 15m, 24h, 7d; written to replica.toml).
        #[arg(long, default_value = "24h")]
        window: String,
        /// Journal cap of new groups (512MiB, 100GiB, 1TB), or `none` (written to
        /// replica.toml).
        #[arg(long, default_value = "none")]
        max_journal: String,
    },
    /// Show a group's retention, or change it (also while serving: applied within a second).
    Retention {
        /// Data directory of the replica.
        #[arg(long)]
        data: PathBuf,
        /// Name of the consistency group.
        #[arg(long)]
        group: String,
        /// New window: how far back points are kept, in agent time before the group's newest
        /// batch (30s, 15m, 24h, 7d).
        #[arg(long)]
        window: Option<String>,
        /// New journal cap (512MiB, 100GiB, 1TB), or `none` for no cap.
        #[arg(long)]
        max_journal: Option<String>,
        /// Apply the change even when it drops points from the window (without it, such a
        /// change is refused with what it would drop, and nothing changes).
        #[arg(long)]
        yes: bool,
    },
    /// Print the replica's certificate fingerprint (what agents pin).
    Fingerprint {
        /// Data directory of the replica.
        #[arg(long)]
        data: PathBuf,
    },
    /// Allow an agent to connect (takes effect at once, also while serving).
    Authorize {
        /// Data directory of the replica.
        #[arg(long)]
        data: PathBuf,
        /// The agent's certificate fingerprint (64 hex characters, from `cdp-agent init`).
        #[arg(long)]
        agent: String,
        /// A name for the agent, for people.
        #[arg(long, default_value = "")]
        name: String,
    },
    /// Remove an agent from the authorized list (takes effect at once: a running serve closes
    /// its connections within a second and refuses it from then on). Its groups stay.
    Deauthorize {
        /// Data directory of the replica.
        #[arg(long)]
        data: PathBuf,
        /// The agent: its fingerprint (64 hex characters) or the name given at `authorize`.
        #[arg(long)]
        agent: String,
    },
    /// List the authorized agents: name, fingerprint, when serve last had a connection from
    /// each, and the groups each protects.
    Agents {
        /// Data directory of the replica.
        #[arg(long)]
        data: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Delete a group (or one volume) with its journal, target files, points and catalog
    /// rows. Without --yes it only says what it would delete (and exits 1).
    Forget {
        /// Data directory of the replica.
        #[arg(long)]
        data: PathBuf,
        /// The volume to forget (its whole group when it is the group's only volume).
        #[arg(long, conflicts_with = "group", required_unless_present = "group")]
        volume: Option<String>,
        /// The group to forget, with every volume of it.
        #[arg(long)]
        group: Option<String>,
        /// Delete it. Without this flag nothing is deleted.
        #[arg(long)]
        yes: bool,
    },
    /// Receive batches from agents until interrupted (Ctrl-C or SIGTERM).
    Serve {
        /// Data directory of the replica.
        #[arg(long)]
        data: PathBuf,
        /// UDP address to listen on (default: the one in replica.toml).
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Show every volume: state, size, window and journal size.
    Status {
        /// Data directory of the replica.
        #[arg(long)]
        data: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List the recovery points of a volume.
    Points {
        /// Data directory of the replica.
        #[arg(long)]
        data: PathBuf,
        /// Name of the volume.
        #[arg(long)]
        volume: String,
        /// Only resolve this point (`latest`, `seq:N`, `bookmark:NAME` or an RFC 3339 time)
        /// and print the one `restore --at` would choose.
        #[arg(long, conflicts_with_all = ["since", "until", "limit", "bookmarks"])]
        at: Option<String>,
        /// Only points whose agent time is at or after this: an RFC 3339 time, or a duration
        /// ago (30m, 24h, 7d).
        #[arg(long)]
        since: Option<String>,
        /// Only points whose agent time is at or before this: an RFC 3339 time, or a duration
        /// ago (30m, 24h, 7d).
        #[arg(long)]
        until: Option<String>,
        /// At most this many points, newest first.
        #[arg(long)]
        limit: Option<u64>,
        /// Only points that carry a bookmark.
        #[arg(long)]
        bookmarks: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Write the image of a volume at a point to a new file or a block device.
    Restore {
        /// Data directory of the replica.
        #[arg(long)]
        data: PathBuf,
        /// Name of the volume.
        #[arg(long)]
        volume: String,
        /// The point: `latest`, `seq:N`, `bookmark:NAME` or an RFC 3339 time.
        #[arg(long)]
        at: String,
        /// Output: a path that does not exist yet, or a block device (written in place).
        #[arg(long)]
        out: PathBuf,
    },
    /// Serve the image of a volume at a point over NBD until interrupted (Ctrl-C or SIGTERM).
    /// Ready at once however long the journal; the point is pinned while it runs.
    Export {
        /// Data directory of the replica.
        #[arg(long)]
        data: PathBuf,
        /// Name of the volume (also the NBD export name).
        #[arg(long)]
        volume: String,
        /// The point: `latest`, `seq:N`, `bookmark:NAME` or an RFC 3339 time.
        #[arg(long)]
        at: String,
        /// Unix socket to serve on (default: DIR/export-VOLUME.sock).
        #[arg(long, conflicts_with = "listen")]
        socket: Option<PathBuf>,
        /// TCP address to serve on instead of a Unix socket (port 0: any free port).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Accept writes into a copy-on-write overlay that is thrown away when the export
        /// stops (the journal and the target disk are never written).
        #[arg(long)]
        writable: bool,
    },
    /// Make the image of a volume at a point the live volume, served read-write over NBD until
    /// interrupted (Ctrl-C or SIGTERM); the volume's agent is refused meanwhile. End it with
    /// --undo (everything as before) or --commit (the volume continues from the failover).
    Failover {
        /// Data directory of the replica.
        #[arg(long)]
        data: PathBuf,
        /// Name of the volume (also the NBD export name).
        #[arg(long)]
        volume: String,
        /// The point: `latest`, `seq:N`, `bookmark:NAME` or an RFC 3339 time. Without it, the
        /// active failover of the volume is served again (its writes kept).
        #[arg(long, conflicts_with_all = ["undo", "commit"])]
        at: Option<String>,
        /// Unix socket to serve on (default: DIR/failover-VOLUME.sock).
        #[arg(long, conflicts_with_all = ["listen", "undo", "commit"])]
        socket: Option<PathBuf>,
        /// TCP address to serve on instead of a Unix socket (port 0: any free port).
        #[arg(long, conflicts_with_all = ["undo", "commit"])]
        listen: Option<SocketAddr>,
        /// End the failover: discard its writes; the journal and every point are as before,
        /// and the agent is accepted again.
        #[arg(long, conflicts_with = "commit")]
        undo: bool,
        /// End the failover for good: the volume continues from the failover point and the
        /// writes made through it; the points after it are dropped. `serve` must be stopped.
        #[arg(long)]
        commit: bool,
    },
    /// Verify the replica against the agents' devices: on demand, report, repair.
    Verify {
        #[command(subcommand)]
        command: VerifyCommand,
    },
    /// List the extents (1 MiB chunks, adjacent ones merged) whose bytes differ between two
    /// points of a volume.
    Diff {
        /// Data directory of the replica.
        #[arg(long)]
        data: PathBuf,
        /// Name of the volume.
        #[arg(long)]
        volume: String,
        /// One point: `latest`, `seq:N`, `bookmark:NAME` or an RFC 3339 time.
        #[arg(long)]
        from: String,
        /// The other point (same syntax).
        #[arg(long)]
        to: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum VerifyCommand {
    /// Verify chunks now, through the running serve (which asks the agent), and wait for the
    /// result: a sample of recently written chunks, or every chunk with --full.
    Run {
        /// Data directory of the replica.
        #[arg(long)]
        data: PathBuf,
        /// Name of the volume (default: every protecting volume).
        #[arg(long)]
        volume: Option<String>,
        /// Check every chunk of the volume, each at its own seq.
        #[arg(long)]
        full: bool,
        /// Chunks per second at most (default: as fast as 4 checks at once allow).
        #[arg(long)]
        rate: Option<f64>,
        /// Stop the run if it has not ended within this long (30s, 5m, 2h): serve stops it
        /// (the chunks checked so far keep their results) and the command fails. Default: wait
        /// until it ends.
        #[arg(long)]
        timeout: Option<String>,
    },
    /// Per volume: chunks verified and mismatches in a period, coverage of the last 24 h, the
    /// last full pass, and every mismatch in detail.
    Report {
        /// Data directory of the replica.
        #[arg(long)]
        data: PathBuf,
        /// Name of the volume (default: every volume).
        #[arg(long)]
        volume: Option<String>,
        /// Start of the period: an RFC 3339 time, or a duration ago (30m, 24h, 7d); default 24h.
        #[arg(long)]
        since: Option<String>,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Resend the volume's mismatched chunks from the agent (through the running serve), verify
    /// them again, and wait for the outcome.
    Repair {
        /// Data directory of the replica.
        #[arg(long)]
        data: PathBuf,
        /// Name of the volume.
        #[arg(long)]
        volume: String,
        /// How long to wait for the outcome (30s, 5m); serve goes on after it.
        #[arg(long, default_value = "300s")]
        timeout: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: could not start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    #[error("{0}")]
    Usage(String),
}

async fn run(command: Command) -> Result<(), CliError> {
    match command {
        Command::Init {
            data,
            listen,
            window,
            max_journal,
        } => {
            let retention = Retention {
                window: parse_duration(&window).map_err(CliError::Usage)?,
                journal_bytes_max: parse_size(&max_journal).map_err(CliError::Usage)?,
            };
            let fp = cdp_replica::init_with(&data, listen, &retention).await?;
            println!("fingerprint: {fp}");
        }
        Command::Retention {
            data,
            group,
            window,
            max_journal,
            yes,
        } => {
            let change = RetentionChange {
                window: window
                    .as_deref()
                    .map(parse_duration)
                    .transpose()
                    .map_err(CliError::Usage)?,
                journal_bytes_max: max_journal
                    .as_deref()
                    .map(parse_size)
                    .transpose()
                    .map_err(CliError::Usage)?,
            };
            let (r, dropped) =
                cdp_replica::set_retention_checked(&data, &group, &change, yes).await?;
            println!("group {group}: {r}");
            if let Some(d) = dropped {
                println!(
                    "the trimmer drops {d} from the window (within a second while serve runs, or when it next starts; a reader's pin holds its point until it ends)"
                );
            }
        }
        Command::Fingerprint { data } => println!("{}", cdp_replica::fingerprint(&data)?),
        Command::Authorize { data, agent, name } => {
            let fp: Fingerprint = agent.parse().map_err(|e| CliError::Usage(format!("{e}")))?;
            if cdp_replica::authorize(&data, fp, &name)? {
                println!("authorized agent {fp}");
            } else {
                println!("agent {fp} was already authorized");
            }
        }
        Command::Deauthorize { data, agent } => {
            let a = cdp_replica::deauthorize(&data, &agent)?;
            println!(
                "deauthorized agent {}{}: a running serve closes its connections within a second and refuses it from now on; its groups stay on the replica (`cdp-replica forget --group NAME` removes one)",
                a.fingerprint,
                if a.name.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", a.name)
                }
            );
        }
        Command::Forget {
            data,
            volume,
            group,
            yes,
        } => {
            use cdp_replica::forget::{ForgetOutcome, ForgetTarget};
            let target = match (volume, group) {
                (Some(v), _) => ForgetTarget::Volume(v),
                (None, Some(g)) => ForgetTarget::Group(g),
                (None, None) => {
                    return Err(CliError::Usage(
                        "name what to forget: --volume NAME or --group NAME".into(),
                    ));
                }
            };
            match cdp_replica::forget::forget(&data, &target, yes).await? {
                ForgetOutcome::WouldDelete(r) => {
                    println!("forget would delete {r}");
                    return Err(CliError::Usage(format!(
                        "nothing was deleted ({} would be freed): run the command again with --yes to delete it",
                        cdp_shared::types::human_bytes(r.bytes())
                    )));
                }
                ForgetOutcome::Forgot(r) => {
                    println!("forgot {r}");
                    println!(
                        "{} freed; if its agent connects again, it is new to the replica and gets a fresh initial sync",
                        cdp_shared::types::human_bytes(r.bytes())
                    );
                }
                ForgetOutcome::AlreadyForgotten { target, at_ns } => println!(
                    "{target} was already forgotten ({})",
                    chrono::DateTime::from_timestamp_nanos(at_ns)
                        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                ),
            }
        }
        Command::Agents { data, json } => {
            let list = cdp_replica::agents(&data).await?;
            if json {
                println!("{}", to_json(&list)?);
            } else {
                print_agents(&list);
            }
        }
        Command::Serve { data, listen } => {
            let listen = match listen {
                Some(l) => l,
                None => cdp_replica::configured_listen(&data)?,
            };
            let handle = cdp_replica::Server::start(&data, listen).await?;
            println!(
                "listening on {} (fingerprint {})",
                handle.local_addr(),
                handle.fingerprint()
            );
            let token = handle.token();
            tokio::spawn(async move {
                wait_for_signal().await;
                tracing::info!("stopping");
                token.cancel();
            });
            handle.wait().await?;
        }
        Command::Status { data, json } => {
            let report = cdp_replica::status(&data).await?;
            if json {
                println!("{}", to_json(&report)?);
            } else {
                print_status(&report);
            }
        }
        Command::Points {
            data,
            volume,
            at: Some(at),
            json,
            ..
        } => {
            let at: PointSpec = at.parse().map_err(|e| CliError::Usage(format!("{e}")))?;
            let point = cdp_replica::resolve_point(&data, &volume, &at).await?;
            if json {
                println!("{}", to_json(&point)?);
            } else {
                println!("{point}");
            }
        }
        Command::Points {
            data,
            volume,
            at: None,
            since,
            until,
            limit,
            bookmarks,
            json,
        } => {
            if limit == Some(0) {
                return Err(CliError::Usage(
                    "--limit 0 would list nothing: give at least 1".into(),
                ));
            }
            let filter = PointsFilter {
                since_ns: since
                    .as_deref()
                    .map(|s| parse_time("--since", s))
                    .transpose()?,
                until_ns: until
                    .as_deref()
                    .map(|s| parse_time("--until", s))
                    .transpose()?,
                bookmarks_only: bookmarks,
                limit,
                newest_first: limit.is_some(),
            };
            let points = cdp_replica::points_filtered(&data, &volume, &filter).await?;
            if json {
                println!("{}", to_json(&points)?);
            } else {
                print_points(&points, filter != PointsFilter::default());
            }
        }
        Command::Restore {
            data,
            volume,
            at,
            out,
        } => {
            let at: PointSpec = at.parse().map_err(|e| CliError::Usage(format!("{e}")))?;
            let s = cdp_replica::restore(&data, &volume, &at, &out).await?;
            println!(
                "restored volume {} at {} to {}: {}, {} journal records read",
                s.volume,
                s.point,
                s.out.display(),
                cdp_shared::types::human_bytes(s.bytes),
                s.records_applied
            );
        }
        Command::Export {
            data,
            volume,
            at,
            socket,
            listen,
            writable,
        } => {
            let at: PointSpec = at.parse().map_err(|e| CliError::Usage(format!("{e}")))?;
            let endpoint = match (socket, listen) {
                (_, Some(addr)) => Some(Endpoint::Tcp(addr)),
                (Some(path), None) => Some(Endpoint::Unix(path)),
                (None, None) => None,
            };
            let handle =
                cdp_replica::export::start(&data, &volume, &at, endpoint, writable).await?;
            let info = handle.info();
            if !info.point.consistent {
                tracing::warn!(
                    volume,
                    "seq {} is not a crash-consistent point (it lies inside a sync); exporting it because it was asked for",
                    info.point.seq
                );
            }
            println!("{info}");
            let token = handle.token();
            tokio::spawn(async move {
                wait_for_signal().await;
                tracing::info!("stopping the export");
                token.cancel();
            });
            handle.wait().await?;
        }
        Command::Failover {
            data,
            volume,
            undo: true,
            ..
        } => {
            let seq = cdp_replica::failover::undo(&data, &volume).await?;
            println!(
                "failover of volume {volume} at seq {seq} undone: its writes are discarded, the journal and every point are as before, and the agent is accepted again"
            );
        }
        Command::Failover {
            data,
            volume,
            commit: true,
            ..
        } => {
            let s = cdp_replica::failover::commit(&data, &volume).await?;
            println!(
                "failover of volume {volume} at seq {} committed: the volume continues from it ({} written through the failover); {} batch rows and {} journal segments removed; the agent stays refused (failback is not built yet)",
                s.seq,
                cdp_shared::types::human_bytes(s.overlay_bytes),
                s.batches_removed,
                s.segments_removed
            );
        }
        Command::Failover {
            data,
            volume,
            at,
            socket,
            listen,
            ..
        } => {
            let at: Option<PointSpec> = at
                .map(|a| a.parse().map_err(|e| CliError::Usage(format!("{e}"))))
                .transpose()?;
            let endpoint = match (socket, listen) {
                (_, Some(addr)) => Some(Endpoint::Tcp(addr)),
                (Some(path), None) => Some(Endpoint::Unix(path)),
                (None, None) => None,
            };
            // Signals are caught from before the line is printed: a SIGTERM right after it
            // stops serving cleanly (the overlay synced once more).
            let stop = signal_waiter();
            let handle =
                cdp_replica::failover::start(&data, &volume, at.as_ref(), endpoint).await?;
            let info = handle.info();
            if !info.point.consistent {
                tracing::warn!(
                    volume,
                    "seq {} is not a crash-consistent point (it lies inside a sync); failing over to it because it was asked for",
                    info.point.seq
                );
            }
            println!("{info}");
            let token = handle.token();
            tokio::spawn(async move {
                stop.await;
                tracing::info!("stopping serving the failover (it stays until --undo or --commit)");
                token.cancel();
            });
            handle.wait().await?;
        }
        Command::Verify { command } => verify(command).await?,
        Command::Diff {
            data,
            volume,
            from,
            to,
            json,
        } => {
            let parse = |p: &str| -> Result<PointSpec, CliError> {
                p.parse().map_err(|e| CliError::Usage(format!("{e}")))
            };
            let (from, to) = (parse(&from)?, parse(&to)?);
            let report = cdp_replica::diff(&data, &volume, &from, &to).await?;
            if json {
                println!("{}", to_json(&report)?);
            } else {
                print_diff(&report);
            }
        }
    }
    Ok(())
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<String, CliError> {
    serde_json::to_string_pretty(value)
        .map_err(|e| CliError::Usage(format!("could not render JSON: {e}")))
}

/// A future that completes at SIGINT or SIGTERM, both caught from the moment it is made.
fn signal_waiter() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => wait_for_signal().await,
        }
    }
}

async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Prints rows with each column padded to its widest cell.
fn print_table(rows: &[Vec<String>]) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, cell)| format!("{cell:<w$}", w = widths[i]))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}

fn print_agents(list: &[AgentInfo]) {
    if list.is_empty() {
        println!(
            "no authorized agents: authorize one with `cdp-replica authorize --agent FINGERPRINT --name NAME`"
        );
        return;
    }
    let mut rows = vec![
        ["NAME", "FINGERPRINT", "LAST SEEN", "CONNECTED", "GROUPS"]
            .map(String::from)
            .to_vec(),
    ];
    for a in list {
        rows.push(vec![
            if a.name.is_empty() {
                "-".into()
            } else {
                a.name.clone()
            },
            a.fingerprint.clone(),
            a.last_seen
                .as_deref()
                .map(human_time)
                .unwrap_or_else(|| "never".into()),
            if a.connected { "yes" } else { "no" }.into(),
            if a.groups.is_empty() {
                "-".into()
            } else {
                a.groups.join(", ")
            },
        ]);
    }
    print_table(&rows);
}

fn print_status(report: &StatusReport) {
    println!("serving: {}", if report.serving { "yes" } else { "no" });
    if report.volumes.is_empty() {
        println!("no volumes yet: authorize an agent and let it connect");
        return;
    }
    let point = |p: &Option<cdp_replica::PointRef>| match p {
        Some(p) => format!(
            "{} {}",
            p.seq,
            p.time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        ),
        None => "-".into(),
    };
    let mut rows = vec![
        [
            "GROUP",
            "VOLUME",
            "STATE",
            "SIZE",
            "WINDOW FIRST",
            "WINDOW LAST",
            "JOURNAL",
            "HEAD",
            "RETENTION",
            "PINS",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for v in &report.volumes {
        rows.push(vec![
            v.group.clone(),
            v.volume.clone(),
            v.state.clone(),
            cdp_shared::types::human_bytes(v.size),
            point(&v.window_first),
            point(&v.window_last),
            cdp_shared::types::human_bytes(v.journal_bytes),
            v.head_seq.to_string(),
            match v.retention.max_journal_bytes {
                Some(cap) => format!("{}, cap {}", v.retention.window, format_size(cap)),
                None => v.retention.window.clone(),
            },
            match v.pins.oldest_seq {
                Some(seq) => format!("{} (oldest {seq})", v.pins.count),
                None => "0".into(),
            },
        ]);
    }
    print_table(&rows);
    for v in &report.volumes {
        if let Some(d) = &v.degraded {
            println!("volume {}: DEGRADED: {}", v.volume, d.reason);
        }
        if let Some(w) = &v.window_short {
            println!("volume {}: WINDOW SHORT: {}", v.volume, w.reason);
        }
    }
    let mut told = std::collections::HashSet::new();
    for v in &report.volumes {
        if let Some(reason) = &v.ingest_reason
            && told.insert(&v.group)
        {
            println!(
                "group {}: ingest PAUSED since {}: {reason}",
                v.group,
                v.paused_since.as_deref().unwrap_or("?")
            );
        }
    }
}

fn print_points(points: &[PointInfo], filtered: bool) {
    if points.is_empty() {
        if filtered {
            println!("no recovery point matches (`points` without filters lists the window)");
        } else {
            println!("no recovery points yet (the volume's initial sync has not completed)");
        }
        return;
    }
    let mut rows = vec![
        [
            "SEQ",
            "TIME",
            "RECEIVED",
            "CONSISTENT",
            "FLUSH",
            "RECORDS",
            "BOOKMARK",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for p in points {
        rows.push(vec![
            p.seq.to_string(),
            p.time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            p.received
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            if p.consistent { "yes" } else { "no" }.into(),
            if p.flush { "yes" } else { "no" }.into(),
            p.records.to_string(),
            p.bookmark.clone().unwrap_or_default(),
        ]);
    }
    print_table(&rows);
}

fn print_diff(report: &DiffReport) {
    println!(
        "volume {} from {} to {}",
        report.volume, report.from, report.to
    );
    if !report.extents.is_empty() {
        let mut rows = vec![["OFFSET", "LENGTH", "SIZE"].map(String::from).to_vec()];
        for e in &report.extents {
            rows.push(vec![
                e.offset.to_string(),
                e.length.to_string(),
                cdp_shared::types::human_bytes(e.length),
            ]);
        }
        print_table(&rows);
    }
    println!(
        "{} extent{}, {} bytes differ ({})",
        report.extents.len(),
        if report.extents.len() == 1 { "" } else { "s" },
        report.bytes,
        cdp_shared::types::human_bytes(report.bytes)
    );
}

async fn verify(command: VerifyCommand) -> Result<(), CliError> {
    match command {
        VerifyCommand::Run {
            data,
            volume,
            full,
            rate,
            timeout,
        } => {
            let timeout = timeout
                .map(|t| parse_duration(&t))
                .transpose()
                .map_err(|e| CliError::Usage(format!("--timeout: {e}")))?;
            if let Some(r) = rate
                && !(r > 0.0 && r <= 1e6)
            {
                return Err(CliError::Usage(format!(
                    "--rate {r} is not a number of chunks per second above 0"
                )));
            }
            let bar = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
                let b = indicatif::ProgressBar::new(0);
                b.set_style(
                    indicatif::ProgressStyle::with_template(
                        "verifying {bar:40} {pos}/{len} chunks, {msg} ({elapsed})",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                b
            });
            let mut told_waiting = false;
            let summary = cdp_replica::verifier::run(&data, volume.as_deref(), full, rate, timeout, |p| {
                if p.waiting_for_agent && !told_waiting {
                    told_waiting = true;
                    let note = "waiting for the agent to connect: the verification goes on when it does (Ctrl-C to stop waiting; serve keeps the run)";
                    match &bar {
                        Some(b) => b.println(note),
                        None => eprintln!("{note}"),
                    }
                }
                if let Some(b) = &bar {
                    b.set_length(p.chunks_total);
                    b.set_position(p.chunks_done);
                    b.set_message(format!("{} mismatches", p.mismatches));
                }
            })
            .await;
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            let summary = summary?;
            let mut failed = Vec::new();
            let mut mismatches = 0;
            for v in &summary.volumes {
                mismatches += v.mismatches;
                let skipped = if v.skipped > 0 {
                    format!(", {} skipped or timed out", v.skipped)
                } else {
                    String::new()
                };
                match &v.error {
                    Some(e) => {
                        println!("volume {}: verification failed: {e}", v.volume);
                        failed.push(v.volume.clone());
                    }
                    None => println!(
                        "volume {}: verified {} of {} chunks{}: {} mismatch{}{skipped}",
                        v.volume,
                        v.chunks_done,
                        v.chunks_total,
                        if full { " (full pass)" } else { "" },
                        v.mismatches,
                        if v.mismatches == 1 { "" } else { "es" },
                    ),
                }
            }
            if !failed.is_empty() {
                return Err(CliError::Usage(format!(
                    "the verification of {} failed (see above)",
                    failed.join(", ")
                )));
            }
            if mismatches > 0 {
                return Err(CliError::Usage(format!(
                    "the verification found {mismatches} chunk{} that differ from the agent's device: see `cdp-replica verify report` and repair with `cdp-replica verify repair --volume NAME`",
                    if mismatches == 1 { "" } else { "s" }
                )));
            }
        }
        VerifyCommand::Report {
            data,
            volume,
            since,
            json,
        } => {
            let since_ns = match since.as_deref() {
                None => None,
                Some(s) => Some(parse_time("--since", s)?),
            };
            let report = cdp_replica::verifier::report(&data, volume.as_deref(), since_ns).await?;
            if json {
                println!("{}", to_json(&report)?);
            } else {
                print_verify_report(&report);
            }
        }
        VerifyCommand::Repair {
            data,
            volume,
            timeout,
        } => {
            let timeout =
                parse_duration(&timeout).map_err(|e| CliError::Usage(format!("--timeout: {e}")))?;
            let msg = cdp_replica::verifier::repair(&data, &volume, timeout).await?;
            println!("{msg}");
        }
    }
    Ok(())
}

/// A time flag (`--since`, `--until`): an RFC 3339 time, or a duration before now.
fn parse_time(flag: &str, s: &str) -> Result<i64, CliError> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return t
            .timestamp_nanos_opt()
            .ok_or_else(|| CliError::Usage(format!("{flag} {s}: the time is out of range")));
    }
    let ago = parse_duration(s).map_err(|_| {
        CliError::Usage(format!(
            "{flag} {s:?} is neither an RFC 3339 time (2024-05-01T12:00:00Z) nor a duration ago (30m, 24h, 7d)"
        ))
    })?;
    Ok(cdp_replica::now_ns() - i64::try_from(ago.as_nanos()).unwrap_or(i64::MAX))
}

/// A time for people: `2024-05-01 12:00:00Z (3 min ago)`.
fn human_time(rfc: &str) -> String {
    let Ok(t) = chrono::DateTime::parse_from_rfc3339(rfc) else {
        return rfc.to_owned();
    };
    let t = t.with_timezone(&chrono::Utc);
    let age = (chrono::Utc::now() - t).num_seconds().max(0);
    let ago = match age {
        0..60 => format!("{age} s ago"),
        60..3600 => format!("{} min ago", age / 60),
        3600..86400 => format!("{:.1} h ago", age as f64 / 3600.0),
        _ => format!("{:.1} d ago", age as f64 / 86400.0),
    };
    format!("{} ({ago})", t.format("%Y-%m-%d %H:%M:%SZ"))
}

fn print_verify_report(report: &cdp_replica::verifier::VerifyReport) {
    println!(
        "verification since {} (coverage over the last 24 h)",
        human_time(&report.since)
    );
    if report.volumes.is_empty() {
        println!("no volumes yet");
        return;
    }
    let mut rows = vec![
        [
            "VOLUME",
            "GROUP",
            "SIZE",
            "CHECKS",
            "CHUNKS",
            "MISMATCHES",
            "SKIPPED",
            "COVERAGE 24H",
            "LAST CHECK",
            "LAST FULL PASS",
            "OPEN",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for v in &report.volumes {
        rows.push(vec![
            v.volume.clone(),
            v.group.clone(),
            cdp_shared::types::human_bytes(v.size),
            v.checks.total.to_string(),
            v.checks.chunks.to_string(),
            v.checks.mismatch.to_string(),
            (v.checks.skipped + v.checks.timeout).to_string(),
            format!(
                "{:.1} % ({}/{})",
                v.coverage.share * 100.0,
                v.coverage.chunks,
                v.coverage.of
            ),
            v.last_check
                .as_deref()
                .map(human_time)
                .unwrap_or("-".into()),
            v.last_full_pass
                .as_deref()
                .map(human_time)
                .unwrap_or("never".into()),
            v.open_mismatches.to_string(),
        ]);
    }
    print_table(&rows);
    for v in &report.volumes {
        for m in &v.mismatches {
            println!();
            println!(
                "mismatch: volume {} chunk {} (bytes {}..{}, {}) at seq {}, found {}: {}",
                v.volume,
                m.chunk,
                m.offset,
                m.offset + m.length,
                cdp_shared::types::human_bytes(m.length),
                m.seq,
                human_time(&m.found),
                match &m.repaired {
                    Some(r) =>
                        format!("repaired {} (good from seq {})", human_time(&r.time), r.seq),
                    None => "OPEN".into(),
                }
            );
            print_table(&[
                vec!["  reason".into(), m.reason.clone()],
                vec!["  agent hash".into(), m.agent_hash.clone()],
                vec![
                    "  replica hash".into(),
                    m.replica_hash.clone().unwrap_or("- (not readable)".into()),
                ],
                vec![
                    "  suspect points".into(),
                    format!(
                        "seq {} {}; most likely from seq {}",
                        m.suspect_points.from_seq,
                        match m.suspect_points.before_seq {
                            Some(s) => format!("to {} (repaired at seq {s})", s.saturating_sub(1)),
                            None => "to the head (not repaired)".into(),
                        },
                        m.suspect_points.likely_from_seq
                    ),
                ],
            ]);
        }
    }
}
