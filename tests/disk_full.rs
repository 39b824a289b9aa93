//! The replica's disk fills up (issue 4): its data directory is on a small tmpfs. Ingest
//! pauses with a clear reason on both sides, the agent keeps serving writes from its spool,
//! nothing is corrupted, and once space is freed ingest resumes by itself; at the end the
//! replica's `latest` equals the device and every bookmark restores exactly.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;

struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn mount_tmpfs(dir: &Path, size_mib: u64) -> Option<Mount> {
    std::fs::create_dir_all(dir).expect("mount point");
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
        .arg(dir)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        if in_ci() {
            panic!("mounting a tmpfs failed: this test needs root (CI runs as root)");
        }
        eprintln!("SKIPPED: mounting a tmpfs needs root");
        return None;
    }
    Some(Mount(dir.to_owned()))
}

#[test]
fn a_full_replica_disk_pauses_ingest_and_recovers_by_itself() {
    if !require_python_nbd() {
        return;
    }
    let mnt = tempfile::tempdir().expect("tempdir");
    let Some(_mount) = mount_tmpfs(mnt.path(), 80) else {
        return;
    };
    let mut c = Cluster::with_replica_dir(Some(mnt.path().join("replica")));
    let dev = c.make_device("v.img", 24 * MIB, 4 * MIB, 5);
    c.protect("v", &dev, None);
    // A tight RPO target: a pause that lasts breaches it, on both sides.
    c.set_agent_config("rpo_target", "\"2s\"");
    c.start_replica();
    c.start_agent();
    c.wait_protecting("v", Duration::from_secs(120));
    c.wait_in_step("v", Duration::from_secs(120));
    let mut model = read_file(&dev);
    let mut nbd = NbdDriver::connect(&c.nbd_uri("v"));
    nbd.write(0, &[1u8; 4096], false).expect("write");
    model[..4096].fill(1);
    nbd.flush().expect("flush");
    c.bookmark("before-full", true);
    let before = *blake3::hash(&model).as_bytes();

    // Leave about 8 MiB free on the replica's filesystem, then write much more than that.
    let filler = mnt.path().join("filler");
    let avail = {
        let out = run_ok(
            Command::new("df")
                .args(["--output=avail", "-B1"])
                .arg(mnt.path()),
        );
        out.lines()
            .nth(1)
            .and_then(|l| l.trim().parse::<u64>().ok())
            .expect("df avail")
    };
    std::fs::write(&filler, vec![0xaau8; (avail - 8 * MIB) as usize]).expect("filler");
    let mut rng = Lcg(9);
    let mut buf = vec![0u8; MIB as usize];
    for i in 0..40u64 {
        rng.fill(&mut buf);
        let offset = (i % 24) * MIB;
        nbd.write(offset, &buf, false)
            .expect("writes go on while the replica's disk is full");
        model[offset as usize..(offset + MIB) as usize].copy_from_slice(&buf);
    }
    nbd.flush().expect("flush while the replica's disk is full");
    wait_until(
        "the replica to pause ingest",
        Duration::from_secs(60),
        || {
            let v = c.volume_status("v");
            v["replica_paused"].is_string()
        },
    );
    let v = c.volume_status("v");
    let reason = v["replica_paused"].as_str().unwrap_or_default().to_owned();
    assert!(
        reason.contains("full") || reason.contains("space"),
        "the reason says the disk is full: {reason}"
    );
    let status = c.replica_status();
    assert!(
        status.to_string().contains("paused"),
        "the replica's status says it is paused: {status}"
    );
    // Both sides name the pause, and then the RPO breach it causes (the lag grows past 2 s
    // while the batches wait in the agent's spool).
    assert_eq!(
        status["volumes"][0]["cause"], "paused/replica-disk-full",
        "{status}"
    );
    wait_until(
        "both sides to name the pause and the RPO breach",
        Duration::from_secs(60),
        || {
            let v = c.volume_status("v");
            let r = c.replica_status();
            let has = |causes: &serde_json::Value, name: &str| {
                causes
                    .as_array()
                    .is_some_and(|cs| cs.iter().any(|x| x == name))
            };
            v["cause"] == "paused/replica-disk-full"
                && has(&v["causes"], "rpo-breach")
                && has(&r["volumes"][0]["causes"], "paused/replica-disk-full")
                && has(&r["volumes"][0]["causes"], "rpo-breach")
        },
    );
    c.wait_agent_names("v", &["paused/replica-disk-full", "rpo-breach"]);
    c.wait_replica_names("v", &["paused/replica-disk-full", "rpo-breach"]);
    let replica = c.replica.as_mut().expect("replica");
    assert!(
        replica.child.try_wait().expect("wait").is_none(),
        "the replica keeps running: {}",
        replica.log_text()
    );

    // Space returns; ingest resumes by itself.
    std::fs::remove_file(&filler).expect("remove the filler");
    c.wait_in_step("v", Duration::from_secs(120));
    assert!(
        c.volume_status("v")["replica_paused"].is_null(),
        "the pause is over"
    );
    drop(nbd);
    let latest = c.restore("v", "latest").expect("restore latest");
    assert_same_image("latest after the disk was full", &latest, &model);
    let got = c
        .restore("v", "bookmark:before-full")
        .expect("restore bookmark");
    assert_eq!(
        *blake3::hash(&got).as_bytes(),
        before,
        "the bookmark from before the disk filled up"
    );
    let _ = std::fs::remove_dir_all(mnt.path().join("replica"));
}
