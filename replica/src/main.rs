//! The `cdp-replica` command line: a thin layer over the library. Errors are printed as one
//! `error: ...` line on stderr with exit code 1; logs go to stderr (RUST_LOG, default info).

mod cli;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

use crate::cli::{CliError, admin, recover, serve, verify};

/// cdp-replica: keeps target disks and journals of protected volumes, restores any point.
#[derive(Parser, Debug)]
#[command(name = "cdp-replica", version, about)]
struct Cli {
    /// Log lines as text (the default) or as JSON objects, one per line (on standard error).
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: cdp_shared::logging::LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// Where `--data` points unless given (or set by `CDP_REPLICA_DATA`).
const DATA_DEFAULT: &str = "/var/lib/cdp-replica";

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a new replica data directory and its identity; prints its fingerprint.
    Init {
        /// Data directory to create (or an empty one to fill).
        #[arg(long, env = "CDP_REPLICA_DATA", default_value = DATA_DEFAULT)]
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
        #[arg(long, env = "CDP_REPLICA_DATA", default_value = DATA_DEFAULT)]
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
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print the replica's certificate fingerprint (what agents pin).
    Fingerprint {
        /// Data directory of the replica.
        #[arg(long, env = "CDP_REPLICA_DATA", default_value = DATA_DEFAULT)]
        data: PathBuf,
    },
    /// Allow an agent to connect (takes effect at once, also while serving).
    Authorize {
        /// Data directory of the replica.
        #[arg(long, env = "CDP_REPLICA_DATA", default_value = DATA_DEFAULT)]
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
        #[arg(long, env = "CDP_REPLICA_DATA", default_value = DATA_DEFAULT)]
        data: PathBuf,
        /// The agent: its fingerprint (64 hex characters) or the name given at `authorize`.
        #[arg(long)]
        agent: String,
    },
    /// List the authorized agents: name, fingerprint, when serve last had a connection from
    /// each, and the groups each protects.
    Agents {
        /// Data directory of the replica.
        #[arg(long, env = "CDP_REPLICA_DATA", default_value = DATA_DEFAULT)]
        data: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Delete a group (or one volume) with its journal, target files, points and catalog
    /// rows. Without --yes it only says what it would delete (and exits 1).
    Forget {
        /// Data directory of the replica.
        #[arg(long, env = "CDP_REPLICA_DATA", default_value = DATA_DEFAULT)]
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
        #[arg(long, env = "CDP_REPLICA_DATA", default_value = DATA_DEFAULT)]
        data: PathBuf,
        /// UDP address to listen on (default: the one in replica.toml).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Serve Prometheus metrics at http://ADDR/metrics and the read-only web console at
        /// http://ADDR/ (over `http` in replica.toml; bind a loopback address, or put a
        /// reverse proxy with authentication in front).
        #[arg(long, value_name = "ADDR")]
        http: Option<SocketAddr>,
    },
    /// Write the man pages and shell completions into DIR (what `make install` installs).
    #[command(hide = true)]
    Generate {
        #[arg(long)]
        out: PathBuf,
    },
    /// Show every volume: state, size, window and journal size.
    Status {
        /// Data directory of the replica.
        #[arg(long, env = "CDP_REPLICA_DATA", default_value = DATA_DEFAULT)]
        data: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List the recovery points of a volume.
    Points {
        /// Data directory of the replica.
        #[arg(long, env = "CDP_REPLICA_DATA", default_value = DATA_DEFAULT)]
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
        #[arg(long, env = "CDP_REPLICA_DATA", default_value = DATA_DEFAULT)]
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
        #[arg(long, env = "CDP_REPLICA_DATA", default_value = DATA_DEFAULT)]
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
    /// Make the image of a consistency group at a point its live volumes, each served
    /// read-write as its own NBD export until interrupted (Ctrl-C or SIGTERM); the group is
    /// refused to its agent meanwhile (the agent's other groups replicate as usual). End it
    /// with --undo (everything as before) or --commit (the group continues from the failover).
    Failover {
        /// Data directory of the replica.
        #[arg(long, env = "CDP_REPLICA_DATA", default_value = DATA_DEFAULT)]
        data: PathBuf,
        /// Name of the volume of a group of one (also the NBD export name).
        #[arg(long, required_unless_present = "group", conflicts_with = "group")]
        volume: Option<String>,
        /// Name of the consistency group: every volume fails over at the same point, each
        /// exported under its own name.
        #[arg(long)]
        group: Option<String>,
        /// The point: `latest`, `seq:N`, `bookmark:NAME` or an RFC 3339 time. Without it, the
        /// active failover of the volume is served again (its writes kept).
        #[arg(long, conflicts_with_all = ["undo", "commit"])]
        at: Option<String>,
        /// Unix socket to serve on (default: DIR/failover-VOLUME.sock for a group of one
        /// volume, DIR/failover-GROUP.sock for a larger group).
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
        #[arg(long, env = "CDP_REPLICA_DATA", default_value = DATA_DEFAULT)]
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
        #[arg(long, env = "CDP_REPLICA_DATA", default_value = DATA_DEFAULT)]
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
        #[arg(long, env = "CDP_REPLICA_DATA", default_value = DATA_DEFAULT)]
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
        #[arg(long, env = "CDP_REPLICA_DATA", default_value = DATA_DEFAULT)]
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
    cdp_shared::logging::init(cli.log_format);
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

async fn run(command: Command) -> Result<(), CliError> {
    match command {
        Command::Init {
            data,
            listen,
            window,
            max_journal,
        } => admin::init(data, listen, window, max_journal).await,
        Command::Retention {
            data,
            group,
            window,
            max_journal,
            yes,
            json,
        } => admin::retention(data, group, window, max_journal, yes, json).await,
        Command::Fingerprint { data } => admin::fingerprint(data),
        Command::Authorize { data, agent, name } => admin::authorize(data, agent, name),
        Command::Deauthorize { data, agent } => admin::deauthorize(data, agent),
        Command::Forget {
            data,
            volume,
            group,
            yes,
        } => admin::forget(data, volume, group, yes).await,
        Command::Agents { data, json } => admin::agents(data, json).await,
        Command::Serve { data, listen, http } => serve::serve(data, listen, http).await,
        Command::Status { data, json } => admin::status(data, json).await,
        Command::Generate { out } => {
            cdp_shared::packaging::generate(Cli::command(), &out).map_err(|e| {
                CliError::msg(format!(
                    "could not write the man pages and completions into {}: {e}",
                    out.display()
                ))
            })
        }
        Command::Points {
            data,
            volume,
            at: Some(at),
            json,
            ..
        } => recover::point_at(data, volume, at, json).await,
        Command::Points {
            data,
            volume,
            at: None,
            since,
            until,
            limit,
            bookmarks,
            json,
        } => recover::points(data, volume, since, until, limit, bookmarks, json).await,
        Command::Restore {
            data,
            volume,
            at,
            out,
        } => recover::restore(data, volume, at, out).await,
        Command::Export {
            data,
            volume,
            at,
            socket,
            listen,
            writable,
        } => recover::export(data, volume, at, socket, listen, writable).await,
        Command::Failover {
            data,
            volume,
            group,
            undo: true,
            ..
        } => recover::failover_undo(data, recover::failover_target(volume, group)?).await,
        Command::Failover {
            data,
            volume,
            group,
            commit: true,
            ..
        } => recover::failover_commit(data, recover::failover_target(volume, group)?).await,
        Command::Failover {
            data,
            volume,
            group,
            at,
            socket,
            listen,
            ..
        } => {
            let target = recover::failover_target(volume, group)?;
            recover::failover(data, target, at, socket, listen).await
        }
        Command::Verify { command } => verify::verify(command).await,
        Command::Diff {
            data,
            volume,
            from,
            to,
            json,
        } => recover::diff(data, volume, from, to, json).await,
    }
}
