//! The tokio shell of the NBD server: it moves bytes between a socket and the sans-IO codec
//! in [`super::proto`], and between the codec and an [`Export`].
//!
//! One connection is a fixed-newstyle handshake followed by the transmission phase. In
//! transmission, one loop reads requests in arrival order (a WRITE's payload in full), checks
//! each with [`proto::check_request`], *calls* the export method right there, in that order
//! (the admission contract documented on [`Export`]), and spawns the returned future; each
//! finished request sends its simple reply to one writer, in completion order. A semaphore
//! taken before the export call bounds the requests in flight, and a second one bounds the
//! READ/WRITE payload bytes they hold. On `NBD_CMD_DISC`, end of stream or shutdown the loop
//! stops reading, every request in flight finishes and its reply is written, then the
//! connection closes. Errors of one connection never affect another.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::proto::{self, Command, ExportInfo, Negotiation};
use super::{Export, ExportError, ExportResult, ExportSet};
use crate::types::NBD_REQUEST_BYTES_MAX;

/// Requests admitted (export method called) and not yet answered, per connection.
pub const REQUESTS_IN_FLIGHT_MAX: usize = 64;
/// READ and WRITE payload bytes held by the requests in flight, per connection.
pub const REQUEST_BYTES_IN_FLIGHT_MAX: u32 = 256 << 20;
/// Longest refused WRITE payload (too long, past the end, read-only) that is read and
/// dropped to keep the stream in step; a longer one closes the connection.
pub const WRITE_DISCARD_BYTES_MAX: u32 = 128 << 20;
/// Options one connection may send before it is deemed abusive and closed.
pub const OPTIONS_PER_CONNECTION_MAX: u32 = 4096;
/// How long the listener helpers wait, after shutdown, for open connections to drain.
pub const SHUTDOWN_DRAIN_MS_MAX: u64 = 10_000;
/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again.
const ACCEPT_ERROR_BACKOFF_MS: u64 = 100;
/// Buffer of the request reader and of the reply writer.
const STREAM_BUFFER_BYTES: usize = 64 << 10;

const _: () = assert!(REQUEST_BYTES_IN_FLIGHT_MAX >= NBD_REQUEST_BYTES_MAX);
const _: () = assert!(WRITE_DISCARD_BYTES_MAX >= NBD_REQUEST_BYTES_MAX);
const _: () = assert!(REQUEST_BYTES_IN_FLIGHT_MAX as usize <= Semaphore::MAX_PERMITS);
const _: () = assert!(REQUESTS_IN_FLIGHT_MAX > 0);

/// Why a connection ended other than by the client's DISC, ABORT or end of stream.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("connection I/O failed: {0}")]
    Io(#[from] io::Error),
    #[error("client broke the protocol: {0}")]
    Protocol(#[from] proto::ProtoError),
    #[error("client sent more than {max} options during the handshake")]
    TooManyOptions { max: u32 },
    #[error(
        "client sent a refused {length}-byte WRITE, more than the {max} bytes the server skips"
    )]
    WritePayloadTooLarge { length: u32, max: u32 },
}

/// Serves one connection until the client disconnects. See [`serve_connection_until`].
pub async fn serve_connection<S: ExportSet, IO: AsyncRead + AsyncWrite + Send + Unpin + 'static>(
    io: IO,
    exports: Arc<S>,
) -> Result<(), ServerError> {
    serve_connection_until(io, exports, CancellationToken::new()).await
}

/// Serves one connection: handshake, then transmission, until the client sends DISC or
/// ABORT or closes the stream (all `Ok`), the client breaks the protocol or I/O fails (`Err`),
/// or `shutdown` is cancelled. On shutdown a connection still in the handshake is closed at
/// once; one in transmission stops reading requests, lets every admitted request finish and
/// writes its reply, then closes (`Ok`).
///
/// Dropping the returned future closes the connection without waiting; export futures
/// already spawned still run to completion.
pub async fn serve_connection_until<
    S: ExportSet,
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
>(
    mut io: IO,
    exports: Arc<S>,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    let export = tokio::select! {
        export = handshake(&mut io, &*exports) => export?,
        () = shutdown.cancelled() => return Ok(()),
    };
    match export {
        Some(export) => transmission(io, export, &shutdown).await,
        None => Ok(()),
    }
}

/// Runs option haggling; `None` when the client aborted.
async fn handshake<S: ExportSet, IO: AsyncRead + AsyncWrite + Unpin>(
    io: &mut IO,
    exports: &S,
) -> Result<Option<Arc<S::Export>>, ServerError> {
    let mut out = Vec::with_capacity(proto::GREETING_BYTES);
    proto::encode_greeting(&mut out);
    io.write_all(&out).await?;
    io.flush().await?;

    let mut flags = [0u8; proto::CLIENT_FLAGS_BYTES];
    io.read_exact(&mut flags).await?;
    let client = proto::parse_client_flags(&flags)?;

    let mut header = [0u8; proto::OPTION_HEADER_BYTES];
    let mut payload = Vec::new();
    for _ in 0..OPTIONS_PER_CONNECTION_MAX {
        io.read_exact(&mut header).await?;
        let header = proto::parse_option_header(&header)?;
        // Bounded by OPTION_PAYLOAD_BYTES_MAX in parse_option_header.
        payload.clear();
        payload.resize(header.length as usize, 0);
        io.read_exact(&mut payload).await?;

        out.clear();
        let lookup = |name: &str| {
            exports.get(name).map(|export| {
                let info = ExportInfo {
                    size: export.size(),
                    read_only: export.read_only(),
                };
                (export, info)
            })
        };
        let negotiation = proto::handle_option(
            header.option,
            &payload,
            client,
            lookup,
            || exports.names(),
            &mut out,
        )?;
        match negotiation {
            Negotiation::Continue => {
                io.write_all(&out).await?;
                io.flush().await?;
            }
            Negotiation::Abort => {
                // The client may close without waiting for the ACK; that is not an error.
                if io.write_all(&out).await.is_ok() {
                    let _ = io.flush().await;
                }
                return Ok(None);
            }
            Negotiation::Transmission(export, _) => {
                io.write_all(&out).await?;
                io.flush().await?;
                return Ok(Some(export));
            }
        }
    }
    Err(ServerError::TooManyOptions {
        max: OPTIONS_PER_CONNECTION_MAX,
    })
}

/// One simple reply on its way to the writer. The permits it carries are released once it
/// has been written, so the in-flight bounds cover replies waiting for the socket too.
struct Reply {
    handle: u64,
    error: u32,
    /// Payload of a successful READ; empty otherwise.
    data: Vec<u8>,
    _slot: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

/// Where the answer to one admitted request goes.
struct ReplyTo {
    tx: mpsc::Sender<Reply>,
    handle: u64,
    slot: OwnedSemaphorePermit,
    bytes: Option<OwnedSemaphorePermit>,
}

impl ReplyTo {
    async fn send(self, result: ExportResult<Vec<u8>>) {
        let (error, data) = match result {
            Ok(data) => (0, data),
            Err(e) => {
                tracing::debug!(handle = self.handle, error = %e, "NBD request failed");
                (e.nbd_errno(), Vec::new())
            }
        };
        let reply = Reply {
            handle: self.handle,
            error,
            data,
            _slot: self.slot,
            _bytes: self.bytes,
        };
        // Fails only when the writer has stopped because the connection broke; the reply
        // then has nowhere to go, and dropping it releases its permits.
        let _ = self.tx.send(reply).await;
    }

    /// Answers right away, without calling the export.
    async fn refuse(self, error: &proto::RequestError) {
        tracing::debug!(handle = self.handle, %error, "NBD request refused");
        let reply = Reply {
            handle: self.handle,
            error: error.nbd_errno(),
            data: Vec::new(),
            _slot: self.slot,
            _bytes: None,
        };
        let _ = self.tx.send(reply).await;
    }

    /// Awaits an admitted export operation in its own task and sends its reply. The operation
    /// runs in a task of its own so that a panic in it still gets an EIO reply instead of
    /// leaving the client waiting.
    fn spawn<F>(self, operation: F)
    where
        F: Future<Output = ExportResult<Vec<u8>>> + Send + 'static,
    {
        tokio::spawn(async move {
            let result = match tokio::spawn(operation).await {
                Ok(result) => result,
                Err(e) => Err(ExportError::Io(format!("export operation failed: {e}"))),
            };
            self.send(result).await;
        });
    }
}

async fn transmission<E: Export, IO: AsyncRead + AsyncWrite + Send + Unpin + 'static>(
    io: IO,
    export: Arc<E>,
    shutdown: &CancellationToken,
) -> Result<(), ServerError> {
    let (read_half, write_half) = tokio::io::split(io);
    let (tx, rx) = mpsc::channel(REQUESTS_IN_FLIGHT_MAX);
    let writer_failed = CancellationToken::new();
    let reader = BufReader::with_capacity(STREAM_BUFFER_BYTES, read_half);
    let writer = BufWriter::with_capacity(STREAM_BUFFER_BYTES, write_half);
    let (read_result, write_result) = tokio::join!(
        read_requests(reader, export, tx, shutdown, &writer_failed),
        write_replies(writer, rx, &writer_failed),
    );
    read_result?;
    write_result
}

/// Reads 28 header bytes; `false` on a clean end of stream before the first byte.
async fn read_request_header<R: AsyncRead + Unpin>(
    reader: &mut R,
    header: &mut [u8; proto::REQUEST_HEADER_BYTES],
) -> io::Result<bool> {
    let n = reader.read(header).await?;
    if n == 0 {
        return Ok(false);
    }
    reader.read_exact(&mut header[n..]).await?;
    Ok(true)
}

/// Reads and drops a refused WRITE's payload, without allocating it.
async fn skip_payload<R: AsyncRead + Unpin>(
    reader: &mut R,
    length: u32,
) -> Result<(), ServerError> {
    if length > WRITE_DISCARD_BYTES_MAX {
        return Err(ServerError::WritePayloadTooLarge {
            length,
            max: WRITE_DISCARD_BYTES_MAX,
        });
    }
    let skipped =
        tokio::io::copy(&mut reader.take(u64::from(length)), &mut tokio::io::sink()).await?;
    if skipped < u64::from(length) {
        return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
    }
    Ok(())
}

/// Awaits every piece of a split TRIM or WRITE_ZEROES, all of them even after a failure,
/// and reports the first error.
async fn all_pieces<F: Future<Output = ExportResult<()>>>(pieces: Vec<F>) -> ExportResult<Vec<u8>> {
    let mut first_error = None;
    for piece in pieces {
        if let Err(e) = piece.await {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(Vec::new()), Err)
}

/// The request loop. Returns on DISC, end of stream, shutdown or a failed writer; dropping
/// its sender lets the writer finish once every spawned request has replied.
async fn read_requests<E: Export, R: AsyncRead + Unpin>(
    mut reader: R,
    export: Arc<E>,
    tx: mpsc::Sender<Reply>,
    shutdown: &CancellationToken,
    writer_failed: &CancellationToken,
) -> Result<(), ServerError> {
    let slots = Arc::new(Semaphore::new(REQUESTS_IN_FLIGHT_MAX));
    let payload_bytes = Arc::new(Semaphore::new(REQUEST_BYTES_IN_FLIGHT_MAX as usize));
    let mut header = [0u8; proto::REQUEST_HEADER_BYTES];
    loop {
        let got = tokio::select! {
            biased;
            () = shutdown.cancelled() => return Ok(()),
            () = writer_failed.cancelled() => return Ok(()),
            got = read_request_header(&mut reader, &mut header) => got?,
        };
        if !got {
            return Ok(());
        }
        let request = proto::parse_request(&header)?;
        if request.command == Command::Disc {
            return Ok(());
        }
        // The semaphores are never closed; an error cannot happen, and would end the loop.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return Ok(());
        };
        let mut reply_to = ReplyTo {
            tx: tx.clone(),
            handle: request.handle,
            slot,
            bytes: None,
        };

        let checked = proto::check_request(
            &request,
            export.size(),
            export.read_only(),
            NBD_REQUEST_BYTES_MAX,
        );
        if let Err(error) = checked {
            if request.command == Command::Write {
                skip_payload(&mut reader, request.length).await?;
            }
            reply_to.refuse(&error).await;
            continue;
        }

        let (offset, length, fua) = (request.offset, request.length, request.fua());
        match request.command {
            Command::Read | Command::Write if length == 0 => reply_to.send(Ok(Vec::new())).await,
            Command::Read => {
                let Ok(bytes) = payload_bytes.clone().acquire_many_owned(length).await else {
                    return Ok(());
                };
                reply_to.bytes = Some(bytes);
                let read = export.read(offset, length);
                reply_to.spawn(async move {
                    let data = read.await?;
                    if data.len() != length as usize {
                        return Err(ExportError::Io(format!(
                            "export returned {} bytes for a {length}-byte read",
                            data.len()
                        )));
                    }
                    Ok(data)
                });
            }
            Command::Write => {
                let Ok(bytes) = payload_bytes.clone().acquire_many_owned(length).await else {
                    return Ok(());
                };
                reply_to.bytes = Some(bytes);
                // Bounded by NBD_REQUEST_BYTES_MAX in check_request.
                let mut data = vec![0u8; length as usize];
                reader.read_exact(&mut data).await?;
                let write = export.write(offset, data, fua);
                reply_to.spawn(async move { write.await.map(|()| Vec::new()) });
            }
            Command::Flush => {
                let flush = export.flush();
                reply_to.spawn(async move { flush.await.map(|()| Vec::new()) });
            }
            Command::Trim => {
                let pieces: Vec<_> = proto::split_range(offset, length, NBD_REQUEST_BYTES_MAX)
                    .map(|(at, len)| export.trim(at, len, fua))
                    .collect();
                reply_to.spawn(all_pieces(pieces));
            }
            Command::WriteZeroes => {
                let pieces: Vec<_> = proto::split_range(offset, length, NBD_REQUEST_BYTES_MAX)
                    .map(|(at, len)| export.write_zeroes(at, len, fua))
                    .collect();
                reply_to.spawn(all_pieces(pieces));
            }
            // Refused by check_request, or handled above.
            Command::Disc | Command::Other(_) => {}
        }
    }
}

/// The single writer: sends replies in the order they arrive, flushing whenever none is
/// waiting. Ends when every sender is gone (all requests answered) or the socket fails.
async fn write_replies<W: AsyncWrite + Unpin>(
    mut writer: BufWriter<W>,
    mut rx: mpsc::Receiver<Reply>,
    failed: &CancellationToken,
) -> Result<(), ServerError> {
    let result: io::Result<()> = async {
        loop {
            let reply = match rx.try_recv() {
                Ok(reply) => reply,
                Err(TryRecvError::Disconnected) => break,
                Err(TryRecvError::Empty) => {
                    writer.flush().await?;
                    match rx.recv().await {
                        Some(reply) => reply,
                        None => break,
                    }
                }
            };
            writer
                .write_all(&proto::encode_simple_reply(reply.handle, reply.error))
                .await?;
            if !reply.data.is_empty() {
                writer.write_all(&reply.data).await?;
            }
        }
        writer.flush().await?;
        // The client may already be gone after DISC; a failed shutdown loses nothing.
        let _ = writer.shutdown().await;
        Ok(())
    }
    .await;
    if result.is_err() {
        failed.cancel();
    }
    result.map_err(ServerError::from)
}

/// A bound listener the accept loop can serve.
trait Listener: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Send + Unpin + 'static;
    /// Accepts one connection and names its peer for logs.
    fn accept_named(&self) -> impl Future<Output = io::Result<(Self::Io, String)>> + Send;
}

impl Listener for UnixListener {
    type Io = UnixStream;
    async fn accept_named(&self) -> io::Result<(UnixStream, String)> {
        let (stream, _) = self.accept().await?;
        let peer = match stream.peer_cred().ok().and_then(|cred| cred.pid()) {
            Some(pid) => format!("unix peer pid {pid}"),
            None => "unix peer".to_owned(),
        };
        Ok((stream, peer))
    }
}

impl Listener for TcpListener {
    type Io = TcpStream;
    async fn accept_named(&self) -> io::Result<(TcpStream, String)> {
        let (stream, addr) = self.accept().await?;
        // The specification asks both sides to disable Nagle's algorithm.
        let _ = stream.set_nodelay(true);
        Ok((stream, addr.to_string()))
    }
}

/// Serves NBD on an already-bound Unix socket, each connection in its own task, until
/// `shutdown` is cancelled. See [`serve_tcp`] for what shutdown does.
pub async fn serve_unix<S: ExportSet>(
    listener: UnixListener,
    exports: Arc<S>,
    shutdown: CancellationToken,
) {
    serve_listener(listener, exports, shutdown).await;
}

/// Serves NBD on an already-bound TCP socket, each connection in its own task, until
/// `shutdown` is cancelled. A failed connection is logged (one `warn` line naming the peer)
/// and affects no other.
///
/// On shutdown the listener stops accepting and is closed. Open connections are told through
/// the same token: one still in the handshake closes at once; one in transmission stops
/// reading requests, finishes every request already admitted and writes its reply, then
/// closes. This function returns when all connections have closed, or after
/// [`SHUTDOWN_DRAIN_MS_MAX`], when the remaining ones (clients that stopped reading replies)
/// are dropped. Export futures already spawned always run to completion.
pub async fn serve_tcp<S: ExportSet>(
    listener: TcpListener,
    exports: Arc<S>,
    shutdown: CancellationToken,
) {
    serve_listener(listener, exports, shutdown).await;
}

async fn serve_listener<L: Listener, S: ExportSet>(
    listener: L,
    exports: Arc<S>,
    shutdown: CancellationToken,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept_named() => match accepted {
                Ok((io, peer)) => {
                    let exports = exports.clone();
                    let shutdown = shutdown.clone();
                    connections.spawn(async move {
                        if let Err(error) = serve_connection_until(io, exports, shutdown).await {
                            tracing::warn!(peer = %peer, %error, "NBD connection closed on error");
                        }
                    });
                }
                Err(error) => {
                    tracing::warn!(%error, "accepting an NBD connection failed");
                    tokio::time::sleep(Duration::from_millis(ACCEPT_ERROR_BACKOFF_MS)).await;
                }
            },
            Some(joined) = connections.join_next(), if !connections.is_empty() => {
                if let Err(error) = joined {
                    tracing::warn!(%error, "NBD connection task failed");
                }
            }
        }
    }
    drop(listener);
    let drained = tokio::time::timeout(Duration::from_millis(SHUTDOWN_DRAIN_MS_MAX), async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = connections.len(),
            "NBD connections did not drain in time; closing them"
        );
        connections.shutdown().await;
    }
}
