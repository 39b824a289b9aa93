//! The verifier against the real agent (issue 6):
//! * no false positives: heavy random writes from fio on a small volume (every chunk under
//!   constant overwrite) for `CDP_VERIFY_SECS` seconds (60; `make soak` runs 600) with the
//!   background verifier at its highest rate: many checks, all of them matches;
//! * a full verify of a 1 GiB volume covers every chunk, and its report says so.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1 << 20;

/// `cdp-replica verify SUB --data DIR ARGS…`.
fn verify_cmd(c: &Cluster, sub: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(bin("cdp-replica"));
    cmd.args(["verify", sub, "--data"])
        .arg(&c.replica_dir)
        .args(args);
    cmd
}

fn report(c: &Cluster, volume: &str) -> serde_json::Value {
    let out = run_ok(&mut verify_cmd(
        c,
        "report",
        &["--volume", volume, "--json"],
    ));
    let r: serde_json::Value = serde_json::from_str(&out).expect("report JSON");
    r["volumes"][0].clone()
}

#[test]
fn no_false_positives_under_heavy_overwrite_at_the_highest_rate() {
    if !require_tool("fio") {
        return;
    }
    let secs: u64 = std::env::var("CDP_VERIFY_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let mut c = Cluster::new();
    let dev = c.make_device("v.img", 8 * MIB, 8 * MIB, 3);
    c.protect("v", &dev, None);
    set_verifier_rate(&c, 10_000);
    c.start_replica();
    c.start_agent();
    c.wait_protecting("v", Duration::from_secs(120));
    // A bounded journal: at this write rate (about 80 MB/s here) the 10-minute soak would
    // otherwise journal some 50 GB. The trimmer keeps up; a check whose point it trims first
    // is skipped, not a mismatch.
    run_ok(
        Command::new(bin("cdp-replica"))
            .args(["retention", "--data"])
            .arg(&c.replica_dir)
            .args(["--group", "v", "--max-journal", "1GiB", "--yes"]),
    );

    // Overwrite in rounds of fio until the verifier has matched thousands of chunks and at
    // least `secs` have passed: a loaded machine checks fewer chunks a second, so it runs
    // more rounds (a count with a deadline, not a rate).
    let wanted = secs * 1000 / 60;
    let round_secs = secs.clamp(1, 15);
    let deadline = Duration::from_secs(secs * 10 + 300);
    let started = Instant::now();
    let mut rounds = 0u64;
    let r = loop {
        let limit = command_deadline() + Duration::from_secs(round_secs);
        let out = run_ok_within(
            Command::new("fio").current_dir(c.dir.path()).args([
                "--name=overwrite",
                "--ioengine=nbd",
                &format!("--uri={}", c.nbd_uri("v")),
                "--rw=randwrite",
                "--bs=4k",
                "--size=8M",
                "--iodepth=8",
                "--time_based",
                &format!("--runtime={round_secs}"),
                "--output-format=json",
            ]),
            limit,
        );
        let fio: serde_json::Value =
            serde_json::from_str(out.trim_start_matches(|ch| ch != '{')).expect("fio JSON");
        assert_eq!(fio["jobs"][0]["error"].as_i64(), Some(0), "fio: {fio}");
        rounds += 1;
        let r = report(&c, "v");
        let matched = r["checks"]["match"].as_u64().unwrap_or(0);
        eprintln!(
            "round {rounds}: {} checks after {:?} of overwrite at {} write IOPS",
            r["checks"]["total"],
            started.elapsed(),
            fio["jobs"][0]["write"]["iops"]
        );
        assert_eq!(r["checks"]["mismatch"], 0, "no false positives: {r}");
        if matched >= wanted && started.elapsed() >= Duration::from_secs(secs) {
            break r;
        }
        assert!(
            started.elapsed() < deadline,
            "the verifier at its highest rate matched {matched} chunks, not {wanted}, in {:?} of overwrite: {r}",
            started.elapsed()
        );
    };
    c.bookmark("after-fio", true);
    assert_eq!(r["open_mismatches"], 0, "{r}");
    assert_eq!(
        r["coverage"]["chunks"], 8,
        "every chunk was checked while overwritten: {r}"
    );
    let st = c.replica_status();
    assert_eq!(
        st["volumes"][0]["degraded"],
        serde_json::Value::Null,
        "{st}"
    );
}

#[test]
fn a_full_verify_of_a_1_gib_volume_covers_every_chunk() {
    let mut c = Cluster::new();
    let dev = c.make_device("big.img", 1024 * MIB, 64 * MIB, 4);
    c.protect("big", &dev, None);
    set_verifier_rate(&c, 0);
    c.start_replica();
    c.start_agent();
    c.wait_protecting("big", Duration::from_secs(300));
    let out = run_ok(&mut verify_cmd(&c, "run", &["--volume", "big", "--full"]));
    assert!(
        out.contains("1024 of 1024") && out.contains("0 mismatches"),
        "{out}"
    );
    let r = report(&c, "big");
    assert_eq!(r["chunks"], 1024, "{r}");
    assert_eq!(r["coverage"]["chunks"], 1024, "{r}");
    assert_eq!(r["coverage"]["of"], 1024, "{r}");
    assert!(r["last_full_pass"].is_string(), "{r}");
    assert_eq!(r["checks"]["mismatch"], 0, "{r}");
    let table = run_ok(&mut verify_cmd(&c, "report", &["--volume", "big"]));
    assert!(
        table.contains("100"),
        "the table shows full coverage: {table}"
    );
}
