//! Bad input gets a clear answer and changes nothing, on a running system:
//! * NBD: a malformed handshake closes that connection only; a request past the end, an
//!   oversized length and an unknown command each get the error reply the protocol says,
//!   and the connection and the server keep serving;
//! * (a corrupt batch is refused by the replica with nothing of it written, in
//!   `replica/tests/quic.rs`; the agent's answer to a Nack, sending the batch again, is the
//!   `SendWindow` unit tests' — the shipped agent has no switch to corrupt a batch);
//! * an agent whose fingerprint is not authorized cannot connect, an agent pinned to another
//!   replica refuses this one, and neither side crashes.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;

fn read_exact(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).expect("read from the NBD server");
    b
}

/// Newstyle handshake with NBD_OPT_EXPORT_NAME; returns the export size.
fn handshake(s: &mut UnixStream, export: &str) -> u64 {
    let hello = read_exact(s, 18);
    assert_eq!(&hello[0..8], b"NBDMAGIC");
    assert_eq!(&hello[8..16], b"IHAVEOPT");
    s.write_all(&3u32.to_be_bytes()).expect("client flags"); // FIXED_NEWSTYLE | NO_ZEROES
    let mut opt = Vec::new();
    opt.extend_from_slice(b"IHAVEOPT");
    opt.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
    opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
    opt.extend_from_slice(export.as_bytes());
    s.write_all(&opt).expect("option");
    let reply = read_exact(s, 10);
    u64::from_be_bytes(reply[0..8].try_into().expect("size"))
}

/// Sends one request and returns (error, data) of its simple reply.
fn request(
    s: &mut UnixStream,
    kind: u16,
    cookie: u64,
    offset: u64,
    len: u32,
    payload: &[u8],
    read_len: usize,
) -> (u32, Vec<u8>) {
    let mut r = Vec::new();
    r.extend_from_slice(&0x25609513u32.to_be_bytes());
    r.extend_from_slice(&0u16.to_be_bytes());
    r.extend_from_slice(&kind.to_be_bytes());
    r.extend_from_slice(&cookie.to_be_bytes());
    r.extend_from_slice(&offset.to_be_bytes());
    r.extend_from_slice(&len.to_be_bytes());
    r.extend_from_slice(payload);
    s.write_all(&r).expect("request");
    let reply = read_exact(s, 16);
    assert_eq!(
        u32::from_be_bytes(reply[0..4].try_into().expect("magic")),
        0x67446698,
        "simple reply magic"
    );
    let error = u32::from_be_bytes(reply[4..8].try_into().expect("error"));
    assert_eq!(
        u64::from_be_bytes(reply[8..16].try_into().expect("cookie")),
        cookie,
        "reply names the request"
    );
    let data = if error == 0 && read_len > 0 {
        read_exact(s, read_len)
    } else {
        Vec::new()
    };
    (error, data)
}

#[test]
fn malformed_nbd_requests_get_protocol_errors_and_the_agent_keeps_serving() {
    if !require_tool("nbdinfo") {
        return;
    }
    let mut c = Cluster::new();
    let dev = c.make_device("v.img", 8 * MIB, MIB, 5);
    c.protect("v", &dev, None);
    c.start_replica();
    c.start_agent();
    let sock = c.nbd_socket();

    // A malformed handshake: garbage instead of client flags and options.
    let mut bad = UnixStream::connect(&sock).expect("connect");
    bad.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let _ = read_exact(&mut bad, 18);
    bad.write_all(b"\xff\xff\xff\xffGARBAGE GARBAGE GARBAGE")
        .expect("garbage");
    let mut rest = Vec::new();
    let _ = bad.read_to_end(&mut rest); // the server closes this connection

    // A bad option magic, then an option with an absurd length.
    for opt in [
        b"NOTAMAGI\x00\x00\x00\x01\x00\x00\x00\x00".to_vec(),
        [
            b"IHAVEOPT".as_slice(),
            &7u32.to_be_bytes(),
            &u32::MAX.to_be_bytes(),
        ]
        .concat(),
    ] {
        let mut s = UnixStream::connect(&sock).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let _ = read_exact(&mut s, 18);
        s.write_all(&3u32.to_be_bytes()).expect("flags");
        s.write_all(&opt).expect("option");
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    }

    // A well-behaved connection sending bad requests.
    let mut s = UnixStream::connect(&sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let size = handshake(&mut s, "v");
    assert_eq!(size, 8 * MIB);
    let (err, _) = request(&mut s, 99, 1, 0, 512, &[], 0);
    assert_eq!(err, 22, "an unknown command gets EINVAL");
    let (err, _) = request(&mut s, 0, 2, size - 512, 1024, &[], 1024);
    assert_eq!(err, 22, "a read past the end gets EINVAL");
    let (err, _) = request(&mut s, 1, 3, size - 512, 1024, &[0xab; 1024], 0);
    assert_eq!(err, 28, "a write past the end gets ENOSPC");
    let (err, _) = request(&mut s, 0, 4, 0, 64 << 20, &[], 0);
    assert!(
        err == 22 || err == 75,
        "an oversized read gets EINVAL or EOVERFLOW, got {err}"
    );
    let (err, data) = request(&mut s, 0, 5, 0, 4096, &[], 4096);
    assert_eq!(err, 0, "the connection still serves good requests");
    assert_eq!(data, read_file(&dev)[..4096].to_vec());
    let (err, _) = request(&mut s, 1, 6, 4096, 4, b"good", 0);
    assert_eq!(err, 0);

    // Other clients were never affected.
    let out = run_ok(Command::new("nbdinfo").arg(c.nbd_uri("v")));
    assert!(
        out.contains(&(8 * MIB).to_string()),
        "nbdinfo after bad clients: {out}"
    );
    let agent = c.agent.as_mut().expect("agent");
    assert!(
        agent.child.try_wait().expect("wait").is_none(),
        "the agent is still running"
    );

    // Nothing the bad requests said reached the device: only the good write did.
    drop(s);
    let bm = run_ok(&mut c.agent_cmd(&["bookmark", "after-bad-input", "--wait"]));
    assert!(bm.contains("durable"));
    let restored = c.restore("v", "latest").expect("restore");
    let device = read_file(&dev);
    assert_eq!(&device[4096..4100], b"good");
    assert_same_image("latest after bad input", &restored, &device);
}

#[test]
fn unauthorized_and_mispinned_agents_are_refused_and_nothing_crashes() {
    let mut c = Cluster::new();
    let dev = c.make_device("v.img", 4 * MIB, MIB, 3);
    c.protect("v", &dev, None);
    c.start_replica();
    c.start_agent();
    c.wait_protecting("v", Duration::from_secs(60));
    let listen = format!("127.0.0.1:{}", c.port);
    let replica_fp = run_ok(&mut c.replica_cmd(&["fingerprint"]))
        .trim()
        .to_owned();

    // An agent nobody authorized.
    let intruder_dir = c.path("intruder");
    let out = run_ok(
        Command::new(bin("cdp-agent"))
            .args(["init", "--data"])
            .arg(&intruder_dir)
            .args(["--replica", &listen, "--replica-fingerprint", &replica_fp]),
    );
    let intruder_fp = out
        .trim()
        .strip_prefix("fingerprint: ")
        .expect("fingerprint")
        .to_owned();
    let dev2 = c.make_device("intruder.img", 4 * MIB, MIB, 4);
    run_ok(
        Command::new(bin("cdp-agent"))
            .args(["protect", "--data"])
            .arg(&intruder_dir)
            .args(["--volume", "stolen", "--device"])
            .arg(&dev2),
    );
    let mut intruder = Proc::spawn(
        "intruder",
        Command::new(bin("cdp-agent"))
            .args(["run", "--data"])
            .arg(&intruder_dir)
            .arg("--socket")
            .arg(c.path("intruder.sock"))
            .args(["--metrics", "127.0.0.1:0"])
            .env("RUST_LOG", "info"),
        &c.path("intruder.log"),
    );
    wait_until(
        "the intruder to be refused",
        Duration::from_secs(30),
        || {
            let out = run(Command::new(bin("cdp-agent"))
                .args(["status", "--json", "--data"])
                .arg(&intruder_dir));
            let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            st["link_error"]
                .as_str()
                .is_some_and(|e| e.contains("not authorized"))
                // Named as a cause too, on the link and on its volume.
                && st["link_cause"] == "disconnected/unauthorized"
                && st["volumes"][0]["causes"]
                    .as_array()
                    .is_some_and(|cs| cs.iter().any(|x| x == "disconnected/unauthorized"))
        },
    );
    wait_named(
        Side::Agent,
        &intruder_dir,
        &c.path("intruder.log"),
        "stolen",
        &["disconnected/unauthorized"],
        Duration::from_secs(30),
    );
    let replica_log = c.replica.as_ref().expect("replica").log_text();
    assert!(
        replica_log.contains(&intruder_fp),
        "the replica names the refused fingerprint: {replica_log}"
    );

    // An agent pinned to a replica that is not this one.
    let wrong_dir = c.path("wrong");
    run_ok(
        Command::new(bin("cdp-agent"))
            .args(["init", "--data"])
            .arg(&wrong_dir)
            .args([
                "--replica",
                &listen,
                "--replica-fingerprint",
                &"ab".repeat(32),
            ]),
    );
    let dev3 = c.make_device("wrong.img", 4 * MIB, MIB, 5);
    run_ok(
        Command::new(bin("cdp-agent"))
            .args(["protect", "--data"])
            .arg(&wrong_dir)
            .args(["--volume", "w", "--device"])
            .arg(&dev3),
    );
    let mut wrong = Proc::spawn(
        "wrong",
        Command::new(bin("cdp-agent"))
            .args(["run", "--data"])
            .arg(&wrong_dir)
            .arg("--socket")
            .arg(c.path("wrong.sock"))
            .args(["--metrics", "127.0.0.1:0"])
            .env("RUST_LOG", "info"),
        &c.path("wrong.log"),
    );
    wait_until(
        "the mispinned agent to refuse the replica",
        Duration::from_secs(30),
        || {
            let out = run(Command::new(bin("cdp-agent"))
                .args(["status", "--json", "--data"])
                .arg(&wrong_dir));
            let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            st["link_error"]
                .as_str()
                .is_some_and(|e| e.contains(&replica_fp) && e.contains("pinned"))
                && st["link_cause"] == "disconnected/replica-mismatch"
        },
    );
    wait_named(
        Side::Agent,
        &wrong_dir,
        &c.path("wrong.log"),
        "w",
        &["disconnected/replica-mismatch"],
        Duration::from_secs(30),
    );

    // Nobody crashed, and the authorized agent still replicates.
    for p in [&mut intruder, &mut wrong] {
        assert!(
            p.child.try_wait().expect("wait").is_none(),
            "{} is still running",
            p.name
        );
    }
    assert!(
        c.replica
            .as_mut()
            .expect("replica")
            .child
            .try_wait()
            .expect("wait")
            .is_none(),
        "the replica is still running"
    );
    let bm = run_ok(&mut c.agent_cmd(&["bookmark", "still-fine", "--wait"]));
    assert!(bm.contains("durable"), "{bm}");
    let status = c.replica_status();
    assert!(
        !status.to_string().contains("stolen"),
        "the intruder's volume never reached the replica: {status}"
    );
    assert!(
        intruder.stop(Duration::from_secs(20)),
        "the intruder stops cleanly: {}",
        intruder.log_text()
    );
    assert!(
        wrong.stop(Duration::from_secs(20)),
        "the mispinned agent stops cleanly: {}",
        wrong.log_text()
    );
}
