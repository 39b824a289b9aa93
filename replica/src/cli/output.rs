//! Shared helpers of the commands: tables, JSON, and times read from flags or shown to people.

use cdp_replica::retention::parse_duration;

use super::CliError;

/// Prints rows with each column padded to its widest cell ([`cdp_shared::table`]).
pub(crate) fn print_table(rows: &[Vec<String>]) {
    cdp_shared::out!("{}", cdp_shared::table::render(rows));
}

pub(crate) fn to_json<T: serde::Serialize>(value: &T) -> Result<String, CliError> {
    serde_json::to_string_pretty(value)
        .map_err(|e| CliError::Usage(format!("could not render JSON: {e}")))
}

/// A time flag (`--since`, `--until`): an RFC 3339 time, or a duration before now.
pub(crate) fn parse_time(flag: &str, s: &str) -> Result<i64, CliError> {
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
pub(crate) fn human_time(rfc: &str) -> String {
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
