//! Ingest: from checked batch bytes to durable, acknowledged journal entries, one task per
//! consistency group (the commit protocol is written out in the crate docs, `lib.rs`).
//!
//! * [`plan_batch`] is the sans-IO core: the semantic checks of one batch against the
//!   volumes of its group (as they will be when the batch's turn comes), and what committing
//!   it means — target writes for syncing volumes, a journal append and record rows for
//!   protecting volumes, volume state changes.
//! * `order` is the sans-IO reorder buffer: the out-of-order batches a group holds (bounded)
//!   until the gap fills, and what becomes of each batch offered to it (duplicate, refreshed,
//!   replaced by a newer chain's, held, refused) — actions for the caller, never I/O.
//! * [`GroupIngest`] keeps one group's journal in seq order: it offers each batch to its
//!   reorder buffer (and checks a duplicate against the catalog), checks the hash chain, and
//!   runs group commits of the in-order run the buffer hands out.
//! * [`IngestService`] is what the QUIC server (and in-process tests) talk to: `hello` admits
//!   an agent's groups, `attach` subscribes a connection to its groups' `Paused`/`Resumed`
//!   news, `submit` checks a batch once into a `CheckedBatch` and hands it to its group's task
//!   through a bounded channel; planning, duplicate handling and the group commit's writes
//!   read the batch's header and records from that check, never decoding it again. Replies
//!   (`Ack`/`Nack`) go back on the [`Reply`] channel that came with the batch.
//!   `heads` publishes every group's durable head (a watch), for the verifier.
//! * A group commit that fails on a full disk is undone and retried every
//!   [`PAUSE_RETRY_INTERVAL`] (the group is *paused*, see the crate docs); any other failure
//!   stops ingest.
//! * `forget` inside serve: [`IngestService::begin_forget`] stops one group's ingest and
//!   trimmer tasks (each group has its own child cancellation token) and refuses Hellos naming
//!   it; [`IngestService::end_forget`] starts them again when the group is still there.
mod admission;
mod group;
mod order;
mod pause;
mod plan;
mod service;

pub use admission::Admitted;
pub(crate) use admission::{fence_of, fence_of_group};
pub use group::{GroupIngest, Received};
pub use plan::{BatchPlan, PlannedRow, StateChange, TargetOp, plan_batch};
pub use service::IngestService;

/// The durable head of every open group (group id → seq), published by each group task
/// after its commits ([`IngestService::heads`]): what the verifier waits on, with no query.
pub type Heads =
    tokio::sync::watch::Receiver<std::collections::HashMap<i64, cdp_shared::types::Seq>>;

use std::time::Duration;

use cdp_shared::batch::{self};
use cdp_shared::types::BATCHES_IN_FLIGHT_DEFAULT;
use cdp_shared::wire::Control;
use tokio::sync::mpsc;

use crate::catalog::{VolumeRow, VolumeState};

/// Batches waiting in a group task's inbox.
pub const INGEST_QUEUE_BATCHES: usize = 2 * BATCHES_IN_FLIGHT_DEFAULT;
/// Out-of-order batches a group holds while it waits for a gap to fill; beyond this, Nack.
pub const PENDING_BATCHES_MAX: usize = 2 * BATCHES_IN_FLIGHT_DEFAULT;
/// Bytes of out-of-order batches a group holds.
pub const PENDING_BYTES_MAX: usize = 512 << 20;
/// Bytes of batches one group commit takes (it always takes at least one batch).
pub const GROUP_COMMIT_BYTES_MAX: usize = 32 << 20;
/// Control messages queued for one connection's control stream.
pub const CONTROL_OUTBOX_MAX: usize = 4 * PENDING_BATCHES_MAX;
/// How often a group paused by a full disk tries its commit again.
pub const PAUSE_RETRY_INTERVAL: Duration = Duration::from_secs(1);

const _: () = assert!(PENDING_BYTES_MAX >= 2 * batch::BATCH_BYTES_MAX);
const _: () = assert!(GROUP_COMMIT_BYTES_MAX >= batch::BATCH_BYTES_MAX);

/// How a running ingest is tuned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IngestOptions {
    /// Where journal segments are rotated (`journal::SEGMENT_BYTES_TARGET` unless
    /// `[journal] segment_size` in `replica.toml` says otherwise).
    pub segment_bytes_target: u64,
}

impl Default for IngestOptions {
    fn default() -> IngestOptions {
        IngestOptions {
            segment_bytes_target: crate::journal::SEGMENT_BYTES_TARGET,
        }
    }
}

impl IngestOptions {
    /// The options `replica.toml` asks for.
    pub fn from_config(config: &crate::datadir::ReplicaConfig) -> IngestOptions {
        IngestOptions {
            segment_bytes_target: config.journal_segment_bytes,
        }
    }
}

/// Where a batch's replies go: the control stream of the connection it came on.
pub type Reply = mpsc::Sender<Control>;

/// A volume as ingest sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeEntry {
    pub id: i64,
    pub agent_id: u32,
    pub name: String,
    pub size: u64,
    pub state: VolumeState,
}

impl From<&VolumeRow> for VolumeEntry {
    fn from(v: &VolumeRow) -> Self {
        VolumeEntry {
            id: v.id,
            agent_id: v.agent_volume_id,
            name: v.name.clone(),
            size: v.size,
            state: v.state,
        }
    }
}
