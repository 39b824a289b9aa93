//! The `cdp-replica` binary: commands, outputs, exit codes and error sentences.

mod common;

use cdp_shared::batch::BatchFlags;
use cdp_shared::identity::{Fingerprint, Identity};
use cdp_shared::types::CHUNK_BYTES;
use common::cli::*;
use common::serve::Serve;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_outputs_and_errors() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("replica");
    let d = data.to_str().expect("path");

    // Errors on a directory with no replica.
    fails(
        &["status", "--data", d],
        &format!("no replica in {d}: run `cdp-replica init --data {d}` first"),
    );
    fails(&["fingerprint", "--data", d], "no replica in");

    // init, twice.
    let out = ok(&["init", "--data", d]);
    let fp_line = out.trim();
    let fp_hex = fp_line
        .strip_prefix("fingerprint: ")
        .unwrap_or_else(|| panic!("init printed {out:?}"));
    let replica_fp: Fingerprint = fp_hex.parse().expect("hex fingerprint");
    fails(&["init", "--data", d], "already exists");
    assert_eq!(ok(&["fingerprint", "--data", d]).trim(), fp_hex);

    let agent = Identity::generate("cli-agent").expect("identity");
    let agent_hex = agent.fingerprint().to_string();
    assert!(
        ok(&[
            "authorize",
            "--data",
            d,
            "--agent",
            &agent_hex,
            "--name",
            "web1"
        ])
        .contains("authorized")
    );
    fails(
        &["authorize", "--data", d, "--agent", "xyz"],
        "not a certificate fingerprint",
    );

    let empty: serde_json::Value =
        serde_json::from_str(&ok(&["status", "--data", d, "--json"])).expect("json");
    assert_eq!(empty["serving"], false);
    assert_eq!(empty["volumes"].as_array().map(Vec::len), Some(0));

    // Serve, and let a test agent protect a volume.
    let serve = Serve::start(&data);
    fails(
        &["serve", "--data", d, "--listen", "127.0.0.1:0"],
        "already running",
    );
    let vol = (0u32, "web-data", 3 * CHUNK_BYTES);
    let mut sim = AgentSim::new("web", &[vol]);
    sim.images.insert(0, pattern(21, vol.2 as usize));
    sim.history[0] = sim.images.clone();
    let mut q = QuicAgent::connect(&agent, replica_fp, serve.addr)
        .await
        .expect("connect");
    q.hello(vec![sim.hello()]).await.expect("welcome");
    let mut batches = Vec::new();
    let done = sim.sync_volume(0, &mut batches);
    batches.push(sim.batch(
        &[Op::Data {
            vol: 0,
            offset: 4096,
            bytes: pattern(22, 10_000),
        }],
        BatchFlags::FLUSH,
        Some("good"),
    ));
    batches.push(sim.batch(
        &[Op::Trim {
            vol: 0,
            offset: 0,
            len: CHUNK_BYTES,
        }],
        BatchFlags::INCONSISTENT,
        None,
    ));
    for (_, b) in &batches {
        q.send_batch(b).await.expect("send");
    }
    let head = sim.seq;
    q.wait_ack("web", head).await;

    let status: serde_json::Value =
        serde_json::from_str(&ok(&["status", "--data", d, "--json"])).expect("json");
    assert_eq!(status["serving"], true);
    let v = &status["volumes"][0];
    assert_eq!(v["volume"], "web-data");
    assert_eq!(v["group"], "web");
    assert_eq!(v["state"], "protecting");
    assert_eq!(v["size"], 3 * CHUNK_BYTES);
    assert_eq!(v["head_seq"], head);
    assert_eq!(v["window_first"]["seq"], done);
    assert_eq!(v["window_last"]["seq"], head - 1);
    assert!(v["journal_bytes"].as_u64().expect("bytes") > 0);
    assert!(ok(&["status", "--data", d]).contains("web-data"));

    let points: serde_json::Value = serde_json::from_str(&ok(&[
        "points", "--data", d, "--volume", "web-data", "--json",
    ]))
    .expect("json");
    let points = points.as_array().expect("array");
    assert_eq!(points.len() as u64, head - done + 1);
    let bm = &points[points.len() - 2];
    assert_eq!(bm["bookmark"], "good");
    assert_eq!(bm["consistent"], true);
    assert_eq!(bm["flush"], true);
    assert_eq!(bm["records"], 1);
    assert!(bm["time"].as_str().expect("time").ends_with('Z'));
    assert!(bm["received"].as_str().is_some());
    assert_eq!(points[points.len() - 1]["consistent"], false);
    assert_eq!(
        points[points.len() - 1]["bookmark"],
        serde_json::Value::Null
    );
    assert!(ok(&["points", "--data", d, "--volume", "web-data"]).contains("good"));

    // Restore while serving.
    let out1 = tmp.path().join("img1");
    let o = run(&[
        "restore",
        "--data",
        d,
        "--volume",
        "web-data",
        "--at",
        "latest",
        "--out",
        out1.to_str().expect("path"),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("seq {}", head - 1)),
        "the chosen point is printed: {}",
        stderr(&o)
    );
    assert!(read(&out1) == sim.image_at(head - 1, 0));

    q.conn.close(0u32.into(), b"done");
    serve.stop();

    // Restore when not serving; an inconsistent point asked for explicitly.
    let out2 = tmp.path().join("img2");
    ok(&[
        "restore",
        "--data",
        d,
        "--volume",
        "web-data",
        "--at",
        &format!("seq:{head}"),
        "--out",
        out2.to_str().expect("path"),
    ]);
    assert!(read(&out2) == sim.image_at(head, 0));
    let status: serde_json::Value =
        serde_json::from_str(&ok(&["status", "--data", d, "--json"])).expect("json");
    assert_eq!(status["volumes"][0]["state"], "disconnected");

    // Errors.
    let o2 = out2.to_str().expect("path");
    fails(
        &[
            "restore",
            "--data",
            d,
            "--volume",
            "nope",
            "--at",
            "latest",
            "--out",
            "/tmp/never",
        ],
        "no volume named \"nope\"",
    );
    fails(
        &["points", "--data", d, "--volume", "nope"],
        "no volume named",
    );
    let fresh = tmp.path().join("img3");
    let f = fresh.to_str().expect("path");
    fails(
        &[
            "restore", "--data", d, "--volume", "web-data", "--at", "seq:999", "--out", f,
        ],
        "first restorable point is seq",
    );
    fails(
        &[
            "restore", "--data", d, "--volume", "web-data", "--at", "seq:1", "--out", f,
        ],
        "before the window",
    );
    fails(
        &[
            "restore",
            "--data",
            d,
            "--volume",
            "web-data",
            "--at",
            "yesterday",
            "--out",
            f,
        ],
        "bookmark:NAME",
    );
    fails(
        &[
            "restore", "--data", d, "--volume", "web-data", "--at", "latest", "--out", o2,
        ],
        "already exists: remove it or choose another --out path",
    );
    assert!(!fresh.exists());
    fails(
        &[
            "restore",
            "--data",
            "/nonexistent/replica",
            "--volume",
            "web-data",
            "--at",
            "latest",
            "--out",
            f,
        ],
        "no replica in /nonexistent/replica",
    );
}

/// `init --window/--max-journal` (defaults of new groups), `retention` (show, set — also while
/// serving — and refuse bad values), and the retention in `status`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_is_set_shown_and_checked() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("replica");
    let d = data.to_str().expect("path");
    fails(
        &["init", "--data", d, "--window", "5x"],
        "\"5x\" is not a window",
    );
    fails(
        &["init", "--data", d, "--max-journal", "12"],
        "it has no unit",
    );
    assert!(
        !data.join("meta.db").exists(),
        "a refused init makes nothing"
    );
    ok(&[
        "init",
        "--data",
        d,
        "--window",
        "2h",
        "--max-journal",
        "1GiB",
    ]);
    let toml = std::fs::read_to_string(data.join("replica.toml")).expect("replica.toml");
    assert!(
        toml.contains("window = \"2h\"") && toml.contains("max_journal = \"1GiB\""),
        "{toml}"
    );
    fails(
        &["retention", "--data", d, "--group", "g"],
        "no group named \"g\"",
    );

    // A group appears when its agent first connects; it starts with the defaults.
    let mut h = Harness::open(&data).await;
    let sim = AgentSim::new("g", &[(0, "r-disk", CHUNK_BYTES)]);
    h.hello(vec![sim.hello()]).await.expect("welcome");
    h.shutdown().await;
    let show = |args: &[&str]| {
        let mut all = vec!["retention", "--data", d, "--group", "g"];
        all.extend_from_slice(args);
        ok(&all).trim().to_owned()
    };
    assert_eq!(show(&[]), "group g: window 2h, journal cap 1GiB");

    // Changed while serving.
    let serve = Serve::start(&data);
    assert_eq!(
        show(&["--window", "30s"]),
        "group g: window 30s, journal cap 1GiB"
    );
    assert_eq!(
        show(&["--max-journal", "none"]),
        "group g: window 30s, journal cap none"
    );
    assert_eq!(
        show(&["--window", "1.5h"]),
        "group g: window 90m, journal cap none"
    );
    assert_eq!(
        show(&["--window", "7d", "--max-journal", "512MiB"]),
        "group g: window 7d, journal cap 512MiB"
    );
    for (flag, value, why) in [
        ("--window", "0s", "it must be at least 1s"),
        ("--window", "1s 500ms", "it must be whole seconds"),
        ("--window", "10", "it has no unit"),
        ("--window", "3651d", "longer than 3650d"),
        ("--max-journal", "100XB", "\"XB\" is not a unit"),
        ("--max-journal", "1KiB", "it must be at least 1MiB"),
        ("--max-journal", "lots", "it does not start with a number"),
    ] {
        fails(
            &["retention", "--data", d, "--group", "g", flag, value],
            why,
        );
    }
    assert_eq!(show(&[]), "group g: window 7d, journal cap 512MiB");
    let shown: serde_json::Value =
        serde_json::from_str(&ok(&["retention", "--data", d, "--group", "g", "--json"]))
            .expect("retention --json");
    assert_eq!(
        shown,
        serde_json::json!({
            "group": "g",
            "retention": { "window": "7d", "window_s": 604800, "max_journal_bytes": 536870912 },
            "dropped": null,
        })
    );

    let status: serde_json::Value =
        serde_json::from_str(&ok(&["status", "--data", d, "--json"])).expect("json");
    let v = &status["volumes"][0];
    assert_eq!(
        v["retention"],
        serde_json::json!({ "window": "7d", "window_s": 604800, "max_journal_bytes": 536870912 })
    );
    assert_eq!(
        v["pins"],
        serde_json::json!({ "count": 0, "oldest_seq": null })
    );
    assert_eq!(v["base_seq"], 0);
    assert!(ok(&["status", "--data", d]).contains("7d, cap 512MiB"));
    serve.stop();
}
