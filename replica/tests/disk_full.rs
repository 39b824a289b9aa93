//! The replica's data directory on a small filesystem that fills up: ingest pauses (`Paused`
//! on the control stream, `status` says why), acknowledges nothing while paused, keeps the
//! batches that arrive meanwhile, and resumes by itself once space is freed (`Resumed`, then
//! the acks). Nothing acknowledged is lost and nothing half-written is ever visible: restores
//! equal the model, and the journal agrees with the catalog.
//!
//! The filesystem is a tmpfs with a size limit, which needs root. Not root: the test is skipped
//! with a printed reason, unless `CI` is set (then it fails).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use cdp_replica::datadir::DataDir;
use cdp_replica::{PointSpec, Server};
use cdp_shared::batch::BatchFlags;
use cdp_shared::identity::Identity;
use cdp_shared::types::CHUNK_BYTES;
use cdp_shared::wire::{Control, GroupHello};
use common::journal::{assert_journal_ends_at_its_commit, group_row, open_catalog};
use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_cdp-replica");
/// Size of the small filesystem.
const FS_BYTES: u64 = 32 << 20;
/// Free space the filler leaves for journaled writes.
const FREE_FOR_JOURNAL_BYTES: u64 = 3 << 20;
/// Free space the filler leaves for the initial sync of the second volume (less than it).
const FREE_FOR_SYNC_BYTES: u64 = 256 << 10;
/// Batches the test agent keeps unacknowledged.
const WINDOW: u64 = 8;
/// Bytes of incompressible data per batch.
const BATCH_DATA_BYTES: usize = 256 << 10;

/// Tiny batches sent at a disk with no byte left (it pauses long before the last).
const TINY_BATCHES: u64 = 400;

const VOL: (u32, &str, u64) = (0, "full-a", CHUNK_BYTES + 4096);
const LATE: (u32, &str, u64) = (1, "full-b", CHUNK_BYTES);

/// A tmpfs mounted for the test; unmounted (lazily) when dropped.
struct Tmpfs {
    path: PathBuf,
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if let Err(e) = rustix::mount::unmount(&self.path, rustix::mount::UnmountFlags::DETACH) {
            eprintln!("could not unmount {}: {e}", self.path.display());
        }
    }
}

/// Mounts a tmpfs of `bytes` at `path`; None (with the reason printed) when the test must be
/// skipped.
fn mount_small_fs(path: &Path, bytes: u64) -> Option<Tmpfs> {
    // As the workspace's end-to-end tests read it: set, and not empty, "false" or "0".
    let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false" && v != "0");
    let skip = |why: String| {
        assert!(!ci, "the disk-full test cannot run in CI: {why}");
        eprintln!("SKIPPED disk_full: {why} (run the tests as root, as CI does)");
    };
    if !rustix::process::geteuid().is_root() {
        skip("mounting a small tmpfs needs root".into());
        return None;
    }
    std::fs::create_dir_all(path).expect("mount point");
    let data = std::ffi::CString::new(format!("size={bytes},mode=0700")).expect("options");
    match rustix::mount::mount(
        "cdp-test",
        path,
        "tmpfs",
        rustix::mount::MountFlags::empty(),
        data.as_c_str(),
    ) {
        Ok(()) => Some(Tmpfs {
            path: path.to_path_buf(),
        }),
        Err(e) => {
            skip(format!(
                "could not mount a tmpfs at {}: {e}",
                path.display()
            ));
            None
        }
    }
}

fn free_bytes(path: &Path) -> u64 {
    let s = rustix::fs::statvfs(path).expect("statvfs");
    s.f_bavail * s.f_frsize
}

/// Fills the filesystem of `dir` with `filler` until `leave` bytes are free.
fn fill(dir: &Path, filler: &Path, leave: u64) {
    let free = free_bytes(dir);
    assert!(free > leave, "only {free} bytes free");
    let mut left = free - leave;
    let buf = vec![0xA5u8; 1 << 20];
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(filler)
        .expect("filler");
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        std::io::Write::write_all(&mut f, &buf[..n]).expect("fill");
        left -= n as u64;
    }
}

/// Fills the filesystem of `filler` until a write fails for want of space.
fn fill_up(filler: &Path) {
    let buf = vec![0x5Au8; 4096];
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(filler)
        .expect("filler");
    loop {
        match std::io::Write::write(&mut f, &buf) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(28) => return,
            Err(e) => panic!("fill: {e}"),
        }
    }
}

fn status_json(root: &Path) -> serde_json::Value {
    let o = Command::new(BIN)
        .args(["status", "--data", root.to_str().expect("path"), "--json"])
        .env("RUST_LOG", "warn")
        .output()
        .expect("run status");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("status json")
}

fn status_table(root: &Path) -> String {
    let o = Command::new(BIN)
        .args(["status", "--data", root.to_str().expect("path")])
        .env("RUST_LOG", "warn")
        .output()
        .expect("run status");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// What the test agent has heard.
#[derive(Default)]
struct Heard {
    acked: u64,
    paused: Option<String>,
    pauses: u32,
    resumes: u32,
}

/// Reads one control message; an Ack while paused, or a Nack, fails the test.
async fn hear(agent: &mut QuicAgent, heard: &mut Heard) {
    match agent.next_control().await.expect("control message") {
        Control::Ack { group, durable } => {
            assert_eq!(group, "g");
            assert!(
                heard.paused.is_none(),
                "batch {durable} acknowledged while ingest is paused"
            );
            heard.acked = heard.acked.max(durable.0);
        }
        Control::Paused { group, reason } => {
            assert_eq!(group, "g");
            assert!(heard.paused.is_none(), "paused twice: {reason}");
            heard.paused = Some(reason);
            heard.pauses += 1;
        }
        Control::Resumed { group } => {
            assert_eq!(group, "g");
            assert!(heard.paused.is_some(), "resumed without a pause");
            heard.paused = None;
            heard.resumes += 1;
        }
        other => panic!("unexpected {other:?}"),
    }
}

/// Sends `batches` with at most WINDOW unacknowledged, until every one is sent or ingest
/// pauses; then reads until it pauses.
async fn send_until_paused(
    agent: &mut QuicAgent,
    heard: &mut Heard,
    batches: &mut std::collections::VecDeque<(u64, Vec<u8>)>,
) {
    while heard.paused.is_none() {
        while let Some((seq, _)) = batches.front()
            && *seq <= heard.acked + WINDOW
        {
            let (_, b) = batches.pop_front().expect("a batch");
            agent.send_batch(&b).await.expect("send");
        }
        hear(agent, heard).await;
    }
}

/// Waits for `Resumed` and the ack of `last`.
async fn until_resumed_and_acked(agent: &mut QuicAgent, heard: &mut Heard, last: u64) {
    while heard.paused.is_some() || heard.acked < last {
        hear(agent, heard).await;
    }
}

async fn restore_equals(root: &Path, out_dir: &Path, volume: &str, seq: u64, model: &[u8]) {
    let out = out_dir.join(format!("{volume}-{seq}"));
    let s = cdp_replica::restore(root, volume, &PointSpec::Seq(seq), &out)
        .await
        .unwrap_or_else(|e| panic!("restore {volume} at {seq}: {e}"));
    assert_eq!(s.point.seq.0, seq);
    assert!(
        read(&out) == model,
        "{volume} at seq {seq} differs from the model"
    );
    std::fs::remove_file(&out).expect("remove restored image");
}

/// The status entry of a volume.
fn volume_status<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["volume"] == name)
        .expect("volume in status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_pauses_ingest_and_it_resumes_when_space_returns() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let Some(fs) = mount_small_fs(&tmp.path().join("small"), FS_BYTES) else {
        return;
    };
    let root = fs.path.join("replica");
    let filler = fs.path.join("filler");
    let replica_fp = init_replica(&root).await;
    let agent_id = Identity::generate("full-agent").expect("identity");
    cdp_replica::authorize(&root, agent_id.fingerprint(), "full").expect("authorize");
    let server = Server::start(&root, "127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("server");
    let mut agent = QuicAgent::connect(&agent_id, replica_fp, server.local_addr())
        .await
        .expect("connect");
    let mut sim = AgentSim::new("g", &[VOL, LATE]);
    sim.images.insert(0, pattern(1, VOL.2 as usize));
    sim.images.insert(1, pattern(2, LATE.2 as usize));
    sim.history[0] = sim.images.clone();
    assert!(matches!(
        agent.hello(vec![sim.hello()]).await.expect("welcome"),
        Control::Welcome { .. }
    ));
    let mut heard = Heard::default();
    let mut batches = Vec::new();
    let synced = sim.sync_volume(0, &mut batches);
    for (_, b) in &batches {
        agent.send_batch(b).await.expect("send");
    }
    while heard.acked < synced {
        hear(&mut agent, &mut heard).await;
    }

    // Phase 1: the journal fills up.
    fill(&root, &filler, FREE_FOR_JOURNAL_BYTES);
    let mut queue = std::collections::VecDeque::new();
    let mut n = 0u64;
    let mut more = |sim: &mut AgentSim, queue: &mut std::collections::VecDeque<_>, count| {
        for _ in 0..count {
            n += 1;
            let ops: Vec<Op> = (0..4u64)
                .map(|i| Op::Data {
                    vol: 0,
                    offset: (n * 7919 + i * 104_729) % (VOL.2 - (64 << 10)),
                    bytes: pattern(3 * (n * 4 + i) + 1, BATCH_DATA_BYTES / 4),
                })
                .collect();
            queue.push_back(sim.batch(&ops, BatchFlags::FLUSH, None));
        }
    };
    // More than the free space can take.
    let needed = (FREE_FOR_JOURNAL_BYTES / BATCH_DATA_BYTES as u64) * 2 + WINDOW;
    more(&mut sim, &mut queue, needed);
    send_until_paused(&mut agent, &mut heard, &mut queue).await;
    let reason = heard.paused.clone().expect("paused");
    assert!(reason.contains("disk is full"), "{reason}");
    let acked_at_pause = heard.acked;
    eprintln!("paused with {acked_at_pause} acknowledged: {reason}");

    // What was acknowledged restores exactly, while paused.
    restore_equals(
        &root,
        tmp.path(),
        VOL.1,
        acked_at_pause,
        sim.image_at(acked_at_pause, 0),
    )
    .await;
    // status says so.
    let st = status_json(&root);
    let v = volume_status(&st, VOL.1);
    assert_eq!(v["state"], "paused", "{st}");
    assert!(
        v["ingest_reason"]
            .as_str()
            .is_some_and(|r| r.contains("disk is full")),
        "{st}"
    );
    assert!(v["paused_since"].as_str().is_some(), "{st}");
    assert_eq!(v["volume_state"], "protecting");
    assert!(status_table(&root).contains("PAUSED"));

    // Batches keep arriving (the rest of the queue), then space returns.
    for (_, b) in queue.drain(..) {
        agent.send_batch(&b).await.expect("send");
    }
    std::fs::remove_file(&filler).expect("free space");
    until_resumed_and_acked(&mut agent, &mut heard, sim.seq).await;
    let st = status_json(&root);
    let v = volume_status(&st, VOL.1);
    assert_eq!(v["state"], "protecting", "{st}");
    assert_eq!(v["ingest_reason"], serde_json::Value::Null);
    assert_eq!(v["head_seq"], sim.seq);

    // Phase 2: the target disk fills up during the initial sync of the second volume.
    fill(&root, &filler, FREE_FOR_SYNC_BYTES);
    let mut sync_batches = Vec::new();
    let late_synced = sim.sync_volume(1, &mut sync_batches);
    let mut queue: std::collections::VecDeque<_> = sync_batches.into_iter().collect();
    send_until_paused(&mut agent, &mut heard, &mut queue).await;
    for (_, b) in queue.drain(..) {
        agent.send_batch(&b).await.expect("send");
    }
    assert_eq!(status_json(&root)["volumes"][0]["state"], "paused");
    std::fs::remove_file(&filler).expect("free space");
    until_resumed_and_acked(&mut agent, &mut heard, late_synced).await;
    assert_eq!((heard.pauses, heard.resumes), (2, 2));

    // Phase 3: not a byte left, and small batches: whichever write meets the full disk first
    // (the journal's last page may still take some; SQLite's WAL may reuse its file), the
    // group pauses and resumes the same way. The model: the image before, and the trims.
    sim.keep_history = false;
    let phase3_base = sim.images[&0].clone();
    let phase3_first = sim.seq + 1;
    let mut trims = Vec::new();
    fill_up(&filler);
    let mut queue = std::collections::VecDeque::new();
    for i in 0..TINY_BATCHES {
        let offset = (i * 8192) % (VOL.2 - 4096);
        trims.push(offset);
        queue.push_back(sim.batch(
            &[Op::Trim {
                vol: 0,
                offset,
                len: 4096,
            }],
            BatchFlags::FLUSH,
            Some(&format!("tiny-{i}")),
        ));
    }
    send_until_paused(&mut agent, &mut heard, &mut queue).await;
    eprintln!("phase 3 paused: {:?}", heard.paused);
    let mut last_sent = heard.acked;
    for (seq, b) in queue.drain(..).take(WINDOW as usize) {
        agent.send_batch(&b).await.expect("send");
        last_sent = last_sent.max(seq);
    }
    std::fs::remove_file(&filler).expect("free space");
    until_resumed_and_acked(&mut agent, &mut heard, last_sent).await;
    assert_eq!((heard.pauses, heard.resumes), (3, 3));
    let phase3_image = |seq: u64| {
        let mut img = phase3_base.clone();
        for &o in &trims[..(seq + 1 - phase3_first) as usize] {
            img[o as usize..o as usize + 4096].fill(0);
        }
        img
    };

    // Phase 4: serve stops and starts again on a disk with no byte left, and carries on; a
    // connection that arrives while the group is paused hears it right after its Welcome.
    fill_up(&filler);
    agent.conn.close(0u32.into(), b"restart");
    server
        .shutdown()
        .await
        .expect("a clean stop on a full disk");
    let server = Server::start(&root, "127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("serve starts on a full disk");
    let mut agent = QuicAgent::connect(&agent_id, replica_fp, server.local_addr())
        .await
        .expect("connect");
    let hello = GroupHello {
        first_held: cdp_shared::types::Seq(heard.acked + 1),
        ..sim.hello()
    };
    match agent.hello(vec![hello.clone()]).await.expect("welcome") {
        Control::Welcome { groups, .. } => assert_eq!(groups[0].durable.0, heard.acked),
        other => panic!("expected Welcome, got {other:?}"),
    }
    let mut queue: std::collections::VecDeque<_> = (heard.acked + 1..=sim.seq)
        .map(|seq| (seq, sim.batches[&seq].clone()))
        .collect();
    send_until_paused(&mut agent, &mut heard, &mut queue).await;
    eprintln!("phase 4 paused: {:?}", heard.paused);
    assert_eq!(status_json(&root)["volumes"][0]["state"], "paused");
    let mut late = QuicAgent::connect(&agent_id, replica_fp, server.local_addr())
        .await
        .expect("connect");
    assert!(matches!(
        late.hello(vec![hello]).await.expect("welcome"),
        Control::Welcome { .. }
    ));
    match late.next_control().await.expect("a message after Welcome") {
        Control::Paused { group, reason } => {
            assert_eq!(group, "g");
            assert!(reason.contains("disk is full"), "{reason}");
        }
        other => panic!("expected Paused, got {other:?}"),
    }
    late.conn.close(0u32.into(), b"done");
    let mut last_sent = heard.acked;
    for (seq, b) in queue.drain(..).take(WINDOW as usize) {
        agent.send_batch(&b).await.expect("send");
        last_sent = last_sent.max(seq);
    }
    std::fs::remove_file(&filler).expect("free space");
    until_resumed_and_acked(&mut agent, &mut heard, last_sent).await;
    assert_eq!((heard.pauses, heard.resumes), (4, 4));

    // Everything restores exactly: every point of the first volume, the second at its sync.
    for seq in synced..phase3_first {
        restore_equals(&root, tmp.path(), VOL.1, seq, sim.image_at(seq, 0)).await;
    }
    for seq in (phase3_first..=last_sent).step_by(7).chain([last_sent]) {
        restore_equals(&root, tmp.path(), VOL.1, seq, &phase3_image(seq)).await;
    }
    restore_equals(
        &root,
        tmp.path(),
        LATE.1,
        late_synced,
        sim.image_at(late_synced, 1),
    )
    .await;

    agent.conn.close(0u32.into(), b"done");
    server.shutdown().await.expect("clean shutdown");

    // The journal holds exactly what the catalog describes, and the pauses are on record.
    let (dir, catalog) = open_catalog(&root).await;
    let g = group_row(&catalog, "g").await;
    assert_journal_ends_at_its_commit(&dir, &catalog, "g", &g)
        .await
        .expect("journaled");
    let events = catalog.events(Some("g"), 50).await.expect("events");
    let count = |needle: &str| events.iter().filter(|e| e.message.contains(needle)).count();
    assert_eq!(count("ingest paused"), 4, "{events:?}");
    assert_eq!(count("ingest resumed"), 4, "{events:?}");
    catalog.close().await;

    // A restore onto a filesystem too small for the image fails with the reason, and leaves
    // nothing behind (neither the image nor its partial file).
    let tiny = mount_small_fs(&tmp.path().join("tiny"), 512 << 10).expect("mounted above");
    let out = tiny.path.join("restored.img");
    let e = cdp_replica::restore(&root, VOL.1, &PointSpec::Latest, &out)
        .await
        .expect_err("the image does not fit");
    assert!(e.to_string().contains("No space left"), "{e}");
    let left: Vec<_> = std::fs::read_dir(&tiny.path)
        .expect("read the tiny fs")
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    drop(tiny);
    drop(fs);
}

/// Seeds of [`pattern`] that give incompressible bytes (multiples of 3 give runs).
fn noise(n: u64) -> Vec<u8> {
    pattern(3 * n + 1, BATCH_DATA_BYTES)
}

/// Bytes of disk the file at `path` occupies (its holes take none).
fn allocated_bytes(path: &Path) -> u64 {
    std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(path).expect("stat")) * 512
}

/// Waits for `Resumed` and the ack of `last`, failing the test after `secs` seconds.
async fn resumed_within(agent: &mut QuicAgent, heard: &mut Heard, last: u64, secs: u64, why: &str) {
    tokio::time::timeout(
        std::time::Duration::from_secs(secs),
        until_resumed_and_acked(agent, heard, last),
    )
    .await
    .unwrap_or_else(|_| {
        panic!(
            "{why}: after {secs} s still {} with batch {} acknowledged of {last}",
            if heard.paused.is_some() {
                "paused"
            } else {
                "waiting"
            },
            heard.acked
        )
    });
}

/// The journal alone fills the replica's filesystem (one segment: the default segment is
/// larger than the filesystem), ingest pauses; `retention --max-journal` below the journal's
/// size then frees the trimmed bytes at once (the trimmer punches them out of the segment),
/// and ingest resumes without a byte freed by hand and keeps going under the cap, with
/// every point in the window restoring exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lower_journal_cap_frees_a_full_disk_at_once() {
    const SMALL_FS_BYTES: u64 = 40 << 20;
    const CAP: &str = "6MiB";
    const CAP_BYTES: u64 = 6 << 20;
    let tmp = tempfile::tempdir().expect("tempdir");
    let Some(fs) = mount_small_fs(&tmp.path().join("small"), SMALL_FS_BYTES) else {
        return;
    };
    let root = fs.path.join("replica");
    let (server, mut agent) = serve_with_agent(&root, "cap").await;
    let vol = (0u32, "capped", CHUNK_BYTES);
    let mut sim = AgentSim::new("g", &[vol]);
    sim.keep_history = false;
    sim.images.insert(0, pattern(1, vol.2 as usize));
    let mut heard = Heard::default();
    let mut batches = Vec::new();
    let synced = sim.sync_volume(0, &mut batches);
    assert!(matches!(
        agent.hello(vec![sim.hello()]).await.expect("welcome"),
        Control::Welcome { .. }
    ));
    for (_, b) in &batches {
        agent.send_batch(b).await.expect("send");
    }
    while heard.acked < synced {
        hear(&mut agent, &mut heard).await;
    }

    // The journal fills the filesystem (more batches than it can hold) and ingest pauses.
    let mut images = std::collections::BTreeMap::new();
    let mut queue = std::collections::VecDeque::new();
    let mut n = 0u64;
    let mut more = |sim: &mut AgentSim,
                    images: &mut std::collections::BTreeMap<u64, Vec<u8>>,
                    queue: &mut std::collections::VecDeque<(u64, Vec<u8>)>,
                    count: u64| {
        for _ in 0..count {
            n += 1;
            let offset = (n * (64 << 10)) % (vol.2 - BATCH_DATA_BYTES as u64);
            let b = sim.batch(
                &[Op::Data {
                    vol: 0,
                    offset,
                    bytes: noise(n),
                }],
                BatchFlags::FLUSH,
                None,
            );
            images.insert(b.0, sim.images[&0].clone());
            queue.push_back(b);
        }
    };
    more(
        &mut sim,
        &mut images,
        &mut queue,
        SMALL_FS_BYTES / BATCH_DATA_BYTES as u64 + WINDOW,
    );
    send_until_paused(&mut agent, &mut heard, &mut queue).await;
    let reason = heard.paused.clone().expect("paused");
    assert!(reason.contains("disk is full"), "{reason}");
    let dir = DataDir::existing(&root).expect("dir");
    let segments = || -> Vec<PathBuf> {
        let mut s: Vec<PathBuf> = std::fs::read_dir(dir.journal("g"))
            .expect("journal dir")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "seg"))
            .collect();
        s.sort();
        s
    };
    let full = segments();
    assert_eq!(
        full.len(),
        1,
        "one segment holds the whole journal: {full:?}"
    );
    let journal_at_pause = allocated_bytes(&full[0]);
    eprintln!(
        "paused with {} acknowledged, journal {journal_at_pause} bytes, {} bytes free: {reason}",
        heard.acked,
        free_bytes(&root)
    );
    assert!(journal_at_pause > SMALL_FS_BYTES / 2, "{journal_at_pause}");

    // A window more of batches is sent while paused; the cap goes below the journal's size.
    let mut last_sent = heard.acked;
    while let Some((seq, _)) = queue.front()
        && *seq <= heard.acked + WINDOW
    {
        let (seq, b) = queue.pop_front().expect("a batch");
        agent.send_batch(&b).await.expect("send");
        last_sent = seq;
    }
    let refused = Command::new(BIN)
        .args(["retention", "--data", root.to_str().expect("path")])
        .args(["--group", "g", "--max-journal", CAP])
        .env("RUST_LOG", "warn")
        .output()
        .expect("run retention");
    assert!(!refused.status.success(), "dropping points needs --yes");
    let o = Command::new(BIN)
        .args(["retention", "--data", root.to_str().expect("path")])
        .args(["--group", "g", "--max-journal", CAP, "--yes"])
        .env("RUST_LOG", "warn")
        .output()
        .expect("run retention");
    assert!(
        o.status.success(),
        "retention: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    resumed_within(
        &mut agent,
        &mut heard,
        last_sent,
        60,
        "ingest did not resume after the journal cap was lowered",
    )
    .await;
    let after = segments();
    assert_eq!(after, full, "the same single segment, not a new one");
    let journal_now = allocated_bytes(&after[0]);
    eprintln!(
        "resumed: journal {journal_now} bytes on disk, {} bytes free",
        free_bytes(&root)
    );
    assert!(
        journal_now < journal_at_pause / 2,
        "the trim freed the journal's disk: {journal_at_pause} -> {journal_now} bytes"
    );

    // Ingest keeps going under the cap: three times the filesystem's size more, no pause.
    more(
        &mut sim,
        &mut images,
        &mut queue,
        3 * SMALL_FS_BYTES / BATCH_DATA_BYTES as u64,
    );
    let last = sim.seq;
    while heard.acked < last {
        while let Some((seq, _)) = queue.front()
            && *seq <= heard.acked + WINDOW
        {
            let (_, b) = queue.pop_front().expect("a batch");
            agent.send_batch(&b).await.expect("send");
        }
        tokio::time::timeout(
            std::time::Duration::from_secs(60),
            hear(&mut agent, &mut heard),
        )
        .await
        .unwrap_or_else(|_| panic!("no message for 60 s at ack {}", heard.acked));
        assert!(heard.paused.is_none(), "paused again: {:?}", heard.paused);
    }
    assert_eq!(heard.pauses, 1);
    let journal_end = allocated_bytes(&segments()[0]);
    // The cap, one group commit over it at most (the batches in flight) until the next trim,
    // the batch at the window's start and the page kept at the segment's head.
    let slack = (WINDOW + 2) * (BATCH_DATA_BYTES as u64 + (64 << 10));
    assert!(
        journal_end <= CAP_BYTES + slack,
        "the journal stays under its cap on disk: {journal_end} bytes"
    );

    // Every point in the window restores exactly (serve stopped: its trimmer no longer
    // moves the window); the first one is served by the target files the trims wrote.
    agent.conn.close(0u32.into(), b"done");
    server.shutdown().await.expect("clean shutdown");
    let points = cdp_replica::points(&root, vol.1).await.expect("points");
    let first = points.first().expect("a point").seq.0;
    assert!(first > synced, "the window moved: first point {first}");
    for seq in (first..=last).step_by(5).chain([last]) {
        restore_equals(&root, tmp.path(), vol.1, seq, &images[&seq]).await;
    }
    drop(fs);
}
