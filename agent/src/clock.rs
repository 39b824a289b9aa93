//! Wall-clock time.

/// Wall-clock time as UTC nanoseconds, for batch headers.
pub fn now_ns() -> i64 {
    chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0)
}
