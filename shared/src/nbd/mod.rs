//! NBD server core: the protocol codec (sans-IO, `proto`) and a thin tokio shell (`server`)
//! that serves any set of exports implementing [`Export`].
//!
//! The agent serves protected volumes through it; the replica serves recovery points.

pub mod proto;
pub mod server;

use std::future::Future;
use std::sync::Arc;

/// What an export's operation can fail with; each maps to the errno the NBD reply carries.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ExportError {
    #[error("I/O error: {0}")]
    Io(String),
    #[error("no space left on the backing device")]
    NoSpace,
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("operation not supported")]
    NotSupported,
    #[error("export is read-only")]
    ReadOnly,
    #[error("server is shutting down")]
    Shutdown,
}

impl ExportError {
    /// The NBD error value for a reply (Linux errno numbers, as the protocol specifies).
    pub fn nbd_errno(&self) -> u32 {
        match self {
            ExportError::Io(_) => proto::NBD_EIO,
            ExportError::NoSpace => proto::NBD_ENOSPC,
            ExportError::Invalid(_) => proto::NBD_EINVAL,
            ExportError::NotSupported => proto::NBD_EINVAL,
            ExportError::ReadOnly => proto::NBD_EPERM,
            ExportError::Shutdown => proto::NBD_ESHUTDOWN,
        }
    }
}

impl From<std::io::Error> for ExportError {
    fn from(e: std::io::Error) -> Self {
        if e.raw_os_error() == Some(28) {
            ExportError::NoSpace
        } else {
            ExportError::Io(e.to_string())
        }
    }
}

pub type ExportResult<T> = Result<T, ExportError>;

/// One export (a volume, or a recovery point).
///
/// **Admission contract.** The server calls these methods from its request-reading loop, in
/// the order the requests arrive on the connection, and only then spawns the returned
/// futures so that many requests run at once. An implementation therefore does its ordering
/// work (assigning a log position, taking its place in a range lock) synchronously inside the
/// call, before returning the future; the future does the I/O. Offsets and lengths are
/// already checked against [`Export::size`] and the request limit when these are called.
pub trait Export: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Whether writes, trims and zero-writes are refused.
    fn read_only(&self) -> bool;
    fn read(
        &self,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = ExportResult<Vec<u8>>> + Send + 'static;
    fn write(
        &self,
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    ) -> impl Future<Output = ExportResult<()>> + Send + 'static;
    fn flush(&self) -> impl Future<Output = ExportResult<()>> + Send + 'static;
    fn trim(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
    ) -> impl Future<Output = ExportResult<()>> + Send + 'static;
    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
    ) -> impl Future<Output = ExportResult<()>> + Send + 'static;
}

/// The exports a server offers, by name.
pub trait ExportSet: Send + Sync + 'static {
    type Export: Export;
    /// The export with this name. The empty name selects the only export when there is
    /// exactly one (what `nbdinfo nbd+unix:///?socket=..` and qemu ask for by default).
    fn get(&self, name: &str) -> Option<Arc<Self::Export>>;
    /// Names of all exports, for NBD_OPT_LIST.
    fn names(&self) -> Vec<String>;
}
