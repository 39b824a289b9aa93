//! The agent's hold on its devices and the end of a volume's protection (issue 10):
//! * a device served by a running agent cannot be protected or served by a second agent,
//!   whatever its data directory: one sentence names the device and the holder's pid, and the
//!   first agent keeps serving (a regular file, and a loop block device);
//! * `cdp-agent unprotect` (see below).

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;

/// A second agent's data directory, paired with the same replica.
fn second_agent(c: &Cluster) -> std::path::PathBuf {
    let dir = c.path("agent2");
    let fp = run_ok(
        Command::new(bin("cdp-replica"))
            .args(["fingerprint", "--data"])
            .arg(&c.replica_dir),
    );
    run_ok(
        Command::new(bin("cdp-agent"))
            .args(["init", "--data"])
            .arg(&dir)
            .args([
                "--replica",
                &format!("127.0.0.1:{}", c.port),
                "--replica-fingerprint",
                fp.trim(),
            ]),
    );
    dir
}

fn refused(cmd: &mut Command, device: &std::path::Path, pid: u32) {
    let out = run(cmd);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{cmd:?} must be refused: {err}");
    assert!(
        err.contains(&format!("device {}", device.display()))
            && err.contains(&format!("pid {pid}")),
        "the refusal names the device and the holder's pid {pid}: {err}"
    );
    assert_eq!(
        err.trim().lines().count(),
        1,
        "the refusal is one sentence: {err}"
    );
}

fn claimed_device_is_refused_to_a_second_agent(device_of: impl Fn(&Cluster) -> std::path::PathBuf) {
    if !require_python_nbd() {
        return;
    }
    let mut c = Cluster::new();
    let dev = device_of(&c);
    c.protect("v", &dev, None);
    let other = second_agent(&c);
    // The second agent protects the same device while nobody serves it (allowed), and the
    // first one starts.
    run_ok(
        Command::new(bin("cdp-agent"))
            .args(["protect", "--data"])
            .arg(&other)
            .args(["--volume", "w", "--device"])
            .arg(&dev),
    );
    c.start_replica();
    c.start_agent();
    c.wait_protecting("v", Duration::from_secs(120));
    let pid = c.agent.as_ref().expect("agent").child.id();

    refused(
        Command::new(bin("cdp-agent"))
            .args(["protect", "--data"])
            .arg(c.path("agent3"))
            .args(["--volume", "x", "--device"])
            .arg(&dev),
        &dev,
        pid,
    );
    let mut run_cmd = Command::new(bin("cdp-agent"));
    run_cmd
        .args(["run", "--data"])
        .arg(&other)
        .arg("--socket")
        .arg(c.path("other.sock"));
    refused(&mut run_cmd, &dev, pid);

    // The first agent keeps serving.
    let mut nbd = NbdDriver::connect(&c.nbd_uri("v"));
    nbd.write(MIB, &[7u8; 4096], true).expect("write");
    assert_eq!(nbd.read(MIB, 4096).expect("read"), vec![7u8; 4096]);
    c.wait_in_step("v", Duration::from_secs(60));
}

#[test]
fn a_file_served_by_one_agent_is_refused_to_another() {
    // `agent3` has no configuration: protect must be refused for the device, not for that.
    claimed_device_is_refused_to_a_second_agent(|c| {
        let dir = c.path("agent3");
        let fp = run_ok(
            Command::new(bin("cdp-replica"))
                .args(["fingerprint", "--data"])
                .arg(&c.replica_dir),
        );
        run_ok(
            Command::new(bin("cdp-agent"))
                .args(["init", "--data"])
                .arg(&dir)
                .args([
                    "--replica",
                    "127.0.0.1:9",
                    "--replica-fingerprint",
                    fp.trim(),
                ]),
        );
        c.make_device("v.img", 8 * MIB, MIB, 1)
    });
}

/// A loop device over a file, detached on drop.
struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn a_block_device_served_by_one_agent_is_refused_to_another() {
    if !require_tool("losetup") {
        return;
    }
    let held: std::sync::Mutex<Option<Loop>> = std::sync::Mutex::new(None);
    claimed_device_is_refused_to_a_second_agent(|c| {
        let dir = c.path("agent3");
        let fp = run_ok(
            Command::new(bin("cdp-replica"))
                .args(["fingerprint", "--data"])
                .arg(&c.replica_dir),
        );
        run_ok(
            Command::new(bin("cdp-agent"))
                .args(["init", "--data"])
                .arg(&dir)
                .args([
                    "--replica",
                    "127.0.0.1:9",
                    "--replica-fingerprint",
                    fp.trim(),
                ]),
        );
        let file = c.make_device("v.img", 8 * MIB, MIB, 1);
        let out = run_ok(Command::new("losetup").args(["-f", "--show"]).arg(&file));
        let dev = out.trim().to_owned();
        *held.lock().expect("loop") = Some(Loop(dev.clone()));
        std::path::PathBuf::from(dev)
    });
}
