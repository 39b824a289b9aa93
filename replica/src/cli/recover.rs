//! `points`, `restore`, `export`, `failover` and `diff`: the commands that read or serve the
//! images of a volume's points.

use std::net::SocketAddr;
use std::path::PathBuf;

use cdp_replica::failover::FailoverTarget;
use cdp_replica::{DiffReport, Endpoint, PointInfo, PointSpec, PointsFilter};

use super::CliError;
use super::output::{parse_time, print_table, to_json};
use super::serve::{signal_waiter, wait_for_signal};

/// `points --at`: the one point `restore --at` would choose.
pub(crate) async fn point_at(
    data: PathBuf,
    volume: String,
    at: String,
    json: bool,
) -> Result<(), CliError> {
    let at: PointSpec = at.parse().map_err(|e| CliError::Usage(format!("{e}")))?;
    let point = cdp_replica::resolve_point(&data, &volume, &at).await?;
    if json {
        cdp_shared::outln!("{}", to_json(&point)?);
    } else {
        cdp_shared::outln!("{point}");
    }
    Ok(())
}

pub(crate) async fn points(
    data: PathBuf,
    volume: String,
    since: Option<String>,
    until: Option<String>,
    limit: Option<u64>,
    bookmarks: bool,
    json: bool,
) -> Result<(), CliError> {
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
        cdp_shared::outln!("{}", to_json(&points)?);
    } else {
        print_points(&points, filter != PointsFilter::default());
    }
    Ok(())
}

pub(crate) async fn restore(
    data: PathBuf,
    volume: String,
    at: String,
    out: PathBuf,
) -> Result<(), CliError> {
    let at: PointSpec = at.parse().map_err(|e| CliError::Usage(format!("{e}")))?;
    let s = cdp_replica::restore(&data, &volume, &at, &out).await?;
    cdp_shared::outln!(
        "restored volume {} at {} to {}: {}, {} journal records read",
        s.volume,
        s.point,
        s.out.display(),
        cdp_shared::types::human_bytes(s.bytes),
        s.records_applied
    );
    Ok(())
}

pub(crate) async fn export(
    data: PathBuf,
    volume: String,
    at: String,
    socket: Option<PathBuf>,
    listen: Option<SocketAddr>,
    writable: bool,
) -> Result<(), CliError> {
    let at: PointSpec = at.parse().map_err(|e| CliError::Usage(format!("{e}")))?;
    let endpoint = match (socket, listen) {
        (_, Some(addr)) => Some(Endpoint::Tcp(addr)),
        (Some(path), None) => Some(Endpoint::Unix(path)),
        (None, None) => None,
    };
    let handle = cdp_replica::export::start(&data, &volume, &at, endpoint, writable).await?;
    let info = handle.info();
    if !info.point.consistent {
        tracing::warn!(
            volume,
            "seq {} is not a crash-consistent point (it lies inside a sync); exporting it because it was asked for",
            info.point.seq
        );
    }
    cdp_shared::outln!("{info}");
    let token = handle.token();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("stopping the export");
        token.cancel();
    });
    handle.wait().await?;
    Ok(())
}

/// What `failover` acts on, from `--volume` or `--group` (clap requires exactly one).
pub(crate) fn failover_target(
    volume: Option<String>,
    group: Option<String>,
) -> Result<FailoverTarget, CliError> {
    match (volume, group) {
        (Some(v), None) => Ok(FailoverTarget::Volume(v)),
        (None, Some(g)) => Ok(FailoverTarget::Group(g)),
        _ => Err(CliError::Usage(
            "name either --volume (a group of one) or --group".into(),
        )),
    }
}

/// `failover --undo`.
pub(crate) async fn failover_undo(data: PathBuf, target: FailoverTarget) -> Result<(), CliError> {
    let seq = cdp_replica::failover::undo(&data, &target).await?;
    cdp_shared::outln!(
        "failover of {} at seq {seq} undone: its writes are discarded, the journal and every point are as before, and the group is accepted from its agent again",
        target.what()
    );
    Ok(())
}

/// `failover --commit`.
pub(crate) async fn failover_commit(data: PathBuf, target: FailoverTarget) -> Result<(), CliError> {
    let s = cdp_replica::failover::commit(&data, &target).await?;
    cdp_shared::outln!(
        "failover of {} at seq {} committed: the group continues from it ({} written through the failover); {} batch rows and {} journal segments removed; the agent stays refused for the group (failback is not built yet)",
        target.what(),
        s.seq,
        cdp_shared::types::human_bytes(s.overlay_bytes),
        s.batches_removed,
        s.segments_removed
    );
    Ok(())
}

/// `failover` (started, or served again): serves until interrupted.
pub(crate) async fn failover(
    data: PathBuf,
    target: FailoverTarget,
    at: Option<String>,
    socket: Option<PathBuf>,
    listen: Option<SocketAddr>,
) -> Result<(), CliError> {
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
    let handle = cdp_replica::failover::start(&data, &target, at.as_ref(), endpoint).await?;
    let info = handle.info();
    if !info.point.consistent {
        tracing::warn!(
            group = %info.group,
            "seq {} is not a crash-consistent point (it lies inside a sync); failing over to it because it was asked for",
            info.point.seq
        );
    }
    cdp_shared::outln!("{info}");
    let token = handle.token();
    tokio::spawn(async move {
        stop.await;
        tracing::info!("stopping serving the failover (it stays until --undo or --commit)");
        token.cancel();
    });
    handle.wait().await?;
    Ok(())
}

pub(crate) async fn diff(
    data: PathBuf,
    volume: String,
    from: String,
    to: String,
    json: bool,
) -> Result<(), CliError> {
    let parse = |p: &str| -> Result<PointSpec, CliError> {
        p.parse().map_err(|e| CliError::Usage(format!("{e}")))
    };
    let (from, to) = (parse(&from)?, parse(&to)?);
    let report = cdp_replica::diff(&data, &volume, &from, &to).await?;
    if json {
        cdp_shared::outln!("{}", to_json(&report)?);
    } else {
        print_diff(&report);
    }
    Ok(())
}

fn print_points(points: &[PointInfo], filtered: bool) {
    if points.is_empty() {
        if filtered {
            cdp_shared::outln!(
                "no recovery point matches (`points` without filters lists the window)"
            );
        } else {
            cdp_shared::outln!(
                "no recovery points yet (the volume's initial sync has not completed)"
            );
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
    cdp_shared::outln!(
        "volume {} from {} to {}",
        report.volume,
        report.from,
        report.to
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
    cdp_shared::outln!(
        "{} extent{}, {} bytes differ ({})",
        report.extents.len(),
        if report.extents.len() == 1 { "" } else { "s" },
        report.bytes,
        cdp_shared::types::human_bytes(report.bytes)
    );
}
