//! `init`, `retention`, `fingerprint`, `authorize`, `deauthorize`, `agents`, `forget` and
//! `status`: the commands that set up and look after the replica.

use std::net::SocketAddr;
use std::path::PathBuf;

use cdp_replica::retention::{format_size, parse_duration, parse_size};
use cdp_replica::{AgentInfo, Retention, RetentionChange, StatusReport};
use cdp_shared::identity::Fingerprint;

use super::CliError;
use super::output::{human_time, print_table, to_json};

pub(crate) async fn init(
    data: PathBuf,
    listen: SocketAddr,
    window: String,
    max_journal: String,
) -> Result<(), CliError> {
    let retention = Retention {
        window: parse_duration(&window).map_err(CliError::Usage)?,
        journal_bytes_max: parse_size(&max_journal).map_err(CliError::Usage)?,
    };
    let fp = cdp_replica::init_with(&data, listen, &retention).await?;
    cdp_shared::outln!("fingerprint: {fp}");
    Ok(())
}

pub(crate) async fn retention(
    data: PathBuf,
    group: String,
    window: Option<String>,
    max_journal: Option<String>,
    yes: bool,
    json: bool,
) -> Result<(), CliError> {
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
    let (r, dropped) = cdp_replica::set_retention_checked(&data, &group, &change, yes).await?;
    if json {
        let ns = cdp_replica::clock::rfc3339_ns;
        let dropped = dropped.as_ref().map(|d| {
            serde_json::json!({
                "points": d.points,
                "first_seq": d.first_seq.0,
                "first_time": ns(d.first_ns),
                "last_seq": d.last_seq.0,
                "kept_seq": d.kept_seq.0,
                "kept_time": ns(d.kept_ns),
            })
        });
        let out = serde_json::json!({
            "group": group,
            "retention": cdp_replica::RetentionStatus::from(&r),
            "dropped": dropped,
        });
        cdp_shared::outln!("{}", to_json(&out)?);
        return Ok(());
    }
    cdp_shared::outln!("group {group}: {r}");
    if let Some(d) = dropped {
        cdp_shared::outln!(
            "the trimmer drops {d} from the window (within a second while serve runs, or when it next starts; a reader's pin holds its point until it ends)"
        );
    }
    Ok(())
}

/// One line of long work for `status`: what, and its rate and time left when known.
fn work_line(w: &cdp_replica::status::Work) -> String {
    let mut line = w.what.clone();
    if let Some(rate) = w.rate_per_s {
        match w.unit {
            "bytes" => line += &format!(", {}/s", cdp_shared::types::human_bytes(rate)),
            unit => line += &format!(", {rate} {unit}/s"),
        }
    }
    if let Some(eta) = w.eta_s {
        line += &format!(
            ", ETA {}",
            cdp_replica::retention::format_span(
                i64::try_from(eta)
                    .unwrap_or(i64::MAX)
                    .saturating_mul(1_000_000_000)
            )
        );
    }
    line
}

pub(crate) fn fingerprint(data: PathBuf) -> Result<(), CliError> {
    cdp_shared::outln!("{}", cdp_replica::fingerprint(&data)?);
    Ok(())
}

pub(crate) fn authorize(data: PathBuf, agent: String, name: String) -> Result<(), CliError> {
    let fp: Fingerprint = agent.parse().map_err(|e| CliError::Usage(format!("{e}")))?;
    if cdp_replica::authorize(&data, fp, &name)? {
        cdp_shared::outln!("authorized agent {fp}");
    } else {
        cdp_shared::outln!("agent {fp} was already authorized");
    }
    Ok(())
}

pub(crate) fn deauthorize(data: PathBuf, agent: String) -> Result<(), CliError> {
    let a = cdp_replica::deauthorize(&data, &agent)?;
    cdp_shared::outln!(
        "deauthorized agent {}{}: a running serve closes its connections within a second and refuses it from now on; its groups stay on the replica (`cdp-replica forget --group NAME` removes one)",
        a.fingerprint,
        if a.name.is_empty() {
            String::new()
        } else {
            format!(" ({})", a.name)
        }
    );
    Ok(())
}

pub(crate) async fn forget(
    data: PathBuf,
    volume: Option<String>,
    group: Option<String>,
    yes: bool,
) -> Result<(), CliError> {
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
            cdp_shared::outln!("forget would delete {r}");
            return Err(CliError::Usage(format!(
                "nothing was deleted ({} would be freed): run the command again with --yes to delete it",
                cdp_shared::types::human_bytes(r.bytes())
            )));
        }
        ForgetOutcome::Forgot(r) => {
            cdp_shared::outln!("forgot {r}");
            cdp_shared::outln!(
                "{} freed; if its agent connects again, it is new to the replica and gets a fresh initial sync",
                cdp_shared::types::human_bytes(r.bytes())
            );
        }
        ForgetOutcome::AlreadyForgotten { target, at_ns } => cdp_shared::outln!(
            "{target} was already forgotten ({})",
            chrono::DateTime::from_timestamp_nanos(at_ns)
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        ),
    }
    Ok(())
}

pub(crate) async fn agents(data: PathBuf, json: bool) -> Result<(), CliError> {
    let list = cdp_replica::agents(&data).await?;
    if json {
        cdp_shared::outln!("{}", to_json(&list)?);
    } else {
        print_agents(&list);
    }
    Ok(())
}

pub(crate) async fn status(data: PathBuf, json: bool) -> Result<(), CliError> {
    let report = cdp_replica::status(&data).await?;
    if json {
        cdp_shared::outln!("{}", to_json(&report)?);
    } else {
        print_status(&report);
    }
    Ok(())
}

fn print_agents(list: &[AgentInfo]) {
    if list.is_empty() {
        cdp_shared::outln!(
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
    cdp_shared::outln!("serving: {}", if report.serving { "yes" } else { "no" });
    if report.volumes.is_empty() {
        cdp_shared::outln!("no volumes yet: authorize an agent and let it connect");
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
            "PRIMARY",
            "STATE",
            "SIZE",
            "WINDOW FIRST",
            "WINDOW LAST",
            "JOURNAL",
            "HEAD",
            "RPO LAG",
            "RETENTION",
            "PINS",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for v in &report.volumes {
        // The causes name the state (`paused/replica-disk-full`), then what else holds; a
        // failover says its point.
        let mut state: Vec<String> = v.causes.iter().map(|c| c.to_string()).collect();
        if v.failover.is_some()
            && let Some(first) = state.first_mut()
        {
            *first = format!("{first} ({})", v.state);
        }
        rows.push(vec![
            v.group.clone(),
            v.volume.clone(),
            v.primary.to_string(),
            state.join(" "),
            cdp_shared::types::human_bytes(v.size),
            point(&v.window_first),
            point(&v.window_last),
            cdp_shared::types::human_bytes(v.journal_bytes),
            v.head_seq.to_string(),
            match v.rpo_lag_ms {
                Some(ms) => cdp_shared::units::format_lag_ms(ms),
                None if v.volume_state != "protecting" => "not protected yet".into(),
                None => "-".into(),
            },
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
            cdp_shared::outln!("volume {}: DEGRADED: {}", v.volume, d.reason);
        }
        if let Some(w) = &v.window_short {
            cdp_shared::outln!("volume {}: WINDOW SHORT: {}", v.volume, w.reason);
        }
        for w in &v.work {
            cdp_shared::outln!("volume {}: {}", v.volume, work_line(w));
        }
    }
    let mut told = std::collections::HashSet::new();
    for v in &report.volumes {
        if let Some(reason) = &v.ingest_reason
            && told.insert(&v.group)
        {
            cdp_shared::outln!(
                "group {}: ingest PAUSED since {}: {reason}",
                v.group,
                v.paused_since.as_deref().unwrap_or("?")
            );
        }
    }
}
