//! cdp-agent: sits in the write path of protected volumes (it serves them over NBD), records
//! every write in order, cuts the writes into sequence-numbered batches, keeps them in a
//! durable spool and ships them over QUIC to the replica.
//!
//! Data flow: NBD server (`exports`) → `pipeline` (range lock, device I/O, records) →
//! `batcher` → `spool` → `link`. `run` wires them together; `control` serves `bookmark` and
//! `status` to the command line.

pub mod activity_log;
pub mod batcher;
pub mod clock;
pub mod config;
pub mod control;
pub mod device;
pub mod dirty_map;
pub mod exports;
pub mod fsutil;
pub mod groups;
pub mod link;
pub mod maintenance;
pub mod metrics;
pub mod pipeline;
pub mod range_lock;
pub mod run;
pub mod spool;
pub mod state;
pub mod status;

/// Exit status of an agent stopped by an internal fault (see [`stop_on_internal_error`]).
pub const EXIT_INTERNAL_ERROR: i32 = 70;

/// Stops the agent at once, with `reason` logged and printed: for a paired assertion that
/// failed (a count that disagrees with what it counts), where going on would skip a resync or
/// lose a write. Like a crash, it leaves the on-disk state as the last durable step left it,
/// and the next start recovers from there (dirty maps are loaded from their bits, activity
/// logs are resynced).
pub fn stop_on_internal_error(reason: &str) -> ! {
    tracing::error!("{reason}");
    eprintln!("error: {reason}");
    std::process::exit(EXIT_INTERNAL_ERROR)
}
