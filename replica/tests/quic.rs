//! The replica's server over real QUIC on loopback, with a test client playing the agent.

mod common;

use std::path::Path;

use cdp_replica::catalog::Catalog;
use cdp_replica::datadir::DataDir;
use cdp_replica::{PointSpec, Server};
use cdp_shared::batch::BatchFlags;
use cdp_shared::identity::Identity;
use cdp_shared::types::CHUNK_BYTES;
use cdp_shared::wire::Control;
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
    let catalog = Catalog::open(&DataDir::new(root).catalog(), false, false)
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
            assert_eq!((groups[0].name.as_str(), groups[0].durable), ("g", 0));
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
    let catalog = Catalog::open(&DataDir::new(&root).catalog(), false, false)
        .await
        .expect("catalog");
    let g = catalog
        .group_by_name("g")
        .await
        .expect("query")
        .expect("group");
    let rows = catalog.batches(g.id, s2, s4).await.expect("batches");
    catalog.close().await;
    let positions: Vec<u64> = rows
        .iter()
        .map(|b| b.span.expect("journaled").position)
        .collect();
    assert_eq!(
        rows.iter().map(|b| b.seq).collect::<Vec<_>>(),
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
            assert_eq!((group.as_str(), seq), ("g", s5));
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
    let catalog = Catalog::open(&DataDir::new(&root).catalog(), false, false)
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
    assert_eq!(st.volumes[0].head_seq, s6);
    let out = tmp.path().join("restored");
    let summary = cdp_replica::restore(
        &root,
        VOL.1,
        &PointSpec::Bookmark("before-upgrade".into()),
        &out,
    )
    .await
    .expect("restore");
    assert_eq!(summary.point.seq, s3);
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
        Control::Refused { reason } => {
            assert!(reason.contains("belongs to another agent"), "{reason}")
        }
        other => panic!("expected Refused, got {other:?}"),
    }
    // A wrong protocol version.
    let mut agent_b = QuicAgent::connect(&b, replica_fp, addr)
        .await
        .expect("connect b");
    agent_b
        .send_control(&Control::Hello {
            protocol: 99,
            groups: vec![],
        })
        .await
        .expect("send");
    match agent_b.next_control().await.expect("reply") {
        Control::Refused { reason } => assert!(reason.contains("protocol version"), "{reason}"),
        other => panic!("expected Refused, got {other:?}"),
    }
    server.shutdown().await.expect("shutdown");
}
