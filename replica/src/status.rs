//! `status`: per volume, its group, state, size, window, journal size, retention and live pins,
//! read from the catalog (works whether or not `serve` runs; `serve.lock` tells which), and
//! whether the running `serve` has paused its group's ingest (the pause board), the group's
//! failover, whether the verifier found chunks that differ from the agent's (`degraded`
//! until they are repaired), and whether the window is shorter than the group's retention
//! although points were trimmed (`window_short`: the journal cap limits it).

use cdp_shared::cause::{self, Cause, Primary};
use cdp_shared::types::Seq;
use std::path::Path;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::catalog::OpenMode;
use crate::catalog::{Catalog, FailoverState, VolumeState};
use crate::clock::{rfc3339, ser_time, time_of};
use crate::datadir::{DataDir, ServeLock};
use crate::error::Result;
use crate::pause_board;
use crate::pins::live_pins;
use crate::points::window;
use crate::retention::{Retention, format_duration, format_size};

/// The RPO target `rpo-breach` is judged against before the group's agent reported its own
/// (the agent's default, `rpo_target` in `agent.toml`).
pub const RPO_TARGET_DEFAULT_MS: u64 = 30_000;

/// A point named in `status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PointRef {
    pub seq: Seq,
    #[serde(serialize_with = "ser_time")]
    pub time: DateTime<Utc>,
}

/// One volume in `status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VolumeStatus {
    pub group: String,
    pub volume: String,
    /// `paused` (`serve` runs but cannot commit the group's batches: see `ingest_reason`),
    /// `degraded` (the verifier found chunks that differ from the agent's: see `degraded`),
    /// `syncing` (initial sync pending or running), `protecting`, or `disconnected` (no agent
    /// link is up, or `serve` is not running), or `failed over at seq N` (see `failover`).
    pub state: String,
    /// The named cause of `state` (README, "Causes").
    pub cause: Cause,
    /// Every cause that holds, `cause` first: also `degraded/verify-mismatch`, the link's
    /// when it is down while the state is another, `rpo-breach` and `history-short`.
    pub causes: Vec<Cause>,
    /// The catalog's state: `new`, `syncing` or `protecting`.
    pub volume_state: String,
    /// Whether the agent link of the group is up.
    pub connected: bool,
    /// Bytes.
    pub size: u64,
    /// First and last crash-consistent points of the window (null before the initial sync
    /// completes).
    pub window_first: Option<PointRef>,
    pub window_last: Option<PointRef>,
    /// Bytes of the group's batches in journal segments.
    pub journal_bytes: u64,
    /// Last durable seq of the group.
    pub head_seq: Seq,
    /// The agent's last sealed seq, as it last reported it to this `serve` (null before a
    /// report, or when `serve` is not running).
    pub agent_head_seq: Option<Seq>,
    /// RPO lag in milliseconds as the replica can vouch for it: the agent's reported lag
    /// plus the report's age (0 while the agent reports 0 every second). Null while the volume
    /// is not protecting yet (initial sync), while failed over, or without a report since
    /// `serve` started.
    pub rpo_lag_ms: Option<u64>,
    /// The group's RPO target as its agent last reported it (`rpo_target` in `agent.toml`),
    /// milliseconds; null without a report.
    pub rpo_target_ms: Option<u64>,
    /// The group's base: every batch up to it is in the target files.
    pub base_seq: Seq,
    /// The group's retention.
    pub retention: RetentionStatus,
    /// The live pins of the group (readers holding points; the base does not pass them).
    pub pins: PinsStatus,
    /// Why ingest of the group is paused (its disk is full), null when it is not.
    pub ingest_reason: Option<String>,
    /// Since when it is paused (RFC 3339), null when it is not.
    pub paused_since: Option<String>,
    /// The group's failover (see `failover`), null when there is none.
    pub failover: Option<FailoverStatus>,
    /// Which side is primary for the group: `agent`, or `replica (failed over)` while it has
    /// a failover (active, committing or committed).
    pub primary: Primary,
    /// Open verification mismatches (null when there is none).
    pub degraded: Option<Degraded>,
    /// The window is shorter than the group's configured window although points were
    /// already trimmed away (the journal cap, not the group's youth, limits it); null
    /// otherwise.
    pub window_short: Option<WindowShort>,
    /// Long work under way on the volume: restores, exports and diffs reading its points, a
    /// requested verification run, a repair; each with its progress, rate and time left.
    pub work: Vec<Work>,
}

/// Long work under way on a volume in `status` (see [`VolumeStatus::work`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Work {
    /// `restore`, `export`, `diff`, `verify` (a requested run), `verify-full` (a requested
    /// full pass) or `repair`.
    pub kind: String,
    /// One line for people: what it is and where it stands.
    pub what: String,
    /// When it started, RFC 3339.
    pub started: String,
    /// What `done` and `total` count: `bytes` or `chunks`.
    pub unit: &'static str,
    pub done: u64,
    /// Null: work without an end (an export).
    pub total: Option<u64>,
    /// `unit`s per second since it started; null before there is anything to go by.
    pub rate_per_s: Option<u64>,
    /// Seconds left at that rate; null without an end or a rate.
    pub eta_s: Option<u64>,
}

/// The rate since `started_ns` and the seconds left at it (sans-IO): none before a tenth of a
/// second has passed or anything is done.
pub fn rate_and_eta(
    done: u64,
    total: Option<u64>,
    started_ns: i64,
    now_ns: i64,
) -> (Option<u64>, Option<u64>) {
    let elapsed = now_ns.saturating_sub(started_ns);
    if elapsed < 100_000_000 || done == 0 {
        return (None, None);
    }
    let rate = done as f64 * 1e9 / elapsed as f64;
    let eta = total.map(|t| (t.saturating_sub(done) as f64 / rate).ceil() as u64);
    (Some(rate.round() as u64), eta)
}

/// What a running repair does, for people (`status` and `verify repair`'s bar).
pub fn repair_phase(phase: Option<&str>) -> &'static str {
    match phase {
        Some("asking") => "asking the agent to resend the chunks",
        Some("resending") => "waiting for the agent's resend to be durable",
        Some("checking") => "checking the chunks again",
        _ => "waiting for serve to take the request",
    }
}

/// The work of volume `v` (see [`VolumeStatus::work`]).
fn work_of(
    v: &crate::catalog::VolumeRow,
    pins: &[crate::catalog::PinRow],
    runs: &[crate::catalog::RunRow],
    repairs: &[crate::catalog::RepairRow],
    now: i64,
) -> Vec<Work> {
    let mut work = Vec::new();
    let since = |ns: i64| rfc3339(&time_of(ns));
    for p in pins.iter().filter(|p| p.volume_id == v.id) {
        let kind = p.holder.split_whitespace().next().unwrap_or_default();
        if !matches!(kind, "restore" | "export" | "diff") {
            continue; // the verifier's and the hash service's pins come and go within seconds
        }
        let (rate, eta) = rate_and_eta(p.done_bytes, p.total_bytes, p.created_ns, now);
        let what = match p.total_bytes {
            Some(t) => format!(
                "{} at seq {}: {} of {}",
                p.holder,
                p.seq,
                cdp_shared::types::human_bytes(p.done_bytes),
                cdp_shared::types::human_bytes(t)
            ),
            None => format!("{} at seq {}", p.holder, p.seq),
        };
        work.push(Work {
            kind: kind.to_owned(),
            what,
            started: since(p.created_ns),
            unit: "bytes",
            done: p.done_bytes,
            total: p.total_bytes,
            rate_per_s: rate,
            eta_s: eta,
        });
    }
    for r in runs.iter().filter(|r| r.volume_id == v.id) {
        let started = r.started_ns.unwrap_or(r.requested_ns);
        let (rate, eta) = rate_and_eta(r.chunks_done, Some(r.chunks_total), started, now);
        work.push(Work {
            kind: if r.full { "verify-full" } else { "verify" }.to_owned(),
            what: format!(
                "{}: {} of {} chunks checked, {} mismatch{}",
                if r.full {
                    "full verify pass"
                } else {
                    "verify run"
                },
                r.chunks_done,
                r.chunks_total,
                r.mismatches,
                if r.mismatches == 1 { "" } else { "es" }
            ),
            started: since(started),
            unit: "chunks",
            done: r.chunks_done,
            total: Some(r.chunks_total),
            rate_per_s: rate,
            eta_s: eta,
        });
    }
    for r in repairs.iter().filter(|r| r.volume_id == v.id) {
        let started = r.started_ns.unwrap_or(r.requested_ns);
        let checking = r.phase.as_deref() == Some("checking");
        let (rate, eta) = if checking {
            rate_and_eta(r.chunks_done, Some(r.chunks_total), started, now)
        } else {
            (None, None)
        };
        let phase = repair_phase(r.phase.as_deref());
        work.push(Work {
            kind: "repair".to_owned(),
            what: format!(
                "repair of {} mismatched chunk{}: {phase}, {} checked again",
                r.chunks_total,
                if r.chunks_total == 1 { "" } else { "s" },
                r.chunks_done
            ),
            started: since(started),
            unit: "chunks",
            done: r.chunks_done,
            total: Some(r.chunks_total),
            rate_per_s: rate,
            eta_s: eta,
        });
    }
    work
}

/// A window cut shorter than its retention in `status` (see [`VolumeStatus::window_short`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WindowShort {
    /// Agent time from the window's first point to its newest, in whole seconds.
    pub effective_secs: u64,
    /// The group's configured window, in seconds.
    pub configured_secs: u64,
    /// One sentence: what limits it and what to do.
    pub reason: String,
}

/// Whether the window of a volume is shorter than its group's window although retention
/// trimmed points away (sans-IO). `first_ns`/`newest_ns`: agent times of the window's first
/// and newest points; `journal_bytes`: the group's journal now.
pub fn window_short(
    volume: &str,
    group: &str,
    retention: &Retention,
    trimmed: bool,
    first_ns: i64,
    newest_ns: i64,
    journal_bytes: u64,
) -> Option<WindowShort> {
    let effective_ns = newest_ns.saturating_sub(first_ns).max(0);
    let configured_ns = i64::try_from(retention.window.as_nanos()).unwrap_or(i64::MAX);
    if !trimmed || effective_ns >= configured_ns {
        return None;
    }
    let effective = crate::retention::format_span(effective_ns);
    let configured = format_duration(retention.window);
    let reason = match retention.journal_bytes_max {
        Some(cap) => format!(
            "the window of volume {volume} spans {effective} of agent time, not the {configured} group {group} keeps: its journal cap of {} (the journal holds {}) trimmed older points; raise it with `cdp-replica retention --group {group} --max-journal SIZE` (or `none`) to keep more",
            format_size(cap),
            cdp_shared::types::human_bytes(journal_bytes)
        ),
        None => format!(
            "the window of volume {volume} spans {effective} of agent time, not the {configured} group {group} keeps: older points were trimmed under an earlier, smaller retention, and the window grows back as new points arrive"
        ),
    };
    Some(WindowShort {
        effective_secs: (effective_ns / 1_000_000_000) as u64,
        configured_secs: retention.window.as_secs(),
        reason,
    })
}

/// A group's failover in `status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FailoverStatus {
    /// The failover point.
    pub seq: Seq,
    /// `active`, `committing` or `committed`.
    pub state: String,
    /// When it started (active, committing) or was committed (committed), RFC 3339.
    pub since: String,
}

/// A volume's open verification mismatches in `status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Degraded {
    pub mismatches: u64,
    /// One sentence: which chunks, why, and what to do.
    pub reason: String,
}

/// A group's retention in `status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RetentionStatus {
    /// The window as `cdp-replica retention` takes it (`24h`).
    pub window: String,
    /// The window in seconds.
    pub window_s: u64,
    /// The journal cap in bytes; null: none.
    pub max_journal_bytes: Option<u64>,
}

impl From<&Retention> for RetentionStatus {
    fn from(r: &Retention) -> Self {
        RetentionStatus {
            window: format_duration(r.window),
            window_s: r.window.as_secs(),
            max_journal_bytes: r.journal_bytes_max,
        }
    }
}

/// The live pins of a group in `status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PinsStatus {
    pub count: usize,
    /// The oldest pinned seq; null when there is no pin.
    pub oldest_seq: Option<Seq>,
}

/// The whole `status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StatusReport {
    /// Whether a `serve` holds `serve.lock` on this data directory.
    pub serving: bool,
    pub volumes: Vec<VolumeStatus>,
}

/// Reads the status of every volume.
pub async fn status(root: &Path) -> Result<StatusReport> {
    let dir = DataDir::existing(root)?;
    let serving = ServeLock::is_held(&dir)?;
    let board = if serving {
        pause_board::read(&dir)?
    } else {
        pause_board::Board::default()
    };
    let catalog = Catalog::open(&dir.catalog(), OpenMode::Existing).await?;
    let runs = catalog.verify_runs_in_state("running").await?;
    let repairs = catalog.repair_requests_in_state("running").await?;
    let mut volumes = Vec::new();
    for v in catalog.volumes().await? {
        let group = catalog.group_by_id(v.group_id).await?;
        let connected = serving && catalog.link(group.id).await?.is_some_and(|l| l.connected);
        let journal_bytes = catalog.journal_bytes(group.id).await?;
        let pins = live_pins(&catalog, group.id).await?;
        let failover = catalog.failover(group.id).await?;
        let mut short = None;
        let (window_first, window_last) = match window(&mut catalog.clone(), &v, &group).await? {
            Ok(w) => {
                // A failover's own state says more than its window (its base is its point).
                if failover.is_none()
                    && let (Some(first), Some(newest)) = (
                        &w.start_batch,
                        catalog.batch(group.id, group.head_seq).await?,
                    )
                {
                    short = window_short(
                        &v.name,
                        &group.name,
                        &group.retention,
                        w.trimmed,
                        first.agent_ns,
                        newest.agent_ns,
                        journal_bytes,
                    );
                }
                (
                    w.first.map(|b| PointRef {
                        seq: b.seq,
                        time: time_of(b.agent_ns),
                    }),
                    w.last.map(|b| PointRef {
                        seq: b.seq,
                        time: time_of(b.agent_ns),
                    }),
                )
            }
            Err(_) => (None, None),
        };
        let pause = board.groups.get(&group.name);
        let head = board.heads.get(&group.name);
        let rpo_lag_ms = head
            .filter(|_| v.state == VolumeState::Protecting && failover.is_none())
            .and_then(|h| h.lag_ms_at(crate::clock::now_ns()));
        let open = catalog.open_mismatches(v.id).await?;
        let degraded = open.first().map(|first| {
            let more = match open.len() {
                1 => String::new(),
                n => format!(" and {} more", n - 1),
            };
            Degraded {
                mismatches: open.len() as u64,
                reason: format!(
                    "the verifier found chunk {} (at seq {}: {}){more} different from the agent's device; run `cdp-replica verify repair --volume {}` and see `cdp-replica verify report --volume {}`",
                    first.chunk, first.seq, first.reason, v.name, v.name
                ),
            }
        });
        let link_cause = if serving {
            Cause::DisconnectedLinkDown
        } else {
            Cause::DisconnectedNotServing
        };
        let cause = if let Some(f) = &failover {
            match f.state {
                FailoverState::Active => Cause::FailedOverActive,
                FailoverState::Committing => Cause::FailedOverCommitting,
                FailoverState::Committed => Cause::FailedOverCommitted,
            }
        } else if pause.is_some() {
            Cause::PausedReplicaDiskFull
        } else if degraded.is_some() {
            Cause::DegradedVerifyMismatch
        } else if !connected {
            link_cause
        } else if v.state == VolumeState::Protecting {
            Cause::Protecting
        } else {
            Cause::SyncingInitial
        };
        let state: String = match (&failover, cause) {
            (Some(f), Cause::FailedOverActive) => format!("failed over at seq {}", f.seq),
            (Some(f), Cause::FailedOverCommitting) => {
                format!("failed over at seq {} (committing)", f.seq)
            }
            (Some(f), _) => format!("failed over at seq {} (committed)", f.seq),
            (None, c) => c.state().to_owned(),
        };
        let rpo_target_ms = head.and_then(|h| h.rpo_target_ms);
        let breach =
            rpo_lag_ms.is_some_and(|lag| lag > rpo_target_ms.unwrap_or(RPO_TARGET_DEFAULT_MS));
        let causes = cause::ordered(
            cause,
            [
                degraded.is_some().then_some(Cause::DegradedVerifyMismatch),
                (!connected && failover.is_none()).then_some(link_cause),
                breach.then_some(Cause::RpoBreach),
                short.is_some().then_some(Cause::HistoryShort),
            ]
            .into_iter()
            .flatten(),
        );
        volumes.push(VolumeStatus {
            group: group.name.clone(),
            volume: v.name.clone(),
            state,
            cause,
            causes,
            volume_state: v.state.as_str().to_owned(),
            connected,
            size: v.size,
            window_first,
            window_last,
            journal_bytes,
            head_seq: group.head_seq,
            agent_head_seq: head.map(|h| Seq(h.seq)),
            rpo_lag_ms,
            rpo_target_ms,
            base_seq: group.base_seq,
            retention: RetentionStatus::from(&group.retention),
            pins: PinsStatus {
                count: pins.len(),
                oldest_seq: pins.iter().map(|p| p.seq).min(),
            },
            ingest_reason: pause.map(|p| p.reason.clone()),
            paused_since: pause.map(|p| rfc3339(&time_of(p.since_ns))),
            primary: if failover.is_some() {
                Primary::Replica
            } else {
                Primary::Agent
            },
            failover: failover.map(|f| FailoverStatus {
                seq: f.seq,
                state: f.state.as_str().to_owned(),
                since: rfc3339(&time_of(f.committed_ns.unwrap_or(f.started_ns))),
            }),
            degraded,
            window_short: short,
            work: work_of(&v, &pins, &runs, &repairs, crate::clock::now_ns()),
        });
    }
    catalog.close().await;
    Ok(StatusReport { serving, volumes })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rate_and_eta_come_from_the_work_done_since_it_started() {
        const S: i64 = 1_000_000_000;
        // Nothing done yet, or too soon to say.
        assert_eq!(rate_and_eta(0, Some(100), 0, 10 * S), (None, None));
        assert_eq!(rate_and_eta(5, Some(100), 0, S / 20), (None, None));
        // 25 of 100 in 5 s: 5 a second, 15 s left.
        assert_eq!(rate_and_eta(25, Some(100), S, 6 * S), (Some(5), Some(15)));
        // Without an end, a rate only; done is done.
        assert_eq!(rate_and_eta(30, None, 0, 3 * S), (Some(10), None));
        assert_eq!(rate_and_eta(100, Some(100), 0, 4 * S), (Some(25), Some(0)));
        // A partial second left rounds up: work is not done before it is.
        assert_eq!(rate_and_eta(3, Some(4), 0, 3 * S), (Some(1), Some(1)));
    }

    #[test]
    fn work_lists_requested_runs_and_repairs_of_the_volume_only() {
        use crate::catalog::{RepairRow, RunRow, VolumeRow};
        const S: i64 = 1_000_000_000;
        let v = VolumeRow {
            id: 7,
            group_id: 1,
            agent_volume_id: 0,
            name: "v".into(),
            size: 32 << 20,
            state: VolumeState::Protecting,
            sync_done_seq: None,
        };
        let run = |volume_id, full| RunRow {
            id: 1,
            volume_id,
            full,
            rate_per_sec: None,
            state: "running".into(),
            requested_ns: 0,
            started_ns: Some(10 * S),
            ended_ns: None,
            chunks_total: 32,
            chunks_done: 8,
            mismatches: 1,
            skipped: 0,
            error: None,
        };
        let repair = |phase: &str, done| RepairRow {
            id: 2,
            volume_id: 7,
            state: "running".into(),
            requested_ns: 0,
            ended_ns: None,
            message: None,
            started_ns: Some(12 * S),
            phase: Some(phase.into()),
            chunks_done: done,
            chunks_total: 4,
        };
        let w = work_of(
            &v,
            &[],
            &[run(7, true), run(8, false)],
            &[repair("checking", 2)],
            14 * S,
        );
        assert_eq!(w.len(), 2, "{w:?}");
        assert_eq!(
            (
                w[0].kind.as_str(),
                w[0].done,
                w[0].total,
                w[0].rate_per_s,
                w[0].eta_s
            ),
            ("verify-full", 8, Some(32), Some(2), Some(12))
        );
        assert_eq!(
            w[0].what,
            "full verify pass: 8 of 32 chunks checked, 1 mismatch"
        );
        assert_eq!(
            (w[1].kind.as_str(), w[1].rate_per_s, w[1].eta_s),
            ("repair", Some(1), Some(2))
        );
        assert_eq!(
            w[1].what,
            "repair of 4 mismatched chunks: checking the chunks again, 2 checked again"
        );
        // Before it checks, a repair has no rate to go by.
        let w = work_of(&v, &[], &[], &[repair("resending", 0)], 14 * S);
        assert_eq!((w[0].rate_per_s, w[0].eta_s), (None, None));
        assert!(w[0].what.contains("the agent's resend"), "{}", w[0].what);
    }

    #[test]
    fn a_window_is_short_only_when_trimmed_and_shorter_than_configured() {
        const S: i64 = 1_000_000_000;
        let day = Retention {
            window: Duration::from_secs(86400),
            journal_bytes_max: Some(1 << 30),
        };
        // Young: not trimmed, however short.
        assert_eq!(window_short("v", "g", &day, false, 0, 60 * S, 0), None);
        // Trimmed by the window itself: the first point is older than the window.
        assert_eq!(window_short("v", "g", &day, true, 0, 86401 * S, 0), None);
        let w = window_short("v", "g", &day, true, 0, 3600 * S, 1 << 30).expect("short");
        assert_eq!((w.effective_secs, w.configured_secs), (3600, 86400));
        assert!(
            w.reason.contains("spans 1h of agent time, not the 24h")
                && w.reason.contains("journal cap of 1GiB")
                && w.reason.contains("--max-journal"),
            "{}",
            w.reason
        );
        let no_cap = Retention {
            journal_bytes_max: None,
            ..day
        };
        let w = window_short("v", "g", &no_cap, true, 0, 90 * S, 0).expect("short");
        assert!(
            w.reason.contains("earlier, smaller retention"),
            "{}",
            w.reason
        );
    }
}
