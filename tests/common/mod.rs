//! Shared helpers for the end-to-end tests: the built binaries, real-tool checks, child
//! processes that are stopped on drop, waiting on conditions with deadlines, and a cluster
//! (one replica, one agent) on loopback in a temporary directory.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The directory holding the binaries the tests run: `target/release`. The end-to-end tests
/// run what ships, so they are themselves built optimized (`cargo test --release`, which
/// `make test` runs, next to `make release`); `CDP_TEST_DEBUG_BINARIES=1` lets a debug test
/// build run the debug binaries for a quick try by hand.
pub fn bin_dir() -> PathBuf {
    if cfg!(debug_assertions) && std::env::var_os("CDP_TEST_DEBUG_BINARIES").is_none() {
        panic!(
            "the end-to-end tests run the release binaries: run them with `cargo test --release` after `make release` (make test does both), or set CDP_TEST_DEBUG_BINARIES=1 to run debug ones"
        );
    }
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .expect("deps dir")
        .parent()
        .expect("profile dir")
        .to_owned()
}

/// Path of a workspace binary. It must have been built after the last change to its sources:
/// cargo does not rebuild another package's binaries for these tests, and an old binary would
/// test old code (`make test` builds them first).
pub fn bin(name: &str) -> PathBuf {
    static CHECKED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is not built: run `make release` (make test does) before the tests",
        p.display()
    );
    CHECKED.get_or_init(|| {
        check_fresh(&bin_dir().join("cdp-agent"), &["agent/src", "shared/src"]);
        check_fresh(
            &bin_dir().join("cdp-replica"),
            &["replica/src", "shared/src", "migrations"],
        );
    });
    p
}

/// Panics when a file under `sources` (the binary's crate and what it depends on) is newer
/// than `binary`.
fn check_fresh(binary: &Path, sources: &[&str]) {
    let built = std::fs::metadata(binary)
        .and_then(|m| m.modified())
        .expect("binary mtime");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut stack: Vec<PathBuf> = sources.iter().map(|d| root.join(d)).collect();
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(changed) = e.metadata().and_then(|m| m.modified()) {
                assert!(
                    changed <= built,
                    "{} is older than {}: run `make release` (make test does) so the tests run the current code",
                    binary.display(),
                    path.display()
                );
            }
        }
    }
}

pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// Whether an external tool is installed. In CI a missing tool fails the test; elsewhere the
/// test is skipped with a message saying why.
pub fn require_tool(tool: &str) -> bool {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
        || Path::new(tool).is_file();
    if !found {
        if in_ci() {
            panic!("{tool} is required by this test and is not installed (make deps installs it)");
        }
        eprintln!("SKIPPED: {tool} is not installed (run `make deps` as root to install it)");
    }
    found
}

/// Whether /usr/bin/python3 can import libnbd's bindings.
pub fn require_python_nbd() -> bool {
    let ok = Command::new("/usr/bin/python3")
        .args(["-c", "import nbd"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        if in_ci() {
            panic!(
                "python3-libnbd is required by this test and is not installed (make deps installs it)"
            );
        }
        eprintln!("SKIPPED: python3-libnbd is not installed (run `make deps` as root)");
    }
    ok
}

/// `GET http://addr{path}` over HTTP/1.0 (so the server closes the connection): the
/// response's head (status line and headers) and body.
pub fn http_get(addr: &str, path: &str) -> (String, String) {
    let mut s =
        std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("request");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("response");
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    (head.to_owned(), body.to_owned())
}

/// The `ADDR` after `marker` in `log` (a line like `… http://ADDR/…`).
pub fn address_in(log: &str, marker: &str) -> Option<String> {
    let rest = &log[log.find(marker)? + marker.len()..];
    Some(rest[..rest.find('/')?].to_owned())
}

/// Polls `cond` until it holds or `timeout` passes; panics with `what` on timeout.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A free UDP port on 127.0.0.1, below the kernel's ephemeral range (32768 and up by
/// default): a port from that range, released here and bound by the replica only later, could
/// meanwhile be handed to some agent's QUIC socket (bound to port 0), and the replica would
/// then fail to listen.
pub fn free_udp_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut rng = Lcg(u64::from(std::process::id()) << 32
        ^ NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0));
    for _ in 0..1000 {
        let port = 20000 + rng.below(12000) as u16;
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free UDP port in 20000..32000 on 127.0.0.1")
}

/// How long one command run by a test may take before it is killed and the test fails
/// (`CDP_TEST_CMD_TIMEOUT_S` overrides it): a hang becomes a failure with the command's output,
/// never a CI run that times out without saying where.
pub fn command_deadline() -> Duration {
    let secs = std::env::var("CDP_TEST_CMD_TIMEOUT_S")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    Duration::from_secs(secs)
}

/// Runs a command to completion (within [`command_deadline`]) and returns its output.
pub fn run(cmd: &mut Command) -> Output {
    run_within(cmd, command_deadline())
}

/// Runs a command to completion and returns its output; kills it and panics with what it
/// printed if it takes longer than `limit`.
pub fn run_within(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    let drain = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out_t = drain(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let err_t = drain(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                let stdout = out_t.join().unwrap_or_default();
                let stderr = err_t.join().unwrap_or_default();
                panic!(
                    "{cmd:?} did not finish within {limit:?}; killed.\nstdout: {}\nstderr: {}",
                    String::from_utf8_lossy(&stdout),
                    String::from_utf8_lossy(&stderr)
                );
            }
            Err(e) => panic!("wait for {cmd:?}: {e}"),
        }
    };
    Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    }
}

/// Runs a command that must succeed; returns its stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    run_ok_within(cmd, command_deadline())
}

/// Like [`run_ok`], for a command that runs for a while by design (fio with `--runtime`):
/// killed, and the test failed, after `limit`.
pub fn run_ok_within(cmd: &mut Command, limit: Duration) -> String {
    let out = run_within(cmd, limit);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The long-running children of this test process, killed by the watchdog.
static CHILDREN: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

fn register_child(pid: u32) {
    if let Ok(mut c) = CHILDREN.lock() {
        c.push(pid);
    }
}

/// How long one cluster test may run (`CDP_TEST_DEADLINE_S` overrides it; `make soak` raises
/// it).
pub fn test_deadline() -> Duration {
    let secs = std::env::var("CDP_TEST_DEADLINE_S")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(900);
    Duration::from_secs(secs)
}

/// Fails the whole test process, loudly, if a cluster test outlives [`test_deadline`]: prints
/// the tails of the cluster's logs, kills every child this process started, and aborts. A
/// hang thus ends as a failure that says where, never as a CI run cut off without a word.
fn start_watchdog(dir: PathBuf, done: std::sync::Arc<std::sync::atomic::AtomicBool>) {
    let limit = test_deadline();
    let name = std::thread::current().name().unwrap_or("test").to_owned();
    std::thread::spawn(move || {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if done.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        eprintln!(
            "WATCHDOG: test {name} did not finish within {limit:?}; aborting the test process"
        );
        for log in ["replica.log", "agent.log"] {
            print_tail(&dir.join(log), 120);
        }
        if let Ok(c) = CHILDREN.lock() {
            for pid in c.iter() {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
        std::process::abort();
    });
}

/// Prints the last `n` lines of a log file to stderr.
pub fn print_tail(path: &Path, n: usize) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(n)..];
    eprintln!("---- last {} lines of {} ----", tail.len(), path.display());
    for l in tail {
        eprintln!("{l}");
    }
}

/// A child process whose output goes to a log file; stopped (SIGTERM, then SIGKILL) on drop.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
    pub name: String,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Proc {
        let f = std::fs::File::create(log).expect("log file");
        let f2 = f.try_clone().expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f)
            .stderr(f2)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        register_child(child.id());
        Proc {
            child,
            log: log.to_owned(),
            name: name.to_owned(),
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM and wait (up to `timeout`) for a clean exit; returns whether it exited 0.
    pub fn stop(&mut self, timeout: Duration) -> bool {
        let pid = self.child.id() as i32;
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.success();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop(Duration::from_secs(5));
        }
    }
}

/// A replica and an agent protecting volumes, on loopback, in a temporary directory.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub replica_dir: PathBuf,
    pub agent_dir: PathBuf,
    pub port: u16,
    pub replica: Option<Proc>,
    pub agent: Option<Proc>,
    /// Tells the watchdog the test is over.
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Cluster {
    /// Initializes both sides and pairs them; nothing is running yet.
    pub fn new() -> Cluster {
        Cluster::with_replica_dir(None)
    }

    /// Like [`Cluster::new`], with the replica's data directory at `replica_dir` (which must
    /// not exist yet) instead of inside the cluster's temporary directory.
    pub fn with_replica_dir(replica_dir: Option<PathBuf>) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let replica_dir = replica_dir.unwrap_or_else(|| dir.path().join("replica"));
        let agent_dir = dir.path().join("agent");
        let port = free_udp_port();
        let listen = format!("127.0.0.1:{port}");
        let out = run_ok(
            Command::new(bin("cdp-replica"))
                .args(["init", "--data"])
                .arg(&replica_dir)
                .args(["--listen", &listen]),
        );
        let replica_fp = out
            .trim()
            .strip_prefix("fingerprint: ")
            .expect("replica init prints the fingerprint")
            .to_owned();
        let out = run_ok(
            Command::new(bin("cdp-agent"))
                .args(["init", "--data"])
                .arg(&agent_dir)
                .args(["--replica", &listen, "--replica-fingerprint", &replica_fp]),
        );
        let agent_fp = out
            .trim()
            .strip_prefix("fingerprint: ")
            .expect("agent init prints the fingerprint")
            .to_owned();
        run_ok(
            Command::new(bin("cdp-replica"))
                .args(["authorize", "--data"])
                .arg(&replica_dir)
                .args(["--agent", &agent_fp, "--name", "test-agent"]),
        );
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        start_watchdog(dir.path().to_owned(), done.clone());
        Cluster {
            dir,
            replica_dir,
            agent_dir,
            port,
            replica: None,
            agent: None,
            done,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Creates a device file of `size` bytes whose first `data_bytes` are pseudo-random.
    pub fn make_device(&self, name: &str, size: u64, data_bytes: u64, seed: u64) -> PathBuf {
        let path = self.path(name);
        let mut f = std::fs::File::create(&path).expect("create device");
        f.set_len(size).expect("size device");
        let mut rng = Lcg(seed);
        let mut buf = vec![0u8; 1 << 20];
        let mut written = 0;
        while written < data_bytes {
            let n = (data_bytes - written).min(buf.len() as u64) as usize;
            rng.fill(&mut buf[..n]);
            f.write_all(&buf[..n]).expect("write device");
            written += n as u64;
        }
        path
    }

    pub fn protect(&self, volume: &str, device: &Path, group: Option<&str>) {
        let mut cmd = Command::new(bin("cdp-agent"));
        cmd.args(["protect", "--data"])
            .arg(&self.agent_dir)
            .args(["--volume", volume, "--device"])
            .arg(device);
        if let Some(g) = group {
            cmd.args(["--group", g]);
        }
        run_ok(&mut cmd);
    }

    pub fn start_replica(&mut self) {
        let log = self.path("replica.log");
        let mut cmd = Command::new(bin("cdp-replica"));
        cmd.args(["serve", "--data"])
            .arg(&self.replica_dir)
            .env("RUST_LOG", "info");
        // The metrics and the console on a free port (the log says which), so that a test
        // can check what they say; not over a test's own `http` in replica.toml (which the
        // flag would override, leaving the config key untested).
        if !config_sets(&self.replica_dir.join("replica.toml"), "http") {
            cmd.args(["--http", "127.0.0.1:0"]);
        }
        let mut p = Proc::spawn("replica", &mut cmd, &log);
        wait_until("the replica to listen", Duration::from_secs(60), || {
            if let Ok(Some(st)) = p.child.try_wait() {
                panic!("the replica exited ({st}):\n{}", p.log_text());
            }
            p.log_text().contains("listening on")
        });
        self.replica = Some(p);
    }

    pub fn start_agent(&mut self) {
        self.start_agent_with_env(&[]);
    }

    pub fn start_agent_with_env(&mut self, env: &[(&str, &str)]) {
        let log = self.path("agent.log");
        let mut cmd = Command::new(bin("cdp-agent"));
        cmd.args(["run", "--data"])
            .arg(&self.agent_dir)
            .env("RUST_LOG", "info");
        if !config_sets(&self.agent_dir.join("agent.toml"), "metrics") {
            cmd.args(["--metrics", "127.0.0.1:0"]);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.agent = Some(Proc::spawn("agent", &mut cmd, &log));
        let sock = self.nbd_socket();
        let agent = self.agent.as_mut().expect("agent");
        wait_until("the agent's NBD socket", Duration::from_secs(30), || {
            if let Ok(Some(st)) = agent.child.try_wait() {
                panic!(
                    "the agent exited ({st}):\n{}",
                    std::fs::read_to_string(&agent.log).unwrap_or_default()
                );
            }
            std::os::unix::net::UnixStream::connect(&sock).is_ok()
        });
    }

    pub fn nbd_socket(&self) -> PathBuf {
        self.agent_dir.join("nbd.sock")
    }

    pub fn nbd_uri(&self, export: &str) -> String {
        format!(
            "nbd+unix:///{export}?socket={}",
            self.nbd_socket().display()
        )
    }

    pub fn agent_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin("cdp-agent"));
        cmd.arg(args[0])
            .arg("--data")
            .arg(&self.agent_dir)
            .args(&args[1..]);
        cmd
    }

    pub fn replica_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin("cdp-replica"));
        cmd.arg(args[0])
            .arg("--data")
            .arg(&self.replica_dir)
            .args(&args[1..]);
        cmd
    }

    pub fn agent_status(&self) -> serde_json::Value {
        let out = run_ok(&mut self.agent_cmd(&["status", "--json"]));
        serde_json::from_str(&out).expect("agent status JSON")
    }

    pub fn replica_status(&self) -> serde_json::Value {
        let out = run_ok(&mut self.replica_cmd(&["status", "--json"]));
        serde_json::from_str(&out).expect("replica status JSON")
    }

    pub fn points(&self, volume: &str) -> Vec<serde_json::Value> {
        let out = run_ok(&mut self.replica_cmd(&["points", "--volume", volume, "--json"]));
        serde_json::from_str(&out).expect("points JSON")
    }

    /// The agent's last sealed seq of the group holding `volume`.
    pub fn agent_last_seq(&self, volume: &str) -> u64 {
        let st = self.agent_status();
        let v = st["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .find(|v| v["name"] == volume)
            .expect("volume in status")
            .clone();
        v["last_seq"].as_u64().expect("last_seq")
    }

    pub fn agent_acked_seq(&self, volume: &str) -> u64 {
        let st = self.agent_status();
        let v = st["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .find(|v| v["name"] == volume)
            .expect("volume in status")
            .clone();
        v["acked_seq"].as_u64().expect("acked_seq")
    }

    /// Waits until the agent reports `volume` protecting (initial sync done).
    pub fn wait_protecting(&self, volume: &str, timeout: Duration) {
        // The agent says `protecting` once it has sealed its sync's last batch; the replica
        // is protecting once it has committed it (then the sync's point is acknowledged).
        let mut synced = 0;
        wait_until(
            &format!("volume {volume} to be protecting"),
            timeout,
            || {
                let st = self.agent_status();
                let v = st["volumes"]
                    .as_array()
                    .and_then(|vs| vs.iter().find(|v| v["name"] == volume));
                match v {
                    Some(v) if v["state"] == "protecting" => {
                        synced = v["last_seq"].as_u64().unwrap_or(0);
                        true
                    }
                    _ => false,
                }
            },
        );
        wait_until(
            &format!("the replica to acknowledge the sync of volume {volume} (seq {synced})"),
            timeout,
            || {
                let st = self.agent_status();
                st["volumes"].as_array().is_some_and(|vs| {
                    vs.iter().any(|v| {
                        v["name"] == volume && v["acked_seq"].as_u64().unwrap_or(0) >= synced
                    })
                })
            },
        );
    }

    /// Waits until the replica has acknowledged everything the agent sealed for `volume`.
    pub fn wait_caught_up(&self, volume: &str, timeout: Duration) -> u64 {
        let mut last = 0;
        wait_until("the replica to acknowledge everything", timeout, || {
            let st = self.agent_status();
            let v = st["volumes"]
                .as_array()
                .expect("volumes")
                .iter()
                .find(|v| v["name"] == volume)
                .expect("volume")
                .clone();
            last = v["last_seq"].as_u64().unwrap_or(0);
            v["acked_seq"].as_u64() == Some(last)
        });
        last
    }

    /// Starts `cdp-replica export` of `volume` at `point` on the Unix socket `socket` (with
    /// `extra` arguments, e.g. `--writable`) and waits until it accepts connections.
    pub fn start_export(&self, volume: &str, point: &str, socket: &Path, extra: &[&str]) -> Proc {
        let _ = std::fs::remove_file(socket);
        let mut cmd = self.replica_cmd(&["export", "--volume", volume, "--at", point]);
        cmd.arg("--socket").arg(socket).args(extra);
        let name = socket
            .file_name()
            .expect("socket name")
            .to_string_lossy()
            .into_owned();
        let mut p = Proc::spawn("export", &mut cmd, &self.path(&format!("{name}.log")));
        wait_until(
            &format!("the export of {volume} at {point}"),
            Duration::from_secs(30),
            || {
                if let Ok(Some(st)) = p.child.try_wait() {
                    panic!("the export exited ({st}):\n{}", p.log_text());
                }
                std::os::unix::net::UnixStream::connect(socket).is_ok()
            },
        );
        p
    }

    /// Restores `volume` at `point` to a new file and returns its bytes, or the error text.
    pub fn restore(&self, volume: &str, point: &str) -> Result<Vec<u8>, String> {
        let out_path = self.path(&format!(
            "restore-{}-{}.img",
            volume,
            point.replace([':', '/'], "_")
        ));
        let _ = std::fs::remove_file(&out_path);
        let out = run(self
            .replica_cmd(&["restore", "--volume", volume, "--at", point, "--out"])
            .arg(&out_path));
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        let bytes = std::fs::read(&out_path).expect("read restored image");
        let _ = std::fs::remove_file(&out_path);
        Ok(bytes)
    }
}

impl Drop for Cluster {
    /// When a test fails, the last lines of the agent's and the replica's logs go to stderr
    /// (the test harness shows them with the failure), then the processes are stopped.
    fn drop(&mut self) {
        self.done.store(true, std::sync::atomic::Ordering::SeqCst);
        // CDP_TEST_KEEP=1: the test's directory (logs, catalog, journal) stays for a look.
        if std::env::var_os("CDP_TEST_KEEP").is_some()
            && let Ok(d) = tempfile::tempdir()
        {
            let kept = std::mem::replace(&mut self.dir, d).keep();
            eprintln!(
                "CDP_TEST_KEEP: the test's directory is kept: {}",
                kept.display()
            );
        }
        if !std::thread::panicking() {
            return;
        }
        for p in [self.replica.as_ref(), self.agent.as_ref()]
            .into_iter()
            .flatten()
        {
            print_tail(&p.log, 80);
        }
    }
}

/// A scripted NBD client (libnbd's Python bindings) speaking to an export.
pub struct NbdDriver {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl NbdDriver {
    pub fn connect(uri: &str) -> NbdDriver {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/drivers/nbd_driver.py");
        let mut child = Command::new("/usr/bin/python3")
            .arg(script)
            .arg(uri)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the NBD driver");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        NbdDriver {
            child,
            stdin,
            stdout,
        }
    }

    fn call(&mut self, cmd: serde_json::Value, data: Option<&[u8]>) -> Result<String, String> {
        let mut line = serde_json::to_vec(&cmd).expect("json");
        line.push(b'\n');
        self.stdin.write_all(&line).expect("driver stdin");
        if let Some(d) = data {
            self.stdin.write_all(d).expect("driver stdin");
        }
        self.stdin.flush().expect("driver stdin");
        let mut reply = String::new();
        self.stdout.read_line(&mut reply).expect("driver stdout");
        let reply = reply.trim_end();
        if let Some(rest) = reply.strip_prefix("ok") {
            Ok(rest.trim().to_owned())
        } else {
            Err(reply.to_owned())
        }
    }

    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<(), String> {
        self.call(
            serde_json::json!({"op": "write", "offset": offset, "len": data.len(), "fua": fua}),
            Some(data),
        )
        .map(|_| ())
    }
    pub fn zero(&mut self, offset: u64, len: u64, fua: bool) -> Result<(), String> {
        self.call(
            serde_json::json!({"op": "zero", "offset": offset, "len": len, "fua": fua}),
            None,
        )
        .map(|_| ())
    }
    pub fn trim(&mut self, offset: u64, len: u64, fua: bool) -> Result<(), String> {
        self.call(
            serde_json::json!({"op": "trim", "offset": offset, "len": len, "fua": fua}),
            None,
        )
        .map(|_| ())
    }
    pub fn flush(&mut self) -> Result<(), String> {
        self.call(serde_json::json!({"op": "flush"}), None)
            .map(|_| ())
    }
    pub fn read(&mut self, offset: u64, len: u64) -> Result<Vec<u8>, String> {
        let hex = self.call(
            serde_json::json!({"op": "read", "offset": offset, "len": len}),
            None,
        )?;
        Ok((0..hex.len() / 2)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex"))
            .collect())
    }
    pub fn size(&mut self) -> u64 {
        self.call(serde_json::json!({"op": "size"}), None)
            .expect("size")
            .parse()
            .expect("size number")
    }
}

impl Drop for NbdDriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A small deterministic generator for test data (no dependency on rand's stream stability).
pub struct Lcg(pub u64);

impl Lcg {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let x = self.0;
        (x ^ (x >> 33)).wrapping_mul(0xff51afd7ed558ccd) ^ (x >> 29)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Compares two images and describes the first difference.
pub fn assert_same_image(what: &str, got: &[u8], expected: &[u8]) {
    assert_eq!(got.len(), expected.len(), "{what}: size differs");
    if let Some(i) = got.iter().zip(expected).position(|(a, b)| a != b) {
        let end = (i + 16).min(got.len());
        panic!(
            "{what}: first difference at byte {i} (chunk {}): got {:02x?}, expected {:02x?}",
            i >> 20,
            &got[i..end],
            &expected[i..end]
        );
    }
}

/// Reads a whole file.
pub fn read_file(path: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut v))
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    v
}

impl Cluster {
    /// Sets `key = value` (a TOML value) in the agent's configuration.
    pub fn set_agent_config(&self, key: &str, value: &str) {
        let path = self.agent_dir.join("agent.toml");
        let text = std::fs::read_to_string(&path).expect("agent.toml");
        let mut found = false;
        let mut lines: Vec<String> = text
            .lines()
            .map(|l| {
                if l.split('=').next().map(str::trim) == Some(key) {
                    found = true;
                    format!("{key} = {value}")
                } else {
                    l.to_owned()
                }
            })
            .collect();
        if !found {
            lines.insert(0, format!("{key} = {value}"));
        }
        std::fs::write(&path, lines.join("\n") + "\n").expect("write agent.toml");
    }

    /// The agent's status of one volume.
    pub fn volume_status(&self, volume: &str) -> serde_json::Value {
        let st = self.agent_status();
        st["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .find(|v| v["name"] == volume)
            .expect("volume in status")
            .clone()
    }

    /// The replica's head seq for `volume` (the last point it lists), 0 when none.
    pub fn replica_head(&self, volume: &str) -> u64 {
        self.points(volume)
            .last()
            .and_then(|p| p["seq"].as_u64())
            .unwrap_or(0)
    }

    /// Takes a bookmark and returns its seq.
    pub fn bookmark(&self, name: &str, wait: bool) -> u64 {
        let mut args = vec!["bookmark", name];
        if wait {
            args.push("--wait");
        }
        let out = run_ok(&mut self.agent_cmd(&args));
        out.split(" seq ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bookmark prints its seq: {out}"))
    }

    /// Waits until the agent has nothing left to send or resync for `volume`: protecting, no
    /// dirty regions, everything sealed acknowledged.
    pub fn wait_in_step(&self, volume: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.volume_status(volume);
            if v["state"] == "protecting"
                && v["dirty_regions"].as_u64() == Some(0)
                && v["acked_seq"] == v["last_seq"]
                && v["consistent"] == true
            {
                return;
            }
            if Instant::now() > deadline {
                let agent = self
                    .agent
                    .as_ref()
                    .map(|a| a.log_text())
                    .unwrap_or_default();
                let replica = self
                    .replica
                    .as_ref()
                    .map(|a| a.log_text())
                    .unwrap_or_default();
                panic!(
                    "timed out after {timeout:?} waiting for volume {volume} to be in step with the replica; last status: {v}\nagent log (tail):\n{}\nreplica log (tail):\n{}",
                    tail(&agent, 30),
                    tail(&replica, 30)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Whether the TOML file `path` sets `key` on a line of its own (`key = …`).
fn config_sets(path: &Path, key: &str) -> bool {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .any(|l| l.split('=').next().map(str::trim) == Some(key))
}

/// Sets `[journal] segment_size` in the replica's replica.toml (read when `serve` starts).
pub fn set_segment_size(c: &Cluster, size: &str) {
    let path = c.replica_dir.join("replica.toml");
    let text = std::fs::read_to_string(&path).expect("replica.toml");
    let line = "segment_size = \"256MiB\"";
    assert!(text.contains(line), "init writes {line}: {text}");
    std::fs::write(
        &path,
        text.replace(line, &format!("segment_size = \"{size}\"")),
    )
    .expect("write replica.toml");
}

/// Sets `[verifier] chunks_per_sec` in the replica's replica.toml (before `serve` starts).
pub fn set_verifier_rate(c: &Cluster, rate: u32) {
    let path = c.replica_dir.join("replica.toml");
    let text = std::fs::read_to_string(&path).expect("replica.toml");
    assert!(
        text.contains("chunks_per_sec"),
        "init writes the [verifier] section: {text}"
    );
    let text: Vec<String> = text
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("chunks_per_sec") {
                format!("chunks_per_sec = {rate}")
            } else {
                l.to_owned()
            }
        })
        .collect();
    std::fs::write(&path, text.join("\n") + "\n").expect("write replica.toml");
}

/// The last `n` lines of a text.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The seed of a randomized test: `CDP_TEST_SEED`, or the clock; printed so a run can be replayed.
pub fn test_seed() -> u64 {
    let seed = std::env::var("CDP_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("seed: {seed} (replay with CDP_TEST_SEED={seed})");
    seed
}

/// A side of the pair, for [`wait_named`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Agent,
    Replica,
}

/// The JSON of one volume in a `status --json` (`name` on the agent, `volume` on the replica).
fn volume_in(status: &serde_json::Value, volume: &str) -> serde_json::Value {
    status["volumes"]
        .as_array()
        .and_then(|vs| {
            vs.iter()
                .find(|v| v["name"] == volume || v["volume"] == volume)
        })
        .cloned()
        .unwrap_or_default()
}

/// Whether `causes` (a `causes` array) holds every one of `want`.
fn holds_all(causes: &serde_json::Value, want: &[&str]) -> bool {
    want.iter().all(|w| {
        causes
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| c == w))
    })
}

/// Whether the exposition `body` has `name{…volume="V"…cause="C"…} 1` for every `C` of `want`.
fn metric_names_all(body: &str, name: &str, volume: &str, want: &[&str]) -> bool {
    want.iter().all(|cause| {
        body.lines().any(|l| {
            l.starts_with(&format!("{name}{{"))
                && l.contains(&format!("volume=\"{volume}\""))
                && l.contains(&format!("cause=\"{cause}\""))
                && l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()) == Some(1.0)
        })
    })
}

/// Waits until every surface of `side` names each of `causes` for `volume`: `status --json`
/// (run on `data`), `/metrics` (its `cdp_agent_volume_cause` / `cdp_replica_volume_cause`
/// gauge at 1) and, on the replica, the console's `/api/status`. The HTTP address is the one
/// the running process logged in `log` (the cluster starts both with port 0); panics with
/// what each surface last said when they do not all name them in `timeout`.
pub fn wait_named(
    side: Side,
    data: &Path,
    log: &Path,
    volume: &str,
    causes: &[&str],
    timeout: Duration,
) {
    let (binary, marker, gauge) = match side {
        Side::Agent => (
            "cdp-agent",
            "serving metrics on http://",
            "cdp_agent_volume_cause",
        ),
        Side::Replica => (
            "cdp-replica",
            "metrics on http://",
            "cdp_replica_volume_cause",
        ),
    };
    let deadline = Instant::now() + timeout;
    let mut last = Vec::new();
    loop {
        last.clear();
        let out = run(Command::new(bin(binary))
            .args(["status", "--json", "--data"])
            .arg(data));
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let v = volume_in(&status, volume);
        let mut ok = holds_all(&v["causes"], causes);
        last.push(format!("status --json: {}", v["causes"]));
        match address_in(&std::fs::read_to_string(log).unwrap_or_default(), marker) {
            None => {
                ok = false;
                last.push(format!("no {marker} in {}", log.display()));
            }
            Some(addr) => {
                let (_, body) = http_get(&addr, "/metrics");
                let named = metric_names_all(&body, gauge, volume, causes);
                ok &= named;
                if !named {
                    let lines: Vec<&str> = body
                        .lines()
                        .filter(|l| l.starts_with(gauge) && l.ends_with(" 1"))
                        .collect();
                    last.push(format!("/metrics: {lines:?}"));
                }
                if side == Side::Replica {
                    let (_, body) = http_get(&addr, "/api/status");
                    let api: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                    let a = volume_in(&api, volume);
                    ok &= holds_all(&a["causes"], causes);
                    last.push(format!("/api/status: {}", a["causes"]));
                }
            }
        }
        if ok {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "timed out after {timeout:?} waiting for every surface of the {side:?} to name {causes:?} for volume {volume}:\n{}",
                last.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Cluster {
    /// [`wait_named`] on the cluster's agent (which must be running).
    pub fn wait_agent_names(&self, volume: &str, causes: &[&str]) {
        let log = &self.agent.as_ref().expect("agent running").log;
        wait_named(
            Side::Agent,
            &self.agent_dir,
            log,
            volume,
            causes,
            Duration::from_secs(30),
        );
    }

    /// [`wait_named`] on the cluster's replica (which must be serving).
    pub fn wait_replica_names(&self, volume: &str, causes: &[&str]) {
        let log = &self.replica.as_ref().expect("replica serving").log;
        wait_named(
            Side::Replica,
            &self.replica_dir,
            log,
            volume,
            causes,
            Duration::from_secs(30),
        );
    }

    /// The `/metrics` exposition of the running agent or serving replica (its address from
    /// its log).
    pub fn metrics(&self, side: Side) -> String {
        let (proc, marker) = match side {
            Side::Agent => (self.agent.as_ref(), "serving metrics on http://"),
            Side::Replica => (self.replica.as_ref(), "metrics on http://"),
        };
        let log = proc.expect("the process runs").log_text();
        let addr = address_in(&log, marker).unwrap_or_else(|| panic!("no {marker} in its log"));
        http_get(&addr, "/metrics").1
    }
}

/// Whether the exposition `body` has the sample `line` (name and labels, as written) at 1.
pub fn metric_is_one(body: &str, line: &str) -> bool {
    body.lines().any(|l| {
        l.strip_prefix(line)
            .is_some_and(|v| v.trim().parse::<f64>().ok() == Some(1.0))
    })
}

/// `cmd` run on a terminal (`script` from util-linux gives it a pseudo-terminal), so that it
/// draws what it draws for people (progress bars); returns its exit status and everything it
/// wrote to the terminal, escape sequences included.
pub fn on_terminal(cmd: &Command, limit: Duration) -> (std::process::ExitStatus, String) {
    let line = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| shell_quote(&a.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ");
    let out = run_within(
        Command::new("script")
            .args(["-qec", &line, "/dev/null"])
            .env("TERM", "xterm"),
        limit,
    );
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// `s` quoted for `sh`.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}
