//! Failover with the real agent (issues 5 and 14): while `serve` runs and the agent keeps
//! writing, the volume is failed over at a bookmark; its group is fenced (refused with a
//! sentence naming the failover, the link stays up, its client writes never fail, it spools),
//! the failover volume takes writes through NBD and reads them back; `--undo` then lets the
//! group back in: it catches up from its spool, `latest` equals the device, and the bookmark
//! restores exactly as before. A second failover is committed (with `serve` stopped): `latest`
//! is then the failover image with its writes, and the group stays refused. A group of two
//! volumes fails over whole while the agent's other group replicates on the same connection.

mod common;

use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;
const VOLUME_BYTES: u64 = 16 * MIB;

fn write_random(nbd: &mut NbdDriver, rng: &mut Lcg, n: usize) {
    for _ in 0..n {
        let len = (1 + rng.below(32)) * 4096;
        let offset = rng.below((VOLUME_BYTES - len) / 4096) * 4096;
        let mut data = vec![0u8; len as usize];
        rng.fill(&mut data);
        nbd.write(offset, &data, false).expect("client write");
    }
    nbd.flush().expect("client flush");
}

/// Starts `cdp-replica failover ARGS…` (its log in `log`) and waits until it serves on
/// `socket`; panics with its log if it exits first.
fn start_failover(c: &Cluster, args: &[&str], socket: &std::path::Path, log: &str) -> Proc {
    let mut cmd = c.replica_cmd(&["failover"]);
    cmd.args(args);
    let mut fo = Proc::spawn("failover", &mut cmd, &c.path(log));
    wait_until("the failover to serve", Duration::from_secs(30), || {
        if let Ok(Some(st)) = fo.child.try_wait() {
            panic!("failover exited ({st}): {}", fo.log_text());
        }
        std::os::unix::net::UnixStream::connect(socket).is_ok()
    });
    fo
}

#[test]
fn failover_fences_the_agent_undo_resumes_and_commit_continues_from_the_point() {
    if !require_python_nbd() {
        return;
    }
    let seed = test_seed();
    let mut rng = Lcg(seed);
    let mut c = Cluster::new();
    let dev = c.make_device("v.img", VOLUME_BYTES, 2 * MIB, seed);
    c.protect("v", &dev, None);
    c.start_replica();
    c.start_agent();
    c.wait_protecting("v", Duration::from_secs(120));
    let mut nbd = NbdDriver::connect(&c.nbd_uri("v"));
    write_random(&mut nbd, &mut rng, 40);
    let bm = c.bookmark("before-failover", true);
    let bookmark_image = c.restore("v", "bookmark:before-failover").expect("restore");
    assert_same_image("the bookmark", &bookmark_image, &read_file(&dev));

    // Fail over at the bookmark while serve runs and the agent keeps writing.
    let sock = c.path("failover.sock");
    let sock_arg = sock.display().to_string();
    let mut fo = start_failover(
        &c,
        &[
            "--volume",
            "v",
            "--at",
            "bookmark:before-failover",
            "--socket",
            &sock_arg,
        ],
        &sock,
        "failover.log",
    );
    wait_until(
        "the agent to be refused for the failover",
        Duration::from_secs(60),
        || {
            let st = c.agent_status();
            st.to_string().contains("failed over")
                && st["link_connected"] == true
                && st["volumes"][0]["cause"] == "disconnected/fenced-by-failover"
        },
    );
    let rv = &c.replica_status()["volumes"][0];
    assert_eq!(rv["cause"], "failed-over/active", "{rv}");
    c.wait_agent_names("v", &["disconnected/fenced-by-failover"]);
    c.wait_replica_names("v", &["failed-over/active"]);
    // The replica is primary for the group: the agent serves it read-only, to the connection
    // already open too (EPERM), and says so.
    let refused = nbd.write(0, &[1u8; 4096], false);
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.contains("Operation not permitted")),
        "a write while the replica is primary: {refused:?}"
    );
    let v = c.volume_status("v");
    assert_eq!(v["primary"], "replica (failed over)", "{v}");
    assert_eq!(
        c.replica_status()["volumes"][0]["primary"],
        "replica (failed over)"
    );
    let text = run_ok(&mut c.agent_cmd(&["status"]));
    assert!(text.contains("replica (failed over)"), "{text}");
    assert_eq!(
        c.replica_head("v"),
        bm,
        "nothing after the failover point is journaled while it is active"
    );

    // The failover volume: the bookmark's image, read-write.
    let mut fnbd = NbdDriver::connect(&format!("nbd+unix:///v?socket={}", sock.display()));
    let mut expected = bookmark_image.clone();
    for _ in 0..20 {
        let len = (1 + rng.below(16)) * 4096;
        let offset = rng.below((VOLUME_BYTES - len) / 4096) * 4096;
        let mut data = vec![0u8; len as usize];
        rng.fill(&mut data);
        fnbd.write(offset, &data, false).expect("failover write");
        expected[offset as usize..(offset + len) as usize].copy_from_slice(&data);
    }
    fnbd.flush().expect("failover flush");
    assert_same_image(
        "the failover volume reads back its writes",
        &fnbd.read(0, VOLUME_BYTES).expect("read"),
        &expected,
    );
    drop(fnbd);
    assert!(
        fo.stop(Duration::from_secs(10)),
        "failover exits 0 on SIGTERM"
    );

    // Undo: the agent is let back in and catches up; nothing before was changed; it is
    // primary again and serves the volume read-write.
    run_ok(&mut c.replica_cmd(&["failover", "--volume", "v", "--undo"]));
    wait_until(
        "the agent to be primary again",
        Duration::from_secs(30),
        || c.volume_status("v")["primary"] == "agent",
    );
    assert_eq!(c.replica_status()["volumes"][0]["primary"], "agent");
    write_random(&mut nbd, &mut rng, 10);
    c.bookmark("after-undo", true);
    let latest = c.restore("v", "latest").expect("restore latest");
    assert_same_image(
        "latest after the undo equals the device",
        &latest,
        &read_file(&dev),
    );
    assert_same_image(
        "the bookmark after the undo",
        &c.restore("v", "bookmark:before-failover").expect("restore"),
        &bookmark_image,
    );

    // A failover committed: the volume continues from the point, with the writes made
    // through it; the agent stays refused.
    let point = c.bookmark("commit-point", true);
    let point_image = c.restore("v", "bookmark:commit-point").expect("restore");
    let sock2 = c.path("failover2.sock");
    let sock2_arg = sock2.display().to_string();
    let mut fo = start_failover(
        &c,
        &[
            "--volume",
            "v",
            "--at",
            &format!("seq:{point}"),
            "--socket",
            &sock2_arg,
        ],
        &sock2,
        "failover2.log",
    );
    let mut fnbd = NbdDriver::connect(&format!("nbd+unix:///v?socket={}", sock2.display()));
    let mut expected = point_image.clone();
    let data = vec![0x5au8; 64 << 10];
    fnbd.write(3 * MIB, &data, false).expect("failover write");
    fnbd.flush().expect("failover flush");
    expected[(3 * MIB) as usize..(3 * MIB) as usize + data.len()].copy_from_slice(&data);
    drop(fnbd);
    assert!(fo.stop(Duration::from_secs(10)), "failover exits 0");
    let refused = run(&mut c.replica_cmd(&["failover", "--volume", "v", "--commit"]));
    assert!(
        !refused.status.success(),
        "commit is refused while serve runs"
    );
    c.replica
        .as_mut()
        .expect("replica")
        .stop(Duration::from_secs(30));
    run_ok(&mut c.replica_cmd(&["failover", "--volume", "v", "--commit"]));
    let latest = c
        .restore("v", "latest")
        .expect("restore latest after commit");
    assert_same_image("latest after the commit", &latest, &expected);
    c.start_replica();
    wait_until(
        "the agent to be refused after the commit",
        Duration::from_secs(60),
        || {
            let st = c.agent_status();
            st.to_string().contains("committed")
                && st["volumes"][0]["cause"] == "disconnected/fenced-by-failover"
        },
    );
    let rv = &c.replica_status()["volumes"][0];
    assert_eq!(rv["cause"], "failed-over/committed", "{rv}");
    c.wait_agent_names("v", &["disconnected/fenced-by-failover"]);
    c.wait_replica_names("v", &["failed-over/committed"]);
    let refused = nbd.write(0, &[1u8; 4096], false);
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.contains("Operation not permitted")),
        "a write after the commit: {refused:?}"
    );
    assert_same_image(
        "the committed volume is not overwritten by the fenced agent",
        &c.restore("v", "latest").expect("restore"),
        &expected,
    );
}

/// Group failover with the real agent: group `ga` of two volumes fails over at a bookmark
/// (one socket, an export per volume, each the bookmark's image) while group `gb` of the same
/// agent keeps replicating on the same connection (acknowledged in every round, its link never
/// dropped); the agent reports `ga` fenced and `gb` protecting; writes through both exports
/// read back; `--undo --group` lets `ga` back in on the open connection and it catches up
/// from its spool.
#[test]
fn a_group_fails_over_whole_while_the_agents_other_group_replicates() {
    if !require_python_nbd() {
        return;
    }
    let seed = test_seed();
    let mut rng = Lcg(seed);
    let mut c = Cluster::new();
    for (v, g) in [("a1", "ga"), ("a2", "ga"), ("b", "gb")] {
        let dev = c.make_device(&format!("{v}.img"), VOLUME_BYTES, 2 * MIB, seed);
        c.protect(v, &dev, Some(g));
    }
    c.start_replica();
    c.start_agent();
    for v in ["a1", "a2", "b"] {
        c.wait_protecting(v, Duration::from_secs(120));
    }
    for v in ["a1", "a2", "b"] {
        c.wait_in_step(v, Duration::from_secs(120));
    }
    let mut nbd: Vec<NbdDriver> = ["a1", "a2", "b"]
        .iter()
        .map(|v| NbdDriver::connect(&c.nbd_uri(v)))
        .collect();
    for d in nbd.iter_mut() {
        write_random(d, &mut rng, 20);
    }
    c.bookmark("before-failover", true);
    let images: Vec<Vec<u8>> = ["a1", "a2"]
        .iter()
        .map(|v| c.restore(v, "bookmark:before-failover").expect("restore"))
        .collect();
    assert_same_image(
        "a1 at the bookmark",
        &images[0],
        &read_file(&c.path("a1.img")),
    );

    let sock = c.replica_dir.join("failover-ga.sock");
    let mut fo = start_failover(
        &c,
        &["--group", "ga", "--at", "bookmark:before-failover"],
        &sock,
        "failover.log",
    );
    // The agent reports ga fenced and gb protecting, on a link that stays up.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let st = c.agent_status();
        let cause = |v: &str| {
            st["volumes"]
                .as_array()
                .and_then(|vs| vs.iter().find(|x| x["name"] == v))
                .map(|x| x["cause"].clone())
        };
        if st["link_connected"] == true
            && cause("a1") == Some("disconnected/fenced-by-failover".into())
            && cause("a2") == Some("disconnected/fenced-by-failover".into())
            && cause("b") == Some("protecting/ok".into())
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the agent does not report ga fenced and gb protecting: {st}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for v in ["a1", "a2"] {
        c.wait_agent_names(v, &["disconnected/fenced-by-failover"]);
        c.wait_replica_names(v, &["failed-over/active"]);
    }
    let st = c.volume_status("a1");
    assert!(
        st["replica_refused"]
            .as_str()
            .is_some_and(|r| r.contains("group ga is failed over on the replica")),
        "{st}"
    );
    let text = run_ok(&mut c.agent_cmd(&["status"]));
    assert!(text.contains("replica refuses group ga: "), "{text}");

    // A bookmark of every group takes gb's (durable: --wait returns) and names ga skipped;
    // one of ga alone is refused: its history is written on the replica now.
    let out = run(&mut c.agent_cmd(&["bookmark", "during-failover", "--wait"]));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("bookmark during-failover: group gb seq ")
            && stdout.contains("durable on the replica")
            && !stdout.contains("group ga"),
        "{stdout}"
    );
    assert!(
        stderr.contains("group ga skipped: group ga is failed over on the replica"),
        "{stderr}"
    );
    let out = run(&mut c.agent_cmd(&["bookmark", "ga-only", "--group", "ga", "--wait"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr
                .contains("bookmark ga-only not taken: group ga is failed over on the replica"),
        "{stderr}"
    );

    // Group gb replicates throughout; ga is served read-only by the agent (the replica is its
    // primary), gb read-write.
    let head_a = c.replica_head("a1");
    for v in ["a1", "a2"] {
        assert_eq!(c.volume_status(v)["primary"], "replica (failed over)");
    }
    assert_eq!(c.volume_status("b")["primary"], "agent");
    let (agent_metrics, replica_metrics) = (c.metrics(Side::Agent), c.metrics(Side::Replica));
    for (body, name) in [
        (&agent_metrics, "cdp_agent_group_primary"),
        (&replica_metrics, "cdp_replica_group_primary"),
    ] {
        for (group, side) in [("ga", "replica"), ("gb", "agent")] {
            let sample = format!("{name}{{group=\"{group}\",side=\"{side}\"}}");
            assert!(
                metric_is_one(body, &sample),
                "{sample} is not 1:\n{}",
                body.lines()
                    .filter(|l| l.starts_with(name))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
    assert!(
        nbd[1]
            .write(0, &[1u8; 4096], false)
            .is_err_and(|e| e.contains("Operation not permitted")),
        "a2 is read-only on the agent"
    );
    for _ in 0..3 {
        write_random(&mut nbd[2], &mut rng, 10);
        c.wait_caught_up("b", Duration::from_secs(60));
        let b = c.volume_status("b");
        assert_eq!(b["cause"], "protecting/ok", "{b}");
    }
    assert_eq!(
        c.replica_head("a1"),
        head_a,
        "nothing of ga is journaled while failed over"
    );

    // Each failover export is the bookmark's image of its volume, read-write.
    for (i, v) in ["a1", "a2"].iter().enumerate() {
        let mut f = NbdDriver::connect(&format!("nbd+unix:///{v}?socket={}", sock.display()));
        assert_same_image(
            &format!("the failover export of {v}"),
            &f.read(0, VOLUME_BYTES).expect("read"),
            &images[i],
        );
        let data = vec![0x70 + i as u8; 128 << 10];
        f.write(MIB, &data, false).expect("failover write");
        f.flush().expect("failover flush");
        assert_eq!(f.read(MIB, data.len() as u64).expect("read"), data);
    }
    assert!(
        fo.stop(Duration::from_secs(10)),
        "failover exits 0 on SIGTERM"
    );

    // Undo: ga joins again on the open connection, the agent is its primary again (its
    // volumes writable), and it catches up.
    run_ok(&mut c.replica_cmd(&["failover", "--group", "ga", "--undo"]));
    wait_until(
        "the agent to be ga's primary again",
        Duration::from_secs(30),
        || {
            c.volume_status("a1")["primary"] == "agent"
                && c.volume_status("a2")["primary"] == "agent"
        },
    );
    write_random(&mut nbd[0], &mut rng, 5);
    write_random(&mut nbd[1], &mut rng, 5);
    for v in ["a1", "a2"] {
        c.wait_in_step(v, Duration::from_secs(120));
        assert_same_image(
            &format!("{v}: latest after the undo equals the device"),
            &c.restore(v, "latest").expect("restore"),
            &read_file(&c.path(&format!("{v}.img"))),
        );
    }
    let log = c.agent.as_ref().expect("agent").log_text();
    assert_eq!(
        log.matches("connected to the replica").count(),
        1,
        "the agent's connection stayed up through the failover and its undo:\n{}",
        tail(&log, 40)
    );
    assert!(
        log.contains("group ga replicates again"),
        "{}",
        tail(&log, 40)
    );
}
