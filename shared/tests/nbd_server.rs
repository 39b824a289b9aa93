//! Integration tests of the NBD server: an in-memory export served on a Unix socket in a
//! temporary directory (one test on TCP), driven by real clients nobody here wrote (nbdinfo,
//! qemu-io, nbdcopy, libnbd from Python) and by raw bytes for what those clients never send
//! (malformed handshakes, unknown commands, pipelining, DISC with requests in flight).
//!
//! A test that needs a missing tool fails when `CI` is set and is skipped otherwise (see
//! [`have_tool`]).

use std::collections::HashMap;
use std::future::Future;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cdp_shared::NBD_REQUEST_BYTES_MAX;
use cdp_shared::nbd::proto::{self, Command as Cmd, Request};
use cdp_shared::nbd::{Export, ExportError, ExportResult, ExportSet, server};
use rand::Rng;
use tokio_util::sync::CancellationToken;

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;
/// Deadline for anything a test waits on: a tool, a reply, a closed connection.
const DEADLINE: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// The in-memory export.

#[derive(Default)]
struct Counters {
    in_flight: AtomicUsize,
    in_flight_peak: AtomicUsize,
    /// Calls that broke the server's promise (range past the end, length over the limit,
    /// write on a read-only export).
    contract_violations: AtomicUsize,
    calls: AtomicU64,
    longest_call: AtomicU64,
}

/// Counts one request in flight from its admission until its future completes.
struct InFlight(Arc<Counters>);

impl InFlight {
    fn new(counters: &Arc<Counters>) -> Self {
        let now = counters.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        counters.in_flight_peak.fetch_max(now, Ordering::SeqCst);
        counters.calls.fetch_add(1, Ordering::SeqCst);
        InFlight(counters.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A `Mutex<Vec<u8>>`-backed export. Like a real one it does its ordering work (here: all of
/// the work) inside the call, and its future only waits a small random delay, so replies
/// come back out of order.
struct MemExport {
    data: Mutex<Vec<u8>>,
    read_only: bool,
    delay_us_max: u64,
    /// A READ at this offset panics inside its future, like a buggy export would.
    panic_on_read_at: Option<u64>,
    counters: Arc<Counters>,
}

impl MemExport {
    /// A zeroed export whose futures wait up to `delay_us_max` microseconds.
    fn new(size: usize, read_only: bool, delay_us_max: u64) -> Arc<Self> {
        Self::filled(vec![0; size], read_only, delay_us_max)
    }

    fn filled(content: Vec<u8>, read_only: bool, delay_us_max: u64) -> Arc<Self> {
        Arc::new(MemExport {
            data: Mutex::new(content),
            read_only,
            delay_us_max,
            panic_on_read_at: None,
            counters: Default::default(),
        })
    }

    fn snapshot(&self, offset: usize, len: usize) -> Vec<u8> {
        self.data.lock().unwrap()[offset..offset + len].to_vec()
    }

    fn violations(&self) -> usize {
        self.counters.contract_violations.load(Ordering::SeqCst)
    }

    fn peak(&self) -> usize {
        self.counters.in_flight_peak.load(Ordering::SeqCst)
    }

    /// Checks the server's promises; on a violation counts it and returns an error.
    fn admit(
        &self,
        offset: u64,
        len: u32,
        writes: bool,
    ) -> Result<std::ops::Range<usize>, ExportError> {
        self.counters
            .longest_call
            .fetch_max(u64::from(len), Ordering::SeqCst);
        let size = self.data.lock().unwrap().len() as u64;
        let bad = offset
            .checked_add(u64::from(len))
            .is_none_or(|end| end > size)
            || len > NBD_REQUEST_BYTES_MAX
            || (writes && self.read_only);
        if bad {
            self.counters
                .contract_violations
                .fetch_add(1, Ordering::SeqCst);
            return Err(ExportError::Invalid(format!(
                "server passed {len} bytes at {offset}"
            )));
        }
        Ok(offset as usize..offset as usize + len as usize)
    }

    fn finish<T: Send + 'static>(
        &self,
        result: ExportResult<T>,
    ) -> impl Future<Output = ExportResult<T>> + Send + 'static {
        let guard = InFlight::new(&self.counters);
        let delay = match self.delay_us_max {
            0 => Duration::ZERO,
            max => Duration::from_micros(rand::rng().random_range(0..=max)),
        };
        async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            drop(guard);
            result
        }
    }

    fn fill(&self, offset: u64, len: u32, writes: bool, byte: u8) -> ExportResult<()> {
        let range = self.admit(offset, len, writes)?;
        self.data.lock().unwrap()[range].fill(byte);
        Ok(())
    }
}

impl Export for MemExport {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read(
        &self,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = ExportResult<Vec<u8>>> + Send + 'static {
        let result = self
            .admit(offset, len, false)
            .map(|range| self.data.lock().unwrap()[range].to_vec());
        let finished = self.finish(result);
        let panics = self.panic_on_read_at == Some(offset);
        async move {
            assert!(!panics, "test export panics on purpose");
            finished.await
        }
    }

    fn write(
        &self,
        offset: u64,
        data: Vec<u8>,
        _fua: bool,
    ) -> impl Future<Output = ExportResult<()>> + Send + 'static {
        let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let result = self
            .admit(offset, len, true)
            .map(|range| self.data.lock().unwrap()[range].copy_from_slice(&data));
        self.finish(result)
    }

    fn flush(&self) -> impl Future<Output = ExportResult<()>> + Send + 'static {
        self.finish(Ok(()))
    }

    fn trim(
        &self,
        offset: u64,
        len: u32,
        _fua: bool,
    ) -> impl Future<Output = ExportResult<()>> + Send + 'static {
        // Trimmed bytes read back as 0xdd so tests can see that a trim reached the export.
        let result = self.fill(offset, len, true, 0xdd);
        self.finish(result)
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        _fua: bool,
    ) -> impl Future<Output = ExportResult<()>> + Send + 'static {
        let result = self.fill(offset, len, true, 0);
        self.finish(result)
    }
}

struct MemExports(HashMap<String, Arc<MemExport>>);

impl MemExports {
    fn new(exports: &[(&str, &Arc<MemExport>)]) -> Self {
        MemExports(
            exports
                .iter()
                .map(|(name, export)| (name.to_string(), Arc::clone(export)))
                .collect(),
        )
    }
}

impl ExportSet for MemExports {
    type Export = MemExport;

    fn get(&self, name: &str) -> Option<Arc<MemExport>> {
        if name.is_empty() && self.0.len() == 1 {
            return self.0.values().next().cloned();
        }
        self.0.get(name).cloned()
    }

    fn names(&self) -> Vec<String> {
        let mut names: Vec<_> = self.0.keys().cloned().collect();
        names.sort();
        names
    }
}

// ---------------------------------------------------------------------------------------------
// A server on a Unix socket in a temporary directory, with its own runtime.

struct TestServer {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    shutdown: CancellationToken,
    served: Option<tokio::task::JoinHandle<()>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl TestServer {
    fn start(exports: MemExports) -> TestServer {
        Self::start_with(exports, server::ServerLimits::default())
    }

    fn start_with(exports: MemExports, limits: server::ServerLimits) -> TestServer {
        let dir = tempfile::tempdir().expect("create temporary directory");
        let socket = dir.path().join("nbd.sock");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("build runtime");
        let listener = {
            let _entered = runtime.enter();
            tokio::net::UnixListener::bind(&socket).expect("bind Unix socket")
        };
        let shutdown = CancellationToken::new();
        let served = runtime.spawn(server::serve_unix(
            listener,
            Arc::new(exports),
            shutdown.clone(),
            limits,
        ));
        TestServer {
            _dir: dir,
            socket,
            shutdown,
            served: Some(served),
            runtime: Some(runtime),
        }
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    fn connect(&self) -> UnixStream {
        let stream = UnixStream::connect(&self.socket).expect("connect to the server");
        stream
            .set_read_timeout(Some(DEADLINE))
            .expect("set read timeout");
        stream
            .set_write_timeout(Some(DEADLINE))
            .expect("set write timeout");
        stream
    }

    /// Cancels the server and waits for `serve_unix` to return.
    fn shut_down(&mut self) {
        self.shutdown.cancel();
        if let (Some(runtime), Some(served)) = (&self.runtime, self.served.take()) {
            runtime
                .block_on(async { tokio::time::timeout(DEADLINE, served).await })
                .expect("serve_unix returns after shutdown")
                .expect("serve_unix task");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// External tools.

/// Whether `program` runs (`probe` as its arguments). A missing tool fails the test in CI
/// (`CI` set) and skips it elsewhere, saying why on stderr.
fn have_tool(program: &str, probe: &[&str], package: &str) -> bool {
    let runs = Command::new(program)
        .args(probe)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if runs {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "`{program} {}` does not run; CI needs it: install the Debian package {package}",
            probe.join(" ")
        );
    }
    eprintln!(
        "skipping: `{program} {}` does not run; install the Debian package {package}",
        probe.join(" ")
    );
    false
}

/// Runs a command to completion within [`DEADLINE`], killing it past that.
fn run(command: &mut Command) -> Output {
    let description = format!("{command:?}");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {description}: {e}"));
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v);
        v
    });
    let err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.read_to_end(&mut v);
        v
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for child") {
            break status;
        }
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{description} did not finish within {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn run_ok(command: &mut Command) -> String {
    let output = run(command);
    let all = text(&output);
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{all}",
        output.status
    );
    all
}

fn random_bytes(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rng().fill(&mut v[..]);
    v
}

// ---------------------------------------------------------------------------------------------
// A raw client, for what real clients never send.

struct RawClient<S: Read + Write> {
    stream: S,
}

#[derive(Debug, PartialEq, Eq)]
struct OptionReply {
    option: u32,
    reply_type: u32,
    data: Vec<u8>,
}

impl<S: Read + Write> RawClient<S> {
    /// Reads the greeting and answers with `client_flags`.
    fn greet(mut stream: S, client_flags: u32) -> Self {
        let mut greeting = [0u8; proto::GREETING_BYTES];
        stream.read_exact(&mut greeting).expect("read greeting");
        assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
        assert_eq!(
            u16::from_be_bytes([greeting[16], greeting[17]]),
            proto::SERVER_HANDSHAKE_FLAGS
        );
        stream
            .write_all(&client_flags.to_be_bytes())
            .expect("send client flags");
        RawClient { stream }
    }

    fn send_option(&mut self, option: u32, payload: &[u8]) {
        let mut bytes = proto::NBD_IHAVEOPT.to_be_bytes().to_vec();
        bytes.extend_from_slice(&option.to_be_bytes());
        bytes.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        bytes.extend_from_slice(payload);
        self.stream.write_all(&bytes).expect("send option");
    }

    fn read_option_reply(&mut self) -> OptionReply {
        let mut header = [0u8; proto::OPTION_REPLY_HEADER_BYTES];
        self.stream
            .read_exact(&mut header)
            .expect("read option reply");
        assert_eq!(
            u64::from_be_bytes(header[..8].try_into().unwrap()),
            proto::NBD_REP_MAGIC
        );
        let option = u32::from_be_bytes(header[8..12].try_into().unwrap());
        let reply_type = u32::from_be_bytes(header[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(header[16..20].try_into().unwrap()) as usize;
        let mut data = vec![0u8; len];
        self.stream
            .read_exact(&mut data)
            .expect("read option reply data");
        OptionReply {
            option,
            reply_type,
            data,
        }
    }

    /// INFO or GO; returns the export size and transmission flags, or the error reply type.
    fn info_or_go(&mut self, option: u32, name: &str) -> Result<(u64, u16), u32> {
        let mut payload = (name.len() as u32).to_be_bytes().to_vec();
        payload.extend_from_slice(name.as_bytes());
        payload.extend_from_slice(&1u16.to_be_bytes());
        payload.extend_from_slice(&proto::NBD_INFO_BLOCK_SIZE.to_be_bytes());
        self.send_option(option, &payload);
        let mut export = None;
        loop {
            let reply = self.read_option_reply();
            assert_eq!(reply.option, option);
            match reply.reply_type {
                proto::NBD_REP_INFO => {
                    let info_type = u16::from_be_bytes([reply.data[0], reply.data[1]]);
                    if info_type == proto::NBD_INFO_EXPORT {
                        let size = u64::from_be_bytes(reply.data[2..10].try_into().unwrap());
                        let flags = u16::from_be_bytes([reply.data[10], reply.data[11]]);
                        export = Some((size, flags));
                    }
                }
                proto::NBD_REP_ACK => return Ok(export.expect("NBD_INFO_EXPORT before ACK")),
                error => return Err(error),
            }
        }
    }

    /// A fixed-newstyle client that enters transmission with GO.
    fn go(stream: S, name: &str) -> (Self, u64) {
        let mut client = Self::greet(
            stream,
            proto::NBD_FLAG_C_FIXED_NEWSTYLE | proto::NBD_FLAG_C_NO_ZEROES,
        );
        let (size, _) = client
            .info_or_go(proto::NBD_OPT_GO, name)
            .expect("GO succeeds");
        (client, size)
    }

    fn send(
        &mut self,
        command: Cmd,
        flags: u16,
        handle: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) {
        let request = Request {
            flags,
            command,
            handle,
            offset,
            length,
        };
        let mut bytes = proto::encode_request(&request).to_vec();
        bytes.extend_from_slice(payload);
        self.stream.write_all(&bytes).expect("send request");
    }

    /// Reads a simple reply header: (error, handle).
    fn reply(&mut self) -> (u32, u64) {
        let mut header = [0u8; proto::SIMPLE_REPLY_HEADER_BYTES];
        self.stream.read_exact(&mut header).expect("read reply");
        assert_eq!(
            u32::from_be_bytes(header[..4].try_into().unwrap()),
            proto::NBD_SIMPLE_REPLY_MAGIC
        );
        (
            u32::from_be_bytes(header[4..8].try_into().unwrap()),
            u64::from_be_bytes(header[8..].try_into().unwrap()),
        )
    }

    fn read_data(&mut self, len: usize) -> Vec<u8> {
        let mut data = vec![0u8; len];
        self.stream.read_exact(&mut data).expect("read reply data");
        data
    }

    fn write(&mut self, handle: u64, offset: u64, data: &[u8]) -> u32 {
        self.send(Cmd::Write, 0, handle, offset, data.len() as u32, data);
        let (error, got) = self.reply();
        assert_eq!(got, handle);
        error
    }

    fn read(&mut self, handle: u64, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.send(Cmd::Read, 0, handle, offset, len, &[]);
        let (error, got) = self.reply();
        assert_eq!(got, handle);
        if error != 0 {
            return Err(error);
        }
        Ok(self.read_data(len as usize))
    }

    /// Reads until the server closes the stream; panics on a timeout.
    fn expect_closed(mut self) {
        let mut sink = [0u8; 4096];
        loop {
            match self.stream.read(&mut sink) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return,
                Err(e) => panic!("expected the server to close the connection, got {e}"),
            }
        }
    }
}

/// Sends `bytes` and expects the server to close the connection.
fn expect_closed_after(mut stream: UnixStream, bytes: &[u8]) {
    // The server may close before reading everything; a failed write is fine then.
    let _ = stream.write_all(bytes);
    RawClient { stream }.expect_closed();
}

// ---------------------------------------------------------------------------------------------
// Real clients.

#[test]
fn nbdinfo_lists_export_names_and_sizes() {
    if !have_tool("nbdinfo", &["--version"], "libnbd-bin") {
        return;
    }
    let alpha = MemExport::new(MIB, false, 0);
    let beta = MemExport::new(3 * MIB, true, 0);
    let server = TestServer::start(MemExports::new(&[("alpha", &alpha), ("beta", &beta)]));

    let listing = run_ok(Command::new("nbdinfo").arg("--list").arg(server.uri("")));
    assert!(listing.contains("export=\"alpha\""), "{listing}");
    assert!(listing.contains("export=\"beta\""), "{listing}");
    assert!(
        listing.contains(&format!("export-size: {}", MIB)),
        "{listing}"
    );
    assert!(
        listing.contains(&format!("export-size: {}", 3 * MIB)),
        "{listing}"
    );

    let size = run_ok(
        Command::new("nbdinfo")
            .arg("--size")
            .arg(server.uri("beta")),
    );
    assert_eq!(size.trim(), (3 * MIB).to_string());
    let details = run_ok(Command::new("nbdinfo").arg(server.uri("beta")));
    assert!(details.contains("is_read_only: true"), "{details}");
    assert!(details.contains("can_multi_conn: true"), "{details}");
    assert!(
        details.contains(&format!("block_size_maximum: {NBD_REQUEST_BYTES_MAX}")),
        "{details}"
    );

    let missing = run(Command::new("nbdinfo").arg(server.uri("gamma")));
    assert!(
        !missing.status.success(),
        "nbdinfo on an unknown export succeeded"
    );
}

#[test]
fn qemu_io_reads_back_what_it_wrote() {
    if !have_tool("qemu-io", &["--version"], "qemu-utils") {
        return;
    }
    let disk = MemExport::new(4 * MIB, false, 200);
    let server = TestServer::start(MemExports::new(&[("disk", &disk)]));
    let commands = [
        "write -P 0xab 0 64k",
        "read -P 0xab 0 64k",
        "write -z 64k 64k",
        "read -P 0 64k 64k",
        "write -f -P 0xcd 128k 4k",
        "read -P 0xcd 128k 4k",
        "write -P 0x5a 200005 3",
        "read -P 0x5a 200005 3",
        "discard 1M 64k",
        "aio_write -P 0x11 2M 64k",
        "aio_write -P 0x22 2112k 64k",
        "aio_write -P 0x33 2176k 1M",
        "aio_flush",
        "read -P 0x11 2M 64k",
        "read -P 0x22 2112k 64k",
        "read -P 0x33 2176k 1M",
        "flush",
    ];
    let mut qemu_io = Command::new("qemu-io");
    qemu_io.arg("-f").arg("raw").arg(server.uri("disk"));
    for command in commands {
        qemu_io.arg("-c").arg(command);
    }
    let output = run_ok(&mut qemu_io);
    assert!(!output.contains("Pattern verification failed"), "{output}");
    assert!(!output.to_lowercase().contains("error"), "{output}");

    assert!(disk.snapshot(0, 64 * KIB).iter().all(|&b| b == 0xab));
    assert!(disk.snapshot(64 * KIB, 64 * KIB).iter().all(|&b| b == 0));
    assert!(disk.snapshot(128 * KIB, 4 * KIB).iter().all(|&b| b == 0xcd));
    assert!(
        disk.snapshot(MIB, 64 * KIB).iter().all(|&b| b == 0xdd),
        "discard reached the export"
    );
    assert!(disk.snapshot(2176 * KIB, MIB).iter().all(|&b| b == 0x33));
    assert_eq!(disk.violations(), 0);
}

#[test]
fn qemu_io_on_unknown_export_fails_and_server_keeps_serving() {
    if !have_tool("qemu-io", &["--version"], "qemu-utils") {
        return;
    }
    let disk = MemExport::new(MIB, false, 0);
    let server = TestServer::start(MemExports::new(&[("disk", &disk)]));
    let missing = run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read 0 4k"])
        .arg(server.uri("nope")));
    assert!(
        !missing.status.success(),
        "qemu-io on an unknown export succeeded:\n{}",
        text(&missing)
    );
    run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 7 0 4k", "-c", "read -P 7 0 4k"])
            .arg(server.uri("disk")),
    );
    // The empty name selects the only export.
    run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", "-r", "-c", "read -P 7 0 4k"])
            .arg(server.uri("")),
    );
}

#[test]
fn nbdcopy_copies_a_file_in_and_out() {
    if !have_tool("nbdcopy", &["--version"], "libnbd-bin") {
        return;
    }
    const SIZE: usize = 8 * MIB;
    let mut content = random_bytes(SIZE);
    // A run of zeroes, which nbdcopy may send as WRITE_ZEROES.
    content[2 * MIB..4 * MIB].fill(0);
    let dir = tempfile::tempdir().expect("temporary directory");
    let source = dir.path().join("source.img");
    let copied = dir.path().join("copied.img");
    std::fs::write(&source, &content).expect("write source image");

    let disk = MemExport::filled(vec![0xee; SIZE], false, 100);
    let server = TestServer::start(MemExports::new(&[("disk", &disk)]));
    run_ok(Command::new("nbdcopy").arg(&source).arg(server.uri("disk")));
    assert!(
        disk.snapshot(0, SIZE) == content,
        "export differs from the source after nbdcopy in"
    );

    std::fs::write(&copied, b"").expect("create target image");
    run_ok(Command::new("nbdcopy").arg(server.uri("disk")).arg(&copied));
    let back = std::fs::read(&copied).expect("read copied image");
    assert!(back == content, "image copied out differs from the source");
    assert_eq!(disk.violations(), 0);
}

#[test]
fn libnbd_python_client_commands_and_refusals() {
    if !have_tool("/usr/bin/python3", &["-c", "import nbd"], "python3-libnbd") {
        return;
    }
    let disk = MemExport::new(48 * MIB, false, 100);
    let ro = MemExport::filled(random_bytes(MIB), true, 0);
    let server = TestServer::start(MemExports::new(&[("disk", &disk), ("ro", &ro)]));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/nbd/libnbd_client.py");
    let output = run_ok(
        Command::new("/usr/bin/python3")
            .arg(script)
            .arg(server.uri("disk"))
            .arg(server.uri("ro"))
            .arg(NBD_REQUEST_BYTES_MAX.to_string()),
    );
    assert!(output.contains("all checks passed"), "{output}");
    assert_eq!(disk.violations() + ro.violations(), 0);
    assert!(
        disk.peak() > 1,
        "no two requests were ever in flight at once"
    );
}

// ---------------------------------------------------------------------------------------------
// Raw bytes.

#[test]
fn malformed_handshakes_close_only_that_connection() {
    let disk = MemExport::new(MIB, false, 0);
    let server = TestServer::start(MemExports::new(&[("disk", &disk)]));
    let (mut bystander, _) = RawClient::go(server.connect(), "disk");
    assert_eq!(bystander.write(1, 0, b"before"), 0);

    // Garbage instead of client flags: unknown flag bits.
    let mut stream = server.connect();
    let mut greeting = [0u8; proto::GREETING_BYTES];
    stream.read_exact(&mut greeting).expect("greeting");
    expect_closed_after(stream, b"GARBAGE GARBAGE GARBAGE");

    // Bad option magic.
    let mut client = RawClient::greet(server.connect(), proto::NBD_FLAG_C_FIXED_NEWSTYLE);
    let mut bytes = b"IHAVEOPX".to_vec();
    bytes.extend_from_slice(&proto::NBD_OPT_GO.to_be_bytes());
    bytes.extend_from_slice(&0u32.to_be_bytes());
    client.stream.write_all(&bytes).expect("send");
    client.expect_closed();

    // An option announcing an absurd length.
    let mut client = RawClient::greet(server.connect(), proto::NBD_FLAG_C_FIXED_NEWSTYLE);
    let mut bytes = proto::NBD_IHAVEOPT.to_be_bytes().to_vec();
    bytes.extend_from_slice(&proto::NBD_OPT_GO.to_be_bytes());
    bytes.extend_from_slice(&0xffff_fff0u32.to_be_bytes());
    client.stream.write_all(&bytes).expect("send");
    client.expect_closed();

    // EXPORT_NAME of an unknown export cannot be answered with an error: the server closes.
    let mut client = RawClient::greet(server.connect(), proto::NBD_FLAG_C_FIXED_NEWSTYLE);
    client.send_option(proto::NBD_OPT_EXPORT_NAME, b"nope");
    client.expect_closed();

    // Garbage in the transmission phase: bad request magic.
    let (client, _) = RawClient::go(server.connect(), "disk");
    expect_closed_after(client.stream, &[0x55; 28]);

    // A WRITE too long even to skip.
    let (mut client, _) = RawClient::go(server.connect(), "disk");
    client.send(Cmd::Write, 0, 9, 0, u32::MAX, &[]);
    client.expect_closed();

    // The client that was already connected and a new one both still work.
    assert_eq!(bystander.read(2, 0, 6), Ok(b"before".to_vec()));
    let (mut fresh, size) = RawClient::go(server.connect(), "disk");
    assert_eq!(size, MIB as u64);
    assert_eq!(fresh.read(3, 0, 6), Ok(b"before".to_vec()));
    assert_eq!(disk.violations(), 0);
}

#[test]
fn unknown_commands_and_flags_get_einval_and_the_connection_stays_usable() {
    let disk = MemExport::new(MIB, false, 0);
    let server = TestServer::start(MemExports::new(&[("disk", &disk)]));
    let (mut client, _) = RawClient::go(server.connect(), "disk");

    for (handle, command) in [
        (1, Cmd::Other(proto::NBD_CMD_CACHE)),
        (2, Cmd::Other(proto::NBD_CMD_BLOCK_STATUS)),
        (3, Cmd::Other(99)),
    ] {
        client.send(command, 0, handle, 0, 4096, &[]);
        assert_eq!(client.reply(), (proto::NBD_EINVAL, handle), "{command:?}");
    }
    // A flag not valid for the command, on a READ and on a WRITE whose payload must be skipped.
    client.send(Cmd::Read, proto::NBD_CMD_FLAG_DF, 4, 0, 4096, &[]);
    assert_eq!(client.reply(), (proto::NBD_EINVAL, 4));
    client.send(Cmd::Write, 0x8000, 5, 0, 4096, &[0x77; 4096]);
    assert_eq!(client.reply(), (proto::NBD_EINVAL, 5));

    assert_eq!(client.write(6, 512, b"usable"), 0);
    assert_eq!(client.read(7, 512, 6), Ok(b"usable".to_vec()));
    // Zero-length requests are answered without touching the export.
    assert_eq!(client.read(8, 0, 0), Ok(Vec::new()));
    assert_eq!(client.write(9, 0, &[]), 0);
    assert!(
        disk.snapshot(0, 512).iter().all(|&b| b == 0),
        "refused write reached the export"
    );
    assert_eq!(disk.violations(), 0);
}

#[test]
fn pipelined_requests_overlap_within_the_in_flight_bound() {
    const REQUESTS: u64 = 300;
    let content = random_bytes(MIB);
    let slow = MemExport::filled(content.clone(), false, 3000);
    let server = TestServer::start(MemExports::new(&[("slow", &slow)]));
    let (mut client, _) = RawClient::go(server.connect(), "slow");

    // All requests go out before any reply is read.
    let offset_of = |handle: u64| (handle * 3 * KIB as u64) % (MIB as u64 - 4 * KIB as u64);
    let mut requests = Vec::new();
    for handle in 0..REQUESTS {
        let request = Request {
            flags: 0,
            command: Cmd::Read,
            handle,
            offset: offset_of(handle),
            length: 4096,
        };
        requests.extend_from_slice(&proto::encode_request(&request));
    }
    client
        .stream
        .write_all(&requests)
        .expect("send pipelined requests");

    let mut seen = vec![false; REQUESTS as usize];
    let mut out_of_order = false;
    for i in 0..REQUESTS {
        let (error, handle) = client.reply();
        assert_eq!(error, 0);
        assert!(
            !std::mem::replace(&mut seen[handle as usize], true),
            "handle {handle} answered twice"
        );
        out_of_order |= handle != i;
        let offset = offset_of(handle) as usize;
        assert!(
            client.read_data(4096) == content[offset..offset + 4096],
            "data of handle {handle}"
        );
    }
    let peak = slow.peak();
    assert!(peak > 1, "requests never overlapped (peak {peak})");
    assert!(
        peak <= server::REQUESTS_IN_FLIGHT_MAX,
        "peak {peak} exceeds the bound"
    );
    assert!(
        out_of_order,
        "replies came back strictly in request order despite random delays"
    );
    assert_eq!(slow.violations(), 0);
}

#[test]
fn disc_waits_for_requests_in_flight() {
    let disk = MemExport::new(8 * MIB, false, 5000);
    let server = TestServer::start(MemExports::new(&[("disk", &disk)]));
    let (mut client, _) = RawClient::go(server.connect(), "disk");
    const WRITES: u64 = 50;
    let mut bytes = Vec::new();
    for handle in 0..WRITES {
        let flags = if handle % 2 == 0 {
            proto::NBD_CMD_FLAG_FUA
        } else {
            0
        };
        let request = Request {
            flags,
            command: Cmd::Write,
            handle,
            offset: handle * 64 * KIB as u64,
            length: 64 * KIB as u32,
        };
        bytes.extend_from_slice(&proto::encode_request(&request));
        bytes.extend_from_slice(&[handle as u8 + 1; 64 * KIB]);
    }
    let disc = Request {
        flags: 0,
        command: Cmd::Disc,
        handle: 999,
        offset: 0,
        length: 0,
    };
    bytes.extend_from_slice(&proto::encode_request(&disc));
    client
        .stream
        .write_all(&bytes)
        .expect("send writes and DISC");

    let mut answered = 0;
    for _ in 0..WRITES {
        let (error, handle) = client.reply();
        assert_eq!(error, 0);
        assert!(handle < WRITES);
        answered += 1;
    }
    assert_eq!(answered, WRITES);
    client.expect_closed();
    for handle in 0..WRITES {
        let at = (handle as usize) * 64 * KIB;
        assert!(
            disk.snapshot(at, 64 * KIB)
                .iter()
                .all(|&b| b == handle as u8 + 1),
            "write {handle}"
        );
    }
}

#[test]
fn export_name_sends_zeroes_unless_the_client_opted_out() {
    let disk = MemExport::filled(b"0123456789".repeat(1000), true, 0);
    let server = TestServer::start(MemExports::new(&[("disk", &disk)]));
    for no_zeroes in [false, true] {
        let flags = proto::NBD_FLAG_C_FIXED_NEWSTYLE
            | if no_zeroes {
                proto::NBD_FLAG_C_NO_ZEROES
            } else {
                0
            };
        let mut client = RawClient::greet(server.connect(), flags);
        client.send_option(proto::NBD_OPT_EXPORT_NAME, b"");
        let mut reply = [0u8; 10];
        client
            .stream
            .read_exact(&mut reply)
            .expect("EXPORT_NAME reply");
        assert_eq!(u64::from_be_bytes(reply[..8].try_into().unwrap()), 10_000);
        assert_eq!(
            u16::from_be_bytes([reply[8], reply[9]]),
            proto::transmission_flags(true)
        );
        if !no_zeroes {
            assert_eq!(
                client.read_data(proto::EXPORT_NAME_REPLY_ZEROES_BYTES),
                vec![0; 124]
            );
        }
        // Any stray byte would break the framing of this reply.
        assert_eq!(client.read(1, 10, 5), Ok(b"01234".to_vec()));
        assert_eq!(client.write(2, 0, b"x"), proto::NBD_EPERM);
    }
}

#[test]
fn option_haggling_list_info_unsupported_abort() {
    let a = MemExport::new(4096, false, 0);
    let b = MemExport::new(8192, true, 0);
    let server = TestServer::start(MemExports::new(&[("a", &a), ("b", &b)]));
    let mut client = RawClient::greet(server.connect(), proto::NBD_FLAG_C_FIXED_NEWSTYLE);

    client.send_option(proto::NBD_OPT_LIST, &[]);
    let mut names = Vec::new();
    loop {
        let reply = client.read_option_reply();
        match reply.reply_type {
            proto::NBD_REP_SERVER => {
                names.push(String::from_utf8(reply.data[4..].to_vec()).unwrap())
            }
            proto::NBD_REP_ACK => break,
            other => panic!("unexpected LIST reply {other:#x}"),
        }
    }
    assert_eq!(names, ["a", "b"]);

    assert_eq!(
        client.info_or_go(proto::NBD_OPT_INFO, "b"),
        Ok((8192, proto::transmission_flags(true)))
    );
    assert_eq!(
        client.info_or_go(proto::NBD_OPT_INFO, "c"),
        Err(proto::NBD_REP_ERR_UNKNOWN)
    );
    // With two exports the empty name selects none.
    assert_eq!(
        client.info_or_go(proto::NBD_OPT_GO, ""),
        Err(proto::NBD_REP_ERR_UNKNOWN)
    );
    for option in [
        proto::NBD_OPT_STRUCTURED_REPLY,
        proto::NBD_OPT_STARTTLS,
        proto::NBD_OPT_SET_META_CONTEXT,
        4242,
    ] {
        client.send_option(option, &[]);
        let reply = client.read_option_reply();
        assert_eq!(
            (reply.option, reply.reply_type),
            (option, proto::NBD_REP_ERR_UNSUP)
        );
    }
    client.send_option(proto::NBD_OPT_ABORT, &[]);
    assert_eq!(client.read_option_reply().reply_type, proto::NBD_REP_ACK);
    client.expect_closed();
}

#[test]
fn long_trims_and_zeroes_reach_the_export_in_bounded_pieces() {
    let size = 2 * NBD_REQUEST_BYTES_MAX as usize + MIB;
    let disk = MemExport::filled(vec![0x42; size], false, 0);
    let server = TestServer::start(MemExports::new(&[("disk", &disk)]));
    let (mut client, _) = RawClient::go(server.connect(), "disk");

    let long = NBD_REQUEST_BYTES_MAX * 2;
    client.send(
        Cmd::WriteZeroes,
        proto::NBD_CMD_FLAG_FUA,
        1,
        4096,
        long,
        &[],
    );
    assert_eq!(client.reply(), (0, 1));
    client.send(Cmd::Trim, 0, 2, 0, 4096, &[]);
    assert_eq!(client.reply(), (0, 2));
    assert!(disk.snapshot(0, 4096).iter().all(|&b| b == 0xdd));
    assert!(disk.snapshot(4096, long as usize).iter().all(|&b| b == 0));
    assert!(
        disk.snapshot(4096 + long as usize, size - 4096 - long as usize)
            .iter()
            .all(|&b| b == 0x42)
    );
    assert!(disk.counters.longest_call.load(Ordering::SeqCst) <= u64::from(NBD_REQUEST_BYTES_MAX));
    assert_eq!(disk.violations(), 0);
}

#[test]
fn shutdown_drains_open_connections_and_stops_accepting() {
    let disk = MemExport::new(MIB, false, 20_000);
    let mut server = TestServer::start(MemExports::new(&[("disk", &disk)]));
    let (mut client, _) = RawClient::go(server.connect(), "disk");
    let handshaking = server.connect();

    let mut bytes = Vec::new();
    for handle in 0..8u64 {
        let request = Request {
            flags: 0,
            command: Cmd::Write,
            handle,
            offset: handle * 4096,
            length: 4096,
        };
        bytes.extend_from_slice(&proto::encode_request(&request));
        bytes.extend_from_slice(&[0x99; 4096]);
    }
    client.stream.write_all(&bytes).expect("send writes");
    // Wait until the server has admitted every write, then shut down with them in flight.
    let started = Instant::now();
    while disk.counters.calls.load(Ordering::SeqCst) < 8 {
        assert!(
            started.elapsed() < DEADLINE,
            "server never admitted the writes"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    server.shut_down();

    for _ in 0..8 {
        assert_eq!(client.reply().0, 0);
    }
    client.expect_closed();
    RawClient {
        stream: handshaking,
    }
    .expect_closed();
    assert!(
        UnixStream::connect(&server.socket).is_err(),
        "server still accepts after shutdown"
    );
    assert!(disk.snapshot(0, 8 * 4096).iter().all(|&b| b == 0x99));
}

#[test]
fn serve_tcp_serves_a_client() {
    let disk = MemExport::new(MIB, false, 0);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind loopback");
    let address = listener.local_addr().expect("local address");
    let shutdown = CancellationToken::new();
    let served = runtime.spawn(server::serve_tcp(
        listener,
        Arc::new(MemExports::new(&[("disk", &disk)])),
        shutdown.clone(),
        server::ServerLimits::default(),
    ));

    let stream = TcpStream::connect(address).expect("connect over TCP");
    stream
        .set_read_timeout(Some(DEADLINE))
        .expect("read timeout");
    let (mut client, size) = RawClient::go(stream, "disk");
    assert_eq!(size, MIB as u64);
    assert_eq!(client.write(1, 100, b"over tcp"), 0);
    assert_eq!(client.read(2, 100, 8), Ok(b"over tcp".to_vec()));
    client.send(Cmd::Disc, 0, 3, 0, 0, &[]);
    client.expect_closed();

    shutdown.cancel();
    runtime
        .block_on(async { tokio::time::timeout(DEADLINE, served).await })
        .expect("serve_tcp returns after shutdown")
        .expect("serve_tcp task");
}

#[test]
fn a_panicking_export_future_gets_eio_and_the_connection_goes_on() {
    let disk = Arc::new(MemExport {
        data: Mutex::new(vec![7; MIB]),
        read_only: false,
        delay_us_max: 0,
        panic_on_read_at: Some(4096),
        counters: Default::default(),
    });
    let server = TestServer::start(MemExports::new(&[("disk", &disk)]));
    let (mut client, _) = RawClient::go(server.connect(), "disk");
    assert_eq!(client.read(1, 4096, 512), Err(proto::NBD_EIO));
    assert_eq!(client.read(2, 0, 4), Ok(vec![7; 4]));
}

// ---------------------------------------------------------------------------------------------
// Limits: connections at once, the handshake deadline.

/// Greets and asks for `name` with GO: the client in transmission, or the option error's type
/// and message.
fn try_go(stream: UnixStream, name: &str) -> Result<RawClient<UnixStream>, (u32, String)> {
    let mut client = RawClient::greet(
        stream,
        proto::NBD_FLAG_C_FIXED_NEWSTYLE | proto::NBD_FLAG_C_NO_ZEROES,
    );
    let mut payload = (name.len() as u32).to_be_bytes().to_vec();
    payload.extend_from_slice(name.as_bytes());
    payload.extend_from_slice(&0u16.to_be_bytes());
    client.send_option(proto::NBD_OPT_GO, &payload);
    loop {
        let reply = client.read_option_reply();
        assert_eq!(reply.option, proto::NBD_OPT_GO);
        match reply.reply_type {
            proto::NBD_REP_INFO => {}
            proto::NBD_REP_ACK => return Ok(client),
            error => return Err((error, String::from_utf8_lossy(&reply.data).into_owned())),
        }
    }
}

/// Reads until the server closes the stream and returns how long that took; panics when it
/// stays open past `limit`.
fn closed_within(stream: &mut UnixStream, limit: Duration) -> Duration {
    let started = Instant::now();
    stream
        .set_read_timeout(Some(limit))
        .expect("set read timeout");
    let mut sink = [0u8; 256];
    loop {
        match stream.read(&mut sink) {
            Ok(0) => return started.elapsed(),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return started.elapsed(),
            Err(e) => panic!(
                "the server did not close the connection within {limit:?} ({e}; {:?} passed)",
                started.elapsed()
            ),
        }
        assert!(
            started.elapsed() <= limit,
            "the server kept the connection open past {limit:?}"
        );
    }
}

#[test]
fn the_connection_over_the_limit_is_refused_and_accepted_once_one_closes() {
    const LIMIT: usize = 3;
    let disk = MemExport::new(MIB, false, 0);
    let server = TestServer::start_with(
        MemExports::new(&[("disk", &disk)]),
        server::ServerLimits {
            connections_max: LIMIT,
            handshake_timeout: DEADLINE,
        },
    );
    // N open: two in transmission, one still in the handshake.
    let (mut first, _) = RawClient::go(server.connect(), "disk");
    let (mut second, _) = RawClient::go(server.connect(), "disk");
    let handshaking = RawClient::greet(server.connect(), proto::NBD_FLAG_C_FIXED_NEWSTYLE);
    assert_eq!(first.write(1, 0, b"first"), 0);

    // The N+1-th is told why in the handshake, then closed.
    let refused = try_go(server.connect(), "disk").map(|_| ());
    let (error, message) = refused.expect_err("the connection over the limit is refused");
    assert_eq!(error, proto::NBD_REP_ERR_POLICY);
    assert!(message.contains("too many connections"), "{message:?}");
    assert!(message.contains(&LIMIT.to_string()), "{message:?}");
    // Every option gets the refusal; ABORT is acknowledged and closes.
    let mut client = RawClient::greet(server.connect(), proto::NBD_FLAG_C_FIXED_NEWSTYLE);
    client.send_option(proto::NBD_OPT_LIST, &[]);
    let reply = client.read_option_reply();
    assert_eq!(
        (reply.option, reply.reply_type),
        (proto::NBD_OPT_LIST, proto::NBD_REP_ERR_POLICY)
    );
    client.send_option(proto::NBD_OPT_ABORT, &[]);
    let reply = client.read_option_reply();
    assert_eq!(
        (reply.option, reply.reply_type),
        (proto::NBD_OPT_ABORT, proto::NBD_REP_ACK)
    );
    client.expect_closed();
    // The open ones are unaffected.
    assert_eq!(second.read(2, 0, 5), Ok(b"first".to_vec()));

    // One closes: a new connection is served again (as soon as the server has seen it go).
    second.send(Cmd::Disc, 0, 3, 0, 0, &[]);
    second.expect_closed();
    let started = Instant::now();
    let mut third = loop {
        match try_go(server.connect(), "disk") {
            Ok(client) => break client,
            Err((error, message)) => {
                assert_eq!(error, proto::NBD_REP_ERR_POLICY, "{message}");
                assert!(
                    started.elapsed() < DEADLINE,
                    "no connection accepted after one closed: {message}"
                );
            }
        }
    };
    assert_eq!(third.read(4, 0, 5), Ok(b"first".to_vec()));
    // Full again.
    assert!(try_go(server.connect(), "disk").is_err());

    // One in the handshake counts as well: once it gives up, its place is free.
    drop(handshaking.stream.shutdown(std::net::Shutdown::Both));
    handshaking.expect_closed();
    let started = Instant::now();
    while try_go(server.connect(), "disk").is_err() {
        assert!(
            started.elapsed() < DEADLINE,
            "the place of a connection that left in its handshake was not freed"
        );
    }
    assert_eq!(disk.violations(), 0);
}

#[test]
fn a_silent_connection_is_closed_at_the_handshake_deadline() {
    const HANDSHAKE: Duration = Duration::from_millis(400);
    let disk = MemExport::new(MIB, false, 0);
    let server = TestServer::start_with(
        MemExports::new(&[("disk", &disk)]),
        server::ServerLimits {
            connections_max: 16,
            handshake_timeout: HANDSHAKE,
        },
    );
    // A client in transmission, idle all along: it must outlive every deadline below.
    let (mut idle, _) = RawClient::go(server.connect(), "disk");

    let margin = HANDSHAKE + Duration::from_secs(5);
    // Sends nothing at all.
    let mut silent = server.connect();
    let waited = closed_within(&mut silent, margin);
    // Sends its client flags, then nothing.
    let mut flags_only = RawClient::greet(server.connect(), proto::NBD_FLAG_C_FIXED_NEWSTYLE);
    let flags_waited = closed_within(&mut flags_only.stream, margin);
    // Stops inside an option header.
    let mut half = RawClient::greet(server.connect(), proto::NBD_FLAG_C_FIXED_NEWSTYLE);
    half.stream.write_all(b"IHAVEOPT\0\0").expect("send");
    let half_waited = closed_within(&mut half.stream, margin);
    // Haggles on, an option every 20 ms (a slow client, not a condition waited for), but never
    // enters transmission.
    let mut haggler = RawClient::greet(server.connect(), proto::NBD_FLAG_C_FIXED_NEWSTYLE);
    let haggle_started = Instant::now();
    let mut options = 0;
    let mut list = proto::NBD_IHAVEOPT.to_be_bytes().to_vec();
    list.extend_from_slice(&proto::NBD_OPT_LIST.to_be_bytes());
    list.extend_from_slice(&0u32.to_be_bytes());
    loop {
        // A send or a read that fails: the server has closed the connection.
        if haggler.stream.write_all(&list).is_err() {
            break;
        }
        let mut header = [0u8; proto::OPTION_REPLY_HEADER_BYTES];
        if haggler.stream.read_exact(&mut header).is_err() {
            break;
        }
        let len = u32::from_be_bytes(header[16..20].try_into().unwrap()) as usize;
        haggler.read_data(len);
        // The LIST reply is one SERVER reply and an ACK.
        haggler.read_option_reply();
        options += 1;
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            haggle_started.elapsed() < margin,
            "a client haggling for ever was not closed at the deadline"
        );
    }
    let haggled = haggle_started.elapsed();
    for (what, waited) in [
        ("silent", waited),
        ("flags only", flags_waited),
        ("half an option header", half_waited),
        ("haggling", haggled),
    ] {
        // Measured from after the connect: the deadline runs from the accept, a moment earlier.
        assert!(
            waited + Duration::from_millis(100) >= HANDSHAKE,
            "{what}: closed after {waited:?}, before the {HANDSHAKE:?} deadline"
        );
    }
    assert!(
        options > 1,
        "the haggling client was served until its deadline"
    );

    // The idle client in transmission was never timed out.
    assert_eq!(idle.write(1, 0, b"still here"), 0);
    assert_eq!(idle.read(2, 0, 10), Ok(b"still here".to_vec()));
}

#[test]
fn refusals_are_bounded_and_brief() {
    let disk = MemExport::new(MIB, false, 0);
    let server = TestServer::start_with(
        MemExports::new(&[("disk", &disk)]),
        server::ServerLimits {
            connections_max: 1,
            handshake_timeout: DEADLINE,
        },
    );
    let (mut served, _) = RawClient::go(server.connect(), "disk");
    // Many silent clients over the limit at once: each is closed within the refusal's time,
    // and beyond the refusals in flight they are closed without even a greeting.
    let mut silent: Vec<UnixStream> = (0..4 * server::REFUSALS_IN_FLIGHT_MAX)
        .map(|_| server.connect())
        .collect();
    let limit = server::REFUSAL_TIMEOUT + Duration::from_secs(5);
    let mut greeted = 0;
    for stream in &mut silent {
        let mut first = [0u8; 1];
        match stream.read(&mut first) {
            Ok(1) => {
                greeted += 1;
                closed_within(stream, limit);
            }
            Ok(_) => {}
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}"),
        }
    }
    assert!(
        greeted < silent.len(),
        "some refused clients were closed without a word ({greeted} of {} greeted)",
        silent.len()
    );
    assert_eq!(served.write(1, 0, b"served"), 0);
}
