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
//!
//! The listener helpers bound what clients can hold ([`ServerLimits`]): at most
//! `connections_max` connections at once, handshake and transmission alike, and a handshake
//! must reach transmission within `handshake_timeout` or the connection is closed. A
//! connection in transmission is never timed out, however long it stays idle (a kernel
//! nbd-client keeps one open for days). A connection over the limit is refused at once: it is
//! answered in the handshake with `NBD_REP_ERR_POLICY` and the text "too many connections"
//! for at most [`REFUSAL_TIMEOUT`] ([`REFUSALS_IN_FLIGHT_MAX`] such at once), or closed
//! without a word when that many are already being refused. So the server never holds more
//! than [`ServerLimits::descriptors_max`] descriptors, whatever its clients do. Refusals,
//! handshake timeouts and failed accepts are logged at most once per second each, with a
//! count.

use std::future::Future;
use std::io;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

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
/// Connections one listener serves at once unless told otherwise.
pub const CONNECTIONS_MAX_DEFAULT: usize = 256;
/// How long a connection may take from its accept to the transmission phase unless told
/// otherwise.
pub const HANDSHAKE_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);
/// Connections over the limit that are told why in the handshake at once; one more is closed
/// without a word.
pub const REFUSALS_IN_FLIGHT_MAX: usize = 8;
/// How long a refused connection is kept to tell its client why.
pub const REFUSAL_TIMEOUT: Duration = Duration::from_millis(500);
/// Options a refused connection may send, each answered with the refusal, before it is closed.
const REFUSAL_OPTIONS_MAX: u32 = 8;
/// At most one log line per interval about refused connections, about handshake timeouts and
/// about failed accepts, each line with the count since the previous one.
const LOG_INTERVAL: Duration = Duration::from_secs(1);
/// Buffer of the request reader and of the reply writer.
const STREAM_BUFFER_BYTES: usize = 64 << 10;

const _: () = assert!(REQUEST_BYTES_IN_FLIGHT_MAX >= NBD_REQUEST_BYTES_MAX);
const _: () = assert!(WRITE_DISCARD_BYTES_MAX >= NBD_REQUEST_BYTES_MAX);
const _: () = assert!(REQUEST_BYTES_IN_FLIGHT_MAX as usize <= Semaphore::MAX_PERMITS);
const _: () = assert!(REQUESTS_IN_FLIGHT_MAX > 0);
const _: () = assert!(REFUSAL_TIMEOUT.as_millis() < HANDSHAKE_TIMEOUT_DEFAULT.as_millis());
const _: () = assert!(REFUSAL_TIMEOUT.as_millis() <= 1000);
const _: () = assert!(REFUSALS_IN_FLIGHT_MAX <= CONNECTIONS_MAX_DEFAULT);

/// What a listener lets its clients hold. See the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerLimits {
    /// Connections served at once, in the handshake or in transmission; one more is refused.
    pub connections_max: usize,
    /// A connection that has not entered transmission this long after its accept is closed.
    pub handshake_timeout: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            connections_max: CONNECTIONS_MAX_DEFAULT,
            handshake_timeout: HANDSHAKE_TIMEOUT_DEFAULT,
        }
    }
}

impl ServerLimits {
    /// File descriptors the server holds at most: the listener, the connections it serves,
    /// the refusals in flight and one just accepted to be closed.
    pub fn descriptors_max(&self) -> usize {
        1 + self.connections_max + REFUSALS_IN_FLIGHT_MAX + 1
    }
}

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
    #[error("client did not finish the handshake within {after:?}")]
    HandshakeTimeout { after: Duration },
}

/// Serves one connection until the client disconnects, with the default handshake deadline.
/// See [`serve_connection_until`].
pub async fn serve_connection<S: ExportSet, IO: AsyncRead + AsyncWrite + Send + Unpin + 'static>(
    io: IO,
    exports: Arc<S>,
) -> Result<(), ServerError> {
    serve_connection_until(
        io,
        exports,
        CancellationToken::new(),
        HANDSHAKE_TIMEOUT_DEFAULT,
    )
    .await
}

/// Serves one connection: handshake, then transmission, until the client sends DISC or
/// ABORT or closes the stream (all `Ok`), the client breaks the protocol or I/O fails (`Err`),
/// the handshake has not reached transmission within `handshake_timeout`
/// ([`ServerError::HandshakeTimeout`]), or `shutdown` is cancelled. On shutdown a connection
/// still in the handshake is closed at once; one in transmission stops reading requests, lets
/// every admitted request finish and writes its reply, then closes (`Ok`). Transmission has
/// no deadline: an idle client keeps its connection.
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
    handshake_timeout: Duration,
) -> Result<(), ServerError> {
    let export = tokio::select! {
        export = tokio::time::timeout(handshake_timeout, handshake(&mut io, &*exports)) => {
            export.map_err(|_| ServerError::HandshakeTimeout { after: handshake_timeout })??
        }
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

/// Tells the client of a connection over the limit why it is not served: the greeting, then
/// [`proto::refuse_option`] for each option, until the client gives up or
/// [`REFUSAL_OPTIONS_MAX`] options. The caller bounds its time.
async fn refuse<IO: AsyncRead + AsyncWrite + Unpin>(
    io: &mut IO,
    message: &str,
) -> Result<(), ServerError> {
    let mut out = Vec::with_capacity(proto::GREETING_BYTES);
    proto::encode_greeting(&mut out);
    io.write_all(&out).await?;
    io.flush().await?;

    let mut flags = [0u8; proto::CLIENT_FLAGS_BYTES];
    io.read_exact(&mut flags).await?;
    proto::parse_client_flags(&flags)?;
    let mut header = [0u8; proto::OPTION_HEADER_BYTES];
    for _ in 0..REFUSAL_OPTIONS_MAX {
        io.read_exact(&mut header).await?;
        let header = proto::parse_option_header(&header)?;
        // Bounded by OPTION_PAYLOAD_BYTES_MAX in parse_option_header; skipped unread.
        let length = u64::from(header.length);
        let skipped = tokio::io::copy(&mut (&mut *io).take(length), &mut tokio::io::sink()).await?;
        if skipped < length {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
        }
        out.clear();
        let refusal = proto::refuse_option(header.option, message, &mut out);
        if !out.is_empty() {
            io.write_all(&out).await?;
            io.flush().await?;
        }
        if refusal == proto::Refusal::Close {
            break;
        }
    }
    Ok(())
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
        let (error, data) = reply_parts(self.handle, result);
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

    /// Runs an admitted export operation and sends its reply. The operation is polled once
    /// right here: one that is done at once (a read served from the page cache) is answered
    /// without a task. Otherwise it goes on in a task of its own. Either way a panic in it gets
    /// an EIO reply instead of leaving the client waiting.
    fn spawn<F>(self, operation: F)
    where
        F: Future<Output = ExportResult<Vec<u8>>> + Send + 'static,
    {
        let mut operation: BoxedOperation = Box::pin(operation);
        let mut cx = Context::from_waker(Waker::noop());
        match poll_guarded(&mut operation, &mut cx) {
            Poll::Ready(result) => self.send_now(result),
            Poll::Pending => {
                tokio::spawn(async move {
                    let result = std::future::poll_fn(|cx| poll_guarded(&mut operation, cx)).await;
                    self.send(result).await;
                });
            }
        }
    }

    /// Sends the reply without waiting: the channel holds as many replies as there are slots,
    /// and this reply holds one, so there is room. Should the channel be full all the same,
    /// the reply is sent from a task.
    fn send_now(self, result: ExportResult<Vec<u8>>) {
        let tx = self.tx.clone();
        let (handle, slot, bytes) = (self.handle, self.slot, self.bytes);
        let (error, data) = reply_parts(handle, result);
        let reply = Reply {
            handle,
            error,
            data,
            _slot: slot,
            _bytes: bytes,
        };
        match tx.try_send(reply) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(reply)) => {
                tokio::spawn(async move {
                    let _ = tx.send(reply).await;
                });
            }
            // The writer has stopped because the connection broke: dropping the reply
            // releases its permits.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

/// An admitted export operation, boxed so that it can be polled in place and then moved into
/// a task if it is not done.
type BoxedOperation = std::pin::Pin<Box<dyn Future<Output = ExportResult<Vec<u8>>> + Send>>;

/// Polls an operation, turning a panic into an I/O error. After a panic (or `Ready`) the
/// operation is not polled again.
fn poll_guarded(
    operation: &mut BoxedOperation,
    cx: &mut Context<'_>,
) -> Poll<ExportResult<Vec<u8>>> {
    match std::panic::catch_unwind(AssertUnwindSafe(|| operation.as_mut().poll(cx))) {
        Ok(poll) => poll,
        Err(_) => Poll::Ready(Err(ExportError::Io(
            "export operation failed: it panicked".to_owned(),
        ))),
    }
}

/// The error code and payload of a reply to `result`.
fn reply_parts(handle: u64, result: ExportResult<Vec<u8>>) -> (u32, Vec<u8>) {
    match result {
        Ok(data) => (0, data),
        Err(e) => {
            tracing::debug!(handle, error = %e, "NBD request failed");
            (e.nbd_errno(), Vec::new())
        }
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

/// Serves NBD on an already-bound Unix socket, each connection in its own task, within
/// `limits`, until `shutdown` is cancelled. See [`serve_tcp`] for what shutdown does.
pub async fn serve_unix<S: ExportSet>(
    listener: UnixListener,
    exports: Arc<S>,
    shutdown: CancellationToken,
    limits: ServerLimits,
) {
    serve_listener(listener, exports, shutdown, limits).await;
}

/// Serves NBD on an already-bound TCP socket, each connection in its own task, within
/// `limits` (see the module docs), until `shutdown` is cancelled. A failed connection is
/// logged (one `warn` line naming the peer) and affects no other.
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
    limits: ServerLimits,
) {
    serve_listener(listener, exports, shutdown, limits).await;
}

/// Says when to write a log line about a repeated event: at the first one, then at most once
/// per interval, each line with the number of events since the previous line. Sans-IO: the
/// caller passes the time, and asks again at [`LogThrottle::next_line_at`] for the count of
/// events left unreported.
#[derive(Debug)]
struct LogThrottle {
    interval: Duration,
    last_line: Option<Instant>,
    unreported: u64,
}

impl LogThrottle {
    fn new(interval: Duration) -> Self {
        LogThrottle {
            interval,
            last_line: None,
            unreported: 0,
        }
    }

    /// Counts one event; `Some(count)` when a line is due now.
    fn handle_event(&mut self, now: Instant) -> Option<u64> {
        self.unreported += 1;
        self.poll_line(now)
    }

    /// `Some(count)` of the events not reported yet when a line is due at `now`.
    fn poll_line(&mut self, now: Instant) -> Option<u64> {
        if self.unreported == 0 {
            return None;
        }
        if let Some(last) = self.last_line
            && now < last + self.interval
        {
            return None;
        }
        self.last_line = Some(now);
        Some(std::mem::take(&mut self.unreported))
    }

    /// When the events not reported yet are due, if there are any.
    fn next_line_at(&self) -> Option<Instant> {
        if self.unreported == 0 {
            return None;
        }
        Some(
            self.last_line
                .map_or_else(Instant::now, |last| last + self.interval),
        )
    }
}

/// The rate-limited log lines of one listener, and the peer each last one was about.
struct ListenerLog {
    refused: LogThrottle,
    refused_peer: String,
    timed_out: LogThrottle,
    timed_out_peer: String,
    accept_failed: LogThrottle,
    accept_error: String,
    limits: ServerLimits,
}

impl ListenerLog {
    fn new(limits: ServerLimits) -> Self {
        ListenerLog {
            refused: LogThrottle::new(LOG_INTERVAL),
            refused_peer: String::new(),
            timed_out: LogThrottle::new(LOG_INTERVAL),
            timed_out_peer: String::new(),
            accept_failed: LogThrottle::new(LOG_INTERVAL),
            accept_error: String::new(),
            limits,
        }
    }

    fn refused(&mut self, now: Instant, peer: String) {
        self.refused_peer = peer;
        if let Some(count) = self.refused.handle_event(now) {
            self.write_refused(count);
        }
    }

    fn timed_out(&mut self, now: Instant, peer: String) {
        self.timed_out_peer = peer;
        if let Some(count) = self.timed_out.handle_event(now) {
            self.write_timed_out(count);
        }
    }

    fn accept_failed(&mut self, now: Instant, error: &io::Error) {
        self.accept_error = error.to_string();
        if let Some(count) = self.accept_failed.handle_event(now) {
            self.write_accept_failed(count);
        }
    }

    /// Writes the lines due at `now`.
    fn poll(&mut self, now: Instant) {
        if let Some(count) = self.refused.poll_line(now) {
            self.write_refused(count);
        }
        if let Some(count) = self.timed_out.poll_line(now) {
            self.write_timed_out(count);
        }
        if let Some(count) = self.accept_failed.poll_line(now) {
            self.write_accept_failed(count);
        }
    }

    fn next_line_at(&self) -> Option<Instant> {
        [
            self.refused.next_line_at(),
            self.timed_out.next_line_at(),
            self.accept_failed.next_line_at(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn write_refused(&self, count: u64) {
        tracing::warn!(
            refused = count,
            connections_max = self.limits.connections_max,
            last_peer = %self.refused_peer,
            "refused {count} NBD connection(s): too many connections ({} open, the most this server serves at once); the last from {}",
            self.limits.connections_max,
            self.refused_peer
        );
    }

    fn write_timed_out(&self, count: u64) {
        tracing::info!(
            closed = count,
            last_peer = %self.timed_out_peer,
            "closed {count} NBD connection(s) that did not finish the handshake within {:?}; the last from {}",
            self.limits.handshake_timeout,
            self.timed_out_peer
        );
    }

    fn write_accept_failed(&self, count: u64) {
        tracing::warn!(
            failed = count,
            error = %self.accept_error,
            "accepting an NBD connection failed {count} time(s): {}; retrying every {ACCEPT_ERROR_BACKOFF_MS} ms",
            self.accept_error
        );
    }
}

/// The text a refused client is sent.
fn refusal_message(limits: &ServerLimits) -> String {
    format!(
        "too many connections: this server serves at most {} at once; try again later",
        limits.connections_max
    )
}

async fn serve_listener<L: Listener, S: ExportSet>(
    listener: L,
    exports: Arc<S>,
    shutdown: CancellationToken,
    limits: ServerLimits,
) {
    let connection_slots = Arc::new(Semaphore::new(
        limits.connections_max.min(Semaphore::MAX_PERMITS),
    ));
    let refusal_slots = Arc::new(Semaphore::new(REFUSALS_IN_FLIGHT_MAX));
    let refusal: Arc<str> = refusal_message(&limits).into();
    let mut log = ListenerLog::new(limits);
    // Each task returns the peer of a connection closed at its handshake deadline.
    let mut connections: JoinSet<Option<String>> = JoinSet::new();
    loop {
        let next_line_at = log.next_line_at();
        tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept_named() => match accepted {
                Ok((io, peer)) => match connection_slots.clone().try_acquire_owned() {
                    Ok(slot) => {
                        let exports = exports.clone();
                        let shutdown = shutdown.clone();
                        connections.spawn(async move {
                            let served = serve_connection_until(
                                io,
                                exports,
                                shutdown,
                                limits.handshake_timeout,
                            )
                            .await;
                            // Released once the connection is closed.
                            drop(slot);
                            match served {
                                Ok(()) => None,
                                Err(ServerError::HandshakeTimeout { after }) => {
                                    tracing::debug!(peer = %peer, "NBD connection did not finish the handshake within {after:?}; closed");
                                    Some(peer)
                                }
                                Err(error) => {
                                    tracing::warn!(peer = %peer, %error, "NBD connection closed on error");
                                    None
                                }
                            }
                        });
                    }
                    Err(_) => {
                        log.refused(Instant::now(), peer.clone());
                        match refusal_slots.clone().try_acquire_owned() {
                            Ok(slot) => {
                                let shutdown = shutdown.clone();
                                let refusal = refusal.clone();
                                connections.spawn(async move {
                                    let mut io = io;
                                    tokio::select! {
                                        refused = tokio::time::timeout(REFUSAL_TIMEOUT, refuse(&mut io, &refusal)) => {
                                            if let Ok(Err(error)) = refused {
                                                tracing::debug!(peer = %peer, %error, "refused NBD connection");
                                            }
                                        }
                                        () = shutdown.cancelled() => {}
                                    }
                                    drop(io);
                                    drop(slot);
                                    None
                                });
                            }
                            // Closed without a word: enough clients are being told already.
                            Err(_) => drop(io),
                        }
                    }
                },
                Err(error) => {
                    // EMFILE, ENFILE, ENOBUFS...: the pending connection stays in the backlog.
                    log.accept_failed(Instant::now(), &error);
                    tokio::time::sleep(Duration::from_millis(ACCEPT_ERROR_BACKOFF_MS)).await;
                }
            },
            Some(joined) = connections.join_next(), if !connections.is_empty() => match joined {
                Ok(Some(peer)) => log.timed_out(Instant::now(), peer),
                Ok(None) => {}
                Err(error) => tracing::warn!(%error, "NBD connection task failed"),
            },
            () = sleep_until(next_line_at) => log.poll(Instant::now()),
        }
    }
    log.poll(Instant::now() + LOG_INTERVAL);
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

/// Sleeps until `at`, or forever when there is nothing to wait for.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_throttle_writes_one_line_per_interval_with_the_count() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut throttle = LogThrottle::new(Duration::from_secs(1));
        assert_eq!(throttle.next_line_at(), None);
        assert_eq!(
            throttle.handle_event(at(0)),
            Some(1),
            "the first event is logged"
        );
        assert_eq!(throttle.next_line_at(), None);
        for ms in 1..=1999 {
            assert_eq!(throttle.handle_event(at(ms / 2)), None);
        }
        assert_eq!(throttle.next_line_at(), Some(at(1000)));
        assert_eq!(throttle.poll_line(at(999)), None);
        assert_eq!(throttle.poll_line(at(1000)), Some(1999));
        assert_eq!(throttle.poll_line(at(5000)), None, "nothing left to report");
        assert_eq!(
            throttle.handle_event(at(5000)),
            Some(1),
            "a quiet second later"
        );
        assert_eq!(throttle.handle_event(at(5001)), None);
        assert_eq!(throttle.handle_event(at(6000)), Some(2));
    }

    #[test]
    fn limits_count_every_descriptor_the_server_may_hold() {
        let limits = ServerLimits::default();
        assert_eq!(limits.connections_max, CONNECTIONS_MAX_DEFAULT);
        assert_eq!(limits.handshake_timeout, HANDSHAKE_TIMEOUT_DEFAULT);
        assert_eq!(
            limits.descriptors_max(),
            CONNECTIONS_MAX_DEFAULT + REFUSALS_IN_FLIGHT_MAX + 2
        );
    }
}
