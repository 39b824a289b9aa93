//! Prometheus metrics on both binaries (issue 13, scope 1): `cdp-agent run` with `metrics`
//! and `cdp-replica serve` with `http` serve `/metrics`; `promtool check metrics` (the
//! Prometheus project's own checker) finds nothing wrong in either exposition, and the
//! values move as writes happen: bytes written, sealed, sent and acknowledged on the agent,
//! ingested on the replica, the heads, the window, and the RPO lag (0 on both sides once an
//! idle volume is durable, with its histogram filling every second).

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;

/// `GET http://addr/metrics`: the body, which must be the text exposition format.
fn scrape(addr: &str) -> String {
    let (head, body) = http_get(addr, "/metrics");
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    body
}

/// Every sample of the exposition: `name{labels}` → value.
fn samples(body: &str) -> BTreeMap<String, f64> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            Some((key.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// The value of the sample whose key starts with `name{` and holds every label of `labels`.
fn value(s: &BTreeMap<String, f64>, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.iter()
        .find(|(k, _)| {
            (k.as_str() == name || k.starts_with(&format!("{name}{{")))
                && labels
                    .iter()
                    .all(|(l, v)| k.contains(&format!("{l}=\"{v}\"")))
        })
        .map(|(_, v)| *v)
}

/// `promtool check metrics` on `body`: no error and no lint problem.
fn promtool_check(what: &str, body: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(body.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics on the {what}'s /metrics: {}{}\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn both_endpoints_pass_promtool_and_move_with_the_writes() {
    if !require_python_nbd() || !require_tool("promtool") {
        return;
    }
    let mut c = Cluster::new();
    let dev = c.make_device("v.img", 16 * MIB, 4 * MIB, test_seed());
    c.protect("v", &dev, None);
    // Port 0: each binary picks a free port and logs where it serves.
    c.set_agent_config("metrics", "\"127.0.0.1:0\"");
    let replica_toml = c.replica_dir.join("replica.toml");
    let text = std::fs::read_to_string(&replica_toml).expect("replica.toml");
    std::fs::write(&replica_toml, format!("http = \"127.0.0.1:0\"\n{text}")).expect("write");
    c.start_replica();
    c.start_agent();
    c.wait_protecting("v", Duration::from_secs(120));
    c.wait_caught_up("v", Duration::from_secs(60));
    let agent_addr = address_in(
        &c.agent.as_ref().expect("agent").log_text(),
        "serving metrics on http://",
    )
    .expect("the agent logs its metrics address");
    let replica_addr = address_in(
        &c.replica.as_ref().expect("replica").log_text(),
        "metrics on http://",
    )
    .expect("the replica prints its metrics address");

    let a0 = scrape(&agent_addr);
    let r0 = scrape(&replica_addr);
    promtool_check("agent", &a0);
    promtool_check("replica", &r0);
    for name in [
        "cdp_agent_rpo_lag_seconds",
        "cdp_agent_written_bytes_total",
        "cdp_agent_spool_cap_bytes",
        "cdp_agent_volume_cause",
    ] {
        assert!(
            a0.contains(&format!("# HELP {name} ")),
            "HELP of {name}:\n{a0}"
        );
    }
    for name in [
        "cdp_replica_rpo_lag_seconds",
        "cdp_replica_window_seconds",
        "cdp_replica_journal_bytes",
        "cdp_replica_verify_coverage_ratio",
    ] {
        assert!(
            r0.contains(&format!("# HELP {name} ")),
            "HELP of {name}:\n{r0}"
        );
    }
    let (a0, r0) = (samples(&a0), samples(&r0));
    let vol = [("group", "v"), ("volume", "v")];
    let grp = [("group", "v")];
    let on = |s: &BTreeMap<String, f64>, name: &str, cause: &str| {
        value(s, name, &[("volume", "v"), ("cause", cause)])
    };
    assert_eq!(
        on(&a0, "cdp_agent_volume_cause", "protecting/ok"),
        Some(1.0)
    );
    assert_eq!(
        on(&a0, "cdp_agent_volume_cause", "syncing/initial"),
        Some(0.0)
    );
    assert_eq!(value(&a0, "cdp_agent_link_up", &[]), Some(1.0));
    assert_eq!(
        value(&a0, "cdp_agent_spool_cap_bytes", &grp),
        Some((4u64 << 30) as f64)
    );
    assert_eq!(
        on(&r0, "cdp_replica_volume_cause", "protecting/ok"),
        Some(1.0)
    );

    // Writes: 4 MiB, flushed, then acknowledged.
    let mut nbd = NbdDriver::connect(&c.nbd_uri("v"));
    let mut rng = Lcg(test_seed());
    let mut buf = vec![0u8; MIB as usize];
    for i in 0..4 {
        rng.fill(&mut buf);
        nbd.write(i * MIB, &buf, false).expect("write");
    }
    nbd.flush().expect("flush");
    drop(nbd);
    let head = c.wait_caught_up("v", Duration::from_secs(60));

    let get = |s: &BTreeMap<String, f64>, name: &str, labels: &[(&str, &str)]| {
        value(s, name, labels).unwrap_or_else(|| panic!("no {name} {labels:?} in {s:?}"))
    };
    let (mut a1, mut r1) = (BTreeMap::new(), BTreeMap::new());
    // The replica's lag comes with the agent's next head report (every second), and an
    // idle, durable volume reads 0 on both sides.
    wait_until(
        "both endpoints to show the writes, durable, with a lag of 0",
        Duration::from_secs(60),
        || {
            a1 = samples(&scrape(&agent_addr));
            r1 = samples(&scrape(&replica_addr));
            value(&a1, "cdp_agent_acked_seq", &grp) == Some(head as f64)
                && value(&r1, "cdp_replica_head_seq", &grp) == Some(head as f64)
                && value(&a1, "cdp_agent_rpo_lag_seconds", &vol) == Some(0.0)
                && value(&r1, "cdp_replica_rpo_lag_seconds", &vol) == Some(0.0)
        },
    );
    let grew = |name: &str,
                a: &BTreeMap<String, f64>,
                b: &BTreeMap<String, f64>,
                l: &[(&str, &str)],
                by: f64| {
        let (x, y) = (get(a, name, l), get(b, name, l));
        assert!(y - x >= by, "{name} went from {x} to {y}, not up by {by}");
    };
    let four = (4 * MIB) as f64;
    grew("cdp_agent_written_bytes_total", &a0, &a1, &vol, four);
    // Compressed random data: the batches hold at least the bytes written, less a little.
    grew("cdp_agent_sealed_bytes_total", &a0, &a1, &grp, four * 0.9);
    grew("cdp_agent_sent_bytes_total", &a0, &a1, &grp, four * 0.9);
    grew("cdp_agent_acked_bytes_total", &a0, &a1, &grp, four * 0.9);
    grew("cdp_agent_sealed_batches_total", &a0, &a1, &grp, 1.0);
    grew(
        "cdp_replica_ingested_bytes_total",
        &r0,
        &r1,
        &grp,
        four * 0.9,
    );
    grew("cdp_replica_journal_bytes", &r0, &r1, &grp, four * 0.9);
    // Acknowledged is what was sealed (nothing held once caught up), recomputed.
    assert_eq!(
        get(&a1, "cdp_agent_sealed_bytes_total", &grp)
            - get(&a1, "cdp_agent_acked_bytes_total", &grp),
        get(&a1, "cdp_agent_spool_bytes", &grp),
        "sealed less acknowledged is what the spool holds"
    );
    assert!(
        get(&r1, "cdp_replica_window_last_timestamp_seconds", &vol)
            >= get(&r0, "cdp_replica_window_last_timestamp_seconds", &vol),
        "the window's last point moves forward"
    );
    assert!(get(&r1, "cdp_replica_window_seconds", &vol) >= 0.0);
    // The histograms fill every second (agent) and at every head report (replica).
    assert!(get(&a1, "cdp_agent_rpo_lag_observed_seconds_count", &grp) >= 1.0);
    assert!(get(&r1, "cdp_replica_rpo_lag_observed_seconds_count", &grp) >= 1.0);
    // Restores and exports run in processes of their own and are counted all the same.
    let restores = |s: &BTreeMap<String, f64>, outcome: &str| {
        get(
            s,
            "cdp_replica_restores_total",
            &[("volume", "v"), ("outcome", outcome)],
        )
    };
    assert_eq!(restores(&r1, "done"), 0.0);
    assert_eq!(get(&r1, "cdp_replica_exports_total", &vol), 0.0);
    c.restore("v", "latest").expect("restore");
    let _ = c
        .restore("v", "seq:999999")
        .expect_err("a point past the head");
    let sock = c.path("export.sock");
    let mut export = c.start_export("v", "latest", &sock, &[]);
    export.stop(Duration::from_secs(10));
    let r2 = samples(&scrape(&replica_addr));
    assert_eq!(restores(&r2, "done"), 1.0, "{r2:?}");
    // The refused point never pinned anything: not a restore.
    assert_eq!(restores(&r2, "failed"), 0.0);
    assert_eq!(get(&r2, "cdp_replica_exports_total", &vol), 1.0);
    promtool_check("agent", &scrape(&agent_addr));
    promtool_check("replica", &scrape(&replica_addr));
}
