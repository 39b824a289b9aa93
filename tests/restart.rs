//! Stops and starts: an agent stopped cleanly and started again continues the same log; a
//! replica stopped while the agent keeps taking writes catches up from the agent's spool when
//! it returns. Every point recorded before, between and after still restores exactly.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;

fn qemu_write(c: &Cluster, cmds: &[&str]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", &c.nbd_uri("v")]);
    for x in cmds {
        cmd.args(["-c", x]);
    }
    let out = run_ok(&mut cmd);
    assert!(!out.contains("failed"), "qemu-io: {out}");
}

#[test]
fn agent_and_replica_restarts_lose_nothing() {
    if !require_tool("qemu-io") {
        return;
    }
    let mut c = Cluster::new();
    let dev = c.make_device("v.img", 24 * MIB, 8 * MIB, 11);
    c.protect("v", &dev, None);
    c.start_replica();
    c.start_agent();
    c.wait_protecting("v", Duration::from_secs(60));

    qemu_write(&c, &["write -P 0x01 0 2M", "write -P 0x02 10M 1M"]);
    run_ok(&mut c.agent_cmd(&["bookmark", "one", "--wait"]));
    let at_one = read_file(&dev);

    // A clean agent restart continues the same log.
    let agent = c.agent.as_mut().expect("agent");
    assert!(
        agent.stop(Duration::from_secs(30)),
        "the agent stops cleanly: {}",
        agent.log_text()
    );
    let offline = run_ok(&mut c.agent_cmd(&["status"]));
    assert!(
        offline.contains("agent not running") && offline.contains("stopped"),
        "{offline}"
    );
    c.start_agent();
    let log = c.agent.as_ref().expect("agent").log_text();
    assert!(
        !log.contains("initial sync started"),
        "a protected volume is not synced again: {log}"
    );
    qemu_write(&c, &["write -P 0x03 4M 3M", "discard 10M 512k"]);
    let out = run_ok(&mut c.agent_cmd(&["bookmark", "two", "--wait"]));
    let two_seq: u64 = out
        .split(" seq ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .expect("bookmark prints its seq");
    let at_two = read_file(&dev);

    // The replica goes away; the agent keeps serving writes and spools them.
    let replica = c.replica.as_mut().expect("replica");
    assert!(
        replica.stop(Duration::from_secs(30)),
        "the replica stops cleanly: {}",
        replica.log_text()
    );
    qemu_write(&c, &["write -P 0x04 20M 4M", "write -z 1M 1M"]);
    run_ok(&mut c.agent_cmd(&["bookmark", "three"]));
    wait_until(
        "the agent to see the link down",
        Duration::from_secs(30),
        || {
            let st = c.agent_status();
            st["link_connected"] == false && st["volumes"][0]["state"] == "disconnected"
        },
    );
    let st = c.agent_status();
    assert!(
        st["volumes"][0]["spool_batches"].as_u64().unwrap_or(0) > 0,
        "the spool holds the unsent batches: {st}"
    );
    let at_three = read_file(&dev);

    // It returns and catches up by itself.
    c.start_replica();
    c.wait_caught_up("v", Duration::from_secs(60));
    for (point, expected) in [
        ("bookmark:one", &at_one),
        ("bookmark:two", &at_two),
        ("bookmark:three", &at_three),
        ("latest", &at_three),
    ] {
        let got = c
            .restore("v", point)
            .unwrap_or_else(|e| panic!("restore {point}: {e}"));
        assert_same_image(&format!("restore at {point}"), &got, expected);
    }
    // `points --at` says which point a restore would choose.
    let chosen: serde_json::Value = serde_json::from_str(&run_ok(&mut c.replica_cmd(&[
        "points",
        "--volume",
        "v",
        "--at",
        "bookmark:two",
        "--json",
    ])))
    .expect("JSON");
    assert_eq!(chosen["seq"].as_u64(), Some(two_seq), "{chosen}");
    assert_eq!(chosen["bookmark"], "two");
    wait_until(
        "acknowledged batches to leave the spool",
        Duration::from_secs(30),
        || c.agent_status()["volumes"][0]["spool_batches"].as_u64() == Some(0),
    );
}

/// A new volume's initial sync taken while the replica is away goes to the spool and is
/// delivered from it when the replica comes: not taken for an image the replica lost and
/// synced again (the replica lists the volume `new` until the sync's batches arrive).
#[test]
fn an_initial_sync_taken_while_the_replica_is_away_is_delivered_from_the_spool() {
    if !require_tool("qemu-io") {
        return;
    }
    let mut c = Cluster::new();
    let dev = c.make_device("v.img", 8 * MIB, 4 * MIB, 12);
    c.protect("v", &dev, None);
    c.start_agent();
    let agent_log = |c: &Cluster| c.agent.as_ref().expect("agent").log_text();
    wait_until(
        "the initial sync to end in the spool",
        Duration::from_secs(60),
        || agent_log(&c).contains("initial sync complete"),
    );
    qemu_write(&c, &["write -P 0x5a 1M 64k", "flush"]);
    c.start_replica();
    c.wait_in_step("v", Duration::from_secs(120));
    let log = agent_log(&c);
    assert_eq!(
        log.matches("initial sync started").count(),
        1,
        "the sync ran once: {}",
        tail(&log, 30)
    );
    assert!(
        !log.contains("synced again from the start") && !log.contains("the agent continues after"),
        "the agent resumed from its spool: {}",
        tail(&log, 30)
    );
    assert_same_image(
        "latest after the spooled sync",
        &c.restore("v", "latest").expect("restore"),
        &read_file(&dev),
    );
}
