//! The replica's server over real QUIC on loopback, with a test client playing the agent.

mod common;

use std::path::Path;

use cdp_replica::catalog::{Catalog, OpenMode};
use cdp_replica::datadir::DataDir;
use cdp_replica::{PointSpec, Server};
use cdp_shared::batch::BatchFlags;
use cdp_shared::identity::Identity;
use cdp_shared::types::{CHUNK_BYTES, Seq};
use cdp_shared::wire::{self, Control};
use common::*;

const VOL: (u32, &str, u64) = (0, "disk0", 2 * CHUNK_BYTES);

/// Length of every segment file of the group.
fn segment_lengths(root: &Path, group: &str) -> Vec<(String, u64)> {
    let jdir = DataDir::new(root).journal(group);
    let mut v: Vec<_> = std::fs::read_dir(jdir)
        .expect("journal dir")
        .map(|e| {
            let e = e.expect("entry");
            (
                e.file_name().into_string().expect("name"),
                e.metadata().expect("stat").len(),
            )
        })
        .collect();
    v.sort();
    v
}

async fn catalog_counts(root: &Path) -> (u64, u64) {
    let catalog = Catalog::open(&DataDir::new(root).catalog(), OpenMode::Existing)
        .await
        .expect("catalog");
    let g = catalog
        .group_by_name("g")
        .await
        .expect("query")
        .expect("group");
    let v = catalog
        .volume_by_name(VOL.1)
        .await
        .expect("query")
        .expect("volume");
    let counts = (
        catalog.batch_count(g.id).await.expect("count"),
        catalog.record_count(v.id).await.expect("count"),
    );
    catalog.close().await;
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_session_over_quic() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("replica");
    let replica_fp = init_replica(&root).await;
    let agent_id = Identity::generate("test-agent").expect("agent identity");
    cdp_replica::authorize(&root, agent_id.fingerprint(), "test").expect("authorize");
    let server = Server::start(&root, "127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("server");
    assert_eq!(server.fingerprint(), replica_fp);
    let addr = server.local_addr();

    // A second serve on the same directory is refused.
    let second = Server::start(&root, "127.0.0.1:0".parse().expect("addr"))
        .await
        .err()
        .expect("second serve refused");
    assert!(second.to_string().contains("already running"), "{second}");

    let mut agent = QuicAgent::connect(&agent_id, replica_fp, addr)
        .await
        .expect("connect");
    let mut sim = AgentSim::new("g", &[VOL]);
    sim.images.insert(0, pattern(3, VOL.2 as usize));
    sim.history[0] = sim.images.clone();
    match agent.hello(vec![sim.hello()]).await.expect("welcome") {
        Control::Welcome { groups, .. } => {
            assert_eq!(groups.len(), 1);
            assert_eq!((groups[0].name.as_str(), groups[0].durable.0), ("g", 0));
        }
        other => panic!("expected Welcome, got {other:?}"),
    }

    // Initial sync, then writes sent out of order: 1.. (sync), then 3, 4, then 2.
    let mut batches = Vec::new();
    let done = sim.sync_volume(0, &mut batches);
    for (_, b) in &batches {
        agent.send_batch(b).await.expect("send");
    }
    agent.wait_ack("g", done).await;
    let (s2, b2) = sim.batch(
        &[Op::Data {
            vol: 0,
            offset: 100,
            bytes: pattern(4, 5000),
        }],
        BatchFlags::FLUSH,
        None,
    );
    let (s3, b3) = sim.batch(
        &[Op::Zero {
            vol: 0,
            offset: 0,
            len: 4096,
        }],
        BatchFlags::FLUSH,
        Some("before-upgrade"),
    );
    let (s4, b4) = sim.batch(
        &[Op::Data {
            vol: 0,
            offset: CHUNK_BYTES - 10,
            bytes: pattern(5, 20),
        }],
        BatchFlags::FLUSH,
        None,
    );
    agent.send_batch(&b3).await.expect("send");
    agent.send_batch(&b4).await.expect("send");
    agent.send_batch(&b2).await.expect("send");
    agent.wait_ack("g", s4).await;
    // The journal holds them in seq order.
    let catalog = Catalog::open(&DataDir::new(&root).catalog(), OpenMode::Existing)
        .await
        .expect("catalog");
    let g = catalog
        .group_by_name("g")
        .await
        .expect("query")
        .expect("group");
    let rows = catalog
        .batches(g.id, Seq(s2), Seq(s4))
        .await
        .expect("batches");
    catalog.close().await;
    let positions: Vec<u64> = rows
        .iter()
        .map(|b| b.span.expect("journaled").position)
        .collect();
    assert_eq!(
        rows.iter().map(|b| b.seq.0).collect::<Vec<_>>(),
        vec![s2, s3, s4]
    );
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "journal order {positions:?}"
    );

    // One bit flipped: Nack, and nothing of it is written anywhere.
    let segs_before = segment_lengths(&root, "g");
    let counts_before = catalog_counts(&root).await;
    let (s5, b5) = sim.batch(
        &[Op::Data {
            vol: 0,
            offset: 50_000,
            bytes: pattern(7, 3000),
        }],
        BatchFlags::FLUSH,
        None,
    );
    let mut corrupt = b5.clone();
    // In the payload (the last byte of the record's data), so the header still names the seq.
    let at = corrupt.len() - 1;
    corrupt[at] ^= 0x10;
    agent.send_batch(&corrupt).await.expect("send");
    match agent.next_control().await.expect("reply") {
        Control::Nack { group, seq, reason } => {
            assert_eq!((group.as_deref(), seq.0), (Some("g"), s5));
            assert!(!reason.is_empty());
        }
        other => panic!("expected a Nack, got {other:?}"),
    }
    assert_eq!(segment_lengths(&root, "g"), segs_before);
    assert_eq!(catalog_counts(&root).await, counts_before);
    agent.send_batch(&b5).await.expect("send");
    agent.wait_ack("g", s5).await;

    // An unauthorized agent gets nowhere, and the server keeps serving.
    let stranger = Identity::generate("stranger").expect("identity");
    let refused = match QuicAgent::connect(&stranger, replica_fp, addr).await {
        Err(_) => true,
        Ok(mut s) => s
            .hello(vec![AgentSim::new("evil", &[(0, "evil", 4096)]).hello()])
            .await
            .is_err(),
    };
    assert!(refused, "an unauthorized agent was served");
    let catalog = Catalog::open(&DataDir::new(&root).catalog(), OpenMode::Existing)
        .await
        .expect("catalog");
    assert!(
        catalog
            .group_by_name("evil")
            .await
            .expect("query")
            .is_none()
    );
    catalog.close().await;
    let (s6, b6) = sim.batch(
        &[Op::Trim {
            vol: 0,
            offset: CHUNK_BYTES,
            len: CHUNK_BYTES,
        }],
        BatchFlags::FLUSH,
        None,
    );
    agent.send_batch(&b6).await.expect("send");
    agent.wait_ack("g", s6).await;

    // Status while serving, and a restore while serving.
    let st = cdp_replica::status(&root).await.expect("status");
    assert!(st.serving);
    assert_eq!(st.volumes[0].state, "protecting");
    assert_eq!(st.volumes[0].head_seq.0, s6);
    let out = tmp.path().join("restored");
    let summary = cdp_replica::restore(
        &root,
        VOL.1,
        &PointSpec::Bookmark("before-upgrade".into()),
        &out,
    )
    .await
    .expect("restore");
    assert_eq!(summary.point.seq.0, s3);
    assert!(read(&out) == sim.image_at(s3, 0));

    agent.conn.close(0u32.into(), b"done");
    server.shutdown().await.expect("clean shutdown");
    let st = cdp_replica::status(&root).await.expect("status");
    assert!(!st.serving);
    assert_eq!(st.volumes[0].state, "disconnected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_in_the_handshake() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("replica");
    let replica_fp = init_replica(&root).await;
    let a = Identity::generate("agent-a").expect("identity");
    let b = Identity::generate("agent-b").expect("identity");
    cdp_replica::authorize(&root, a.fingerprint(), "a").expect("authorize");
    let server = Server::start(&root, "127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("server");
    let addr = server.local_addr();
    let sim = AgentSim::new("g", &[VOL]);
    let mut agent_a = QuicAgent::connect(&a, replica_fp, addr)
        .await
        .expect("connect");
    assert!(matches!(
        agent_a.hello(vec![sim.hello()]).await.expect("reply"),
        Control::Welcome { .. }
    ));

    // Authorized while serving; but the group belongs to agent a.
    cdp_replica::authorize(&root, b.fingerprint(), "b").expect("authorize");
    let mut agent_b = QuicAgent::connect(&b, replica_fp, addr)
        .await
        .expect("connect b");
    match agent_b.hello(vec![sim.hello()]).await.expect("reply") {
        Control::Refused { reason, .. } => {
            assert!(reason.contains("belongs to another agent"), "{reason}")
        }
        other => panic!("expected Refused, got {other:?}"),
    }
    // An agent of protocol version 1 (its Hello reads the same in version 2) is refused
    // with a sentence naming both versions; so is one of a version to come.
    for old in [1, 99] {
        let mut agent_b = QuicAgent::connect(&b, replica_fp, addr)
            .await
            .expect("connect b");
        agent_b
            .send_control(&Control::Hello {
                protocol: old,
                groups: vec![sim.hello()],
            })
            .await
            .expect("send");
        match agent_b.next_control().await.expect("reply") {
            Control::Refused { reason, .. } => assert!(
                reason.contains(&format!(
                    "protocol version {}, not {old}",
                    cdp_shared::wire::PROTOCOL_VERSION
                )),
                "{reason}"
            ),
            other => panic!("expected Refused, got {other:?}"),
        }
    }
    server.shutdown().await.expect("shutdown");
}

/// Reads control messages until one that is not an Ack.
async fn next_non_ack(agent: &mut QuicAgent) -> Control {
    loop {
        match agent.next_control().await.expect("control message") {
            Control::Ack { .. } => {}
            other => return other,
        }
    }
}

fn hash_request(group: &str, volume: u32, first_chunk: u64, count: u32) -> Control {
    Control::HashRequest {
        group: group.into(),
        volume,
        first_chunk,
        count,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_hashes_over_quic() {
    const VOL: (u32, &str, u64) = (0, "hashed", 6 * CHUNK_BYTES + 12_345);
    const NEW: (u32, &str, u64) = (1, "unsynced", 2 * CHUNK_BYTES);
    let chunks = VOL.2.div_ceil(CHUNK_BYTES);
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("replica");
    let replica_fp = init_replica(&root).await;
    let agent_id = Identity::generate("hash-agent").expect("identity");
    cdp_replica::authorize(&root, agent_id.fingerprint(), "owner").expect("authorize");

    // Ingest in-process (as the agent): the initial sync of one volume, then journaled
    // writes of every kind, one of them in the short last chunk.
    let mut sim = AgentSim::new("g", &[VOL, NEW]);
    sim.keep_history = false;
    sim.images.insert(0, pattern(31, VOL.2 as usize));
    let mut h = Harness::open(&root).await;
    h.agent = agent_id.fingerprint();
    h.hello(vec![sim.hello()]).await.expect("welcome");
    let mut batches = Vec::new();
    sim.sync_volume(0, &mut batches);
    for (i, op) in [
        Op::Data {
            vol: 0,
            offset: CHUNK_BYTES - 700,
            bytes: pattern(32, 3000),
        },
        Op::Zero {
            vol: 0,
            offset: 2 * CHUNK_BYTES + 4096,
            len: 70_000,
        },
        Op::Trim {
            vol: 0,
            offset: 4 * CHUNK_BYTES,
            len: CHUNK_BYTES,
        },
        Op::Data {
            vol: 0,
            offset: VOL.2 - 5000,
            bytes: pattern(33, 5000),
        },
    ]
    .into_iter()
    .enumerate()
    {
        batches.push(sim.batch(&[op], BatchFlags::FLUSH, Some(&format!("b{i}"))));
    }
    for (_, b) in batches {
        h.submit(b).await;
    }
    h.wait_ack("g", sim.seq).await;
    h.shutdown().await;

    let server = Server::start(&root, "127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("server");
    let mut agent = QuicAgent::connect(&agent_id, replica_fp, server.local_addr())
        .await
        .expect("connect");
    // The welcome names the head's hash and every volume's state.
    match agent.hello(vec![sim.hello()]).await.expect("welcome") {
        Control::Welcome { groups, .. } => {
            let w = &groups[0];
            assert_eq!(w.durable.0, sim.seq);
            assert_eq!(
                w.head_hash,
                blake3::Hash::from_bytes(sim.hashes[&sim.seq])
                    .to_hex()
                    .to_string()
            );
            let states: Vec<(u32, &str)> =
                w.volumes.iter().map(|v| (v.id, v.state.as_str())).collect();
            assert_eq!(states, vec![(0, "protecting"), (1, "new")]);
        }
        m => panic!("expected Welcome, got {m:?}"),
    }

    // Every chunk at once.
    let model = chunk_hashes_of(&sim.images[&0]);
    assert_eq!(model.len() as u64, chunks);
    agent
        .send_control(&hash_request("g", 0, 0, chunks as u32))
        .await
        .expect("send");
    match next_non_ack(&mut agent).await {
        Control::HashReply {
            group,
            volume,
            seq,
            first_chunk,
            hashes,
        } => {
            assert_eq!(
                (group.as_str(), volume, seq.0, first_chunk),
                ("g", 0, sim.seq, 0)
            );
            assert_eq!(hashes, model);
        }
        m => panic!("expected HashReply, got {m:?}"),
    }
    // Several requests in flight at once (answered two at a time), each on its own.
    for c in 0..chunks {
        agent
            .send_control(&hash_request("g", 0, c, 1))
            .await
            .expect("send");
    }
    let mut got = vec![String::new(); chunks as usize];
    for _ in 0..chunks {
        match next_non_ack(&mut agent).await {
            Control::HashReply {
                first_chunk,
                mut hashes,
                ..
            } => {
                assert_eq!(hashes.len(), 1);
                got[first_chunk as usize] = hashes.remove(0);
            }
            m => panic!("expected HashReply, got {m:?}"),
        }
    }
    assert_eq!(got, model);

    // Refusals, each one sentence.
    for (req, needle) in [
        (hash_request("nope", 0, 0, 1), "not announced"),
        (hash_request("g", 9, 0, 1), "no volume with id 9"),
        (hash_request("g", 1, 0, 1), "not protecting"),
        (hash_request("g", 0, chunks - 1, 2), "past the end"),
        (
            hash_request("g", 0, 0, wire::HASHES_PER_MESSAGE_MAX + 1),
            "at a time",
        ),
        (hash_request("g", 0, 0, 0), "at a time"),
    ] {
        agent.send_control(&req).await.expect("send");
        match next_non_ack(&mut agent).await {
            Control::HashError { reason, .. } => {
                assert!(reason.contains(needle), "{reason:?} lacks {needle:?}")
            }
            m => panic!("expected HashError for {req:?}, got {m:?}"),
        }
    }

    // A new write moves the head: the next answer is the image at the new seq.
    let (s, b) = sim.batch(
        &[Op::Data {
            vol: 0,
            offset: 2 * CHUNK_BYTES + 10,
            bytes: pattern(34, 9000),
        }],
        BatchFlags::FLUSH,
        None,
    );
    agent.send_batch(&b).await.expect("send");
    agent.wait_ack("g", s).await;
    agent
        .send_control(&hash_request("g", 0, 1, 3))
        .await
        .expect("send");
    match next_non_ack(&mut agent).await {
        Control::HashReply { seq, hashes, .. } => {
            assert_eq!(seq.0, s);
            assert_eq!(hashes, chunk_hashes_of(&sim.images[&0])[1..4].to_vec());
            assert_ne!(hashes[1], model[2]);
        }
        m => panic!("expected HashReply, got {m:?}"),
    }
    agent.conn.close(0u32.into(), b"done");
    server.shutdown().await.expect("shutdown");
}

/// A record whose data fails its hash while the batch's payload hash holds (only a faulty
/// agent sends one) is found when the group commit writes it to the syncing volume's target:
/// the batch is refused like any bad batch, the commit undone, and ingest goes on (it used
/// to stop the whole replica). The batch sent again is committed, and the image is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_whose_data_fails_its_hash_is_refused_and_ingest_goes_on() {
    use cdp_shared::batch::{SealParams, decode_header, seal};
    const BIG: (u32, &str, u64) = (0, "disk0", 3 * CHUNK_BYTES);
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("replica");
    let (server, mut agent) = serve_with_agent(&root, "test").await;
    let mut sim = AgentSim::new("g", &[BIG]);
    sim.images.insert(0, pattern(5, BIG.2 as usize));
    sim.history[0] = sim.images.clone();
    assert!(matches!(
        agent.hello(vec![sim.hello()]).await.expect("welcome"),
        Control::Welcome { .. }
    ));
    let mut batches = Vec::new();
    let done = sim.sync_volume(0, &mut batches);
    assert!(batches.len() >= 2, "the sync spans several batches");

    // The first sync batch with the last byte of its last record's data flipped, sealed
    // again: its payload hash holds, its record's data hash does not.
    let (seq, good) = batches[0].clone();
    let h = decode_header(&good).expect("header");
    let mut payload = good[h.header_len as usize..].to_vec();
    let last = payload.len() - 1;
    payload[last] ^= 0x01;
    let (bad, _) = seal(
        &SealParams {
            group: &h.group,
            seq: h.seq,
            agent_time_ns: h.agent_time_ns,
            flags: h.flags,
            bookmark: h.bookmark.as_deref(),
            prev_hash: h.prev_hash,
            record_count: h.record_count,
        },
        &payload,
    );
    agent.send_batch(&bad).await.expect("send");
    match agent.next_control().await.expect("reply") {
        Control::Nack {
            group,
            seq: nacked,
            reason,
        } => {
            assert_eq!((group.as_deref(), nacked.0), (Some("g"), seq));
            assert!(reason.contains("record"), "{reason}");
        }
        other => panic!("expected a Nack, got {other:?}"),
    }
    // The agent sends it again (and the rest of the sync): all of it is committed.
    for (_, b) in &batches {
        agent.send_batch(b).await.expect("send");
    }
    agent.wait_ack("g", done).await;
    let (image, _) = restore_bytes(&root, BIG.1, &PointSpec::Seq(done))
        .await
        .expect("restore");
    assert!(
        image == sim.images[&0],
        "the restored image is the device's"
    );
    agent.conn.close(0u32.into(), b"done");
    server
        .shutdown()
        .await
        .expect("ingest never stopped: a clean shutdown");
}
