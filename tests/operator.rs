//! What an operator meets at the command line, on the release binaries:
//! * `CDP_AGENT_DATA` / `CDP_REPLICA_DATA` stand for `--data`;
//! * a command whose output goes to a pipe closed early (`status --json | head -c1`) exits 0
//!   and prints no panic;
//! * a mistyped key in `agent.toml` stops `run` with the key and the file named;
//! * `--log-format json` logs one JSON object per line;
//! * the agent's RPO lag: "not protected yet" (null) during the initial sync, which shows its
//!   progress and ETA; 0 once an idle volume's every batch is durable.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;

#[test]
fn data_from_the_environment_closed_pipes_unknown_keys_and_json_logs() {
    let mut c = Cluster::new();
    let dev = c.make_device("dev", 4 * MIB, MIB, test_seed());

    // The environment names the data directory.
    let by_flag = run_ok(&mut c.agent_cmd(&["fingerprint"]));
    let by_env = run_ok(
        Command::new(bin("cdp-agent"))
            .arg("fingerprint")
            .env("CDP_AGENT_DATA", &c.agent_dir),
    );
    assert_eq!(by_flag, by_env, "CDP_AGENT_DATA stands for --data");
    run_ok(
        Command::new(bin("cdp-agent"))
            .args(["protect", "--volume", "v", "--device"])
            .arg(&dev)
            .env("CDP_AGENT_DATA", &c.agent_dir),
    );
    let by_env = run_ok(
        Command::new(bin("cdp-replica"))
            .args(["status", "--json"])
            .env("CDP_REPLICA_DATA", &c.replica_dir),
    );
    let by_flag = run_ok(&mut c.replica_cmd(&["status", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&by_env).expect("status JSON");
    assert_eq!(
        v,
        serde_json::from_str::<serde_json::Value>(&by_flag).expect("status JSON"),
        "CDP_REPLICA_DATA stands for --data"
    );

    // Output into a pipe whose reader has gone: exit 0, no panic. The reader is closed before
    // the process can have written anything, so every write meets EPIPE.
    for mut cmd in [
        c.replica_cmd(&["status", "--json"]),
        c.replica_cmd(&["status"]),
        c.agent_cmd(&["fingerprint"]),
    ] {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        drop(child.stdout.take());
        let out = child.wait_with_output().expect("wait");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "{cmd:?} into a closed pipe: {} {stderr}",
            out.status
        );
        assert!(!stderr.contains("panicked"), "{cmd:?}: {stderr}");
    }

    // --log-format json: every line the agent logs is a JSON object with a level.
    c.start_replica();
    let log = c.path("agent-json.log");
    let mut cmd = c.agent_cmd(&["run", "--log-format", "json"]);
    cmd.env("RUST_LOG", "info");
    let mut agent = Proc::spawn("agent", &mut cmd, &log);
    wait_until("the agent to log", Duration::from_secs(30), || {
        agent.log_text().lines().count() >= 2
    });
    assert!(agent.stop(Duration::from_secs(20)), "the agent stops");
    for line in agent.log_text().lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(v["level"].is_string(), "{line}");
    }

    // A mistyped key stops `run` before anything starts, naming the key and the file.
    let conf = c.agent_dir.join("agent.toml");
    let text = std::fs::read_to_string(&conf).expect("agent.toml");
    std::fs::write(&conf, text.replace("batches_in_flight", "batches_inflight"))
        .expect("write agent.toml");
    let out = run(&mut c.agent_cmd(&["run"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "run with a mistyped key: {stderr}");
    assert!(
        stderr.contains("unknown field `batches_inflight`")
            && stderr.contains(&conf.display().to_string()),
        "{stderr}"
    );
}

#[test]
fn rpo_lag_is_null_while_syncing_and_zero_when_idle() {
    let mut c = Cluster::new();
    let dev = c.make_device("dev", 32 * MIB, 32 * MIB, test_seed());
    c.protect("v", &dev, None);
    // A slow initial sync (about 16 s), so that status sees it under way.
    c.set_agent_config("sync_bytes_per_sec_max", "\"2MiB\"");
    // A tight RPO target, so that the replica names the breach once the agent is gone.
    c.set_agent_config("rpo_target", "\"2s\"");
    c.start_replica();
    c.start_agent();
    let mut seen = serde_json::Value::Null;
    wait_until(
        "the initial sync to report progress",
        Duration::from_secs(60),
        || {
            seen = c.volume_status("v");
            seen["state"] == "syncing" && seen["sync_eta_s"].is_u64()
        },
    );
    assert!(
        seen["rpo_lag_ms"].is_null(),
        "no RPO lag before the first point: {seen}"
    );
    assert_eq!(seen["cause"], "syncing/initial", "{seen}");
    // The sync may start before the first connection is up: then the link's cause follows.
    assert_eq!(seen["causes"][0], "syncing/initial", "{seen}");
    assert_eq!(seen["rpo_target_ms"], 2000, "{seen}");
    let p = seen["sync_progress"].as_f64().expect("progress");
    assert!(p > 0.0 && p < 1.0, "{seen}");
    // Named on every surface: both statuses, both /metrics, the console's API.
    c.wait_agent_names("v", &["syncing/initial"]);
    c.wait_replica_names("v", &["syncing/initial"]);
    // The rate and the time left agree: what is left, at that rate.
    let rate = seen["sync_rate_bytes_per_s"].as_u64().expect("a rate") as f64;
    let eta = seen["sync_eta_s"].as_u64().expect("eta") as f64;
    let left = (1.0 - seen["sync_progress"].as_f64().expect("progress")) * (32 * MIB) as f64;
    assert!(
        rate > 0.0 && (eta - left / rate).abs() <= 1.0 + 0.1 * eta,
        "{seen}"
    );
    let text = run_ok(&mut c.agent_cmd(&["status"]));
    assert!(
        text.contains("not protected yet") && text.contains("MiB/s, ETA"),
        "{text}"
    );
    let rv = &c.replica_status()["volumes"][0];
    assert!(rv["rpo_lag_ms"].is_null(), "replica side, syncing: {rv}");
    assert_eq!(rv["cause"], "syncing/initial", "replica side: {rv}");
    let text = run_ok(&mut c.replica_cmd(&["status"]));
    assert!(text.contains("not protected yet"), "{text}");

    c.wait_protecting("v", Duration::from_secs(120));
    let mut w = NbdDriver::connect(&c.nbd_uri("v"));
    w.write(0, &[7u8; 4096], false).expect("write");
    w.flush().expect("flush");
    c.wait_caught_up("v", Duration::from_secs(60));
    // Everything durable and nothing open: the lag is 0, not the time since the last write.
    wait_until(
        "an idle volume's lag to be 0",
        Duration::from_secs(30),
        || c.volume_status("v")["rpo_lag_ms"] == 0,
    );
    std::thread::sleep(Duration::from_millis(1500));
    let v = c.volume_status("v");
    assert_eq!(v["rpo_lag_ms"], 0, "idle for 1.5 s: {v}");
    assert!(v["sync_eta_s"].is_null(), "{v}");
    assert!(v["sync_rate_bytes_per_s"].is_null(), "{v}");
    assert_eq!(v["causes"], serde_json::json!(["protecting/ok"]), "{v}");

    // The replica shows the lag the agent reports (every second, on the control stream).
    wait_until(
        "the replica to show the agent's lag of 0",
        Duration::from_secs(30),
        || c.replica_status()["volumes"][0]["rpo_lag_ms"] == 0,
    );
    let rv = c.replica_status()["volumes"][0].clone();
    assert_eq!(rv["agent_head_seq"], v["last_seq"], "{rv}");
    assert_eq!(rv["causes"], serde_json::json!(["protecting/ok"]), "{rv}");
    assert_eq!(rv["rpo_target_ms"], 2000, "the agent's target: {rv}");
    // An agent the replica no longer hears from may be writing: the lag grows with the
    // report's age.
    let agent = c.agent.as_mut().expect("agent");
    agent.kill9();
    wait_until(
        "the replica's lag to grow once the agent is gone",
        Duration::from_secs(30),
        || {
            c.replica_status()["volumes"][0]["rpo_lag_ms"]
                .as_u64()
                .is_some_and(|ms| ms > 2000)
        },
    );
    // Past the 2 s target, with the link down (noticed within 2 s).
    wait_until(
        "the replica to name the link down and the RPO breach",
        Duration::from_secs(30),
        || {
            c.replica_status()["volumes"][0]["causes"]
                == serde_json::json!(["disconnected/link-down", "rpo-breach"])
        },
    );
    c.wait_replica_names("v", &["disconnected/link-down", "rpo-breach"]);
    let text = run_ok(&mut c.replica_cmd(&["status"]));
    assert!(text.contains("disconnected/link-down rpo-breach"), "{text}");
    let v = c.volume_status("v");
    assert_eq!(v["cause"], "stopped/not-running", "the agent is gone: {v}");
}

/// A journal cap that cannot hold the group's retention: once the trimmer has had to drop
/// points to keep the cap, the replica names `history-short` in its status, on /metrics and
/// in the console's API.
#[test]
fn a_journal_cap_below_the_retention_is_named_history_short() {
    if !require_python_nbd() {
        return;
    }
    let mut c = Cluster::new();
    let dev = c.make_device("dev", 16 * MIB, 2 * MIB, test_seed());
    c.protect("v", &dev, None);
    // Small segments, so that the trimmer can drop whole ones under a small cap.
    set_segment_size(&c, "1MiB");
    c.start_replica();
    c.start_agent();
    c.wait_protecting("v", Duration::from_secs(120));
    run_ok(&mut c.replica_cmd(&[
        "retention",
        "--group",
        "v",
        "--window",
        "24h",
        "--max-journal",
        "2MiB",
        "--yes",
    ]));
    let mut w = NbdDriver::connect(&c.nbd_uri("v"));
    let mut rng = Lcg(test_seed());
    let mut buf = vec![0u8; MIB as usize];
    for i in 0..12 {
        rng.fill(&mut buf);
        w.write((i % 8) * MIB, &buf, false).expect("write");
        w.flush().expect("flush");
    }
    c.wait_caught_up("v", Duration::from_secs(60));
    c.wait_replica_names("v", &["history-short"]);
    let rv = c.replica_status()["volumes"][0].clone();
    assert!(
        rv["window_short"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("journal cap of 2MiB")),
        "{rv}"
    );
}

/// Long work shows its progress with a rate and the time left (issue 13, scope 7): a full
/// verification pass in `status` (text and JSON) while it runs and as a bar on a terminal,
/// and a restore's bar on a terminal.
#[test]
fn long_work_shows_progress_with_rate_and_eta() {
    if !require_python_nbd() || !require_tool("script") {
        return;
    }
    let mut c = Cluster::new();
    let dev = c.make_device("dev", 32 * MIB, 32 * MIB, test_seed());
    c.protect("v", &dev, None);
    c.start_replica();
    c.start_agent();
    c.wait_protecting("v", Duration::from_secs(120));
    c.wait_caught_up("v", Duration::from_secs(60));

    // A full pass at 4 chunks a second: 32 chunks, about 8 s.
    let mut verify = Command::new(bin("cdp-replica"));
    verify
        .args(["verify", "run", "--data"])
        .arg(&c.replica_dir)
        .args(["--volume", "v", "--full", "--rate", "4"]);
    let pass = std::thread::spawn(move || on_terminal(&verify, Duration::from_secs(120)));
    let mut seen = serde_json::Value::Null;
    wait_until(
        "status to show the full pass under way with a rate and a time left",
        Duration::from_secs(60),
        || {
            let v = c.replica_status()["volumes"][0].clone();
            seen = v["work"].clone();
            v["work"].as_array().is_some_and(|ws| {
                ws.iter().any(|w| {
                    w["kind"] == "verify-full"
                        && w["done"].as_u64().is_some_and(|d| d > 0 && d < 32)
                        && w["rate_per_s"].is_u64()
                        && w["eta_s"].is_u64()
                })
            })
        },
    );
    let w = seen
        .as_array()
        .and_then(|ws| ws.iter().find(|w| w["kind"] == "verify-full"))
        .cloned()
        .expect("the pass");
    assert_eq!(
        (w["unit"].as_str(), w["total"].as_u64()),
        (Some("chunks"), Some(32)),
        "{w}"
    );
    let text = run_ok(&mut c.replica_cmd(&["status"]));
    assert!(
        text.contains("volume v: full verify pass:")
            && text.contains("chunks/s")
            && text.contains("ETA"),
        "{text}"
    );
    let (status, screen) = pass.join().expect("the pass");
    assert!(status.success(), "{screen}");
    assert!(
        screen.contains("verifying") && screen.contains("/s, eta "),
        "the bar shows the rate and the time left: {screen}"
    );
    assert!(
        screen.contains("verified 32 of 32 chunks (full pass): 0 mismatches"),
        "{screen}"
    );
    let v = c.replica_status()["volumes"][0].clone();
    assert_eq!(v["work"], serde_json::json!([]), "the pass is over: {v}");

    // A restore on a terminal draws its bar: bytes, rate, time left.
    let out = c.path("restored.img");
    let mut restore = c.replica_cmd(&["restore", "--volume", "v", "--at", "latest", "--out"]);
    restore.arg(&out);
    let (status, screen) = on_terminal(&restore, Duration::from_secs(120));
    assert!(status.success(), "{screen}");
    assert!(screen.contains("/s eta "), "the restore's bar: {screen}");
    assert_same_image("the restore", &read_file(&out), &read_file(&dev));
}
