//! `export`: the image of a volume at a recovery point served as an NBD export (instant
//! recovery, test failover), over a Unix socket (default `DIR/export-<volume>.sock`) or TCP.
//!
//! # Life of an export
//! 1. The socket path is checked (a stale socket left by a dead export is removed; a live one
//!    is refused).
//! 2. The point is resolved and pinned ([`crate::pins`], holder `export on <socket>`); the
//!    pin is held, and renewed, for the export's whole life.
//! 3. The image is opened lazily ([`LazyImage`]): no full plan, so the export is ready at
//!    once however long the journal. Each 1 MiB chunk is planned when a read first reaches it.
//! 4. The listener is bound and served ([`cdp_shared::nbd::server`], with its default
//!    [`ServerLimits`]: 256 connections at once, a 10 s handshake deadline); the export's
//!    name is the volume's name (the empty name selects it too).
//! 5. On stop ([`ExportHandle::token`], SIGINT/SIGTERM in the CLI): the server drains, the pin
//!    is checked and released, the socket is removed, and the overlay is dropped.
//!
//! Reads run concurrently on the blocking pool; a read may span chunks. The export works
//! whether `serve` runs on the data directory or not (the catalog is opened as `restore` opens
//! it, and only the pin rows are written); why the trimmer cannot disturb it is argued in
//! [`crate::lazy_image`]. Once a renewal finds the pin lost (the process stalled past the
//! pin's TTL), every read fails with EIO and [`ExportHandle::wait`] returns the error.
//!
//! # Read-only and writable
//! Read-only by default: the export says so in its flags and the server refuses writes, trims
//! and zero-writes with EPERM. With `writable`, they go to a copy-on-write [`Overlay`] (4 KiB
//! blocks, read-modify-write of partial blocks from the merged image) and reads merge the
//! overlay over the image; the overlay is thrown away when the export stops. The journal, the
//! catalog (but for the pin) and the target file are never written. FLUSH and FUA succeed at
//! once without syncing anything: the overlay is discardable by design, so there is nothing
//! to make durable.
//!
//! A failover ([`crate::failover`]) is served by the same code, with a persistent overlay and
//! without a pin (its catalog row holds the point): there FLUSH, and FUA on a write, go
//! through the writer task like a write, so they come after every write admitted before them,
//! and make them durable ([`Overlay::sync`]) before they are answered.
//!
//! Writes are applied one at a time, in admission order, by one task per export (fed through
//! a channel at admission, so the order is the order in which requests arrived; the NBD
//! server bounds what is in flight per connection). Reads are not ordered against writes in
//! flight — as on any disk, a client that wants a read to see a write waits for its reply.

use cdp_shared::types::Seq;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cdp_shared::nbd::server::ServerLimits;
use cdp_shared::nbd::{Export, ExportError, ExportResult, ExportSet};
use cdp_shared::point::PointSpec;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::datadir::DataDir;
use crate::error::{ReplicaError, Result};
use crate::lazy_image::LazyImage;
use crate::overlay::{OVERLAY_BLOCK_BYTES, Overlay, block_span};
use crate::pins::{PinGuard, pin_point};
use crate::points::ChosenPoint;

/// Where an export listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix socket at this path.
    Unix(PathBuf),
    /// A TCP address (port 0: any free port).
    Tcp(SocketAddr),
}

impl Endpoint {
    /// The NBD URI of export `name` here: `nbd+unix:///<name>?socket=<path>` or
    /// `nbd://<addr>/<name>`.
    pub fn uri(&self, name: &str) -> String {
        match self {
            Endpoint::Unix(path) => format!("nbd+unix:///{name}?socket={}", path.display()),
            Endpoint::Tcp(addr) => format!("nbd://{addr}/{name}"),
        }
    }
}

/// The default socket of an export of `volume`: `DIR/export-<volume>.sock`.
pub fn default_socket(root: &Path, volume: &str) -> PathBuf {
    root.join(format!("export-{volume}.sock"))
}

/// What a running export serves, and where.
#[derive(Clone, Debug)]
pub struct ExportInfo {
    pub volume: String,
    pub point: ChosenPoint,
    pub writable: bool,
    /// `nbd+unix:///<volume>?socket=<path>` or `nbd://<addr>/<volume>`.
    pub uri: String,
    /// The socket path (Unix) or the bound address (TCP).
    pub endpoint: Endpoint,
}

impl std::fmt::Display for ExportInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "export of volume {} at {}, {}: {}",
            self.volume,
            self.point,
            if self.writable {
                "writable (writes go to an overlay thrown away when the export stops)"
            } else {
                "read-only"
            },
            self.uri
        )
    }
}

/// A running export; [`ExportHandle::wait`] for it after cancelling its token.
pub struct ExportHandle {
    info: ExportInfo,
    /// Every export of the listener, `info` first (a group's failover serves several).
    infos: Vec<ExportInfo>,
    token: CancellationToken,
    server: JoinHandle<()>,
    writers: Vec<JoinHandle<()>>,
    exports: Vec<Arc<PointExport>>,
    pin: Option<Arc<PinGuard>>,
}

/// What keeps an exported point from being trimmed.
#[derive(Clone)]
pub(crate) enum Hold {
    /// A reader's pin (`export`): renewed while the export runs, and it may be lost.
    Pin(Arc<PinGuard>),
    /// A failover row: it holds the point until the operator ends the failover.
    Failover,
}

impl Hold {
    fn is_held(&self) -> bool {
        match self {
            Hold::Pin(p) => p.is_held(),
            Hold::Failover => true,
        }
    }
}

/// An image to serve ([`serve_image`]).
pub(crate) struct Served {
    pub name: String,
    pub point: ChosenPoint,
    pub image: LazyImage,
    pub hold: Hold,
    pub overlay: Option<Arc<Overlay>>,
    /// FLUSH and FUA make the overlay's writes durable (a failover).
    pub durable: bool,
}

impl ExportHandle {
    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    /// Every export served on the listener (one, but for a group's failover).
    pub fn infos(&self) -> &[ExportInfo] {
        &self.infos
    }

    /// Cancelling it stops the export.
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Waits until the export has stopped (its token cancelled), then releases its pin and
    /// removes its socket; the overlay goes with the last reference to the export. `Err` when
    /// the pin was lost while serving (reads were refused from then on).
    pub async fn wait(mut self) -> Result<()> {
        let _ = (&mut self.server).await;
        // The server is done with the exports; dropping them closes the writers' channels.
        self.exports.clear();
        for w in self.writers.drain(..) {
            let _ = w.await;
        }
        if let Endpoint::Unix(path) = &self.info.endpoint
            && let Err(e) = std::fs::remove_file(path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(
                "could not remove the export's socket {}: {e}",
                path.display()
            );
        }
        let Some(pin) = self.pin.take() else {
            return Ok(());
        };
        match Arc::try_unwrap(pin) {
            Ok(pin) => {
                let held = pin.check_held().await;
                if let Err(e) = pin.release().await {
                    tracing::warn!("could not remove the export's pin (it expires by itself): {e}");
                }
                held
            }
            // A request future still runs (the server gave up waiting for it): the pin is
            // removed when it ends.
            Err(pin) => {
                let held = pin.check_held().await;
                drop(pin);
                held
            }
        }
    }
}

/// Starts an export of `volume` at `at` (see the module docs); `endpoint` `None` is the
/// default socket. Returns once it accepts connections.
pub async fn start(
    root: &Path,
    volume: &str,
    at: &PointSpec,
    endpoint: Option<Endpoint>,
    writable: bool,
) -> Result<ExportHandle> {
    let dir = DataDir::existing(root)?;
    let endpoint = endpoint.unwrap_or_else(|| Endpoint::Unix(default_socket(dir.root(), volume)));
    if let Endpoint::Unix(path) = &endpoint {
        clear_stale_socket(path)?;
    }
    let holder = match &endpoint {
        Endpoint::Unix(p) => format!("export on {}", p.display()),
        Endpoint::Tcp(a) => format!("export on {a}"),
    };
    let (point, pin) = pin_point(dir.root(), volume, at, &holder).await?;
    let (catalog, volume_id) = (pin.catalog().clone(), pin.volume_row().id);
    match serve(&dir, volume, point, pin, endpoint, writable).await {
        Ok(h) => {
            // Counted for /metrics (best effort: the export serves whether or not).
            if let Err(e) = catalog.count_reader(volume_id, "export", "started").await {
                tracing::debug!("could not count an export: {e}");
            }
            Ok(h)
        }
        Err((e, pin)) => {
            let _ = pin.release().await;
            Err(e)
        }
    }
}

/// Steps 3–4 of the module docs; on failure gives the pin back to be released.
async fn serve(
    dir: &DataDir,
    volume: &str,
    point: ChosenPoint,
    pin: PinGuard,
    endpoint: Endpoint,
    writable: bool,
) -> std::result::Result<ExportHandle, (ReplicaError, PinGuard)> {
    let image = match pin.lazy_image().await {
        Ok(i) => i,
        Err(e) => return Err((e, pin)),
    };
    let overlay = if writable {
        match Overlay::create(&dir.root().join("tmp"), image.size()) {
            Ok(o) => Some(Arc::new(o)),
            Err(e) => return Err((e, pin)),
        }
    } else {
        None
    };
    let listener = match bind(&endpoint).await {
        Ok(l) => l,
        Err(e) => return Err((e, pin)),
    };
    let pin = Arc::new(pin);
    let mut handle = serve_images(
        vec![Served {
            name: volume.to_owned(),
            point,
            image,
            hold: Hold::Pin(pin.clone()),
            overlay,
            durable: false,
        }],
        listener,
    );
    handle.pin = Some(pin);
    Ok(handle)
}

/// Serves `served` on `listener`, each image as an export named after its volume (steps 3–4
/// of the module docs, once the images are open). One image is also selected by the empty
/// name; several (a group's failover) only by their names.
pub(crate) fn serve_images(served: Vec<Served>, listener: Listener) -> ExportHandle {
    let token = CancellationToken::new();
    let mut writers = Vec::new();
    let mut exports = Vec::new();
    let mut named = Vec::new();
    for s in served {
        let writes = match &s.overlay {
            Some(o) => {
                let (tx, rx) = mpsc::unbounded_channel();
                writers.push(tokio::spawn(run_writer(
                    s.image.clone(),
                    o.clone(),
                    s.hold.clone(),
                    s.durable,
                    rx,
                )));
                Some(tx)
            }
            None => None,
        };
        let writable = s.overlay.is_some();
        let export = Arc::new(PointExport {
            image: s.image,
            hold: s.hold,
            overlay: s.overlay,
            writes,
        });
        exports.push(export.clone());
        named.push((s.name, s.point, writable, export));
    }
    let set = Arc::new(PointExports {
        exports: named
            .iter()
            .map(|(name, _, _, e)| (name.clone(), e.clone()))
            .collect(),
    });
    let t = token.clone();
    let (server, endpoint) = match listener {
        Listener::Unix(l, path) => {
            let server = tokio::spawn(cdp_shared::nbd::server::serve_unix(
                l,
                set,
                t,
                ServerLimits::default(),
            ));
            (server, Endpoint::Unix(path))
        }
        Listener::Tcp(l, local) => {
            let server = tokio::spawn(cdp_shared::nbd::server::serve_tcp(
                l,
                set,
                t,
                ServerLimits::default(),
            ));
            (server, Endpoint::Tcp(local))
        }
    };
    let infos: Vec<ExportInfo> = named
        .into_iter()
        .map(|(volume, point, writable, _)| ExportInfo {
            uri: endpoint.uri(&volume),
            volume,
            point,
            writable,
            endpoint: endpoint.clone(),
        })
        .collect();
    ExportHandle {
        info: infos[0].clone(),
        infos,
        token,
        server,
        writers,
        exports,
        pin: None,
    }
}

/// A bound listener of an export.
pub(crate) enum Listener {
    Unix(tokio::net::UnixListener, PathBuf),
    Tcp(tokio::net::TcpListener, SocketAddr),
}

pub(crate) async fn bind(endpoint: &Endpoint) -> Result<Listener> {
    match endpoint {
        Endpoint::Unix(path) => tokio::net::UnixListener::bind(path)
            .map(|l| Listener::Unix(l, path.clone()))
            .map_err(|e| ReplicaError::ExportSocket {
                path: path.clone(),
                reason: e.to_string(),
            }),
        Endpoint::Tcp(addr) => {
            let listen = |source| ReplicaError::Listen {
                addr: addr.to_string(),
                source,
            };
            let l = tokio::net::TcpListener::bind(addr).await.map_err(listen)?;
            let local = l.local_addr().map_err(listen)?;
            Ok(Listener::Tcp(l, local))
        }
    }
}

/// Removes a socket file no process listens on any more; refuses a live one or a path that
/// is not a socket.
pub(crate) fn clear_stale_socket(path: &Path) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(ReplicaError::io("check", path)(e)),
    };
    let refuse = |reason: &str| ReplicaError::ExportSocket {
        path: path.to_path_buf(),
        reason: reason.to_owned(),
    };
    if !meta.file_type().is_socket() {
        return Err(refuse("the path exists and is not a socket"));
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(refuse(
            "another export (or another program) is serving there (stop it first)",
        ));
    }
    std::fs::remove_file(path).map_err(ReplicaError::io("remove the stale socket", path))?;
    tracing::info!("removed the stale socket {}", path.display());
    Ok(())
}

/// The exports of an [`ExportHandle`], by volume name (the empty name selects the only one).
struct PointExports {
    exports: Vec<(String, Arc<PointExport>)>,
}

impl ExportSet for PointExports {
    type Export = PointExport;
    fn get(&self, name: &str) -> Option<Arc<PointExport>> {
        match (name, self.exports.as_slice()) {
            ("", [(_, only)]) => Some(only.clone()),
            _ => self
                .exports
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, e)| e.clone()),
        }
    }
    fn names(&self) -> Vec<String> {
        self.exports.iter().map(|(n, _)| n.clone()).collect()
    }
}

/// A write (or a flush) waiting for the export's writer task.
struct WriteOp {
    offset: u64,
    kind: WriteKind,
    /// Durable before the reply (FUA), where the export is durable.
    fua: bool,
    reply: oneshot::Sender<ExportResult<()>>,
}

enum WriteKind {
    Data(Vec<u8>),
    /// A zero-write or a trim: the range reads as zeros afterwards.
    Zero(u64),
    /// FLUSH: every write before it durable, where the export is durable.
    Flush,
}

/// The image at the pinned point, with its overlay when writable.
pub struct PointExport {
    image: LazyImage,
    hold: Hold,
    overlay: Option<Arc<Overlay>>,
    writes: Option<mpsc::UnboundedSender<WriteOp>>,
}

fn pin_lost(seq: Seq) -> ExportError {
    ExportError::Io(format!(
        "the export's pin on seq {seq} was lost (the process stalled past the pin's time to live), so the image can no longer be vouched for; restart the export"
    ))
}

fn export_error(what: &str, e: ReplicaError) -> ExportError {
    tracing::warn!("{what} failed: {e}");
    if e.is_disk_full() {
        ExportError::NoSpace
    } else {
        ExportError::Io(e.to_string())
    }
}

impl PointExport {
    fn submit(
        &self,
        offset: u64,
        kind: WriteKind,
        fua: bool,
    ) -> impl Future<Output = ExportResult<()>> + use<> {
        let (reply, rx) = oneshot::channel();
        let sent = match &self.writes {
            None => Err(ExportError::ReadOnly),
            Some(w) => w
                .send(WriteOp {
                    offset,
                    kind,
                    fua,
                    reply,
                })
                .map_err(|_| ExportError::Shutdown),
        };
        async move {
            sent?;
            rx.await.map_err(|_| ExportError::Shutdown)?
        }
    }
}

impl Export for PointExport {
    fn size(&self) -> u64 {
        self.image.size()
    }

    fn read_only(&self) -> bool {
        self.writes.is_none()
    }

    fn read(
        &self,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = ExportResult<Vec<u8>>> + Send + 'static {
        let image = self.image.clone();
        let overlay = self.overlay.clone();
        let hold = self.hold.clone();
        async move {
            if !hold.is_held() {
                return Err(pin_lost(image.seq()));
            }
            let data = merged_read(&image, overlay.as_ref(), offset, u64::from(len))
                .await
                .map_err(|e| export_error(&format!("a read of {len} bytes at {offset}"), e))?;
            // Trimmed under the read? Then what was read cannot be vouched for.
            if !hold.is_held() {
                return Err(pin_lost(image.seq()));
            }
            Ok(data)
        }
    }

    fn write(
        &self,
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    ) -> impl Future<Output = ExportResult<()>> + Send + 'static {
        self.submit(offset, WriteKind::Data(data), fua)
    }

    fn flush(&self) -> impl Future<Output = ExportResult<()>> + Send + 'static {
        // Read-only: nothing to flush. A throw-away overlay: the writer answers at once.
        let read_only = self.writes.is_none();
        let op = self.submit(0, WriteKind::Flush, false);
        async move {
            if read_only {
                return Ok(());
            }
            op.await
        }
    }

    fn trim(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
    ) -> impl Future<Output = ExportResult<()>> + Send + 'static {
        self.submit(offset, WriteKind::Zero(u64::from(len)), fua)
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
    ) -> impl Future<Output = ExportResult<()>> + Send + 'static {
        self.submit(offset, WriteKind::Zero(u64::from(len)), fua)
    }
}

/// The bytes `[offset, offset + len)`: the overlay's blocks over the image.
async fn merged_read(
    image: &LazyImage,
    overlay: Option<&Arc<Overlay>>,
    offset: u64,
    len: u64,
) -> Result<Vec<u8>> {
    let held = overlay
        .map(|o| o.held_ranges(offset, len))
        .unwrap_or_default();
    let all_held = held.len() == 1 && held[0] == (offset, len);
    let mut buf = if all_held {
        vec![0u8; len as usize]
    } else {
        image.read(offset, len).await?
    };
    if let Some(o) = overlay
        && !held.is_empty()
    {
        let o = o.clone();
        buf = tokio::task::spawn_blocking(move || {
            for (from, n) in held {
                let at = (from - offset) as usize;
                o.read_at(from, &mut buf[at..at + n as usize])?;
            }
            Ok::<_, ReplicaError>(buf)
        })
        .await??;
    }
    Ok(buf)
}

/// Applies the export's writes to its overlay one at a time, in admission order, until the
/// export is dropped; with `durable`, a FLUSH (or a write with FUA) makes them durable before
/// it is answered.
async fn run_writer(
    image: LazyImage,
    overlay: Arc<Overlay>,
    hold: Hold,
    durable: bool,
    mut ops: mpsc::UnboundedReceiver<WriteOp>,
) {
    while let Some(op) = ops.recv().await {
        let sync = durable && (op.fua || matches!(op.kind, WriteKind::Flush));
        let result = if !hold.is_held() {
            Err(pin_lost(image.seq()))
        } else {
            let what = match &op.kind {
                WriteKind::Data(d) => format!("a write of {} bytes at {}", d.len(), op.offset),
                WriteKind::Zero(n) => format!("a zero-write of {n} bytes at {}", op.offset),
                WriteKind::Flush => "a flush".to_owned(),
            };
            let applied = match op.kind {
                WriteKind::Flush => Ok(()),
                kind => apply(&image, &overlay, op.offset, kind).await,
            };
            let synced = match applied {
                Ok(()) if sync => {
                    let o = overlay.clone();
                    tokio::task::spawn_blocking(move || o.sync())
                        .await
                        .map_err(ReplicaError::from)
                        .and_then(|r| r)
                }
                other => other,
            };
            synced.map_err(|e| export_error(&what, e))
        };
        let _ = op.reply.send(result);
    }
}

/// One write: partial blocks at the edges are completed from the merged image, whole blocks
/// are written (data) or punched (zeros) into the overlay.
async fn apply(
    image: &LazyImage,
    overlay: &Arc<Overlay>,
    offset: u64,
    kind: WriteKind,
) -> Result<()> {
    let size = overlay.size();
    let len = match &kind {
        WriteKind::Data(d) => d.len() as u64,
        WriteKind::Zero(n) => *n,
        WriteKind::Flush => 0,
    };
    if len == 0 {
        return Ok(());
    }
    let (first, end_block) = block_span(offset, len);
    let start = first * OVERLAY_BLOCK_BYTES;
    let end = (end_block * OVERLAY_BLOCK_BYTES).min(size);
    match kind {
        WriteKind::Data(data) => {
            let buf = if start == offset && end == offset + len {
                data
            } else {
                let mut buf = vec![0u8; (end - start) as usize];
                fill_edges(image, overlay, start, end, offset, len, &mut buf).await?;
                let at = (offset - start) as usize;
                buf[at..at + data.len()].copy_from_slice(&data);
                buf
            };
            let o = overlay.clone();
            tokio::task::spawn_blocking(move || o.write_blocks(start, &buf)).await?
        }
        WriteKind::Flush => Ok(()),
        WriteKind::Zero(_) => {
            // Whole blocks inside the range are punched; partial edge blocks are rewritten.
            let inner_start = offset.div_ceil(OVERLAY_BLOCK_BYTES) * OVERLAY_BLOCK_BYTES;
            let inner_end = if offset + len == size {
                size
            } else {
                (offset + len) / OVERLAY_BLOCK_BYTES * OVERLAY_BLOCK_BYTES
            };
            if inner_start < inner_end {
                let o = overlay.clone();
                tokio::task::spawn_blocking(move || {
                    o.zero_blocks(inner_start, inner_end - inner_start)
                })
                .await??;
            }
            let mut edges = Vec::new();
            if inner_start >= inner_end {
                edges.push((offset, len));
            } else {
                if offset < inner_start {
                    edges.push((offset, inner_start - offset));
                }
                if inner_end < offset + len {
                    edges.push((inner_end, offset + len - inner_end));
                }
            }
            for (o, n) in edges {
                Box::pin(apply(
                    image,
                    overlay,
                    o,
                    WriteKind::Data(vec![0u8; n as usize]),
                ))
                .await?;
            }
            Ok(())
        }
    }
}

/// Fills the first and last blocks of `[start, end)` (the ones the write `[offset, offset +
/// len)` covers only in part) with the merged image's bytes.
async fn fill_edges(
    image: &LazyImage,
    overlay: &Arc<Overlay>,
    start: u64,
    end: u64,
    offset: u64,
    len: u64,
    buf: &mut [u8],
) -> Result<()> {
    let last_start = (end - 1) / OVERLAY_BLOCK_BYTES * OVERLAY_BLOCK_BYTES;
    let mut edges = Vec::new();
    if offset > start {
        edges.push((start, (start + OVERLAY_BLOCK_BYTES).min(end)));
    }
    if offset + len < end && (edges.is_empty() || last_start > start) {
        edges.push((last_start, end));
    }
    for (from, to) in edges {
        let bytes = merged_read(image, Some(overlay), from, to - from).await?;
        let at = (from - start) as usize;
        buf[at..at + bytes.len()].copy_from_slice(&bytes);
    }
    Ok(())
}
