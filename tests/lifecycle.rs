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

/// A new agent's data directory `name`, paired with the cluster's replica.
fn another_agent(c: &Cluster, name: &str) -> std::path::PathBuf {
    let dir = c.path(name);
    let fp = run_ok(&mut c.replica_cmd(&["fingerprint"]));
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
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert!(
        errors.len() == 1 && errors[0].contains(&format!("pid {pid}")),
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
    let other = another_agent(&c, "agent2");
    // A third one, with no volume: its protect is refused for the device alone.
    let third = another_agent(&c, "agent3");
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
            .arg(&third)
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
    claimed_device_is_refused_to_a_second_agent(|c| c.make_device("v.img", 8 * MIB, MIB, 1));
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
        let file = c.make_device("v.img", 8 * MIB, MIB, 1);
        let out = run_ok(Command::new("losetup").args(["-f", "--show"]).arg(&file));
        let dev = out.trim().to_owned();
        *held.lock().expect("loop") = Some(Loop(dev.clone()));
        std::path::PathBuf::from(dev)
    });
}

/// Whether an NBD client can open export `name` at `uri` (libnbd's `nbdinfo`).
fn export_opens(uri: &str) -> bool {
    run(Command::new("nbdinfo").arg(uri)).status.success()
}

#[test]
fn unprotect_stops_serving_and_releases_the_device_while_other_groups_go_on() {
    if !require_python_nbd() || !require_tool("nbdinfo") {
        return;
    }
    let mut c = Cluster::new();
    let dev_a = c.make_device("a.img", 8 * MIB, MIB, 1);
    let dev_b = c.make_device("b.img", 8 * MIB, MIB, 2);
    let dev_c = c.make_device("c.img", 8 * MIB, MIB, 3);
    let dev_d = c.make_device("d.img", 8 * MIB, MIB, 4);
    c.protect("a", &dev_a, None);
    c.protect("b", &dev_b, None);
    c.protect("c", &dev_c, Some("cd"));
    c.protect("d", &dev_d, Some("cd"));
    c.start_replica();
    c.start_agent();
    for v in ["a", "b", "c", "d"] {
        c.wait_protecting(v, Duration::from_secs(120));
    }
    let mut a = NbdDriver::connect(&c.nbd_uri("a"));
    a.write(0, &[1u8; 4096], true).expect("write a");
    c.bookmark("before", true);

    // A volume that shares its group is refused, and nothing changes.
    let out = run(&mut c.agent_cmd(&["unprotect", "--volume", "c"]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--group cd"),
        "a volume of a group of two is refused: {err}"
    );
    assert!(export_opens(&c.nbd_uri("c")), "c is still served");

    let out = run_ok(&mut c.agent_cmd(&["unprotect", "--volume", "a"]));
    assert!(
        out.contains("no longer protected") && out.contains("released its devices"),
        "{out}"
    );
    // The open connection's requests fail; a new client does not find the export.
    assert!(
        a.write(4096, &[2u8; 4096], false).is_err(),
        "a request on a connection to an unprotected volume fails"
    );
    assert!(!export_opens(&c.nbd_uri("a")), "a is no longer served");
    drop(a);
    // Its device is free for another agent.
    let other = another_agent(&c, "agent2");
    run_ok(
        Command::new(bin("cdp-agent"))
            .args(["protect", "--data"])
            .arg(&other)
            .args(["--volume", "a2", "--device"])
            .arg(&dev_a),
    );
    // It left the configuration and the status; its state was kept aside.
    let config = std::fs::read_to_string(c.agent_dir.join("agent.toml")).expect("config");
    assert!(!config.contains("a.img"), "{config}");
    let st = c.agent_status();
    let names: Vec<&str> = st["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(names, vec!["b", "c", "d"], "{st}");
    assert!(!c.agent_dir.join("state").join("a.json").exists());
    assert!(
        std::fs::read_dir(c.agent_dir.join("unprotected"))
            .expect("unprotected")
            .count()
            == 1
    );

    // The other groups go on replicating.
    let mut b = NbdDriver::connect(&c.nbd_uri("b"));
    b.write(0, &[3u8; 4096], true).expect("write b");
    let mut cd = NbdDriver::connect(&c.nbd_uri("c"));
    cd.write(0, &[4u8; 4096], true).expect("write c");
    c.bookmark("after", true);
    c.wait_in_step("b", Duration::from_secs(60));
    let restored = c.restore("b", "bookmark:after").expect("restore b");
    assert_eq!(&restored[..4096], &[3u8; 4096][..]);
    // The replica keeps a's history.
    let restored = c.restore("a", "bookmark:before").expect("restore a");
    assert_eq!(&restored[..4096], &[1u8; 4096][..]);

    // With the group unprotected, the replica may forget it while the agent stays connected
    // for its other groups.
    let out = run_ok(&mut c.replica_cmd(&["forget", "--volume", "a", "--yes"]));
    assert!(out.starts_with("forgot "), "{out}");
    assert!(
        c.restore("a", "latest").is_err(),
        "a is forgotten on the replica"
    );
    c.wait_in_step("b", Duration::from_secs(60));

    // A whole group, with --purge; then, with the agent stopped, the last one.
    let out = run_ok(&mut c.agent_cmd(&["unprotect", "--group", "cd", "--purge"]));
    assert!(
        out.contains("group cd (c, d) is no longer protected"),
        "{out}"
    );
    assert!(!c.agent_dir.join("spool").join("cd").exists());
    assert!(!c.agent_dir.join("state").join("c.json").exists());
    assert!(
        c.agent
            .as_mut()
            .expect("agent")
            .stop(Duration::from_secs(30))
    );
    let out = run_ok(&mut c.agent_cmd(&["unprotect", "--volume", "b"]));
    assert!(out.contains("(the agent is not running)"), "{out}");
    let config = std::fs::read_to_string(c.agent_dir.join("agent.toml")).expect("config");
    assert!(!config.contains("[[volume]]"), "{config}");
}
