//! systemd's readiness protocol (`Type=notify`, sd_notify(3)): one datagram to the socket
//! `$NOTIFY_SOCKET` names (a path, or an abstract name after `@`). Without the variable
//! (not started by systemd) it does nothing. A failure to tell is logged, never fatal: the
//! service works all the same, and systemd times the start out on its own.

use std::os::unix::net::UnixDatagram;

/// Tells systemd the service is ready (`READY=1`), with a status line.
pub fn ready(status: &str) {
    send(&format!("READY=1\nSTATUS={status}\n"));
}

/// Tells systemd the service is stopping (`STOPPING=1`).
pub fn stopping() {
    send("STOPPING=1\n");
}

fn send(message: &str) {
    if let Some(path) = std::env::var_os("NOTIFY_SOCKET") {
        send_to(&path, message);
    }
}

/// Sends `message` to the notify socket `path` (a path, or `@` and an abstract name).
fn send_to(path: &std::ffi::OsStr, message: &str) {
    let result = (|| -> std::io::Result<()> {
        let socket = UnixDatagram::unbound()?;
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(message.as_bytes(), &addr)?;
        } else {
            socket.send_to(message.as_bytes(), path)?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        tracing::warn!(
            "could not notify systemd through {}: {e}",
            path.to_string_lossy()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_reach_the_notify_socket_by_path_and_abstract_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).expect("bind");
        send_to(path.as_os_str(), "READY=1\nSTATUS=serving\n");
        let mut buf = [0u8; 256];
        let n = listener.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=serving\n");
        // An abstract name.
        let name = format!("cdp-notify-test-{}", std::process::id());
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .expect("abstract address");
        let abstract_listener = UnixDatagram::bind_addr(&addr).expect("bind abstract");
        send_to(std::ffi::OsStr::new(&format!("@{name}")), "STOPPING=1\n");
        let n = abstract_listener.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"STOPPING=1\n");
    }
}
