//! Recovery point specifications: what an operator types after `--at`.
//!
//! `latest` (the latest consistent point), `seq:N` (batch N exactly), `bookmark:NAME` (the
//! latest batch carrying that bookmark) or an RFC 3339 time (the latest consistent point at or
//! before it). Parsing only; resolving a spec against a journal is the replica's job.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, SecondsFormat, Utc};

use crate::types::check_name;

/// The forms [`PointSpec::from_str`] accepts, for error messages and help texts.
pub const POINT_FORMS: &str =
    "`latest`, `seq:N`, `bookmark:NAME` or an RFC 3339 time such as 2024-05-01T12:00:00Z";

/// A recovery point as asked for, before it is resolved against a journal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PointSpec {
    /// The latest consistent point.
    Latest,
    /// Batch `N` exactly (an inconsistent one too, since it was asked for explicitly).
    Seq(u64),
    /// The latest batch that carries this bookmark.
    Bookmark(String),
    /// The latest consistent point whose agent time is at or before this time.
    Time(DateTime<Utc>),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{input:?} is not a recovery point: {reason}; use {POINT_FORMS}")]
pub struct PointSpecError {
    pub input: String,
    pub reason: String,
}

impl FromStr for PointSpec {
    type Err = PointSpecError;

    fn from_str(input: &str) -> Result<PointSpec, PointSpecError> {
        let bad = |reason: &str| PointSpecError {
            input: input.to_owned(),
            reason: reason.to_owned(),
        };
        let s = input.trim();
        if s.is_empty() {
            return Err(bad("it is empty"));
        }
        if s.eq_ignore_ascii_case("latest") {
            return Ok(PointSpec::Latest);
        }
        if let Some(n) = strip_prefix_ignore_case(s, "seq:") {
            return match n.parse::<u64>() {
                Ok(0) => Err(bad("seqs start at 1")),
                Ok(n) => Ok(PointSpec::Seq(n)),
                Err(_) => Err(bad("the seq is not a positive whole number")),
            };
        }
        if let Some(name) = strip_prefix_ignore_case(s, "bookmark:") {
            return match check_name("bookmark", name) {
                Ok(()) => Ok(PointSpec::Bookmark(name.to_owned())),
                Err(reason) => Err(bad(&reason)),
            };
        }
        match DateTime::parse_from_rfc3339(s) {
            Ok(t) => Ok(PointSpec::Time(t.with_timezone(&Utc))),
            Err(e) => Err(bad(&format!("it is not an RFC 3339 time ({e})"))),
        }
    }
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    if s.len() >= prefix.len()
        && s.is_char_boundary(prefix.len())
        && s[..prefix.len()].eq_ignore_ascii_case(prefix)
    {
        Some(&s[prefix.len()..])
    } else {
        None
    }
}

impl fmt::Display for PointSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PointSpec::Latest => write!(f, "latest"),
            PointSpec::Seq(n) => write!(f, "seq:{n}"),
            PointSpec::Bookmark(name) => write!(f, "bookmark:{name}"),
            PointSpec::Time(t) => write!(f, "{}", t.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn accepted_forms_parse() {
        assert_eq!("latest".parse(), Ok(PointSpec::Latest));
        assert_eq!(" LATEST ".parse(), Ok(PointSpec::Latest));
        assert_eq!("seq:42".parse(), Ok(PointSpec::Seq(42)));
        assert_eq!(
            "bookmark:before-upgrade".parse(),
            Ok(PointSpec::Bookmark("before-upgrade".into()))
        );
        assert_eq!(
            "2024-05-01T12:00:00Z".parse(),
            Ok(PointSpec::Time(
                Utc.with_ymd_and_hms(2024, 5, 1, 12, 0, 0)
                    .single()
                    .expect("valid time")
            ))
        );
        assert_eq!(
            "2024-05-01T14:00:00+02:00".parse(),
            Ok(PointSpec::Time(
                Utc.with_ymd_and_hms(2024, 5, 1, 12, 0, 0)
                    .single()
                    .expect("valid time")
            ))
        );
    }

    #[test]
    fn rejected_forms_name_the_accepted_ones() {
        for bad in [
            "",
            "seq:",
            "seq:0",
            "seq:-1",
            "seq:x",
            "bookmark:",
            "bookmark:a/b",
            "yesterday",
            "2024-05-01",
        ] {
            let err = bad.parse::<PointSpec>().expect_err(bad);
            let text = err.to_string();
            assert!(
                text.contains("`latest`")
                    && text.contains("seq:N")
                    && text.contains("bookmark:NAME"),
                "{text}"
            );
            assert!(text.contains("RFC 3339"), "{text}");
        }
    }

    #[test]
    fn display_round_trips() {
        for s in ["latest", "seq:7", "bookmark:b1", "2024-05-01T12:00:00.5Z"] {
            let p: PointSpec = s.parse().expect(s);
            assert_eq!(p.to_string().parse::<PointSpec>(), Ok(p.clone()));
        }
    }
}
