//! Time: now, and the one way times are shown (RFC 3339, UTC).

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serializer;

/// Now, as UTC nanoseconds since the Unix epoch.
pub fn now_ns() -> i64 {
    chrono::Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX)
}

/// A catalog time (UTC nanoseconds) as a date.
pub(crate) fn time_of(ns: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_nanos(ns)
}

/// A date as operators read it everywhere: RFC 3339, UTC, as many fraction digits as needed.
pub(crate) fn rfc3339(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// A catalog time (UTC nanoseconds) as [`rfc3339`] shows it.
pub fn rfc3339_ns(ns: i64) -> String {
    rfc3339(&time_of(ns))
}

/// Serializes a date as [`rfc3339`] (serde `serialize_with`).
pub(crate) fn ser_time<S: Serializer>(
    t: &DateTime<Utc>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.collect_str(&rfc3339(t))
}
