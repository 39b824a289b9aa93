//! The one syntax for sizes and durations, in both configuration files and every flag:
//! sizes as `4GiB`, `512MiB`, `1TB` (`bytesize`: powers of 1024 with `i`, of 1000 without),
//! durations as `90s`, `1h30m`, `7d`, `20ms` (`humantime`). Sans-IO.
//!
//! A TOML value of either kind may also be a bare integer, read in the unit its key names
//! (bytes for a size; the key's own unit for a duration), so files written before the units
//! keep working.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Largest size accepted anywhere: 1 EiB.
pub const SIZE_MAX: u64 = 1 << 60;

/// Parses a size: a number and a unit (`64KiB`, `256MiB`, `1.5GiB`, `1TB`, `4096B`), at most
/// 1 EiB. A bare number is refused: a size always says its unit. `Err` says why, for the
/// caller's sentence (which names the key or the flag and gives examples).
pub fn parse_size(input: &str) -> Result<u64, String> {
    let s = input.trim();
    if s.is_empty() {
        return Err("it is empty".to_owned());
    }
    if !s.starts_with(|c: char| c.is_ascii_digit()) {
        return Err("it does not start with a number".to_owned());
    }
    if s.chars().all(|c| c.is_ascii_digit()) {
        return Err("it has no unit".to_owned());
    }
    let unit = s
        .trim_start_matches(|c: char| c.is_ascii_digit() || c == '.')
        .trim();
    const UNITS: &[&str] = &[
        "b", "k", "kb", "kib", "ki", "m", "mb", "mib", "mi", "g", "gb", "gib", "gi", "t", "tb",
        "tib", "ti", "p", "pb", "pib", "pi", "e", "eb", "eib", "ei",
    ];
    if !UNITS.contains(&unit.to_ascii_lowercase().as_str()) {
        return Err(format!(
            "{unit:?} is not a unit (sizes use B, KiB, MiB, GiB, TiB, or KB, MB, GB, TB)"
        ));
    }
    let size: bytesize::ByteSize = s
        .parse()
        .map_err(|e: String| format!("it is not a size ({e})"))?;
    let n = size.as_u64();
    if n > SIZE_MAX || n == u64::MAX {
        return Err("it is larger than 1 EiB".to_owned());
    }
    Ok(n)
}

/// A size as [`parse_size`] reads it back exactly: the largest binary unit that divides it
/// (`256MiB`, `4GiB`, `1536KiB`), else bytes (`1000B`).
pub fn format_size(n: u64) -> String {
    for (unit, shift) in [
        ("EiB", 60),
        ("PiB", 50),
        ("TiB", 40),
        ("GiB", 30),
        ("MiB", 20),
        ("KiB", 10),
    ] {
        if n > 0 && n.is_multiple_of(1 << shift) {
            return format!("{}{unit}", n >> shift);
        }
    }
    format!("{n}B")
}

/// Parses a duration: numbers with units, in one run or separated by spaces (`90s`, `1h30m`,
/// `7d`, `20ms`, `1h 30m`). A bare number is refused: a duration always says its unit.
pub fn parse_duration(input: &str) -> Result<Duration, String> {
    let s = input.trim();
    if s.is_empty() {
        return Err("it is empty".to_owned());
    }
    if !s.starts_with(|c: char| c.is_ascii_digit()) {
        return Err("it does not start with a number".to_owned());
    }
    if s.chars().all(|c| c.is_ascii_digit()) {
        return Err("it has no unit".to_owned());
    }
    humantime::parse_duration(s).map_err(|e| format!("it is not a duration ({e})"))
}

/// A duration as [`parse_duration`] reads it back exactly (`1h 30m`, `7days`, `20ms`).
pub fn format_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// An RPO lag for a table: `12 ms` under ten seconds, else whole seconds (`42 s`).
pub fn format_lag_ms(ms: u64) -> String {
    if ms < 10_000 {
        format!("{ms} ms")
    } else {
        format!("{} s", ms / 1000)
    }
}

/// A size in a TOML file: a string with a unit (`"4GiB"`) or a bare integer of bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SizeValue {
    Bytes(u64),
    Text(String),
}

impl SizeValue {
    /// The size in bytes; `Err` says why not.
    pub fn bytes(&self) -> Result<u64, String> {
        match self {
            SizeValue::Bytes(n) if *n <= SIZE_MAX => Ok(*n),
            SizeValue::Bytes(_) => Err("it is larger than 1 EiB".to_owned()),
            SizeValue::Text(s) => parse_size(s),
        }
    }

    /// The value written for `n` bytes.
    pub fn of(n: u64) -> SizeValue {
        SizeValue::Text(format_size(n))
    }
}

/// The value as TOML writes it: `4096` or `"4GiB"`.
impl std::fmt::Display for SizeValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SizeValue::Bytes(n) => write!(f, "{n}"),
            SizeValue::Text(s) => write!(f, "{s:?}"),
        }
    }
}

/// A duration in a TOML file: a string with units (`"1h30m"`) or a bare integer in the unit
/// the caller names (`bare_unit`, e.g. milliseconds for a key that was `…_ms`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DurationValue {
    Number(u64),
    Text(String),
}

impl DurationValue {
    /// The duration, a bare number read as `bare_unit` each; `Err` says why not.
    pub fn duration(&self, bare_unit: Duration) -> Result<Duration, String> {
        match self {
            DurationValue::Number(n) => u32::try_from(*n)
                .ok()
                .and_then(|n| bare_unit.checked_mul(n))
                .ok_or_else(|| "it is too long".to_owned()),
            DurationValue::Text(s) => parse_duration(s),
        }
    }

    /// The value written for `d`.
    pub fn of(d: Duration) -> DurationValue {
        DurationValue::Text(format_duration(d))
    }
}

/// The value as TOML writes it: `20` or `"1h30m"`.
impl std::fmt::Display for DurationValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DurationValue::Number(n) => write!(f, "{n}"),
            DurationValue::Text(s) => write!(f, "{s:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_in_binary_and_decimal_units() {
        assert_eq!(parse_size("4GiB"), Ok(4 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("1TB"), Ok(1_000_000_000_000));
        assert_eq!(parse_size("64 KiB"), Ok(64 << 10));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("4096B"), Ok(4096));
        assert_eq!(
            parse_size("100XB"),
            Err("\"XB\" is not a unit (sizes use B, KiB, MiB, GiB, TiB, or KB, MB, GB, TB)".into())
        );
        assert_eq!(parse_size("1EiB"), Ok(SIZE_MAX));
        for bad in [
            "",
            "GiB",
            "4096",
            "4 parsecs",
            "-1GiB",
            "99999999EiB",
            "1.2.3GiB",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn a_formatted_size_reads_back() {
        for n in [
            0,
            1,
            1000,
            4096,
            1536 << 10,
            256 << 20,
            4 << 30,
            3 << 40,
            SIZE_MAX,
        ] {
            assert_eq!(parse_size(&format_size(n)), Ok(n), "{n}");
        }
        assert_eq!(format_size(256 << 20), "256MiB");
    }

    #[test]
    fn durations_read_compound_units() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86400)));
        assert_eq!(parse_duration("20ms"), Ok(Duration::from_millis(20)));
        for bad in ["", "30", "soon", "1x", "-5s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
        for d in [
            Duration::from_millis(20),
            Duration::from_secs(5400),
            Duration::from_secs(7 * 86400),
        ] {
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
    }

    #[test]
    fn toml_values_take_a_string_or_a_bare_number() {
        #[derive(Deserialize)]
        struct T {
            size: SizeValue,
            age: DurationValue,
        }
        let t: T = toml::from_str("size = 4096\nage = 20\n").unwrap();
        assert_eq!(t.size.bytes(), Ok(4096));
        assert_eq!(
            t.age.duration(Duration::from_millis(1)),
            Ok(Duration::from_millis(20))
        );
        let t: T = toml::from_str("size = \"4GiB\"\nage = \"1h30m\"\n").unwrap();
        assert_eq!(t.size.bytes(), Ok(4 << 30));
        assert_eq!(
            t.age.duration(Duration::from_millis(1)),
            Ok(Duration::from_secs(5400))
        );
        let t: T = toml::from_str("size = \"4 bananas\"\nage = \"later\"\n").unwrap();
        assert!(t.size.bytes().is_err());
        assert!(t.age.duration(Duration::from_millis(1)).is_err());
    }
}
