//! The commands of the `cdp-replica` binary, grouped by family; `main.rs` parses the command
//! line and calls them.

pub(crate) mod admin;
pub(crate) mod output;
pub(crate) mod recover;
pub(crate) mod serve;
pub(crate) mod verify;

use cdp_replica::ReplicaError;

#[derive(Debug, thiserror::Error)]
pub(crate) enum CliError {
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    #[error("{0}")]
    Usage(String),
    /// A failure outside the library (the HTTP listener), one sentence.
    #[error("{0}")]
    Failed(String),
}

impl CliError {
    pub(crate) fn msg(reason: String) -> CliError {
        CliError::Failed(reason)
    }
}
