//! The verifier: background checks under continuous ingest find no false mismatch (and then
//! find an unshipped write and repair it automatically); every kind
//! of damage (a flipped byte of the target file, a flipped byte of a journal record, a journal
//! record lost, a write the agent applied but never shipped) is found with the right volume,
//! chunk and seq, turns `status` degraded, and `verify repair` clears it; `verify run --full`
//! covers every chunk; `verify report` as a table and as JSON.
//!
//! The test agent answers `VerifyRequest` from its model (the image after the last batch it
//! built: a batch boundary) and `RepairRequest` by sending one consistent batch that rewrites
//! the chunks from its model.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cdp_replica::Server;
use cdp_replica::catalog::{Catalog, OpenMode};
use cdp_replica::datadir::DataDir;
use cdp_shared::batch::{BatchFlags, RECORD_HEADER_BYTES};
use cdp_shared::identity::{Fingerprint, Identity};
use cdp_shared::types::{CHUNK_BYTES, Seq};
use cdp_shared::wire::{self, Control, FrameDecoder};
use common::cli::*;
use common::serve::Serve;
use common::*;

/// Unacknowledged batches the test agent lets out at once.
const WINDOW: u64 = 16;

/// A QUIC test agent that answers the verifier from its model.
struct VerifyAgent {
    conn: quinn::Connection,
    sim: Arc<Mutex<AgentSim>>,
    acked: Arc<AtomicU64>,
    reader: tokio::task::JoinHandle<()>,
    _endpoint: quinn::Endpoint,
}

fn hash_hex(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

fn chunk_of(image: &[u8], chunk: u64) -> &[u8] {
    let start = (chunk * CHUNK_BYTES) as usize;
    let end = (start + CHUNK_BYTES as usize).min(image.len());
    &image[start..end]
}

async fn send_frame(send: &tokio::sync::Mutex<quinn::SendStream>, msg: &Control) {
    let _ = send.lock().await.write_all(&wire::encode(msg)).await;
}

async fn send_batch(conn: &quinn::Connection, bytes: &[u8]) {
    let mut s = conn.open_uni().await.expect("open a batch stream");
    s.write_all(bytes).await.expect("send a batch");
    s.finish().expect("finish a batch stream");
}

impl VerifyAgent {
    /// Connects, says hello, and runs the initial sync of every volume of `sim`.
    async fn start(
        identity: &Identity,
        replica: Fingerprint,
        addr: std::net::SocketAddr,
        mut sim: AgentSim,
    ) -> VerifyAgent {
        let mut q = QuicAgent::connect(identity, replica, addr)
            .await
            .expect("connect");
        match q.hello(vec![sim.hello()]).await.expect("welcome") {
            Control::Welcome { .. } => {}
            m => panic!("expected Welcome, got {m:?}"),
        }
        let mut batches = Vec::new();
        for v in sim.volumes.clone() {
            sim.sync_volume(v.id, &mut batches);
        }
        let QuicAgent {
            endpoint,
            conn,
            send,
            mut recv,
            ..
        } = q;
        let send = Arc::new(tokio::sync::Mutex::new(send));
        let sim = Arc::new(Mutex::new(sim));
        let acked = Arc::new(AtomicU64::new(0));
        let reader = {
            let (sim, acked, conn, send) = (sim.clone(), acked.clone(), conn.clone(), send.clone());
            tokio::spawn(async move {
                let mut decoder = FrameDecoder::new();
                let mut buf = vec![0u8; 65536];
                loop {
                    let msg = match decoder.poll_frame() {
                        Ok(Some(m)) => m,
                        Ok(None) => match recv.read(&mut buf).await {
                            Ok(Some(n)) => {
                                decoder.handle_bytes(&buf[..n]);
                                continue;
                            }
                            _ => return,
                        },
                        Err(e) => panic!("bad control frame: {e}"),
                    };
                    match msg {
                        Control::Ack { durable, .. } => {
                            acked.fetch_max(durable.0, Ordering::SeqCst);
                        }
                        Control::VerifyRequest {
                            id, volume, chunk, ..
                        } => {
                            let reply = {
                                let sim = sim.lock().expect("sim");
                                Control::VerifyReply {
                                    id,
                                    seq: cdp_shared::types::Seq(sim.seq),
                                    hash: hash_hex(chunk_of(&sim.images[&volume], chunk)),
                                }
                            };
                            send_frame(&send, &reply).await;
                        }
                        Control::RepairRequest {
                            id, volume, chunks, ..
                        } => {
                            let (started, batch) = {
                                let mut sim = sim.lock().expect("sim");
                                let started = sim.seq;
                                let ops: Vec<Op> = chunks
                                    .iter()
                                    .map(|&c| Op::Data {
                                        vol: volume,
                                        offset: c * CHUNK_BYTES,
                                        bytes: chunk_of(&sim.images[&volume], c).to_vec(),
                                    })
                                    .collect();
                                (started, sim.batch(&ops, BatchFlags::FLUSH, None).1)
                            };
                            send_frame(
                                &send,
                                &Control::RepairStarted {
                                    id,
                                    seq: cdp_shared::types::Seq(started),
                                },
                            )
                            .await;
                            send_batch(&conn, &batch).await;
                        }
                        other => panic!("unexpected control message {other:?}"),
                    }
                }
            })
        };
        let agent = VerifyAgent {
            conn,
            sim,
            acked,
            reader,
            _endpoint: endpoint,
        };
        for (_, b) in batches {
            agent.send(b).await;
        }
        agent.wait_acked().await;
        agent
    }

    fn seq(&self) -> u64 {
        self.sim.lock().expect("sim").seq
    }

    /// Sends a batch, keeping at most `WINDOW` unacknowledged.
    async fn send(&self, bytes: Vec<u8>) {
        let deadline = Instant::now() + DEADLINE;
        while self.seq().saturating_sub(self.acked.load(Ordering::SeqCst)) > WINDOW {
            assert!(Instant::now() < deadline, "no ack in time");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        send_batch(&self.conn, &bytes).await;
    }

    async fn write(&self, ops: &[Op], flags: u16) -> u64 {
        let (seq, bytes) = self.sim.lock().expect("sim").batch(ops, flags, None);
        self.send(bytes).await;
        seq
    }

    /// Waits until every batch built is acknowledged.
    async fn wait_acked(&self) {
        let deadline = Instant::now() + DEADLINE;
        while self.acked.load(Ordering::SeqCst) < self.seq() {
            assert!(
                Instant::now() < deadline,
                "batches not acknowledged in time"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn close(self) {
        self.reader.abort();
        self.conn.close(0u32.into(), b"bye");
    }
}

fn set_verify_rate(root: &Path, rate: f64) {
    let path = DataDir::new(root).config();
    let text = std::fs::read_to_string(&path).expect("replica.toml");
    let text = text.replace("chunks_per_sec = 2", &format!("chunks_per_sec = {rate}"));
    assert!(text.contains(&format!("chunks_per_sec = {rate}")), "{text}");
    std::fs::write(&path, text).expect("write replica.toml");
}

fn set_auto_repair(root: &Path) {
    let path = DataDir::new(root).config();
    let text = std::fs::read_to_string(&path).expect("replica.toml");
    let text = text.replace("auto_repair = false", "auto_repair = true");
    std::fs::write(&path, text).expect("write replica.toml");
}

/// Reads the report of volume `busy` until `cond` holds (with a deadline).
async fn wait_for_report(
    root: &Path,
    what: &str,
    cond: impl Fn(&cdp_replica::verifier::VolumeReport) -> bool,
) -> cdp_replica::verifier::VolumeReport {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let report = cdp_replica::verifier::report(root, Some("busy"), None)
            .await
            .expect("report");
        if cond(&report.volumes[0]) {
            return report.volumes[0].clone();
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_false_mismatch_under_continuous_ingest() {
    const VOL: (u32, &str, u64) = (0, "busy", 8 * CHUNK_BYTES - 3000);
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("replica");
    let replica_fp = init_replica(&root).await;
    set_verify_rate(&root, 60.0);
    set_auto_repair(&root);
    let agent_id = Identity::generate("busy-agent").expect("identity");
    cdp_replica::authorize(&root, agent_id.fingerprint(), "busy").expect("authorize");
    let server = Server::start(&root, "127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("server");
    let mut sim = AgentSim::new("g", &[VOL]);
    sim.keep_history = false;
    sim.images.insert(0, pattern(1, VOL.2 as usize));
    let agent = VerifyAgent::start(&agent_id, replica_fp, server.local_addr(), sim).await;

    // Random writes, zeros and trims (some across chunk boundaries, some in the short last
    // chunk) for 15 s while the verifier checks 60 chunks a second.
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let started = Instant::now();
    let mut i = 0u64;
    while started.elapsed() < Duration::from_secs(15) {
        let len = 1 + next(128 << 10);
        let offset = next(VOL.2 - len);
        let op = match next(10) {
            0 => Op::Zero {
                vol: 0,
                offset,
                len,
            },
            1 => Op::Trim {
                vol: 0,
                offset,
                len,
            },
            _ => Op::Data {
                vol: 0,
                offset,
                bytes: pattern(1000 + i, len as usize),
            },
        };
        let flags = if next(3) == 0 { BatchFlags::FLUSH } else { 0 };
        agent.write(&[op], flags).await;
        i += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    agent.wait_acked().await;
    let report = cdp_replica::verifier::report(&root, Some("busy"), None)
        .await
        .expect("report");
    let v = &report.volumes[0];
    eprintln!("{i} batches written; checks: {:?}", v.checks);
    assert_eq!(v.checks.mismatch, 0, "false mismatches: {:?}", v.mismatches);
    assert_eq!(v.open_mismatches, 0);
    assert_eq!(v.checks.timeout, 0);
    assert!(
        v.checks.matched >= 200,
        "only {} matching checks in 15 s",
        v.checks.matched
    );
    // The sweep went round: every chunk compared.
    assert_eq!(v.coverage.chunks, 8, "{:?}", v.coverage);

    // The background verifier finds a write the agent never shipped, and (auto_repair) has it
    // resent and verified again by itself.
    let head = {
        let mut sim = agent.sim.lock().expect("sim");
        let img = sim.images.get_mut(&0).expect("image");
        let at = (4 * CHUNK_BYTES + 10) as usize;
        img[at..at + 100].copy_from_slice(&pattern(4242, 100));
        sim.seq
    };
    let found = wait_for_report(&root, "the background verifier to find chunk 4", |v| {
        v.mismatches.iter().any(|m| m.chunk == 4)
    })
    .await;
    let m = found
        .mismatches
        .iter()
        .find(|m| m.chunk == 4)
        .expect("chunk 4");
    assert_eq!((m.seq, m.reason.as_str()), (Seq(head), "the hashes differ"));
    let repaired = wait_for_report(&root, "the automatic repair of chunk 4", |v| {
        v.open_mismatches == 0 && v.mismatches.iter().all(|m| m.repaired.is_some())
    })
    .await;
    assert_eq!(repaired.mismatches.len(), 1, "{:?}", repaired.mismatches);
    let r = repaired.mismatches[0].repaired.as_ref().expect("repaired");
    assert!(r.seq > Seq(head));
    assert_eq!(
        repaired.mismatches[0].suspect_points.before_seq,
        Some(r.seq)
    );
    agent.close().await;
    server.shutdown().await.expect("shutdown");
    let status = cdp_replica::status(&root).await.expect("status");
    assert_eq!(status.volumes[0].degraded, None);
}

// ---- the CLI, against a `serve` child process ----

fn flip_byte(path: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open for the fault");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).expect("read the byte");
    b[0] ^= 0x5a;
    f.write_all_at(&b, at).expect("flip the byte");
    f.sync_all().expect("sync");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_are_found_reported_and_repaired() {
    const CHUNKS: u64 = 8;
    const VOL: (u32, &str, u64) = (0, "vault", CHUNKS * CHUNK_BYTES - 5000);
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("replica");
    let d = root.to_str().expect("path");
    let replica_fp = init_replica(&root).await;
    // No background verifier: the on-demand runs find everything here.
    set_verify_rate(&root, 0.0);
    let agent_id = Identity::generate("vault-agent").expect("identity");
    cdp_replica::authorize(&root, agent_id.fingerprint(), "vault").expect("authorize");
    fails(
        &["verify", "run", "--data", d, "--full"],
        "`cdp-replica serve` is not running",
    );

    let serve = Serve::start(&root);
    let mut sim = AgentSim::new("g", &[VOL]);
    sim.keep_history = false;
    sim.images.insert(0, pattern(7, VOL.2 as usize));
    let agent = VerifyAgent::start(&agent_id, replica_fp, serve.addr, sim).await;
    // Journaled writes: chunk 0, chunk 1 (its record will be damaged), chunk 2 (its records
    // will be lost), chunk 6 and the short last chunk; chunks 3 (the unshipped write) and 5 (the
    // flipped target byte) keep the image of the initial sync.
    for (i, (offset, len)) in [
        (100, 5000),
        (CHUNK_BYTES + 4096, 64 << 10),
        (2 * CHUNK_BYTES + 10, 200_000),
        (6 * CHUNK_BYTES + 3000, 9000),
        (VOL.2 - 7000, 7000),
    ]
    .into_iter()
    .enumerate()
    {
        agent
            .write(
                &[Op::Data {
                    vol: 0,
                    offset,
                    bytes: pattern(100 + i as u64 * 3 + 1, len as usize),
                }],
                BatchFlags::FLUSH,
            )
            .await;
    }
    agent.wait_acked().await;

    // A full pass: every chunk, no mismatch, coverage 100 %.
    let out = ok(&["verify", "run", "--data", d, "--volume", "vault", "--full"]);
    assert!(
        out.contains("verified 8 of 8 chunks (full pass): 0 mismatches"),
        "{out}"
    );
    let r = json(&["verify", "report", "--data", d, "--json"]);
    let v = &r["volumes"][0];
    assert_eq!(v["volume"], "vault");
    assert_eq!(v["chunks"], CHUNKS);
    assert_eq!(v["coverage"]["chunks"], CHUNKS);
    assert_eq!(v["coverage"]["share"], 1.0);
    assert!(v["last_full_pass"].is_string(), "{v}");
    assert_eq!(v["checks"]["total"], CHUNKS);
    assert_eq!(v["checks"]["match"], CHUNKS);
    assert_eq!(v["open_mismatches"], 0);
    assert_eq!(v["runs"][0]["state"], "done");
    assert_eq!(v["runs"][0]["chunks_done"], CHUNKS);
    let table = ok(&["verify", "report", "--data", d]);
    assert!(
        table.contains("COVERAGE 24H") && table.contains("100.0 % (8/8)"),
        "{table}"
    );
    assert!(
        table.contains("vault") && table.contains("8.0 MiB"),
        "{table}"
    );

    // The four faults.
    let dir = DataDir::new(&root);
    let catalog = Catalog::open(&dir.catalog(), OpenMode::Existing)
        .await
        .expect("catalog");
    let vrow = catalog
        .volume_by_name("vault")
        .await
        .expect("read")
        .expect("volume");
    let head = agent.seq();
    // (a) A byte of chunk 5 flipped in the target file.
    flip_byte(&dir.target("vault"), 5 * CHUNK_BYTES + 777);
    // (b) A byte flipped inside the payload of chunk 1's journal record.
    let rec = catalog
        .records_in_chunks(vrow.id, Seq(0), Seq(head), 1, 2, |_| CHUNK_BYTES)
        .await
        .expect("records");
    assert_eq!(rec.len(), 1, "{rec:?}");
    flip_byte(
        &dir.journal("g").join(format!("{:016}.seg", rec[0].segment)),
        rec[0].position + RECORD_HEADER_BYTES as u64 + 1000,
    );
    // (c) Chunk 2's journal records lost.
    catalog.close().await;
    assert!(sql::delete_records_of_chunk(&dir.catalog(), vrow.id, 2, 0, head).await >= 1);
    // (d) A write to chunk 3 applied to the agent's device but never shipped.
    {
        let mut sim = agent.sim.lock().expect("sim");
        let img = sim.images.get_mut(&0).expect("image");
        let at = (3 * CHUNK_BYTES + 123) as usize;
        img[at..at + 4096].copy_from_slice(&pattern(999, 4096));
    }

    let (out, _) = fails(
        &["verify", "run", "--data", d, "--volume", "vault", "--full"],
        "found 4 chunks that differ",
    );
    assert!(
        out.contains("verified 8 of 8 chunks (full pass): 4 mismatches"),
        "{out}"
    );
    let r = json(&[
        "verify", "report", "--data", d, "--volume", "vault", "--json",
    ]);
    let v = &r["volumes"][0];
    assert_eq!(v["open_mismatches"], 4);
    let ms = v["mismatches"].as_array().expect("mismatches");
    let mut found: Vec<(u64, u64, String)> = ms
        .iter()
        .map(|m| {
            (
                m["chunk"].as_u64().expect("chunk"),
                m["seq"].as_u64().expect("seq"),
                m["reason"].as_str().expect("reason").to_owned(),
            )
        })
        .collect();
    found.sort();
    let chunks: Vec<u64> = found.iter().map(|f| f.0).collect();
    assert_eq!(chunks, vec![1, 2, 3, 5], "{found:?}");
    assert!(found.iter().all(|f| f.1 == head), "{found:?} at seq {head}");
    assert!(
        found[0].2.starts_with("journal record damaged"),
        "{found:?}"
    );
    assert_eq!(found[1].2, "the hashes differ");
    for m in ms {
        let chunk = m["chunk"].as_u64().expect("chunk");
        assert_eq!(m["offset"], chunk * CHUNK_BYTES);
        assert_eq!(m["length"], CHUNK_BYTES);
        assert_eq!(m["agent_hash"].as_str().map(str::len), Some(64));
        assert!(m["repaired"].is_null());
        assert!(m["suspect_points"]["before_seq"].is_null());
        let from = m["suspect_points"]["from_seq"].as_u64().expect("from");
        let likely = m["suspect_points"]["likely_from_seq"]
            .as_u64()
            .expect("likely");
        assert!(from <= likely && likely <= head, "{m}");
        if chunk == 1 {
            assert!(m["replica_hash"].is_null());
            // The damaged record's batch.
            assert_eq!(likely, rec[0].seq.0);
        } else {
            assert_eq!(m["replica_hash"].as_str().map(str::len), Some(64));
        }
        if chunk == 5 || chunk == 3 {
            assert_eq!(likely, from, "no record of chunk {chunk} in the window");
        }
    }
    let table = ok(&["verify", "report", "--data", d, "--volume", "vault"]);
    assert!(
        table.contains("mismatch: volume vault chunk 5") && table.contains("OPEN"),
        "{table}"
    );
    assert!(table.contains("suspect points"), "{table}");

    // status: degraded, with the reason.
    let s = json(&["status", "--data", d, "--json"]);
    let sv = &s["volumes"][0];
    assert_eq!(sv["state"], "degraded");
    assert_eq!(sv["cause"], "degraded/verify-mismatch", "{sv}");
    assert_eq!(sv["degraded"]["mismatches"], 4);
    assert!(
        sv["degraded"]["reason"]
            .as_str()
            .expect("reason")
            .contains("verify repair --volume vault")
    );
    assert!(ok(&["status", "--data", d]).contains("DEGRADED"));

    // Repair: the agent resends the chunks; each is verified again and marked repaired.
    let out = ok(&[
        "verify",
        "repair",
        "--data",
        d,
        "--volume",
        "vault",
        "--timeout",
        "120s",
    ]);
    assert!(
        out.contains("repaired 4 of 4 mismatched chunks of volume vault"),
        "{out}"
    );
    let s = json(&["status", "--data", d, "--json"]);
    assert!(s["volumes"][0]["degraded"].is_null(), "{s}");
    assert_ne!(s["volumes"][0]["state"], "degraded");
    let r = json(&[
        "verify", "report", "--data", d, "--volume", "vault", "--json",
    ]);
    let v = &r["volumes"][0];
    assert_eq!(v["open_mismatches"], 0);
    for m in v["mismatches"].as_array().expect("mismatches") {
        let repaired = m["repaired"]["seq"].as_u64().expect("repaired");
        assert!(repaired > head);
        assert_eq!(m["suspect_points"]["before_seq"], repaired);
    }
    assert!(
        ok(&["verify", "repair", "--data", d, "--volume", "vault"]).contains("nothing to repair")
    );

    // A full pass afterwards finds nothing.
    let out = ok(&["verify", "run", "--data", d, "--volume", "vault", "--full"]);
    assert!(
        out.contains("verified 8 of 8 chunks (full pass): 0 mismatches"),
        "{out}"
    );
    // And a sample run (no --full) works too.
    let out = ok(&["verify", "run", "--data", d]);
    assert!(
        out.contains("volume vault: verified 8 of 8 chunks: 0 mismatches"),
        "{out}"
    );
    fails(
        &["verify", "report", "--data", d, "--since", "yesterday"],
        "--since",
    );

    // `--timeout`: a full run at 1 chunk a second cannot end within 2 s; the command fails
    // saying so, and serve stops the run: only a few of its 8 checks happen (a run that went on
    // would add all 8 before serve takes the next run).
    let total = |r: &serde_json::Value| r["volumes"][0]["checks"]["total"].as_u64().expect("total");
    let before = total(&json(&[
        "verify", "report", "--data", d, "--volume", "vault", "--json",
    ]));
    let (out, _) = fails(
        &[
            "verify",
            "run",
            "--data",
            d,
            "--volume",
            "vault",
            "--full",
            "--rate",
            "1",
            "--timeout",
            "2s",
        ],
        "failed",
    );
    assert!(
        out.contains("verification failed: stopped: not done within 2s (verify run --timeout)"),
        "{out}"
    );
    fails(
        &["verify", "run", "--data", d, "--timeout", "soon"],
        "--timeout",
    );
    let out = ok(&["verify", "run", "--data", d, "--volume", "vault", "--full"]);
    assert!(out.contains("verified 8 of 8 chunks"), "{out}");
    let r = json(&[
        "verify", "report", "--data", d, "--volume", "vault", "--json",
    ]);
    let added = total(&r) - before;
    assert!(
        (8..8 + 6).contains(&added),
        "the stopped run checked at most a few chunks: {added} checks in all: {r}"
    );
    let stopped = &r["volumes"][0]["runs"][1];
    assert_eq!(stopped["state"], "failed", "{r}");
    assert!(stopped["chunks_done"].as_u64().expect("done") < 8, "{r}");
    agent.close().await;
}
