//! `cdp-replica export` and `cdp-replica failover` as child processes: NBD servers on a Unix
//! socket, up once they printed their line (which names the socket).
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::DEADLINE;
use super::nbd::Nbd;

/// A running export or failover; killed (SIGKILL) when dropped.
pub struct NbdProc {
    pub child: Child,
    /// The line it printed once it served.
    pub line: String,
    /// The socket the line names.
    pub socket: PathBuf,
    /// The command (`export`, `failover`), for the failure messages.
    what: String,
    volume: String,
}

impl NbdProc {
    /// Runs `program COMMAND --data ROOT --volume VOLUME ARGS…` (warnings only, on the
    /// test's stderr) and waits (with the deadline) for its line.
    pub fn start(
        program: &str,
        command: &str,
        root: &Path,
        volume: &str,
        args: &[&str],
    ) -> NbdProc {
        let mut child = Command::new(program)
            .args(command_args(command, root, volume, args))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn cdp-replica {command}: {e}"));
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(out).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(DEADLINE)
            .unwrap_or_else(|_| panic!("{command} prints its line"));
        assert!(!line.is_empty(), "{command} exited: {:?}", child.try_wait());
        let socket = PathBuf::from(
            line.trim_end()
                .rsplit_once("?socket=")
                .unwrap_or_else(|| panic!("no socket in {line:?}"))
                .1,
        );
        NbdProc {
            child,
            line,
            socket,
            what: command.to_owned(),
            volume: volume.to_owned(),
        }
    }

    /// `program export --data ROOT --volume VOLUME --at AT [--socket SOCKET] [--writable]`.
    pub fn export(
        program: &str,
        root: &Path,
        volume: &str,
        at: &str,
        socket: Option<&Path>,
        writable: bool,
    ) -> NbdProc {
        let socket = socket.map(|s| s.display().to_string());
        let mut args = vec!["--at", at];
        if let Some(s) = &socket {
            args.extend(["--socket", s]);
        }
        if writable {
            args.push("--writable");
        }
        NbdProc::start(program, "export", root, volume, &args)
    }

    /// A client of the export, by the volume's name.
    pub fn connect(&self) -> Nbd {
        Nbd::connect(&self.socket, &self.volume)
    }

    pub fn signal(&mut self, signal: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).expect("pid");
        rustix::process::kill_process(pid, signal).expect("signal");
    }

    /// Waits (with the deadline) for the process to exit.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "{} did not stop", self.what);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then wait (with the deadline) for it to exit, however it does.
    pub fn terminate(mut self) -> ExitStatus {
        self.signal(rustix::process::Signal::TERM);
        self.wait_exit()
    }

    /// SIGTERM, then a clean exit.
    pub fn stop(self) {
        let what = self.what.clone();
        let status = self.terminate();
        assert!(status.success(), "{what} exited with {status}");
    }

    /// SIGKILL: nothing runs after it.
    pub fn kill(mut self) {
        self.signal(rustix::process::Signal::KILL);
        self.wait_exit();
    }
}

impl Drop for NbdProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `COMMAND --data ROOT --volume VOLUME ARGS…`.
pub fn command_args(command: &str, root: &Path, volume: &str, args: &[&str]) -> Vec<String> {
    let mut all = vec![
        command.to_owned(),
        "--data".into(),
        root.display().to_string(),
        "--volume".into(),
        volume.into(),
    ];
    all.extend(args.iter().map(|s| s.to_string()));
    all
}
