//! `cdp-replica serve` as a child process, for the tests that run the real binary.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::DEADLINE;

/// A running `serve`; killed (SIGKILL) when dropped.
pub struct Serve {
    pub child: Child,
    /// Where its stderr goes (`None`: the test's stderr).
    log: Option<PathBuf>,
    /// Its address, once it said it listens (`0.0.0.0:0` before).
    pub addr: SocketAddr,
}

impl Serve {
    /// Starts `serve --data DATA --listen LISTEN`, its stderr appended to `log`, with the
    /// environment `env` (`RUST_LOG` is `info` unless `env` sets it). Call
    /// [`Serve::wait_listening`] next.
    pub fn spawn(data: &Path, listen: &str, log: &Path, env: &[(&str, String)]) -> Serve {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let mut cmd = Self::command(data, listen);
        cmd.env("RUST_LOG", "info").stderr(file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Serve {
            child: cmd.spawn().expect("spawn serve"),
            log: Some(log.to_path_buf()),
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        }
    }

    /// Starts `serve --data DATA` on a free loopback port, its warnings on the test's stderr,
    /// and waits until it listens.
    pub fn start(data: &Path) -> Serve {
        let mut cmd = Self::command(data, "127.0.0.1:0");
        cmd.env("RUST_LOG", "warn").stderr(Stdio::inherit());
        let mut serve = Serve {
            child: cmd.spawn().expect("spawn serve"),
            log: None,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        };
        serve.wait_listening();
        serve
    }

    fn command(data: &Path, listen: &str) -> Command {
        let mut cmd = Command::new(super::replica_bin());
        cmd.args(["serve", "--data"])
            .arg(data)
            .args(["--listen", listen])
            .stdout(Stdio::piped());
        cmd
    }

    /// Waits (with a deadline) for the "listening on ADDR" line; fails the test with the
    /// tail of the log if it does not come.
    pub fn wait_listening(&mut self) -> SocketAddr {
        let out = self.child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(out).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(DEADLINE).unwrap_or_default();
        self.addr = line
            .split_whitespace()
            .nth(2)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "serve did not start ({line:?}); its log ends with:\n{}",
                    self.log.as_deref().map(log_tail).unwrap_or_default()
                )
            });
        self.addr
    }

    /// SIGKILL, and reap it.
    pub fn kill(mut self) {
        self.child.kill().expect("SIGKILL serve");
        self.child.wait().expect("reap serve");
    }

    /// SIGTERM, then wait (with a deadline) for a clean exit.
    pub fn stop(mut self) {
        self.terminate();
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                assert!(status.success(), "serve exited with {status}");
                return;
            }
            assert!(Instant::now() < deadline, "serve did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then wait (however long it takes) for an exit that must be clean; a failure
    /// shows the tail of the log.
    pub fn stop_and_wait(mut self) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).expect("pid");
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
        let status = self.child.wait().expect("wait for serve");
        assert!(
            status.success(),
            "serve exited with {status}; log:\n{}",
            self.log.as_deref().map(log_tail).unwrap_or_default()
        );
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).expect("pid");
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The last 30 lines of a log file.
pub fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
