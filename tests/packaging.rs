//! Packaging (issue 13, scope 5): `make install` puts everything under DESTDIR/PREFIX (the
//! binaries, the systemd units pointing at them, the example configurations, man pages and
//! shell completions generated from the binaries), `systemd-analyze verify` finds nothing
//! wrong in the units, and both binaries tell systemd they are ready (`Type=notify`) once
//! they serve.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1 << 20;

#[test]
fn make_install_installs_everything_and_the_units_verify() {
    if !require_tool("systemd-analyze") || !require_tool("make") {
        return;
    }
    let dest = tempfile::tempdir().expect("tempdir");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // `install` is `release` then `install-files`; the release binaries are built already.
    let out = run(Command::new("make")
        .arg("-C")
        .arg(root)
        .arg("install-files")
        .arg(format!("DESTDIR={}", dest.path().display()))
        .arg("PREFIX=/usr"));
    assert!(
        out.status.success(),
        "make install-files: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let d = dest.path();
    for f in [
        "usr/bin/cdp-agent",
        "usr/bin/cdp-replica",
        "usr/lib/systemd/system/cdp-agent.service",
        "usr/lib/systemd/system/cdp-replica.service",
        "usr/share/doc/cdp/examples/agent.toml",
        "usr/share/doc/cdp/examples/replica.toml",
        "usr/share/man/man1/cdp-agent.1",
        "usr/share/man/man1/cdp-agent-run.1",
        "usr/share/man/man1/cdp-agent-status.1",
        "usr/share/man/man1/cdp-replica.1",
        "usr/share/man/man1/cdp-replica-serve.1",
        "usr/share/man/man1/cdp-replica-restore.1",
        "usr/share/bash-completion/completions/cdp-agent",
        "usr/share/bash-completion/completions/cdp-replica",
        "usr/share/zsh/vendor-completions/_cdp-agent",
        "usr/share/zsh/vendor-completions/_cdp-replica",
        "usr/share/fish/vendor_completions.d/cdp-agent.fish",
        "usr/share/fish/vendor_completions.d/cdp-replica.fish",
    ] {
        let p = d.join(f);
        let len = std::fs::metadata(&p)
            .unwrap_or_else(|e| panic!("{f} is installed: {e}"))
            .len();
        assert!(len > 0, "{f} is empty");
    }
    assert!(
        !d.join("usr/share/man/man1/cdp-agent-generate.1").exists(),
        "the hidden generate command gets no page"
    );
    let page = std::fs::read_to_string(d.join("usr/share/man/man1/cdp-agent-run.1")).expect("page");
    assert!(
        page.contains("metrics"),
        "the page documents run's flags: {page}"
    );
    let unit =
        std::fs::read_to_string(d.join("usr/lib/systemd/system/cdp-agent.service")).expect("unit");
    assert!(unit.contains("ExecStart=/usr/bin/cdp-agent run"), "{unit}");
    assert!(unit.contains("Type=notify"), "{unit}");

    // The units as installed, their ExecStart pointed into DESTDIR (verify checks that the
    // binary exists) and the man pages found where they were installed.
    let units = tempfile::tempdir().expect("tempdir");
    let mut paths = Vec::new();
    for u in ["cdp-agent.service", "cdp-replica.service"] {
        let text = std::fs::read_to_string(d.join("usr/lib/systemd/system").join(u)).expect("unit");
        let text = text.replace(
            "ExecStart=/usr/bin/",
            &format!("ExecStart={}/usr/bin/", d.display()),
        );
        let p = units.path().join(u);
        std::fs::write(&p, text).expect("write unit");
        paths.push(p);
    }
    let out = run(Command::new("systemd-analyze")
        .arg("verify")
        .args(&paths)
        .env("MANPATH", d.join("usr/share/man"))
        .env("SYSTEMD_LOG_LEVEL", "notice"));
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Binds a notify socket in `dir` and returns it with its path.
fn notify_socket(dir: &Path) -> (UnixDatagram, std::path::PathBuf) {
    let path = dir.join("notify.sock");
    let s = UnixDatagram::bind(&path).expect("bind the notify socket");
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    (s, path)
}

/// Waits for a datagram holding `READY=1` (or fails at the deadline, naming the log).
fn wait_ready(s: &UnixDatagram, what: &str, p: &mut Proc) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut buf = [0u8; 512];
    loop {
        if let Ok(n) = s.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            if msg.lines().any(|l| l == "READY=1") {
                return msg;
            }
        }
        if let Ok(Some(st)) = p.child.try_wait() {
            panic!(
                "{what} exited ({st}) before it was ready:\n{}",
                p.log_text()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{what} never said READY=1:\n{}",
            p.log_text()
        );
    }
}

#[test]
fn both_binaries_tell_systemd_when_they_are_ready() {
    let c = Cluster::new();
    let dev = c.make_device("v.img", 4 * MIB, MIB, 7);
    c.protect("v", &dev, None);

    let (replica_notify, replica_path) = notify_socket(&c.path("."));
    let mut replica = Proc::spawn(
        "replica",
        Command::new(bin("cdp-replica"))
            .args(["serve", "--data"])
            .arg(&c.replica_dir)
            .env("NOTIFY_SOCKET", &replica_path),
        &c.path("replica.log"),
    );
    let msg = wait_ready(&replica_notify, "cdp-replica serve", &mut replica);
    assert!(msg.contains("STATUS="), "{msg}");
    assert!(
        replica.log_text().contains("listening on"),
        "ready only once it listens: {}",
        replica.log_text()
    );

    let agent_dir = c.path("agent-notify");
    std::fs::create_dir_all(&agent_dir).expect("dir");
    let (agent_notify, agent_path) = notify_socket(&agent_dir);
    let sock = c.nbd_socket();
    let mut agent = Proc::spawn(
        "agent",
        Command::new(bin("cdp-agent"))
            .args(["run", "--data"])
            .arg(&c.agent_dir)
            .env("NOTIFY_SOCKET", &agent_path),
        &c.path("agent.log"),
    );
    wait_ready(&agent_notify, "cdp-agent run", &mut agent);
    // Ready means serving: the NBD socket accepts at once.
    assert!(
        std::os::unix::net::UnixStream::connect(&sock).is_ok(),
        "the NBD socket accepts once the agent said it is ready"
    );
    // A stop is announced too.
    assert!(agent.stop(Duration::from_secs(60)), "the agent stops");
    let mut buf = [0u8; 512];
    let stopping = (0..50).any(|_| {
        agent_notify
            .recv(&mut buf)
            .is_ok_and(|n| String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"))
    });
    assert!(stopping, "the agent said STOPPING=1");
    assert!(replica.stop(Duration::from_secs(60)), "the replica stops");
}
