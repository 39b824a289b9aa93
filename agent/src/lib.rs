//! cdp-agent: sits in the write path of protected volumes (it serves them over NBD), records
//! every write in order, cuts the writes into sequence-numbered batches, keeps them in a
//! durable spool and ships them over QUIC to the replica.
//!
//! Data flow: NBD server (`exports`) → `write_pipeline` (range lock, device I/O, records) →
//! `batcher` → `spool` → `sender`. `run` wires them together; `control` serves `bookmark` and
//! `status` to the command line.

pub mod activity_log;
pub mod batcher;
pub mod control;
pub mod device;
pub mod dirty_map;
pub mod exports;
pub mod range_lock;
pub mod resync;
pub mod run;
pub mod sender;
pub mod spool;
pub mod state;
pub mod status;
pub mod write_pipeline;
