//! Test support: an agent simulator that builds batches (and keeps a reference model of every
//! volume after every seq), an in-process ingest harness, and a QUIC test agent.
#![allow(dead_code)]

pub mod cli;
pub mod export;
pub mod journal;
pub mod nbd;
pub mod ops;
pub mod serve;
pub mod sql;
pub mod test_agent;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cdp_replica::catalog::{Catalog, OpenMode};
use cdp_replica::datadir::DataDir;
use cdp_replica::ingest::{IngestOptions, IngestService};
use cdp_replica::{PointSpec, ReplicaError, RestoreSummary};
use cdp_shared::Seq;
use cdp_shared::batch::{
    self, BatchFlags, Hash, RecordEncoder, RecordKind, SealParams, encode_marker,
};
use cdp_shared::identity::{self, Fingerprint, Identity};
use cdp_shared::types::{CHUNK_BYTES, split_at_chunks};
use cdp_shared::wire::{
    self, Control, FrameDecoder, GroupHello, GroupWelcome, PROTOCOL_VERSION, VolumeInfo,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The `cdp-replica` binary the tests run: the one cargo built for this test run. The tests
/// run what ships, so it must be an optimized build (`cargo test --release`, which `make test`
/// runs); `CDP_TEST_DEBUG_BINARIES=1` allows a debug build for a quick try by hand.
pub fn replica_bin() -> &'static str {
    if cfg!(debug_assertions) && std::env::var_os("CDP_TEST_DEBUG_BINARIES").is_none() {
        panic!(
            "the tests that start cdp-replica run the release binary: run them with `cargo test --release` (make test does), or set CDP_TEST_DEBUG_BINARIES=1 to run a debug build"
        );
    }
    env!("CARGO_BIN_EXE_cdp-replica")
}

/// How long a test waits for something that should happen.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// One thing a batch does.
#[derive(Clone, Debug)]
pub enum Op {
    Data {
        vol: u32,
        offset: u64,
        bytes: Vec<u8>,
    },
    Zero {
        vol: u32,
        offset: u64,
        len: u64,
    },
    Trim {
        vol: u32,
        offset: u64,
        len: u64,
    },
    SyncBegin(u32),
    SyncEnd(u32),
}

/// Builds batches of one group like an agent would, and keeps the expected image of every
/// volume after every seq.
pub struct AgentSim {
    pub group: String,
    pub volumes: Vec<VolumeInfo>,
    pub seq: u64,
    prev: Hash,
    enc: RecordEncoder,
    pub time_ns: i64,
    /// Current image of each volume.
    pub images: HashMap<u32, Vec<u8>>,
    /// images after each seq: history[seq] (index 0 = before any batch).
    pub history: Vec<HashMap<u32, Vec<u8>>>,
    /// The bytes of every batch built, by seq.
    pub batches: HashMap<u64, Vec<u8>>,
    /// Header hash of every batch built, by seq.
    pub hashes: HashMap<u64, Hash>,
    /// Keep a copy of every image after every seq in `history` (tests with big volumes or
    /// many batches turn it off and keep their own model).
    pub keep_history: bool,
    /// Stamp batches with the real clock (now, strictly increasing) instead of one second per
    /// seq from `TIME_BASE_NS`.
    pub real_time: bool,
    /// Agent time of every batch built, by seq.
    pub times: BTreeMap<u64, i64>,
    /// Byte length of every batch built, by seq.
    pub lengths: BTreeMap<u64, u64>,
    /// With `keep_history` off: a copy of every image every this many seqs, and the ops of
    /// every batch, so that [`AgentSim::model_image`] can replay any seq.
    pub checkpoint_every: Option<u64>,
    checkpoints: BTreeMap<u64, HashMap<u32, Vec<u8>>>,
    ops_log: BTreeMap<u64, Vec<Op>>,
}

pub const TIME_BASE_NS: i64 = 1_700_000_000_000_000_000;

impl AgentSim {
    pub fn new(group: &str, volumes: &[(u32, &str, u64)]) -> AgentSim {
        let volumes: Vec<VolumeInfo> = volumes
            .iter()
            .map(|&(id, name, size)| VolumeInfo {
                id,
                name: name.to_owned(),
                size,
            })
            .collect();
        let images: HashMap<u32, Vec<u8>> = volumes
            .iter()
            .map(|v| (v.id, vec![0u8; v.size as usize]))
            .collect();
        AgentSim {
            group: group.to_owned(),
            volumes,
            seq: 0,
            prev: batch::ZERO_HASH,
            enc: RecordEncoder::new(),
            time_ns: TIME_BASE_NS,
            history: vec![images.clone()],
            images,
            batches: HashMap::new(),
            hashes: HashMap::new(),
            keep_history: true,
            real_time: false,
            times: BTreeMap::new(),
            lengths: BTreeMap::new(),
            checkpoint_every: None,
            checkpoints: BTreeMap::new(),
            ops_log: BTreeMap::new(),
        }
    }

    /// Keeps a checkpointed model instead of every image (see `checkpoint_every`); the
    /// current images are the first checkpoint.
    pub fn checkpointed(mut self, every: u64) -> AgentSim {
        self.keep_history = false;
        self.checkpoint_every = Some(every);
        self.checkpoints.insert(self.seq, self.images.clone());
        self
    }

    /// The image of `vol` after `seq`, from `history` or replayed from the checkpoints.
    pub fn model_image(&self, seq: u64, vol: u32) -> Vec<u8> {
        if self.checkpoint_every.is_none() {
            return self.image_at(seq, vol).to_vec();
        }
        let (&at, images) = self
            .checkpoints
            .range(..=seq)
            .next_back()
            .expect("a checkpoint at or before");
        let mut image = images[&vol].clone();
        for (_, ops) in self.ops_log.range((
            std::ops::Bound::Excluded(at),
            std::ops::Bound::Included(seq),
        )) {
            for op in ops {
                match op {
                    Op::Data {
                        vol: v,
                        offset,
                        bytes,
                    } if *v == vol => image[*offset as usize..*offset as usize + bytes.len()]
                        .copy_from_slice(bytes),
                    Op::Zero {
                        vol: v,
                        offset,
                        len,
                    }
                    | Op::Trim {
                        vol: v,
                        offset,
                        len,
                    } if *v == vol => image[*offset as usize..(*offset + *len) as usize].fill(0),
                    _ => {}
                }
            }
        }
        image
    }

    pub fn hello(&self) -> GroupHello {
        GroupHello {
            name: self.group.clone(),
            volumes: self.volumes.clone(),
            head: cdp_shared::types::Seq(self.seq),
            first_held: cdp_shared::types::Seq(1),
            head_hash: String::new(),
        }
    }

    pub fn agent_time(seq: u64) -> i64 {
        TIME_BASE_NS + seq as i64 * 1_000_000_000
    }

    /// Seals the next batch doing `ops` (byte-changing ops are split at chunk boundaries).
    pub fn batch(&mut self, ops: &[Op], flags: u16, bookmark: Option<&str>) -> (u64, Vec<u8>) {
        let mut payload = Vec::new();
        let mut count = 0u32;
        for op in ops {
            match op {
                Op::Data { vol, offset, bytes } => {
                    for (o, l) in split_at_chunks(*offset, bytes.len() as u64) {
                        let from = (o - offset) as usize;
                        self.enc.encode_data(
                            *vol,
                            o,
                            &bytes[from..from + l as usize],
                            0,
                            &mut payload,
                        );
                        count += 1;
                    }
                    let img = self.images.get_mut(vol).expect("volume");
                    img[*offset as usize..*offset as usize + bytes.len()].copy_from_slice(bytes);
                }
                Op::Zero { vol, offset, len } | Op::Trim { vol, offset, len } => {
                    let kind = if matches!(op, Op::Zero { .. }) {
                        RecordKind::Zero
                    } else {
                        RecordKind::Trim
                    };
                    for (o, l) in split_at_chunks(*offset, *len) {
                        encode_marker(*vol, kind, o, l as u32, 0, &mut payload);
                        count += 1;
                    }
                    let img = self.images.get_mut(vol).expect("volume");
                    img[*offset as usize..(*offset + *len) as usize].fill(0);
                }
                Op::SyncBegin(vol) => {
                    encode_marker(*vol, RecordKind::SyncBegin, 0, 0, 0, &mut payload);
                    count += 1;
                }
                Op::SyncEnd(vol) => {
                    encode_marker(*vol, RecordKind::SyncEnd, 0, 0, 0, &mut payload);
                    count += 1;
                }
            }
        }
        self.seq += 1;
        let agent_time_ns = if self.real_time {
            let last = self.times.values().next_back().copied().unwrap_or(0);
            (chrono::Utc::now().timestamp_nanos_opt().expect("now")).max(last + 1)
        } else {
            Self::agent_time(self.seq)
        };
        let params = SealParams {
            group: &self.group,
            seq: Seq(self.seq),
            agent_time_ns,
            flags: BatchFlags(flags),
            bookmark,
            prev_hash: self.prev,
            record_count: count,
        };
        let (bytes, hash) = batch::seal(&params, &payload);
        self.prev = hash;
        self.hashes.insert(self.seq, hash);
        self.history.push(if self.keep_history {
            self.images.clone()
        } else {
            HashMap::new()
        });
        self.batches.insert(self.seq, bytes.clone());
        self.times.insert(self.seq, agent_time_ns);
        self.lengths.insert(self.seq, bytes.len() as u64);
        if let Some(every) = self.checkpoint_every {
            self.ops_log.insert(self.seq, ops.to_vec());
            if self.seq.is_multiple_of(every) {
                self.checkpoints.insert(self.seq, self.images.clone());
            }
        }
        (self.seq, bytes)
    }

    /// The initial sync of `vol` over one or more batches: SyncBegin, the current image as data
    /// (all-zero chunks as Zero records), SyncEnd. Returns the seq of the SyncEnd batch.
    pub fn sync_volume(&mut self, vol: u32, out: &mut Vec<(u64, Vec<u8>)>) -> u64 {
        let image = self.images[&vol].clone();
        let size = image.len() as u64;
        let mut ops = vec![Op::SyncBegin(vol)];
        let mut at = 0u64;
        while at < size {
            let n = (size - at).min(CHUNK_BYTES);
            let piece = &image[at as usize..(at + n) as usize];
            if piece.iter().all(|&b| b == 0) {
                ops.push(Op::Zero {
                    vol,
                    offset: at,
                    len: n,
                });
            } else {
                ops.push(Op::Data {
                    vol,
                    offset: at,
                    bytes: piece.to_vec(),
                });
            }
            at += n;
            // At most two chunks per batch, so a sync spans several batches.
            if ops.len() >= 3 && at < size {
                out.push(self.batch(&ops, BatchFlags::SYNC | BatchFlags::INCONSISTENT, None));
                ops.clear();
            }
        }
        ops.push(Op::SyncEnd(vol));
        let b = self.batch(&ops, BatchFlags::SYNC | BatchFlags::FLUSH, None);
        let seq = b.0;
        out.push(b);
        seq
    }

    pub fn image_at(&self, seq: u64, vol: u32) -> &[u8] {
        &self.history[seq as usize][&vol]
    }
}

/// Random bytes that compress sometimes (runs) and sometimes not.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407)
        | 1;
    let runs = seed.is_multiple_of(3);
    (0..len)
        .map(|i| {
            if runs {
                ((i / 512) as u64 ^ seed) as u8 | 1
            } else {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            }
        })
        .collect()
}

/// An in-process replica ingest, bypassing QUIC.
pub struct Harness {
    pub root: PathBuf,
    pub service: IngestService,
    pub token: CancellationToken,
    pub agent: Fingerprint,
    pub reply: mpsc::Sender<Control>,
    pub replies: mpsc::Receiver<Control>,
    pub announced: HashSet<String>,
}

/// Sets `[journal] segment_size` in the `replica.toml` that `init` wrote (read when `serve`
/// starts); tests make many small segments.
pub fn set_segment_size(root: &Path, size: &str) {
    let path = root.join("replica.toml");
    let text = std::fs::read_to_string(&path).expect("read replica.toml");
    let line = "segment_size = \"256MiB\"";
    assert!(text.contains(line), "replica.toml has {line}: {text}");
    std::fs::write(
        &path,
        text.replace(line, &format!("segment_size = \"{size}\"")),
    )
    .expect("write replica.toml");
}

pub async fn init_replica(root: &Path) -> Fingerprint {
    cdp_replica::init(root, "127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("init")
}

impl Harness {
    /// Opens the ingest of an initialized data directory (recovering its journals).
    pub async fn open(root: &Path) -> Harness {
        Harness::open_with(root, IngestOptions::default()).await
    }

    /// [`Harness::open`] with explicit options (small segments).
    pub async fn open_with(root: &Path, options: IngestOptions) -> Harness {
        let dir = DataDir::existing(root).expect("data dir");
        let catalog = Catalog::open(&dir.catalog(), OpenMode::Migrate)
            .await
            .expect("catalog");
        let token = CancellationToken::new();
        let service = IngestService::start_with(&dir, catalog, token.clone(), options)
            .await
            .expect("ingest");
        let (reply, replies) = mpsc::channel(1024);
        Harness {
            root: root.to_path_buf(),
            service,
            token,
            agent: Fingerprint([7; 32]),
            reply,
            replies,
            announced: HashSet::new(),
        }
    }

    /// Says hello, and attaches the reply channel to the groups welcomed. A group refused
    /// alone (fenced) is an `Err` with its reason too, after the others are attached.
    pub async fn hello(&mut self, groups: Vec<GroupHello>) -> Result<Vec<GroupWelcome>, String> {
        for g in &groups {
            self.announced.insert(g.name.clone());
        }
        let admitted = self
            .service
            .hello(&self.agent, PROTOCOL_VERSION, &groups)
            .await
            .expect("hello")?;
        for w in &admitted.welcomes {
            self.service.attach(&w.name, &self.reply).await;
        }
        match admitted.refused.first() {
            Some(r) => Err(r.reason.clone()),
            None => Ok(admitted.welcomes),
        }
    }

    /// The initial sync of `vol` of `sim` (see [`AgentSim::sync_volume`]), every batch
    /// submitted and acknowledged; returns the seq that completed it.
    pub async fn sync(&mut self, sim: &mut AgentSim, vol: u32) -> u64 {
        let mut out = Vec::new();
        let synced = sim.sync_volume(vol, &mut out);
        for (_, b) in out {
            self.submit(b).await;
        }
        self.wait_ack(&sim.group, synced).await;
        synced
    }

    /// Seals the next batch of `sim` (see [`AgentSim::batch`]), submits it and waits for its
    /// ack; returns its seq.
    pub async fn commit(
        &mut self,
        sim: &mut AgentSim,
        ops: &[Op],
        flags: u16,
        bookmark: Option<&str>,
    ) -> u64 {
        let (seq, bytes) = sim.batch(ops, flags, bookmark);
        self.submit(bytes).await;
        self.wait_ack(&sim.group, seq).await;
        seq
    }

    pub async fn submit(&self, bytes: Vec<u8>) {
        self.service
            .submit(&self.agent, &self.announced, bytes, &self.reply)
            .await;
    }

    /// Waits for an Ack of `group` reaching `seq`; panics on a Nack or at the deadline.
    pub async fn wait_ack(&mut self, group: &str, seq: u64) {
        wait_ack(&mut self.replies, group, seq).await
    }

    /// The next reply (with a deadline).
    pub async fn next_reply(&mut self) -> Control {
        tokio::time::timeout(DEADLINE, self.replies.recv())
            .await
            .expect("a reply in time")
            .expect("reply channel open")
    }

    pub async fn shutdown(self) {
        self.service.shutdown().await;
        self.service.catalog().close().await;
    }
}

pub async fn wait_ack(replies: &mut mpsc::Receiver<Control>, group: &str, seq: u64) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let msg = tokio::time::timeout_at(deadline, replies.recv())
            .await
            .expect("ack in time")
            .expect("reply channel open");
        match msg {
            Control::Ack { group: g, durable } if g == group && durable.0 >= seq => return,
            Control::Ack { .. } => {}
            other => panic!("expected an ack of {group} {seq}, got {other:?}"),
        }
    }
}

/// A replica initialized in `root`, serving on loopback, with one agent named `name`
/// authorized and connected over QUIC.
pub async fn serve_with_agent(root: &Path, name: &str) -> (cdp_replica::ServerHandle, QuicAgent) {
    let replica_fp = init_replica(root).await;
    let agent_id = Identity::generate(&format!("{name}-agent")).expect("agent identity");
    cdp_replica::authorize(root, agent_id.fingerprint(), name).expect("authorize");
    let server = cdp_replica::Server::start(root, "127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("server");
    let agent = QuicAgent::connect(&agent_id, replica_fp, server.local_addr())
        .await
        .expect("connect");
    (server, agent)
}

/// A QUIC agent for tests.
pub struct QuicAgent {
    pub endpoint: quinn::Endpoint,
    pub conn: quinn::Connection,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
    decoder: FrameDecoder,
}

impl QuicAgent {
    /// Connects and opens the control stream (the TLS refusal of an unauthorized agent only
    /// shows at the first stream I/O).
    pub async fn connect(
        identity: &Identity,
        replica: Fingerprint,
        addr: SocketAddr,
    ) -> Result<QuicAgent, String> {
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr"))
            .map_err(|e| e.to_string())?;
        endpoint.set_default_client_config(
            identity::client_config(identity, replica).map_err(|e| e.to_string())?,
        );
        let conn = endpoint
            .connect(addr, identity::SERVER_NAME)
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        Ok(QuicAgent {
            endpoint,
            conn,
            send,
            recv,
            decoder: FrameDecoder::new(),
        })
    }

    pub async fn send_control(&mut self, msg: &Control) -> Result<(), String> {
        self.send
            .write_all(&wire::encode(msg))
            .await
            .map_err(|e| e.to_string())
    }

    /// The next control message from the replica; `VerifyRequest`s are answered with
    /// `VerifyRefused` and skipped.
    pub async fn next_control(&mut self) -> Result<Control, String> {
        let mut buf = vec![0u8; 65536];
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            match self.decoder.poll_frame().map_err(|e| e.to_string())? {
                // The replica's background verifier asks every agent; this one does not keep
                // the device image, so it refuses (the verifier records `skipped`).
                Some(Control::VerifyRequest { id, .. }) => {
                    self.send_control(&Control::VerifyRefused {
                        id,
                        reason: "the test agent does not verify".into(),
                    })
                    .await?;
                    continue;
                }
                Some(m) => return Ok(m),
                None => {}
            }
            match tokio::time::timeout_at(deadline, self.recv.read(&mut buf)).await {
                Err(_) => return Err("no control message in time".into()),
                Ok(Ok(Some(n))) => self.decoder.handle_bytes(&buf[..n]),
                Ok(Ok(None)) => return Err("control stream ended".into()),
                Ok(Err(e)) => return Err(e.to_string()),
            }
        }
    }

    pub async fn hello(&mut self, groups: Vec<GroupHello>) -> Result<Control, String> {
        self.send_control(&Control::Hello {
            protocol: PROTOCOL_VERSION,
            groups,
        })
        .await?;
        self.next_control().await
    }

    pub async fn send_batch(&self, bytes: &[u8]) -> Result<(), String> {
        let mut s = self.conn.open_uni().await.map_err(|e| e.to_string())?;
        s.write_all(bytes).await.map_err(|e| e.to_string())?;
        s.finish().map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Reads control messages until an Ack of `group` reaching `seq`; panics on a Nack.
    pub async fn wait_ack(&mut self, group: &str, seq: u64) {
        if let Err(e) = self.try_wait_ack(group, seq).await {
            panic!("{e}");
        }
    }

    /// [`Self::wait_ack`], with the failure returned (for a test that adds the replica's log).
    pub async fn try_wait_ack(&mut self, group: &str, seq: u64) -> Result<(), String> {
        loop {
            match self.next_control().await {
                Ok(Control::Ack { group: g, durable }) if g == group && durable.0 >= seq => {
                    return Ok(());
                }
                Ok(Control::Ack { .. }) => {}
                Ok(other) => {
                    return Err(format!("expected an ack of {group} {seq}, got {other:?}"));
                }
                Err(e) => return Err(format!("waiting for the ack of {group} {seq}: {e}")),
            }
        }
    }
}

/// The blake3 hash (hex) of each 1 MiB chunk of `image` (the last one over what is left).
pub fn chunk_hashes_of(image: &[u8]) -> Vec<String> {
    image
        .chunks(CHUNK_BYTES as usize)
        .map(|c| blake3::hash(c).to_hex().to_string())
        .collect()
}

/// Numbers the files [`restore_bytes`] restores into.
static RESTORED: AtomicU64 = AtomicU64::new(0);

/// Restores `volume` at `at` into a new file in `root`; returns the image and what `restore`
/// says, the file removed.
pub async fn restore_bytes(
    root: &Path,
    volume: &str,
    at: &PointSpec,
) -> Result<(Vec<u8>, RestoreSummary), ReplicaError> {
    let out = root.join(format!("out-{}", RESTORED.fetch_add(1, Ordering::Relaxed)));
    let summary = cdp_replica::restore(root, volume, at, &out).await?;
    let bytes = read(&out);
    std::fs::remove_file(&out).expect("remove restored image");
    Ok((bytes, summary))
}

/// Reads a whole file.
pub fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

pub fn arc<T>(t: T) -> Arc<T> {
    Arc::new(t)
}
