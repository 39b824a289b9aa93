//! Retention: how much history a consistency group keeps, and which base the trimmer moves
//! to next (sans-IO: no clock, no disk; the trimmer gathers the inputs and does the I/O).
//!
//! A group's retention is a time **window** (default [`WINDOW_DEFAULT`], 24 h) and an optional
//! **journal cap** (default: none — the window alone bounds the journal; set a cap to bound
//! the disk it takes). The window is measured in agent time back from the agent time of the
//! group's newest durable batch (or from the replica's clock when that is earlier, so that an
//! agent clock running ahead never trims more), not from the replica's clock alone: while an
//! agent is away (a site down, a link cut) its journal does not grow, and nothing is trimmed
//! either — the last day before the outage stays recoverable however long the outage lasts. The cap
//! counts the bytes of the group's batches held in journal segments (`status` shows them as
//! `journal_bytes`); segment files hold at most one segment more
//! ([`crate::journal::SEGMENT_BYTES_MAX`]), since a segment is unlinked only once every batch
//! in it has been trimmed.
//!
//! The new base B' ([`choose_trim`]) is the newest seq such that every batch ≤ B' is older
//! than the window, or, when that is further, the seq up to which batches must go so that the
//! journal bytes of the batches after it fit under the cap — never past the oldest live pin,
//! never past the head, and at most [`TRIM_ROUND_BYTES_MAX`] / [`TRIM_ROUND_RECORDS_MAX`] /
//! [`TRIM_ROUND_BATCHES_MAX`] beyond the current base in one round (a round that must go
//! further is followed at once by another).
//!
//! Durations are written `30s`, `15m`, `24h`, `1h30m`, `7d`; sizes `512MiB`, `100GiB`, `1TB`
//! (KiB, MiB, GiB, TiB are powers of 1024; KB, MB, GB, TB powers of 1000; B bytes), or `none`
//! for no cap: the syntax of `cdp_shared::units`, shared with the agent.

use cdp_shared::types::Seq;
use std::time::Duration;

use cdp_shared::batch::BATCH_BYTES_MAX;
use cdp_shared::types::BATCH_RECORDS_MAX;

/// The window of a new group unless configured otherwise.
pub const WINDOW_DEFAULT: Duration = Duration::from_secs(24 * 3600);
/// The shortest window accepted.
pub const WINDOW_MIN: Duration = Duration::from_secs(1);
/// The longest window accepted (ten years).
pub const WINDOW_MAX: Duration = Duration::from_secs(3650 * 24 * 3600);
/// The smallest journal cap accepted.
pub const JOURNAL_CAP_MIN_BYTES: u64 = 1 << 20;
/// The largest journal cap accepted (1 EiB: well inside SQLite's i64).
pub const JOURNAL_CAP_MAX_BYTES: u64 = 1 << 60;
/// Journal bytes one trim round applies to the target files at most (it always takes at least
/// one batch).
pub const TRIM_ROUND_BYTES_MAX: u64 = 64 << 20;
/// Records one trim round applies at most (it always takes at least one batch).
pub const TRIM_ROUND_RECORDS_MAX: u64 = 1 << 16;
/// Batches one trim round takes at most.
pub const TRIM_ROUND_BATCHES_MAX: u64 = 4096;

const _: () = assert!(TRIM_ROUND_BYTES_MAX >= BATCH_BYTES_MAX as u64);
const _: () = assert!(TRIM_ROUND_RECORDS_MAX >= BATCH_RECORDS_MAX as u64);
const _: () = assert!(JOURNAL_CAP_MIN_BYTES <= JOURNAL_CAP_MAX_BYTES);
const _: () = assert!(WINDOW_MAX.as_secs() <= i64::MAX as u64 / 1_000_000_000);

/// The retention of one group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// How far back, in agent time from the group's newest batch, points are kept (whole
    /// seconds, within [`WINDOW_MIN`]..=[`WINDOW_MAX`]).
    pub window: Duration,
    /// Cap on the group's journal bytes; `None`: no cap.
    pub journal_bytes_max: Option<u64>,
}

impl Default for Retention {
    fn default() -> Retention {
        Retention {
            window: WINDOW_DEFAULT,
            journal_bytes_max: None,
        }
    }
}

impl std::fmt::Display for Retention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "window {}, journal cap ", format_duration(self.window))?;
        match self.journal_bytes_max {
            Some(n) => write!(f, "{}", format_size(n)),
            None => write!(f, "none"),
        }
    }
}

/// Parses a window: numbers with units (`30s`, `15m`, `24h`, `1h30m`, `7d`; the syntax of
/// [`cdp_shared::units::parse_duration`]), whole seconds from 1s to 3650d. `Err` is the
/// sentence for the operator.
pub fn parse_duration(input: &str) -> Result<Duration, String> {
    let bad = |why: &str| {
        format!(
            "{input:?} is not a window: {why}; write a number and a unit, such as 30s, 15m, 24h, 1h30m or 7d"
        )
    };
    let d = cdp_shared::units::parse_duration(input).map_err(|e| bad(&e))?;
    if d > WINDOW_MAX {
        return Err(bad("it is longer than 3650d"));
    }
    if d < WINDOW_MIN {
        return Err(bad("it must be at least 1s"));
    }
    if d.subsec_nanos() != 0 {
        return Err(bad("it must be whole seconds"));
    }
    Ok(d)
}

/// A window as [`parse_duration`] reads it, in the largest unit that divides it (`24h`, `90m`).
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    // Whole days from two days on (a day reads better as 24h).
    if s > 24 * 3600 && s.is_multiple_of(24 * 3600) {
        return format!("{}d", s / (24 * 3600));
    }
    for (unit, n) in [("h", 3600), ("m", 60)] {
        if s > 0 && s.is_multiple_of(n) {
            return format!("{}{unit}", s / n);
        }
    }
    format!("{s}s")
}

/// A span of agent time for people, to the second: `2d 3h`, `1h 5m`, `4m 30s`, `12s`
/// (`0s` for less than a second).
pub fn format_span(ns: i64) -> String {
    let s = ns.max(0) / 1_000_000_000;
    let (d, h, m, sec) = (s / 86400, s / 3600 % 24, s / 60 % 60, s % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{sec}s"),
        (0, 0, _) if sec == 0 => format!("{m}m"),
        (0, 0, _) => format!("{m}m {sec}s"),
        (0, _, 0) => format!("{h}h"),
        (0, _, _) => format!("{h}h {m}m"),
        (_, 0, _) => format!("{d}d"),
        _ => format!("{d}d {h}h"),
    }
}

/// Parses a journal cap: a whole number and a unit (`512MiB`, `100GiB`, `1TB`), or `none`.
/// `Err` is the sentence for the operator.
pub fn parse_size(input: &str) -> Result<Option<u64>, String> {
    if input.trim().eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    let bad = |why: &str| {
        format!(
            "{input:?} is not a journal size: {why}; write a whole number and a unit, such as 512MiB, 100GiB or 1TB, or `none` for no cap"
        )
    };
    let bytes = parse_bytes(input).map_err(|why| bad(&why))?;
    if bytes < JOURNAL_CAP_MIN_BYTES {
        return Err(bad("it must be at least 1MiB"));
    }
    Ok(Some(bytes))
}

/// A size in bytes: a number and a unit (`64KiB`, `256MiB`, `1.5GiB`, `1TB`; the syntax of
/// [`cdp_shared::units::parse_size`]), at most 1 EiB. `Err` says why not, for the caller's
/// sentence.
pub fn parse_bytes(input: &str) -> Result<u64, String> {
    let n = cdp_shared::units::parse_size(input)?;
    if n > JOURNAL_CAP_MAX_BYTES {
        return Err("it is larger than 1 EiB".to_owned());
    }
    Ok(n)
}

/// A journal cap as [`parse_size`] reads it, exactly, in the largest binary or decimal unit
/// that divides it (`100GiB`, `1TB`, `1536MiB`).
pub fn format_size(bytes: u64) -> String {
    for (unit, n) in [
        ("TiB", 1u64 << 40),
        ("TB", 1_000_000_000_000),
        ("GiB", 1 << 30),
        ("GB", 1_000_000_000),
        ("MiB", 1 << 20),
        ("MB", 1_000_000),
        ("KiB", 1 << 10),
        ("KB", 1_000),
    ] {
        if bytes >= n && bytes.is_multiple_of(n) {
            return format!("{}{unit}", bytes / n);
        }
    }
    format!("{bytes}B")
}

/// One batch after the base, as the trimmer weighs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchWeight {
    pub seq: Seq,
    /// Bytes of the batch in a journal segment (0 when it was not journaled).
    pub journal_bytes: u64,
    /// Records of the batch.
    pub records: u64,
}

/// What the trimmer knows when it chooses the next base.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrimInputs {
    /// The group's base (every batch ≤ base is in the target files).
    pub base: Seq,
    /// The group's durable head.
    pub head: Seq,
    /// The newest seq such that every batch in (base, it] is older than the window (base when
    /// the batch after the base is not).
    pub older_than_window: Seq,
    /// Journal bytes beyond the cap (0 when there is no cap or the journal is within it).
    pub excess_bytes: u64,
    /// The oldest live pin of the group, if any.
    pub oldest_pin: Option<Seq>,
}

/// The trimmer's decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrimChoice {
    /// The new base B', or `None` when the base stays.
    pub to: Option<Seq>,
    /// What retention asks for (before the round limits and pins).
    pub wanted: Seq,
    /// A pin keeps the base short of what retention asks for.
    pub held_by_pin: bool,
    /// The round limits (not a pin) stopped short of `wanted`: another round should follow.
    pub more: bool,
}

/// Chooses the next base (see the module docs). `batches` are the batches after the base in
/// seq order, consecutive from `base + 1`, as many as a round may take (at most
/// [`TRIM_ROUND_BATCHES_MAX`]; fewer when the head comes first).
pub fn choose_trim(inputs: &TrimInputs, batches: &[BatchWeight]) -> TrimChoice {
    let TrimInputs {
        base,
        head,
        older_than_window,
        excess_bytes,
        oldest_pin,
    } = *inputs;
    // The cap: the first seq at which the bytes trimmed reach the excess.
    let mut for_cap = base;
    if excess_bytes > 0 {
        let mut acc = 0u64;
        for_cap = head;
        for b in batches {
            acc += b.journal_bytes;
            if acc >= excess_bytes {
                for_cap = b.seq;
                break;
            }
        }
    }
    let wanted = older_than_window.max(for_cap).min(head);
    // The round limits (at least one batch).
    let mut round = base;
    let (mut bytes, mut records) = (0u64, 0u64);
    for (i, b) in batches.iter().enumerate() {
        if b.seq > wanted || i as u64 >= TRIM_ROUND_BATCHES_MAX {
            break;
        }
        bytes += b.journal_bytes;
        records += b.records;
        if round > base && (bytes > TRIM_ROUND_BYTES_MAX || records > TRIM_ROUND_RECORDS_MAX) {
            break;
        }
        round = b.seq;
    }
    let held_by_pin = oldest_pin.is_some_and(|p| p < wanted);
    let to = match oldest_pin {
        Some(p) => round.min(p),
        None => round,
    };
    TrimChoice {
        to: (to > base).then_some(to),
        wanted,
        held_by_pin,
        more: to > base && round < wanted && oldest_pin.is_none_or(|p| p > round),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_print() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration(" 24h "), Ok(WINDOW_DEFAULT));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86400)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        for (bad, why) in [
            ("", "empty"),
            ("h", "does not start with a number"),
            ("10", "no unit"),
            ("5x", "not a duration"),
            ("1s 500ms", "whole seconds"),
            ("0s", "at least 1s"),
            ("-3h", "does not start with a number"),
            ("3651d", "longer than 3650d"),
            ("99999999999999999999s", "not a duration"),
        ] {
            let e = parse_duration(bad).expect_err(bad);
            assert!(e.contains(why) && e.contains("24h"), "{bad}: {e}");
        }
        assert_eq!(format_duration(Duration::from_secs(86400)), "24h");
        for s in ["30s", "15m", "24h", "7d", "2d", "90m", "61s", "36h"] {
            assert_eq!(format_duration(parse_duration(s).expect(s)), s);
        }
    }

    #[test]
    fn spans_print_for_people() {
        let s = |secs: i64| format_span(secs * 1_000_000_000);
        assert_eq!(format_span(999_999_999), "0s");
        assert_eq!(s(12), "12s");
        assert_eq!(s(270), "4m 30s");
        assert_eq!(s(300), "5m");
        assert_eq!(s(3900), "1h 5m");
        assert_eq!(s(7200), "2h");
        assert_eq!(s(86400 + 3 * 3600 + 7), "1d 3h");
        assert_eq!(s(2 * 86400 + 59), "2d");
        assert_eq!(format_span(-5), "0s");
    }

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!(parse_size("512MiB"), Ok(Some(512 << 20)));
        assert_eq!(parse_size("100GiB"), Ok(Some(100 << 30)));
        assert_eq!(parse_size("1TB"), Ok(Some(1_000_000_000_000)));
        assert_eq!(parse_size("2gib"), Ok(Some(2 << 30)));
        assert_eq!(parse_size("none"), Ok(None));
        assert_eq!(parse_size("1.5GiB"), Ok(Some(3 << 29)));
        for (bad, why) in [
            ("12", "no unit"),
            ("3 parsecs", "is not a unit"),
            ("1KiB", "at least 1MiB"),
            ("GiB", "does not start with a number"),
            ("2000000TiB", "larger than 1 EiB"),
        ] {
            let e = parse_size(bad).expect_err(bad);
            assert!(e.contains(why) && e.contains("100GiB"), "{bad}: {e}");
        }
        for s in ["512MiB", "100GiB", "1TB", "1536MiB", "3MB"] {
            assert_eq!(
                format_size(parse_size(s).expect(s).expect("a cap")),
                s,
                "{s}"
            );
        }
    }

    fn weights(from: u64, to: u64, bytes: u64) -> Vec<BatchWeight> {
        (from..=to)
            .map(|seq| BatchWeight {
                seq: Seq(seq),
                journal_bytes: bytes,
                records: 1,
            })
            .collect()
    }

    #[test]
    fn the_window_the_cap_pins_and_the_head_bound_the_base() {
        let batches = weights(11, 30, 100);
        let inputs = TrimInputs {
            base: Seq(10),
            head: Seq(30),
            older_than_window: Seq(15),
            excess_bytes: 0,
            oldest_pin: None,
        };
        // The window alone.
        let c = choose_trim(&inputs, &batches);
        assert_eq!(
            (c.to, c.wanted, c.held_by_pin, c.more),
            (Some(Seq(15)), Seq(15), false, false)
        );
        // Nothing older than the window, no cap: the base stays.
        let c = choose_trim(
            &TrimInputs {
                older_than_window: Seq(10),
                ..inputs
            },
            &batches,
        );
        assert_eq!(c.to, None);
        // The cap asks for more: 950 bytes over means ten batches go.
        let c = choose_trim(
            &TrimInputs {
                excess_bytes: 950,
                ..inputs
            },
            &batches,
        );
        assert_eq!(c.to, Some(Seq(20)));
        // A pin holds it back, and says so.
        let c = choose_trim(
            &TrimInputs {
                excess_bytes: 450,
                oldest_pin: Some(Seq(12)),
                ..inputs
            },
            &batches,
        );
        assert_eq!((c.to, c.held_by_pin), (Some(Seq(12)), true));
        // A pin at the base: nothing moves.
        let c = choose_trim(
            &TrimInputs {
                oldest_pin: Some(Seq(10)),
                ..inputs
            },
            &batches,
        );
        assert_eq!((c.to, c.held_by_pin), (None, true));
        // A pin past what is wanted does not hold anything.
        let c = choose_trim(
            &TrimInputs {
                oldest_pin: Some(Seq(25)),
                ..inputs
            },
            &batches,
        );
        assert_eq!((c.to, c.held_by_pin), (Some(Seq(15)), false));
        // Never past the head, even when everything is older than the window.
        let c = choose_trim(
            &TrimInputs {
                older_than_window: Seq(99),
                ..inputs
            },
            &batches,
        );
        assert_eq!(c.to, Some(Seq(30)));
    }

    #[test]
    fn a_round_is_bounded_but_takes_at_least_one_batch() {
        let big = weights(1, 10, TRIM_ROUND_BYTES_MAX / 2 + 1);
        let inputs = TrimInputs {
            base: Seq(0),
            head: Seq(10),
            older_than_window: Seq(10),
            excess_bytes: 0,
            oldest_pin: None,
        };
        let c = choose_trim(&inputs, &big);
        assert_eq!((c.to, c.more), (Some(Seq(1)), true));
        let small = weights(1, 10, TRIM_ROUND_BYTES_MAX / 4);
        assert_eq!(choose_trim(&inputs, &small).to, Some(Seq(4)));
        let many = weights(1, TRIM_ROUND_BATCHES_MAX + 10, 0);
        let c = choose_trim(
            &TrimInputs {
                head: Seq(TRIM_ROUND_BATCHES_MAX + 10),
                older_than_window: Seq(TRIM_ROUND_BATCHES_MAX + 10),
                ..inputs
            },
            &many,
        );
        assert_eq!(c.to, Some(Seq(TRIM_ROUND_BATCHES_MAX)));
    }
}
