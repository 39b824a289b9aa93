//! NBD connection limits (issue 10), with the real binaries: an agent whose file-descriptor
//! limit is 512 (`prlimit --nofile=512:512`, and `nbd_connections_max` far above it, so the
//! descriptor limit is what binds) serves a writing libnbd client while 2,000 more
//! connections to its Unix socket never finish the handshake (a third send nothing, a third
//! send their client flags, a third stop inside an option header).
//!
//! What must hold: no write or flush of the client fails; `cdp-agent status` and `bookmark`
//! answer while the idle connections are open; a client over the limit is told "too many
//! connections" in the handshake; every idle connection is closed by the agent within its
//! handshake deadline (10 s) plus a margin; refusals are logged a line per second, not a line
//! each; once they are gone a new client connects; the volume ends in step, and `restore
//! --at latest` equals the device.
//!
//! Before the fix the agent accepted every connection until it ran out of descriptors and
//! kept them for ever: the spool could not open its next segment ("spool append failed: Too
//! many open files", and the client's flushes stopped), the control socket's accept loop
//! spun and `status` timed out, a new client hung unanswered in the backlog, and the idle
//! connections were never closed. This test failed there within 20 s, on whichever came
//! first.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: u64 = 1 << 20;
const VOLUME_BYTES: u64 = 32 * MIB;
/// Connections that never finish the handshake.
const IDLE_CONNECTIONS: usize = 2000;
/// The agent's descriptor limit, soft and hard.
const AGENT_DESCRIPTORS: u64 = 512;
/// The agent's handshake deadline (`HANDSHAKE_TIMEOUT_DEFAULT`).
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
/// How late after the deadline an idle connection may still see its end.
const EOF_MARGIN: Duration = Duration::from_secs(5);
/// How long a control command may take while the idle connections are open.
const CONTROL_DEADLINE: Duration = Duration::from_secs(10);
/// How long one connect may wait for room in the listener's backlog.
const CONNECT_DEADLINE: Duration = Duration::from_secs(10);

/// `(soft, hard)` "Max open files" of a process, from `/proc/PID/limits`.
fn nofile_limits(pid: &str) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("read limits");
    let line = text
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    let numbers: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (numbers[0], numbers[1])
}

/// Raises this test process's soft descriptor limit to its hard limit (with `prlimit --pid`,
/// as the workspace has no `unsafe` and the root package no rustix) so it can hold every
/// idle connection.
fn raise_own_descriptor_limit(needed: u64) {
    let me = std::process::id().to_string();
    let (soft, hard) = nofile_limits(&me);
    if soft < hard {
        run_ok(Command::new("prlimit").args([
            "--pid",
            me.as_str(),
            &format!("--nofile={hard}:{hard}"),
        ]));
    }
    let (soft, _) = nofile_limits(&me);
    assert!(
        soft >= needed,
        "this test holds {needed} descriptors and its hard limit is {soft}: raise it (ulimit -Hn)"
    );
}

fn descriptors_open(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// What became of one idle connection.
#[derive(Debug)]
struct Idle {
    /// Why it could not connect, if it could not.
    connect_error: Option<String>,
    /// It read the server's greeting.
    greeted: bool,
    /// Time from its connect to the end of stream, `None` when none came in time.
    closed_after: Option<Duration>,
}

/// Connects to `socket` and stays silent in the handshake (`kind` 0: sends nothing; 1: sends
/// its client flags; 2: also the first 10 bytes of an option header), reading until the
/// server closes the connection or the handshake deadline plus the margin has passed.
async fn idle_connection(
    socket: PathBuf,
    kind: usize,
    open: Arc<AtomicUsize>,
    connected_tx: tokio::sync::oneshot::Sender<()>,
) -> Idle {
    let started = Instant::now();
    let mut stream = loop {
        match tokio::net::UnixStream::connect(&socket).await {
            Ok(stream) => break stream,
            // The listener's backlog is full: wait for room, as a client would.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if started.elapsed() > CONNECT_DEADLINE {
                    return Idle {
                        connect_error: Some(format!("no room in the backlog: {e}")),
                        greeted: false,
                        closed_after: None,
                    };
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => {
                return Idle {
                    connect_error: Some(e.to_string()),
                    greeted: false,
                    closed_after: None,
                };
            }
        }
    };
    let connected = Instant::now();
    open.fetch_add(1, Ordering::SeqCst);
    let _ = connected_tx.send(());
    let deadline = tokio::time::Instant::from_std(connected + HANDSHAKE_DEADLINE + EOF_MARGIN);
    let mut greeting = [0u8; 18];
    let mut greeted = false;
    let mut closed = false;
    match tokio::time::timeout_at(deadline, stream.read_exact(&mut greeting)).await {
        Ok(Ok(_)) => greeted = &greeting[..16] == b"NBDMAGICIHAVEOPT",
        Ok(Err(_)) => closed = true,
        Err(_) => {}
    }
    if greeted && kind >= 1 {
        // NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES, then half an option header.
        let mut bytes = 3u32.to_be_bytes().to_vec();
        if kind == 2 {
            bytes.extend_from_slice(b"IHAVEOPT\0\0");
        }
        let _ = stream.write_all(&bytes).await;
    }
    if !closed {
        let mut sink = [0u8; 256];
        loop {
            match tokio::time::timeout_at(deadline, stream.read(&mut sink)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    closed = true;
                    break;
                }
                Ok(Ok(_)) => {}
                Err(_) => break,
            }
        }
    }
    open.fetch_sub(1, Ordering::SeqCst);
    Idle {
        connect_error: None,
        greeted,
        closed_after: closed.then(|| connected.elapsed()),
    }
}

/// Opens `count` idle connections one after the other (as fast as the agent accepts them),
/// sets `all_connected`, and returns what became of each.
async fn flood(
    socket: PathBuf,
    count: usize,
    open: Arc<AtomicUsize>,
    all_connected: Arc<AtomicBool>,
) -> Vec<Idle> {
    let mut tasks = Vec::with_capacity(count);
    for i in 0..count {
        let (connected_tx, connected_rx) = tokio::sync::oneshot::channel();
        tasks.push(tokio::spawn(idle_connection(
            socket.clone(),
            i % 3,
            open.clone(),
            connected_tx,
        )));
        // The next connect only once this one is connected (or has given up): one at a time.
        let _ = connected_rx.await;
    }
    all_connected.store(true, Ordering::SeqCst);
    let mut idle = Vec::with_capacity(count);
    for t in tasks {
        idle.push(t.await.expect("idle connection task"));
    }
    idle
}

/// Starts the agent with its descriptor limit lowered to [`AGENT_DESCRIPTORS`].
fn start_limited_agent(c: &mut Cluster) {
    let mut cmd = Command::new("prlimit");
    cmd.arg(format!("--nofile={AGENT_DESCRIPTORS}:{AGENT_DESCRIPTORS}"))
        .arg(bin("cdp-agent"))
        .args(["run", "--data"])
        .arg(&c.agent_dir)
        .env("RUST_LOG", "info");
    let log = c.path("agent.log");
    c.agent = Some(Proc::spawn("agent", &mut cmd, &log));
    let socket = c.nbd_socket();
    let agent = c.agent.as_mut().expect("agent");
    wait_until("the agent's NBD socket", Duration::from_secs(30), || {
        if let Ok(Some(st)) = agent.child.try_wait() {
            panic!("the agent exited ({st}):\n{}", agent.log_text());
        }
        socket.exists() && std::os::unix::net::UnixStream::connect(&socket).is_ok()
    });
    let pid = agent.child.id().to_string();
    assert_eq!(
        nofile_limits(&pid),
        (AGENT_DESCRIPTORS, AGENT_DESCRIPTORS),
        "prlimit set the agent's limit"
    );
}

/// The agent's connection limit, from its log line "NBD: at most N connections".
fn logged_connection_limit(log: &str) -> Option<usize> {
    log.lines().find_map(|l| {
        l.split("NBD: at most ")
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

/// Whether a libnbd client (nbdinfo) is refused with "too many connections" in the handshake.
fn nbdinfo_told_too_many(uri: &str) -> bool {
    let out = run_within(
        Command::new("nbdinfo")
            .arg("--size")
            .arg(uri)
            .env("LIBNBD_DEBUG", "1"),
        CONTROL_DEADLINE,
    );
    !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("too many connections")
}

/// The writing client: random 4 KiB-aligned writes of 4 to 256 KiB (large enough that the
/// spool cuts new segments, which need descriptors, while the idle connections are open),
/// mirrored in `model`, a flush every 8.
struct Writer {
    nbd: NbdDriver,
    rng: Lcg,
    model: Vec<u8>,
    buf: Vec<u8>,
    writes: u64,
    flushes: u64,
}

impl Writer {
    fn op(&mut self) -> Result<(), String> {
        let len = (1 + self.rng.below(64)) * 4096;
        let offset = self.rng.below((VOLUME_BYTES - len) / 4096 + 1) * 4096;
        self.buf.resize(len as usize, 0);
        self.rng.fill(&mut self.buf);
        self.nbd
            .write(offset, &self.buf, false)
            .map_err(|e| format!("a client write of {len} bytes at {offset} failed: {e}"))?;
        self.model[offset as usize..(offset + len) as usize].copy_from_slice(&self.buf);
        self.writes += 1;
        if self.writes.is_multiple_of(8) {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), String> {
        self.nbd
            .flush()
            .map_err(|e| format!("a client flush failed: {e}"))?;
        self.flushes += 1;
        Ok(())
    }
}

/// How long the writing client may go without finishing a write or a flush.
const CLIENT_STALL_MAX: Duration = Duration::from_secs(20);

#[test]
fn idle_handshakes_never_starve_clients_or_the_control_socket() {
    if !require_python_nbd() || !require_tool("prlimit") || !require_tool("nbdinfo") {
        return;
    }
    raise_own_descriptor_limit(IDLE_CONNECTIONS as u64 + 256);
    let mut c = Cluster::new();
    let device = c.make_device("vol.img", VOLUME_BYTES, 8 * MIB, test_seed());
    c.protect("vol", &device, None);
    c.set_agent_config("nbd_connections_max", "100000");
    c.start_replica();
    start_limited_agent(&mut c);
    c.wait_protecting("vol", Duration::from_secs(120));
    let agent_pid = c.agent.as_ref().expect("agent").child.id();

    let uri = c.nbd_uri("vol");
    let mut writer = Writer {
        nbd: NbdDriver::connect(&uri),
        rng: Lcg(test_seed()),
        model: read_file(&device),
        buf: Vec::new(),
        writes: 0,
        flushes: 0,
    };
    for _ in 0..16 {
        writer.op().expect("a write before the flood");
    }
    let at_rest = descriptors_open(agent_pid);
    eprintln!("the agent holds {at_rest} descriptors with one NBD client");

    // The client writes and flushes all along, in its own thread.
    let stop_writing = Arc::new(AtomicBool::new(false));
    let ops_done = Arc::new(AtomicUsize::new(0));
    let writing = {
        let stop = stop_writing.clone();
        let ops_done = ops_done.clone();
        std::thread::spawn(move || -> Result<Writer, String> {
            while !stop.load(Ordering::SeqCst) {
                writer.op()?;
                ops_done.fetch_add(1, Ordering::SeqCst);
            }
            writer.flush()?;
            Ok(writer)
        })
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let open = Arc::new(AtomicUsize::new(0));
    let all_connected = Arc::new(AtomicBool::new(false));
    let flood_started = Instant::now();
    let flooding = runtime.spawn(flood(
        c.nbd_socket(),
        IDLE_CONNECTIONS,
        open.clone(),
        all_connected.clone(),
    ));

    // The control socket is asked every second while the idle connections come and go.
    let mut statuses = 0u32;
    let mut open_at_a_status = 0usize;
    let mut bookmarked_while_open = 0usize;
    let mut peak_descriptors = 0usize;
    let mut refused_client_told = false;
    let mut next_status = Instant::now();
    let mut last_progress = (0, Instant::now());
    while !flooding.is_finished() {
        if writing.is_finished() {
            let error = writing.join().expect("writer thread").err();
            panic!("the client stopped during the flood: {error:?}");
        }
        let done = ops_done.load(Ordering::SeqCst);
        if done != last_progress.0 {
            last_progress = (done, Instant::now());
        }
        assert!(
            last_progress.1.elapsed() < CLIENT_STALL_MAX,
            "the client's writes and flushes stalled: none finished for {CLIENT_STALL_MAX:?} ({} idle connections open)",
            open.load(Ordering::SeqCst)
        );
        peak_descriptors = peak_descriptors.max(descriptors_open(agent_pid));
        if Instant::now() >= next_status {
            let open_now = open.load(Ordering::SeqCst);
            let out = run_within(&mut c.agent_cmd(&["status", "--json"]), CONTROL_DEADLINE);
            assert!(
                out.status.success(),
                "`cdp-agent status` failed with {open_now} idle connections open: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            statuses += 1;
            open_at_a_status = open_at_a_status.max(open_now);
            if bookmarked_while_open == 0 && open_now >= 100 {
                let out = run_within(
                    &mut c.agent_cmd(&["bookmark", "during-the-flood"]),
                    CONTROL_DEADLINE,
                );
                assert!(
                    out.status.success(),
                    "`cdp-agent bookmark` failed with {open_now} idle connections open: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                bookmarked_while_open = open_now;
            }
            next_status = Instant::now() + Duration::from_secs(1);
        }
        // Once every idle connection has connected, the agent is full: a new client is told.
        if !refused_client_told
            && all_connected.load(Ordering::SeqCst)
            && flood_started.elapsed() < HANDSHAKE_DEADLINE - Duration::from_secs(2)
        {
            refused_client_told = nbdinfo_told_too_many(&uri);
        }
        assert!(
            flood_started.elapsed() < HANDSHAKE_DEADLINE + EOF_MARGIN + CONNECT_DEADLINE * 2,
            "the idle connections did not end"
        );
        // The pace of the checks above.
        std::thread::sleep(Duration::from_millis(50));
    }
    let idle = runtime.block_on(flooding).expect("the flood task finished");
    let flood_secs = flood_started.elapsed().as_secs_f64();
    stop_writing.store(true, Ordering::SeqCst);
    let mut writer = writing
        .join()
        .expect("writer thread")
        .unwrap_or_else(|e| panic!("the client failed during the flood: {e}"));
    let (ops, flushes) = (writer.writes, writer.flushes);

    let not_connected: Vec<_> = idle
        .iter()
        .filter_map(|i| i.connect_error.clone())
        .collect();
    assert!(
        not_connected.is_empty(),
        "{} of {IDLE_CONNECTIONS} idle connections could not connect, e.g. {:?}",
        not_connected.len(),
        not_connected.first()
    );
    let never_closed = idle.iter().filter(|i| i.closed_after.is_none()).count();
    assert_eq!(
        never_closed,
        0,
        "{never_closed} of {IDLE_CONNECTIONS} idle connections were still open {:?} after they connected",
        HANDSHAKE_DEADLINE + EOF_MARGIN
    );
    let held: Vec<Duration> = idle
        .iter()
        .filter_map(|i| i.closed_after)
        .filter(|d| *d >= HANDSHAKE_DEADLINE - Duration::from_millis(500))
        .collect();
    let greeted = idle.iter().filter(|i| i.greeted).count();
    eprintln!(
        "{ops} writes and {flushes} flushes in {flood_secs:.1} s; {statuses} status answers (up to {open_at_a_status} idle connections open); {} idle connections held until the handshake deadline, {} refused, {greeted} greeted; the agent held {at_rest} descriptors at rest and {peak_descriptors} at most",
        held.len(),
        IDLE_CONNECTIONS - held.len()
    );
    assert!(statuses >= 2, "status was asked while the flood lasted");
    assert!(
        bookmarked_while_open >= 100,
        "a bookmark was taken while idle connections were open"
    );
    assert!(
        refused_client_told,
        "a libnbd client over the limit was told \"too many connections\""
    );
    assert!(
        peak_descriptors <= AGENT_DESCRIPTORS as usize,
        "{peak_descriptors}"
    );

    // What the agent logged: its limit, the refusals a line per second, the deadline closures.
    let log = c.agent.as_ref().expect("agent").log_text();
    let limit = logged_connection_limit(&log).expect("the agent logs its connection limit");
    assert!(
        limit >= 256 && limit < AGENT_DESCRIPTORS as usize,
        "a 512-descriptor limit leaves most to NBD clients, and keeps some: {limit}"
    );
    assert!(
        held.len() < limit && held.len() + 4 >= limit,
        "the connections under the limit (less the writing client) waited for their deadline: {} of {limit}",
        held.len()
    );
    let refusal_lines = log
        .lines()
        .filter(|l| l.contains("too many connections"))
        .count();
    assert!(
        refusal_lines >= 1 && refusal_lines as f64 <= flood_secs + 3.0,
        "{refusal_lines} refusal lines in {flood_secs:.1} s: one a second at most"
    );
    assert!(
        log.contains("did not finish the handshake within"),
        "the deadline closures are logged"
    );
    assert!(!log.contains("ERROR"), "the agent logged an error:\n{log}");

    // The limit is free again: a new client connects and writes.
    let mut second = NbdDriver::connect(&uri);
    second
        .write(0, b"after the flood", false)
        .expect("the second client's write");
    second.flush().expect("the second client's flush");
    drop(second);
    writer.model[..15].copy_from_slice(b"after the flood");
    for _ in 0..16 {
        writer.op().expect("a write after the flood");
    }
    writer.flush().expect("last flush");
    let Writer { nbd, model, .. } = writer;
    drop(nbd);

    c.wait_in_step("vol", Duration::from_secs(120));
    let on_device = read_file(&device);
    assert_same_image("the device", &on_device, &model);
    let restored = c.restore("vol", "latest").expect("restore latest");
    assert_same_image("restore --at latest", &restored, &on_device);
}
