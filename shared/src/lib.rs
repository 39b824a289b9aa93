//! cdp-shared: what the agent and the replica have in common — the batch format, the control
//! protocol, the NBD server core, identities and TLS, the extent map, point and time parsing.
//!
//! Nothing here depends on `cdp-agent` or `cdp-replica`. Apart from the NBD server shell and
//! the identity files (and [`fileio`]'s page-cache-only read), nothing here does socket or disk
//! I/O.

pub mod batch;
pub mod cause;
pub mod fileio;
pub mod identity;
pub mod logging;
pub mod metrics;
pub mod nbd;
pub mod notify;
pub mod packaging;
pub mod point;
pub mod pool;
pub mod stdout;
pub mod table;
pub mod types;
pub mod units;
pub mod wire;

pub use types::*;
