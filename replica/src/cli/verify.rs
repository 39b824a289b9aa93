//! `verify run`, `verify report` and `verify repair`: the CLI of the verifier.

use std::path::PathBuf;

use cdp_replica::retention::parse_duration;

use super::CliError;
use super::output::{human_time, parse_time, print_table, to_json};
use crate::VerifyCommand;

pub(crate) async fn verify(command: VerifyCommand) -> Result<(), CliError> {
    match command {
        VerifyCommand::Run {
            data,
            volume,
            full,
            rate,
            timeout,
        } => {
            run(data, volume, full, rate, timeout).await?;
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
                cdp_shared::outln!("{}", to_json(&report)?);
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
            let bar = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
                let b = indicatif::ProgressBar::new(0);
                b.set_style(
                    indicatif::ProgressStyle::with_template(
                        "repairing {bar:40} {pos}/{len} chunks checked again, {per_sec}, eta {eta}, {msg} ({elapsed})",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                b
            });
            let msg = cdp_replica::verifier::repair(&data, &volume, timeout, |row| {
                if let Some(b) = &bar {
                    b.set_length(row.chunks_total);
                    b.set_position(row.chunks_done);
                    b.set_message(
                        cdp_replica::status::repair_phase(row.phase.as_deref()).to_owned(),
                    );
                }
            })
            .await;
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            cdp_shared::outln!("{}", msg?);
        }
    }
    Ok(())
}

/// `verify run`: asks serve for the runs, shows their progress, prints how each ended.
async fn run(
    data: PathBuf,
    volume: Option<String>,
    full: bool,
    rate: Option<f64>,
    timeout: Option<String>,
) -> Result<(), CliError> {
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
                "verifying {bar:40} {pos}/{len} chunks, {per_sec}, eta {eta}, {msg} ({elapsed})",
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
                cdp_shared::outln!("volume {}: verification failed: {e}", v.volume);
                failed.push(v.volume.clone());
            }
            None => cdp_shared::outln!(
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
    Ok(())
}

fn print_verify_report(report: &cdp_replica::verifier::VerifyReport) {
    cdp_shared::outln!(
        "verification since {} (coverage over the last 24 h)",
        human_time(&report.since)
    );
    if report.volumes.is_empty() {
        cdp_shared::outln!("no volumes yet");
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
            cdp_shared::outln!();
            cdp_shared::outln!(
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
                            Some(s) =>
                                format!("to {} (repaired at seq {s})", s.0.saturating_sub(1)),
                            None => "to the head (not repaired)".into(),
                        },
                        m.suspect_points.likely_from_seq
                    ),
                ],
            ]);
        }
    }
}
