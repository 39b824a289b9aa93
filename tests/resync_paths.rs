//! The three paths that end in a dirty-region resync, against the release binaries (issue
//! 10). A miscompile at opt-level 2 once made the dirty map count 0 while its bits were set, so
//! every release build skipped these resyncs while the debug suite passed; each path here
//! fails on such a build.
//!
//! * **crash**: unflushed writes on a few chunks, `kill -9` of the agent before they were ever
//!   sealed into a batch (the activity log is their only trace), restart: the resync of those
//!   chunks runs in that same run, every point between the restart and the resync's end is not
//!   consistent, and a bookmark after it restores equal to the device
//!   (`CDP_CRASH_ROUNDS`, default 10; `make soak` 100);
//! * **repair**: a byte of a journal record flipped while the replica is stopped; `verify run
//!   --full` finds the chunk, `verify repair` has the agent resend it, the mismatch closes and a
//!   new full verify is clean (`CDP_REPAIR_ROUNDS`, default 10; `make soak` 100);
//! * **overflow**: the replica away while far more than the spool's cap is written: dirty
//!   regions, then their resync, then consistent again, and `latest` equals the device
//!   (`CDP_OVERFLOW_ROUNDS`, default 10; `make soak` 100).

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;

fn rounds(var: &str) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
}

fn hash(b: &[u8]) -> [u8; 32] {
    *blake3::hash(b).as_bytes()
}

/// The seq after which the agent's current run continues its log (its start-up line).
fn continues_after(log: &str) -> u64 {
    log.lines()
        .filter_map(|l| l.split(" continues after seq ").nth(1))
        .filter_map(|r| r.split_whitespace().next()?.parse().ok())
        .next_back()
        .unwrap_or_else(|| panic!("the agent says where its log continues:\n{log}"))
}

/// The seq of the point that ended the last dirty-region resync of this run, if any.
fn resync_end(log: &str) -> Option<u64> {
    log.lines()
        .filter_map(|l| l.split("resync complete: seq ").nth(1))
        .filter_map(|r| r.split_whitespace().next()?.parse().ok())
        .next_back()
}

#[test]
fn crash_unflushed_writes_are_resynced_in_the_same_run() {
    if !require_python_nbd() {
        return;
    }
    let seed = test_seed();
    let mut rng = Lcg(seed);
    let mut c = Cluster::new();
    let size = 16 * MIB;
    let dev = c.make_device("v.img", size, 4 * MIB, seed);
    c.protect("v", &dev, None);
    // Batches are cut only by a flush (or 4 MiB): the few small writes of a round stay in the
    // open batch, in memory, and die with the agent. The activity log is their only trace.
    c.set_agent_config("batch_age", "\"10m\"");
    c.start_replica();
    c.start_agent();
    c.wait_protecting("v", Duration::from_secs(120));
    c.wait_in_step("v", Duration::from_secs(120));
    let mut model = read_file(&dev);
    for round in 0..rounds("CDP_CRASH_ROUNDS") {
        let chunks: BTreeSet<u64> = (0..1 + rng.below(6))
            .map(|_| rng.below(size / MIB))
            .collect();
        let mut nbd = NbdDriver::connect(&c.nbd_uri("v"));
        let mut buf = vec![0u8; 4096];
        for chunk in &chunks {
            rng.fill(&mut buf);
            let offset = chunk * MIB + rng.below(MIB / 4096) * 4096;
            nbd.write(offset, &buf, false)
                .unwrap_or_else(|e| panic!("round {round}: write: {e}"));
            model[offset as usize..offset as usize + 4096].copy_from_slice(&buf);
        }
        c.agent.as_mut().expect("agent").kill9();
        drop(nbd);
        assert_same_image(
            &format!("round {round}: the device after the kill"),
            &read_file(&dev),
            &model,
        );

        if round == 0 {
            // With the replica away too, the restarted agent's resync waits, and its status
            // names why the chunks are dirty.
            c.replica.as_mut().expect("replica").kill9();
            c.start_agent();
            wait_until(
                "the agent to name the resync after the crash",
                Duration::from_secs(60),
                || {
                    let v = c.volume_status("v");
                    v["cause"] == "resyncing/after-crash"
                        && v["causes"]
                            == serde_json::json!([
                                "resyncing/after-crash",
                                "disconnected/link-down"
                            ])
                },
            );
            c.wait_agent_names("v", &["resyncing/after-crash", "disconnected/link-down"]);
            c.agent.as_mut().expect("agent").kill9();
            c.start_replica();
        }
        c.start_agent();
        c.wait_in_step("v", Duration::from_secs(120));
        let log = c.agent.as_ref().expect("agent").log_text();
        let from = continues_after(&log);
        let end = resync_end(&log).unwrap_or_else(|| {
            panic!(
                "round {round}: the unflushed writes on chunks {chunks:?} were resynced in this run:\n{}",
                tail(&log, 40)
            )
        });
        let points = c.points("v");
        let after: Vec<_> = points
            .iter()
            .filter(|p| p["seq"].as_u64().is_some_and(|s| s > from && s <= end))
            .collect();
        assert!(!after.is_empty(), "round {round}: points after seq {from}");
        for p in &after {
            let seq = p["seq"].as_u64().unwrap_or(0);
            assert_eq!(
                p["consistent"],
                seq == end,
                "round {round}: points from the restart (after seq {from}) to the resync's end (seq {end}) are not consistent, the end is: {p}"
            );
        }
        let name = format!("after-{round}");
        c.bookmark(&name, true);
        let restored = c
            .restore("v", &format!("bookmark:{name}"))
            .unwrap_or_else(|e| panic!("round {round}: restore: {e}"));
        assert_same_image(
            &format!("round {round}: bookmark {name} against the device"),
            &restored,
            &model,
        );
    }
}

/// Flips one byte of the journal inside the stored bytes of a record that holds `pattern`
/// (raw: it does not compress). Returns the segment changed.
fn flip_in_journal(c: &Cluster, group: &str, pattern: &[u8]) -> std::path::PathBuf {
    use std::os::unix::fs::FileExt;
    let dir = c.replica_dir.join("journal").join(group);
    let needle = &pattern[..64];
    for e in std::fs::read_dir(&dir).expect("journal dir").flatten() {
        let path = e.path();
        let data = read_file(&path);
        if let Some(at) = data.windows(needle.len()).rposition(|w| w == needle) {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .expect("open segment");
            f.write_all_at(&[data[at + 1000] ^ 0x5a], (at + 1000) as u64)
                .expect("flip");
            f.sync_all().expect("sync");
            return path;
        }
    }
    panic!("the written pattern is in no segment of {}", dir.display());
}

fn verify(c: &Cluster, args: &[&str]) -> std::process::Output {
    let mut cmd = std::process::Command::new(bin("cdp-replica"));
    cmd.arg("verify")
        .arg(args[0])
        .arg("--data")
        .arg(&c.replica_dir)
        .args(&args[1..]);
    run(&mut cmd)
}

#[test]
fn repair_of_a_damaged_journal_record_closes_the_mismatch() {
    if !require_python_nbd() {
        return;
    }
    let seed = test_seed();
    let mut rng = Lcg(seed);
    let mut c = Cluster::new();
    let size = 16 * MIB;
    let dev = c.make_device("v.img", size, 2 * MIB, seed);
    c.protect("v", &dev, None);
    set_verifier_rate(&c, 0);
    c.start_replica();
    c.start_agent();
    c.wait_protecting("v", Duration::from_secs(120));
    let mut nbd = NbdDriver::connect(&c.nbd_uri("v"));
    for round in 0..rounds("CDP_REPAIR_ROUNDS") {
        let chunk = rng.below(size / MIB);
        let mut pattern = vec![0u8; 64 << 10];
        rng.fill(&mut pattern);
        nbd.write(chunk * MIB, &pattern, false).expect("write");
        nbd.flush().expect("flush");
        c.wait_in_step("v", Duration::from_secs(60));
        assert!(
            c.replica
                .as_mut()
                .expect("replica")
                .stop(Duration::from_secs(30)),
            "round {round}: the replica stops cleanly"
        );
        flip_in_journal(&c, "v", &pattern);
        c.start_replica();
        c.wait_in_step("v", Duration::from_secs(60));

        let out = verify(&c, &["run", "--volume", "v", "--full"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && text.contains("(full pass): 1 mismatch"),
            "round {round}: the full verify finds chunk {chunk}: {text}"
        );
        c.wait_replica_names("v", &["degraded/verify-mismatch"]);
        // On a terminal, so that its progress bar is drawn too.
        let mut repair = std::process::Command::new(bin("cdp-replica"));
        repair
            .args(["verify", "repair", "--data"])
            .arg(&c.replica_dir)
            .args(["--volume", "v", "--timeout", "120s"]);
        let (status, text) = on_terminal(&repair, Duration::from_secs(180));
        assert!(
            status.success() && text.contains("repaired 1 of 1"),
            "round {round}: the repair of chunk {chunk} completes: {text}"
        );
        assert!(
            text.contains("repairing "),
            "round {round}: its bar: {text}"
        );
        let out = verify(&c, &["report", "--volume", "v", "--json"]);
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("report JSON");
        assert_eq!(
            r["volumes"][0]["open_mismatches"], 0,
            "round {round}: the mismatch is closed: {r}"
        );
        let out = verify(&c, &["run", "--volume", "v", "--full"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success() && text.contains("0 mismatches"),
            "round {round}: a new full verify is clean: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    nbd.flush().expect("flush");
    c.wait_in_step("v", Duration::from_secs(60));
    assert_eq!(
        hash(&c.restore("v", "latest").expect("restore")),
        hash(&read_file(&dev)),
        "latest equals the device after the repairs"
    );
}

#[test]
fn spool_overflow_dirty_regions_are_resynced_and_the_group_is_consistent_again() {
    if !require_python_nbd() {
        return;
    }
    let seed = test_seed();
    let mut rng = Lcg(seed);
    let mut c = Cluster::new();
    let size = 64 * MIB;
    let dev = c.make_device("v.img", size, 8 * MIB, seed);
    c.protect("v", &dev, None);
    // The smallest cap the agent accepts: two batches.
    c.set_agent_config("spool_bytes_max", &(12 * MIB + 4 * MIB).to_string());
    c.start_replica();
    c.start_agent();
    c.wait_protecting("v", Duration::from_secs(120));
    let mut model = read_file(&dev);
    let mut nbd = NbdDriver::connect(&c.nbd_uri("v"));
    for round in 0..rounds("CDP_OVERFLOW_ROUNDS") {
        nbd.flush().expect("flush");
        let before_name = format!("before-{round}");
        c.bookmark(&before_name, true);
        let before = hash(&model);
        // The replica goes away and more than the cap is written.
        c.replica.as_mut().expect("replica").kill9();
        let mut written = 0;
        let mut buf = vec![0u8; 2 * MIB as usize];
        while written < 24 * MIB {
            let offset = rng.below(size / MIB - 2) * MIB + rng.below(8) * 4096;
            rng.fill(&mut buf);
            nbd.write(offset, &buf, false)
                .unwrap_or_else(|e| panic!("round {round}: a write during the overflow: {e}"));
            model[offset as usize..offset as usize + buf.len()].copy_from_slice(&buf);
            written += buf.len() as u64;
        }
        nbd.flush().expect("flush during the overflow");
        let v = c.volume_status("v");
        assert_eq!(v["state"], "overflow", "round {round}: {v}");
        // The overflow decides the state; its dirty regions are named too, and the link down
        // once it is noticed (within 2 s of the kill).
        assert_eq!(v["cause"], "overflow/spool-full", "round {round}: {v}");
        let rv = c.replica_status()["volumes"][0].clone();
        assert_eq!(
            rv["cause"], "disconnected/not-serving",
            "round {round}: {rv}"
        );
        wait_until(
            "the agent to name the overflow, its dirty regions and the link down",
            Duration::from_secs(30),
            || {
                c.volume_status("v")["causes"]
                    == serde_json::json!([
                        "overflow/spool-full",
                        "resyncing/overflow",
                        "disconnected/link-down"
                    ])
            },
        );
        // On the agent's /metrics too (the replica, killed, serves nothing).
        c.wait_agent_names(
            "v",
            &[
                "overflow/spool-full",
                "resyncing/overflow",
                "disconnected/link-down",
            ],
        );
        assert!(
            v["dirty_regions"].as_u64().unwrap_or(0) > 0,
            "round {round}: dirty regions are tracked: {v}"
        );
        assert!(
            c.agent_dir.join("state").join("v.dirty").exists(),
            "round {round}: the dirty map is on disk after a flush"
        );
        c.start_replica();
        c.wait_in_step("v", Duration::from_secs(120));
        let log = c.agent.as_ref().expect("agent").log_text();
        let end = resync_end(&log)
            .unwrap_or_else(|| panic!("round {round}: the dirty regions were resynced"));
        let points = c.points("v");
        let last = points.last().expect("points");
        assert!(
            last["consistent"] == true && last["seq"].as_u64() >= Some(end),
            "round {round}: the resync ends with a consistent point: {last}"
        );
        assert!(
            points
                .iter()
                .any(|p| p["consistent"] == false && p["seq"].as_u64() < Some(end)),
            "round {round}: points inside the resync are recorded as not consistent"
        );
        assert!(
            !c.agent_dir.join("state").join("v.dirty").exists(),
            "round {round}: no dirty map is left once the resync is durable"
        );
        assert_eq!(
            hash(&c.restore("v", "latest").expect("restore")),
            hash(&model),
            "round {round}: latest equals the device after the resync"
        );
        assert_eq!(
            hash(
                &c.restore("v", &format!("bookmark:{before_name}"))
                    .expect("restore")
            ),
            before,
            "round {round}: the point before the overflow"
        );
    }
    assert_same_image("the device", &read_file(&dev), &model);
}

/// The batches of the agent's spool segment at `path`: (offset, length, seq).
fn spool_batches(path: &std::path::Path) -> Vec<(usize, usize, u64)> {
    let data = read_file(path);
    let mut at = cdp_agent::spool::SEGMENT_HEADER_BYTES as usize;
    let mut out = Vec::new();
    while let Ok(h) = cdp_shared::batch::decode_header(&data[at..]) {
        out.push((at, h.total_len(), h.seq.0));
        at += h.total_len();
    }
    out
}

#[test]
fn a_damaged_flushed_spool_batch_is_resynced_not_dropped_as_a_torn_tail() {
    if !require_python_nbd() {
        return;
    }
    let seed = test_seed();
    let mut rng = Lcg(seed);
    let mut c = Cluster::new();
    let size = 16 * MIB;
    let dev = c.make_device("v.img", size, 4 * MIB, seed);
    c.protect("v", &dev, None);
    c.start_replica();
    c.start_agent();
    c.wait_protecting("v", Duration::from_secs(120));
    c.wait_in_step("v", Duration::from_secs(60));
    // The replica away: every flushed batch stays in the spool.
    c.replica.as_mut().expect("replica").kill9();
    let mut nbd = NbdDriver::connect(&c.nbd_uri("v"));
    let mut chunks = BTreeSet::new();
    let mut buf = vec![0u8; 64 << 10];
    for _ in 0..12 {
        let chunk = rng.below(size / MIB);
        chunks.insert(chunk);
        rng.fill(&mut buf);
        nbd.write(chunk * MIB, &buf, false).expect("write");
        nbd.flush().expect("flush");
    }
    drop(nbd);
    assert!(
        c.agent
            .as_mut()
            .expect("agent")
            .stop(Duration::from_secs(60)),
        "the agent stops cleanly"
    );
    let spool = c.agent_dir.join("spool").join("v");
    let segment = std::fs::read_dir(&spool)
        .expect("spool")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "spl"))
        .max()
        .expect("a spool segment");
    let batches = spool_batches(&segment);
    assert!(
        batches.len() >= 10,
        "flushed batches in the spool: {batches:?}"
    );
    // One byte flipped in the payload of a batch in the middle.
    let (at, len, seq) = batches[batches.len() / 2];
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&segment)
            .expect("open segment");
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, (at + len - 10) as u64)
            .expect("read");
        f.write_all_at(&[b[0] ^ 0x20], (at + len - 10) as u64)
            .expect("flip");
        f.sync_all().expect("sync");
    }

    c.start_replica();
    c.start_agent();
    c.wait_in_step("v", Duration::from_secs(120));
    let log = c.agent.as_ref().expect("agent").log_text();
    assert!(
        log.contains("the spool is damaged") && log.contains(&format!("from seq {seq}")),
        "the agent reports the damaged batch (seq {seq}) and what follows it:\n{}",
        tail(&log, 30)
    );
    assert!(
        resync_end(&log).is_some(),
        "the chunks of the lost batches are resynced:\n{}",
        tail(&log, 30)
    );
    assert!(
        spool
            .join("damaged")
            .join(segment.file_name().expect("name"))
            .exists(),
        "the lost bytes are kept aside"
    );
    c.bookmark("after", true);
    assert_same_image(
        "bookmark after the damage against the device",
        &c.restore("v", "bookmark:after").expect("restore"),
        &read_file(&dev),
    );
}
