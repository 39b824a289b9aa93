//! Running the `cdp-replica` binary's commands in tests.
#![allow(dead_code)]

use std::process::{Command, Output};

/// Runs `cdp-replica ARGS…` (warnings only on stderr).
pub fn run(args: &[&str]) -> Output {
    Command::new(super::replica_bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run cdp-replica")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs a command that must succeed; returns its stdout.
pub fn ok(args: &[&str]) -> String {
    let o = run(args);
    assert!(
        o.status.success(),
        "{args:?} failed: {}{}",
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

/// Runs a command that must exit 1 with an `error:` sentence containing `needle` (and no
/// panic); returns (stdout, stderr).
pub fn fails(args: &[&str], needle: &str) -> (String, String) {
    let o = run(args);
    let (out, err) = (stdout(&o), stderr(&o));
    assert_eq!(
        o.status.code(),
        Some(1),
        "{args:?} should exit 1: {out}{err}"
    );
    assert!(
        err.contains("error: ") && err.contains(needle),
        "{args:?}: stderr {err:?} lacks {needle:?}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
    (out, err)
}

/// Runs a command that must succeed and print JSON.
pub fn json(args: &[&str]) -> serde_json::Value {
    let out = ok(args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {out}"))
}
