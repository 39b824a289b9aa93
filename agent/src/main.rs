//! The `cdp-agent` command line: a thin layer over the library.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use cdp_agent::config::{AgentConfig, AgentConfigFile, CONFIG_FILE, VolumeConfig};
use cdp_agent::control::{self, Reply, Request};
use cdp_agent::device::{BlockDev, FileDev};
use cdp_agent::run::{Agent, Listen, RunOptions};
use cdp_agent::state;
use cdp_agent::status;
use cdp_shared::identity::{Fingerprint, Identity};
use cdp_shared::types::check_name;
use clap::{CommandFactory, Parser, Subcommand};

/// cdp-agent: protects block devices by recording every write and shipping it to a replica.
#[derive(Parser)]
#[command(name = "cdp-agent", version, about)]
struct Cli {
    /// Log lines as text (the default) or as JSON objects, one per line (on standard error).
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: cdp_shared::logging::LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// Where `--data` points unless given (or set by `CDP_AGENT_DATA`).
const DATA_DEFAULT: &str = "/var/lib/cdp-agent";

#[derive(Subcommand)]
enum Command {
    /// Create the agent's data directory and identity; prints its fingerprint.
    Init {
        /// The agent's data directory.
        #[arg(long, env = "CDP_AGENT_DATA", default_value = DATA_DEFAULT)]
        data: PathBuf,
        /// The replica to ship to, HOST:PORT.
        #[arg(long)]
        replica: String,
        /// The replica's fingerprint, as `cdp-replica fingerprint` prints it.
        #[arg(long)]
        replica_fingerprint: String,
    },
    /// Print this agent's certificate fingerprint (authorize it on the replica).
    Fingerprint {
        /// The agent's data directory.
        #[arg(long, env = "CDP_AGENT_DATA", default_value = DATA_DEFAULT)]
        data: PathBuf,
    },
    /// Protect a volume: a block device or a regular file. Takes effect at the next `run`.
    Protect {
        /// The agent's data directory.
        #[arg(long, env = "CDP_AGENT_DATA", default_value = DATA_DEFAULT)]
        data: PathBuf,
        /// Name of the volume (also its NBD export name).
        #[arg(long)]
        volume: String,
        /// The block device or file that holds the volume.
        #[arg(long)]
        device: PathBuf,
        /// Consistency group: volumes of one group share one log and one seq. Defaults to the
        /// volume's name.
        #[arg(long)]
        group: Option<String>,
    },
    /// Serve the protected volumes over NBD and replicate every write.
    Run {
        /// The agent's data directory.
        #[arg(long, env = "CDP_AGENT_DATA", default_value = DATA_DEFAULT)]
        data: PathBuf,
        /// Unix socket for NBD clients (default: DIR/nbd.sock).
        #[arg(long, conflicts_with = "listen")]
        socket: Option<PathBuf>,
        /// Serve NBD over TCP on this address instead of a Unix socket.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Serve Prometheus metrics at http://ADDR/metrics (over `metrics` in agent.toml;
        /// bind a loopback address unless a firewall guards it).
        #[arg(long, value_name = "ADDR")]
        metrics: Option<SocketAddr>,
    },
    /// Write the man pages and shell completions into DIR (what `make install` installs).
    #[command(hide = true)]
    Generate {
        #[arg(long)]
        out: PathBuf,
    },
    /// Seal a named consistent point in every group of the running agent (or in one).
    Bookmark {
        /// The agent's data directory.
        #[arg(long, env = "CDP_AGENT_DATA", default_value = DATA_DEFAULT)]
        data: PathBuf,
        /// Name of the bookmark.
        name: String,
        /// Only in this group (default: every group; a group the replica refuses, e.g.
        /// because it is failed over there, makes `--wait` wait until it is accepted again).
        #[arg(long)]
        group: Option<String>,
        /// Return only once the replica has made the bookmark durable.
        #[arg(long)]
        wait: bool,
    },
    /// Compare every chunk of a volume with the replica's latest image (by hash) and send the
    /// chunks that differ. Returns when done.
    Resync {
        /// The agent's data directory.
        #[arg(long, env = "CDP_AGENT_DATA", default_value = DATA_DEFAULT)]
        data: PathBuf,
        /// Only this volume (default: every volume).
        #[arg(long)]
        volume: Option<String>,
    },
    /// Stop protecting a volume (or every volume of a consistency group): a running agent stops
    /// serving and recording it at once and releases its device; it leaves agent.toml. Its
    /// agent-side state is moved to DIR/unprotected/ (or deleted with --purge). The replica
    /// keeps its history (`cdp-replica forget` deletes that).
    Unprotect {
        /// The agent's data directory.
        #[arg(long, env = "CDP_AGENT_DATA", default_value = DATA_DEFAULT)]
        data: PathBuf,
        /// The volume; it must be the only volume of its group (otherwise use --group).
        #[arg(long, conflicts_with = "group", required_unless_present = "group")]
        volume: Option<String>,
        /// Every volume of this consistency group.
        #[arg(long)]
        group: Option<String>,
        /// Delete the volume's agent-side state (spool, activity log, dirty map) instead of
        /// keeping it aside.
        #[arg(long)]
        purge: bool,
    },
    /// Show the state of every protected volume.
    Status {
        /// The agent's data directory.
        #[arg(long, env = "CDP_AGENT_DATA", default_value = DATA_DEFAULT)]
        data: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
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
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> Result<()> {
    match command {
        Command::Init {
            data,
            replica,
            replica_fingerprint,
        } => init(&data, &replica, &replica_fingerprint),
        Command::Fingerprint { data } => {
            cdp_shared::outln!("{}", Identity::load(&data)?.fingerprint());
            Ok(())
        }
        Command::Protect {
            data,
            volume,
            device,
            group,
        } => protect(&data, &volume, &device, group).await,
        Command::Run {
            data,
            socket,
            listen,
            metrics,
        } => run(&data, socket, listen, metrics).await,
        Command::Generate { out } => cdp_shared::packaging::generate(Cli::command(), &out)
            .with_context(|| format!("write the man pages and completions into {}", out.display())),
        Command::Bookmark {
            data,
            name,
            group,
            wait,
        } => bookmark(&data, &name, group, wait).await,
        Command::Status { data, json } => show_status(&data, json).await,
        Command::Resync { data, volume } => resync(&data, volume).await,
        Command::Unprotect {
            data,
            volume,
            group,
            purge,
        } => unprotect(&data, volume, group, purge).await,
    }
}

fn init(data: &Path, replica: &str, replica_fingerprint: &str) -> Result<()> {
    let fp: Fingerprint = replica_fingerprint
        .parse()
        .context("--replica-fingerprint")?;
    if data.join(CONFIG_FILE).exists() {
        bail!(
            "{} already holds an agent; use it, or pick another directory",
            data.display()
        );
    }
    if !replica.contains(':') {
        bail!("--replica {replica:?} must be HOST:PORT");
    }
    std::fs::create_dir_all(data).with_context(|| format!("create {}", data.display()))?;
    let identity = Identity::generate("cdp-agent")?;
    identity.save(data)?;
    let config = AgentConfigFile::new(replica, &fp.to_string());
    config.save(data)?;
    cdp_shared::outln!("fingerprint: {}", identity.fingerprint());
    Ok(())
}

async fn protect(data: &Path, volume: &str, device: &Path, group: Option<String>) -> Result<()> {
    let mut config = AgentConfigFile::load(data)?;
    check_name("volume", volume).map_err(anyhow::Error::msg)?;
    let group = group.unwrap_or_else(|| volume.to_owned());
    check_name("group", &group).map_err(anyhow::Error::msg)?;
    if config.volumes.iter().any(|v| v.name == volume) {
        bail!("volume {volume} is already protected by this agent");
    }
    let device = std::fs::canonicalize(device)
        .with_context(|| format!("device {} cannot be opened", device.display()))?;
    if let Some(v) = config.volumes.iter().find(|v| v.device == device) {
        bail!(
            "device {} is already protected as volume {}",
            device.display(),
            v.name
        );
    }
    let dev = FileDev::open(&device).map_err(|e| {
        if e.kind() == std::io::ErrorKind::ResourceBusy {
            anyhow::anyhow!("{e}")
        } else {
            anyhow::anyhow!(
                "device {} cannot be opened read-write: {e}",
                device.display()
            )
        }
    })?;
    if dev.size() == 0 {
        bail!(
            "device {} is empty; a volume needs a size",
            device.display()
        );
    }
    let id = config.volumes.iter().filter(|v| v.group == group).count() as u32;
    config.volumes.push(VolumeConfig {
        name: volume.to_owned(),
        device: device.clone(),
        group: group.clone(),
        id,
    });
    config.save(data)?;
    cdp_shared::outln!(
        "protecting volume {volume} ({}, {}) in group {group}",
        device.display(),
        cdp_shared::types::human_bytes(dev.size())
    );
    if control::request(data, &Request::Status, Some(Duration::from_secs(2)))
        .await?
        .is_some()
    {
        cdp_shared::outln!(
            "the agent is running: restart it (`cdp-agent run --data {}`) to start protecting {volume}",
            data.display()
        );
    }
    Ok(())
}

async fn run(
    data: &Path,
    socket: Option<PathBuf>,
    listen: Option<SocketAddr>,
    metrics: Option<SocketAddr>,
) -> Result<()> {
    let listen = match (socket, listen) {
        (_, Some(addr)) => Listen::Tcp(addr),
        (Some(path), None) => Listen::Unix(path),
        (None, None) => Listen::Unix(data.join("nbd.sock")),
    };
    let agent = Agent::start(RunOptions {
        data_dir: data.to_owned(),
        listen,
        metrics,
    })
    .await?;
    match &agent.nbd {
        Listen::Unix(p) => tracing::info!(
            "serving {} volume(s) over NBD on {}",
            agent
                .groups
                .snapshot()
                .iter()
                .map(|g| g.volumes.len())
                .sum::<usize>(),
            p.display()
        ),
        Listen::Tcp(a) => tracing::info!(
            "serving {} volume(s) over NBD on {a}",
            agent
                .groups
                .snapshot()
                .iter()
                .map(|g| g.volumes.len())
                .sum::<usize>()
        ),
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("install the SIGTERM handler")?;
    // Serving, with the signals caught: ready for systemd (`Type=notify`).
    cdp_shared::notify::ready("serving NBD; shipping to the replica");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("stopping");
    cdp_shared::notify::stopping();
    agent.stop().await
}

fn not_running(data: &Path) -> anyhow::Error {
    anyhow::anyhow!(
        "the agent in {} is not running: start it with `cdp-agent run --data {}`",
        data.display(),
        data.display()
    )
}

async fn bookmark(data: &Path, name: &str, group: Option<String>, wait: bool) -> Result<()> {
    AgentConfig::load(data)?;
    check_name("bookmark", name).map_err(anyhow::Error::msg)?;
    let reply = control::request(
        data,
        &Request::Bookmark {
            name: name.to_owned(),
            group,
            wait,
        },
        None,
    )
    .await?
    .ok_or_else(|| not_running(data))?;
    match reply {
        Reply::Bookmarked {
            points,
            durable,
            skipped,
        } => {
            for s in &skipped {
                eprintln!("bookmark {name}: group {} skipped: {}", s.group, s.reason);
            }
            for p in points {
                let how = if durable {
                    "durable on the replica"
                } else {
                    "sealed in the spool"
                };
                cdp_shared::outln!("bookmark {name}: group {} seq {} ({how})", p.group, p.seq);
                if !p.consistent {
                    eprintln!(
                        "warning: group {} is syncing or resyncing: bookmark {name} is recorded but is not a consistent recovery point; take it again once `cdp-agent status` shows the group protecting",
                        p.group
                    );
                }
            }
            Ok(())
        }
        Reply::Error { message } => bail!("{message}"),
        _ => bail!("the agent answered a bookmark request with something else"),
    }
}

async fn resync(data: &Path, volume: Option<String>) -> Result<()> {
    AgentConfig::load(data)?;
    let reply = control::request(data, &Request::Resync { volume }, None)
        .await?
        .ok_or_else(|| not_running(data))?;
    match reply {
        Reply::Resynced { volumes } => {
            for v in volumes {
                cdp_shared::outln!(
                    "resynced volume {}: {} chunks compared, {} differed and were sent ({} sent by resyncs since the agent started)",
                    v.volume,
                    v.chunks_compared,
                    v.chunks_sent,
                    cdp_shared::types::human_bytes(v.bytes_sent)
                );
            }
            Ok(())
        }
        Reply::Error { message } => bail!("{message}"),
        _ => bail!("the agent answered a resync request with something else"),
    }
}

async fn unprotect(
    data: &Path,
    volume: Option<String>,
    group: Option<String>,
    purge: bool,
) -> Result<()> {
    let mut config = AgentConfigFile::load(data)?;
    let group = group_to_unprotect(&config, volume, group)?;
    let volumes: Vec<VolumeConfig> = config
        .volumes
        .iter()
        .filter(|c| c.group == group)
        .cloned()
        .collect();
    let names: Vec<&str> = volumes.iter().map(|v| v.name.as_str()).collect();
    let live = stop_serving(data, &group).await?;
    config.volumes.retain(|c| c.group != group);
    config.save(data)?;
    let files = agent_side_files(data, &group, &volumes);
    let kept = remove_or_set_aside(data, &group, &files, purge)?;
    report_unprotected(&group, &names, live.as_ref(), purge, kept.as_deref());
    Ok(())
}

/// The group `unprotect` names: `--group`, or the group of `--volume` when it is alone in it.
fn group_to_unprotect(
    config: &AgentConfigFile,
    volume: Option<String>,
    group: Option<String>,
) -> Result<String> {
    Ok(match (volume, group) {
        (Some(v), _) => {
            let Some(vc) = config.volumes.iter().find(|c| c.name == v) else {
                bail!("no volume named {v} is protected by this agent");
            };
            let others: Vec<&str> = config
                .volumes
                .iter()
                .filter(|c| c.group == vc.group && c.name != v)
                .map(|c| c.name.as_str())
                .collect();
            if !others.is_empty() {
                bail!(
                    "volume {v} shares consistency group {} with {}: a group is unprotected whole, with `--group {}`",
                    vc.group,
                    others.join(", "),
                    vc.group
                );
            }
            vc.group.clone()
        }
        (None, Some(g)) => {
            if !config.volumes.iter().any(|c| c.group == g) {
                bail!("no group named {g} is protected by this agent");
            }
            g
        }
        (None, None) => bail!("name a --volume or a --group"),
    })
}

/// Asks a running agent to stop serving and recording `group`; `None` when no agent runs.
async fn stop_serving(data: &Path, group: &str) -> Result<Option<control::Unprotected>> {
    Ok(
        match control::request(data, &Request::Status, Some(Duration::from_secs(5))).await? {
            None => None,
            Some(_) => match control::request(
                data,
                &Request::Unprotect {
                    group: group.to_owned(),
                },
                Some(control::UNPROTECT_WAIT * 3),
            )
            .await?
            {
                Some(Reply::Unprotected(u)) => Some(u),
                Some(Reply::Error { message }) => bail!("{message}"),
                Some(_) => bail!("the agent answered an unprotect request with something else"),
                None => None,
            },
        },
    )
}

/// The agent-side files of `group` and its `volumes` that exist: state, logs, maps, spool.
fn agent_side_files(data: &Path, group: &str, volumes: &[VolumeConfig]) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = Vec::new();
    let state = state::state_dir(data);
    for v in volumes {
        for suffix in [".json", ".al.0", ".al.1", ".dirty"] {
            files.push(state.join(format!("{}{suffix}", v.name)));
        }
    }
    files.push(state.join(format!("{group}.generation")));
    files.push(data.join("spool").join(group));
    files.into_iter().filter(|p| p.exists()).collect()
}

/// Deletes `files` (`purge`) or moves them to `DATA/unprotected/<group>.<time>`; returns
/// where they were kept, if anywhere.
fn remove_or_set_aside(
    data: &Path,
    group: &str,
    files: &[PathBuf],
    purge: bool,
) -> Result<Option<PathBuf>> {
    if files.is_empty() {
        return Ok(None);
    }
    if purge {
        for f in files {
            let r = if f.is_dir() {
                std::fs::remove_dir_all(f)
            } else {
                std::fs::remove_file(f)
            };
            r.with_context(|| format!("delete {}", f.display()))?;
        }
        return Ok(None);
    }
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ");
    let aside = data.join("unprotected").join(format!("{group}.{stamp}"));
    std::fs::create_dir_all(&aside).with_context(|| format!("create {}", aside.display()))?;
    for f in files {
        let to = aside.join(f.file_name().unwrap_or_default());
        std::fs::rename(f, &to)
            .with_context(|| format!("move {} to {}", f.display(), to.display()))?;
    }
    Ok(Some(aside))
}

/// Tells the operator what `unprotect` did.
fn report_unprotected(
    group: &str,
    names: &[&str],
    live: Option<&control::Unprotected>,
    purge: bool,
    kept: Option<&Path>,
) {
    match live {
        Some(u) => {
            cdp_shared::outln!(
                "group {group} ({}) is no longer protected: the agent stopped serving and recording it{}",
                names.join(", "),
                if u.released {
                    " and released its devices"
                } else {
                    "; some of its files were still in use and are released when the last client lets go"
                }
            );
            if u.acked_seq < u.last_seq {
                eprintln!(
                    "warning: the replica acknowledged group {group} up to seq {} of seq {}: the batches after it never reached the replica (they are in the group's spool{})",
                    u.acked_seq,
                    u.last_seq,
                    if purge {
                        ", now deleted"
                    } else {
                        ", kept aside"
                    }
                );
            }
        }
        None => cdp_shared::outln!(
            "group {group} ({}) is no longer protected (the agent is not running)",
            names.join(", ")
        ),
    }
    if let Some(aside) = kept {
        cdp_shared::outln!(
            "its agent-side state is kept in {} (--purge deletes it); protecting the volume again starts it afresh",
            aside.display()
        );
    }
    cdp_shared::outln!(
        "the replica keeps the history of {}: `cdp-replica forget` deletes it there",
        names.join(", ")
    );
}

async fn show_status(data: &Path, json: bool) -> Result<()> {
    let config = AgentConfig::load(data)?;
    let st = match control::request(data, &Request::Status, Some(Duration::from_secs(5))).await? {
        Some(Reply::Status(s)) => *s,
        Some(Reply::Error { message }) => bail!("{message}"),
        Some(_) => bail!("the agent answered a status request with something else"),
        None => status::offline(data, &config)?,
    };
    if json {
        cdp_shared::outln!("{}", serde_json::to_string_pretty(&st)?);
    } else {
        cdp_shared::out!("{}", status::render(&st));
    }
    Ok(())
}
