//! Failover with the real agent (issue 5): while `serve` runs and the agent keeps writing, the
//! volume is failed over at a bookmark; the agent is fenced (refused with a sentence naming
//! the failover, its client writes never fail, it spools), the failover volume takes writes
//! through NBD and reads them back; `--undo` then lets the agent back in: it catches up from
//! its spool, `latest` equals the device, and the bookmark restores exactly as before.
//! Finally a second failover is committed (with `serve` stopped): `latest` is then the
//! failover image with its writes, and the agent stays refused.

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
    let mut fo = Proc::spawn(
        "failover",
        c.replica_cmd(&[
            "failover",
            "--volume",
            "v",
            "--at",
            "bookmark:before-failover",
        ])
        .arg("--socket")
        .arg(&sock),
        &c.path("failover.log"),
    );
    wait_until("the failover to serve", Duration::from_secs(30), || {
        if let Ok(Some(st)) = fo.child.try_wait() {
            panic!("failover exited ({st}): {}", fo.log_text());
        }
        std::os::unix::net::UnixStream::connect(&sock).is_ok()
    });
    wait_until(
        "the agent to be refused for the failover",
        Duration::from_secs(60),
        || {
            let st = c.agent_status();
            st.to_string().contains("failed over")
                && st["link_cause"] == "disconnected/fenced-by-failover"
                && st["volumes"][0]["cause"] == "disconnected/fenced-by-failover"
        },
    );
    let rv = &c.replica_status()["volumes"][0];
    assert_eq!(rv["cause"], "failed-over/active", "{rv}");
    c.wait_agent_names("v", &["disconnected/fenced-by-failover"]);
    c.wait_replica_names("v", &["failed-over/active"]);
    // Client writes go on while the agent is fenced.
    write_random(&mut nbd, &mut rng, 40);
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

    // Undo: the agent is let back in and catches up; nothing before was changed.
    run_ok(&mut c.replica_cmd(&["failover", "--volume", "v", "--undo"]));
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
    let mut fo = Proc::spawn(
        "failover",
        c.replica_cmd(&["failover", "--volume", "v", "--at", &format!("seq:{point}")])
            .arg("--socket")
            .arg(&sock2),
        &c.path("failover2.log"),
    );
    wait_until(
        "the second failover to serve",
        Duration::from_secs(30),
        || {
            if let Ok(Some(st)) = fo.child.try_wait() {
                panic!("failover exited ({st}): {}", fo.log_text());
            }
            std::os::unix::net::UnixStream::connect(&sock2).is_ok()
        },
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
                && st["link_cause"] == "disconnected/fenced-by-failover"
        },
    );
    let rv = &c.replica_status()["volumes"][0];
    assert_eq!(rv["cause"], "failed-over/committed", "{rv}");
    c.wait_agent_names("v", &["disconnected/fenced-by-failover"]);
    c.wait_replica_names("v", &["failed-over/committed"]);
    write_random(&mut nbd, &mut rng, 5);
    assert_same_image(
        "the committed volume is not overwritten by the fenced agent",
        &c.restore("v", "latest").expect("restore"),
        &expected,
    );
}
