//! Identities on disk and pinned mutual TLS over real QUIC endpoints on 127.0.0.1.

use std::collections::HashSet;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cdp_shared::identity::{
    self, ALPN, AuthorizeFn, Fingerprint, Identity, IdentityError, SERVER_NAME,
};
use rustls::pki_types::CertificateDer;
use tokio::sync::mpsc;
use tokio::time::timeout;

/// Deadline for any single network step in these tests.
const STEP: Duration = Duration::from_secs(10);
const REQUEST: &[u8] = b"hello replica";
const REPLY: &[u8] = b"hello agent";

#[test]
fn fingerprint_hex_round_trip() {
    let identity = Identity::generate("agent-a").unwrap();
    let fingerprint = identity.fingerprint();
    assert_eq!(fingerprint, Fingerprint::of_der(identity.cert_der()));

    let hex = fingerprint.to_string();
    assert_eq!(hex.len(), 64);
    assert!(
        hex.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    );
    assert_eq!(hex.parse::<Fingerprint>().unwrap(), fingerprint);
    let shouted = format!("  {}\n", hex.to_uppercase());
    assert_eq!(shouted.parse::<Fingerprint>().unwrap(), fingerprint);

    let json = serde_json::to_string(&fingerprint).unwrap();
    assert_eq!(json, format!("\"{hex}\""));
    assert_eq!(
        serde_json::from_str::<Fingerprint>(&json).unwrap(),
        fingerprint
    );
    assert!(serde_json::from_str::<Fingerprint>("\"abc\"").is_err());

    let known = Fingerprint([0xab; 32]);
    assert_eq!(known.to_string(), "ab".repeat(32));
}

#[test]
fn bad_fingerprints_are_rejected() {
    let good = "0123456789abcdef".repeat(4);
    let cases = [
        String::new(),
        "   ".to_string(),
        good[..63].to_string(),
        format!("{good}0"),
        format!("{}g", &good[..63]),
        format!("0x{}", &good[..62]),
        format!("{}é", &good[..62]),
        good.replace('5', " "),
    ];
    for input in cases {
        let error = input
            .parse::<Fingerprint>()
            .expect_err(&format!("{input:?} must be rejected"));
        assert!(
            matches!(error, IdentityError::BadFingerprint { .. }),
            "{input:?}: {error:?}"
        );
        let message = error.to_string();
        assert!(message.contains("fingerprint"), "{message}");
        assert!(message.contains("64 hexadecimal"), "{message}");
    }
}

#[test]
fn save_load_round_trip() {
    let data = tempfile::tempdir().unwrap();
    let missing = Identity::load(data.path()).unwrap_err();
    assert!(
        matches!(missing, IdentityError::NotInitialized { .. }),
        "{missing:?}"
    );
    assert!(missing.to_string().contains("run `init`"), "{missing}");

    let identity = Identity::generate("cdp-replica").unwrap();
    identity.save(data.path()).unwrap();

    let key = data.path().join("identity/key.der");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "key file mode is {mode:o}");
    let cert = std::fs::read(data.path().join("identity/cert.der")).unwrap();
    assert_eq!(cert, identity.cert_der());
    let leftovers: Vec<_> = std::fs::read_dir(data.path().join("identity"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .filter(|name| name.to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    let loaded = Identity::load(data.path()).unwrap();
    assert_eq!(loaded.fingerprint(), identity.fingerprint());
    assert_eq!(loaded.cert_der(), identity.cert_der());

    let other = Identity::generate("cdp-replica").unwrap();
    let refused = other.save(data.path()).unwrap_err();
    assert!(
        matches!(refused, IdentityError::AlreadyExists { .. }),
        "{refused:?}"
    );
    assert!(
        refused.to_string().contains("refusing to overwrite"),
        "{refused}"
    );
    assert_eq!(
        Identity::load(data.path()).unwrap().fingerprint(),
        identity.fingerprint()
    );
}

#[test]
fn damaged_identities_are_reported() {
    let data = tempfile::tempdir().unwrap();
    Identity::generate("agent-a")
        .unwrap()
        .save(data.path())
        .unwrap();

    // A key that belongs to another certificate.
    let other = tempfile::tempdir().unwrap();
    Identity::generate("agent-b")
        .unwrap()
        .save(other.path())
        .unwrap();
    let other_key = std::fs::read(other.path().join("identity/key.der")).unwrap();
    std::fs::write(data.path().join("identity/key.der"), &other_key).unwrap();
    let error = Identity::load(data.path()).unwrap_err();
    assert!(matches!(error, IdentityError::Corrupt { .. }), "{error:?}");

    // An interrupted save: the key without its certificate.
    std::fs::remove_file(data.path().join("identity/cert.der")).unwrap();
    let error = Identity::load(data.path()).unwrap_err();
    assert!(
        matches!(error, IdentityError::Incomplete { .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("cert.der"), "{error}");
}

/// What the server saw of one incoming connection.
type Outcome = Result<Fingerprint, String>;

/// A replica-like server: accepts connections forever, answers one request per connection
/// on a bidirectional stream, and reports each connection's outcome.
fn spawn_server(
    replica: &Identity,
    authorize: AuthorizeFn,
) -> (
    quinn::Endpoint,
    SocketAddr,
    mpsc::UnboundedReceiver<Outcome>,
) {
    let config = identity::server_config(replica, authorize).unwrap();
    let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let (outcomes_tx, outcomes_rx) = mpsc::unbounded_channel();
    let accepting = endpoint.clone();
    tokio::spawn(async move {
        while let Some(incoming) = accepting.accept().await {
            let outcomes_tx = outcomes_tx.clone();
            tokio::spawn(async move {
                let outcome = serve_one(incoming).await.map_err(|e| e.to_string());
                let _ = outcomes_tx.send(outcome);
            });
        }
    });
    (endpoint, addr, outcomes_rx)
}

async fn serve_one(incoming: quinn::Incoming) -> Result<Fingerprint, Box<dyn std::error::Error>> {
    let connection = incoming.await?;
    let protocol = connection
        .handshake_data()
        .and_then(|data| data.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|data| data.protocol);
    if protocol.as_deref() != Some(ALPN) {
        return Err(format!("negotiated ALPN {protocol:?}").into());
    }
    let certs = connection
        .peer_identity()
        .ok_or("no peer identity")?
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| "peer identity is not a certificate chain")?;
    let agent = Fingerprint::of_der(certs[0].as_ref());
    let (mut send, mut recv) = connection.accept_bi().await?;
    let request = recv.read_to_end(1024).await?;
    if request != REQUEST {
        return Err(format!("unexpected request {request:?}").into());
    }
    send.write_all(REPLY).await?;
    send.finish()?;
    connection.closed().await;
    Ok(agent)
}

fn client_endpoint() -> quinn::Endpoint {
    quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap()
}

/// Connects, sends [`REQUEST`] and reads the reply; any failure is returned as its message.
async fn exchange(
    endpoint: &quinn::Endpoint,
    config: quinn::ClientConfig,
    server: SocketAddr,
) -> Result<Vec<u8>, String> {
    let attempt = async {
        let connection = endpoint
            .connect_with(config, server, SERVER_NAME)
            .map_err(|e| format!("connect: {e}"))?
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let (mut send, mut recv) = connection
            .open_bi()
            .await
            .map_err(|e| format!("open_bi: {e}"))?;
        send.write_all(REQUEST)
            .await
            .map_err(|e| format!("write: {e}"))?;
        send.finish().map_err(|e| format!("finish: {e}"))?;
        let reply = recv.read_to_end(1024).await.map_err(|e| {
            let reason = connection.close_reason().map(|r| r.to_string());
            format!("read: {e} ({})", reason.unwrap_or_default())
        })?;
        connection.close(0u32.into(), b"done");
        Ok(reply)
    };
    timeout(STEP, attempt)
        .await
        .unwrap_or_else(|_| panic!("exchange with {server} did not finish within {STEP:?}"))
}

async fn next_outcome(outcomes: &mut mpsc::UnboundedReceiver<Outcome>) -> Outcome {
    timeout(STEP, outcomes.recv())
        .await
        .expect("server reported no outcome in time")
        .expect("server task ended (panicked?)")
}

fn allow_list(agents: &[Fingerprint]) -> (Arc<Mutex<HashSet<Fingerprint>>>, AuthorizeFn) {
    let list = Arc::new(Mutex::new(agents.iter().copied().collect::<HashSet<_>>()));
    let reader = list.clone();
    let authorize: AuthorizeFn = Arc::new(move |agent| reader.lock().unwrap().contains(agent));
    (list, authorize)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorized_client_exchanges_bytes() {
    let replica = Identity::generate(SERVER_NAME).unwrap();
    let agent = Identity::generate("agent-a").unwrap();
    let (_list, authorize) = allow_list(&[agent.fingerprint()]);
    let (server, addr, mut outcomes) = spawn_server(&replica, authorize);

    let client = client_endpoint();
    let config = identity::client_config(&agent, replica.fingerprint()).unwrap();
    let reply = exchange(&client, config, addr).await.unwrap();
    assert_eq!(reply, REPLY);
    assert_eq!(next_outcome(&mut outcomes).await, Ok(agent.fingerprint()));

    client.close(0u32.into(), b"bye");
    server.close(0u32.into(), b"bye");
}

/// Collects formatted `tracing` output (this test's runtime runs on the test thread only).
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn unauthorized_client_is_refused_and_server_keeps_serving() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _log = tracing::subscriber::set_default(subscriber);

    let replica = Identity::generate(SERVER_NAME).unwrap();
    let agent_a = Identity::generate("agent-a").unwrap();
    let agent_b = Identity::generate("agent-b").unwrap();
    let (list, authorize) = allow_list(&[agent_a.fingerprint()]);
    let (server, addr, mut outcomes) = spawn_server(&replica, authorize);
    let client = client_endpoint();

    // B is unknown: with TLS 1.3 its handshake may look complete; its first I/O must fail.
    let config_b = identity::client_config(&agent_b, replica.fingerprint()).unwrap();
    let refused = exchange(&client, config_b.clone(), addr).await.unwrap_err();
    println!("unauthorized client saw: {refused}");
    assert!(refused.contains("not authorized"), "{refused}");
    assert!(
        refused.contains(&agent_b.fingerprint().to_string()),
        "{refused}"
    );
    let server_side = next_outcome(&mut outcomes).await.unwrap_err();
    println!("server saw: {server_side}");
    assert!(
        server_side.contains(&agent_b.fingerprint().to_string()),
        "{server_side}"
    );

    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let warnings: Vec<&str> = log.lines().filter(|line| line.contains("WARN")).collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(
        warnings[0].contains(&agent_b.fingerprint().to_string()),
        "{log}"
    );
    assert!(
        warnings[0].contains(&format!(
            "cdp-replica authorize --data DIR --agent {}",
            agent_b.fingerprint()
        )),
        "{log}"
    );

    // The endpoint still serves an authorized agent.
    let config_a = identity::client_config(&agent_a, replica.fingerprint()).unwrap();
    assert_eq!(exchange(&client, config_a, addr).await.unwrap(), REPLY);
    assert_eq!(next_outcome(&mut outcomes).await, Ok(agent_a.fingerprint()));

    // Authorizing B takes effect at its next handshake, without restarting the server.
    list.lock().unwrap().insert(agent_b.fingerprint());
    assert_eq!(
        exchange(&client, config_b.clone(), addr).await.unwrap(),
        REPLY
    );
    assert_eq!(next_outcome(&mut outcomes).await, Ok(agent_b.fingerprint()));

    // And revoking it takes effect at the next handshake too (no session resumption).
    list.lock().unwrap().remove(&agent_b.fingerprint());
    exchange(&client, config_b, addr).await.unwrap_err();
    next_outcome(&mut outcomes).await.unwrap_err();

    client.close(0u32.into(), b"bye");
    server.close(0u32.into(), b"bye");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_refuses_a_server_with_the_wrong_fingerprint() {
    let replica = Identity::generate(SERVER_NAME).unwrap();
    let impostor = Identity::generate(SERVER_NAME).unwrap();
    let agent = Identity::generate("agent-a").unwrap();
    let (_list, authorize) = allow_list(&[agent.fingerprint()]);
    let (server, addr, mut outcomes) = spawn_server(&impostor, authorize);
    let client = client_endpoint();

    let pinned = replica.fingerprint();
    let config = identity::client_config(&agent, pinned).unwrap();
    let refused = exchange(&client, config, addr).await.unwrap_err();
    println!("pinned client saw: {refused}");
    assert!(refused.contains(&pinned.to_string()), "{refused}");
    assert!(
        refused.contains(&impostor.fingerprint().to_string()),
        "{refused}"
    );
    let server_side = next_outcome(&mut outcomes).await.unwrap_err();
    println!("server saw: {server_side}");

    // Both sides are still healthy: the same client endpoint, correctly pinned, gets through.
    let config = identity::client_config(&agent, impostor.fingerprint()).unwrap();
    assert_eq!(exchange(&client, config, addr).await.unwrap(), REPLY);
    assert_eq!(next_outcome(&mut outcomes).await, Ok(agent.fingerprint()));

    client.close(0u32.into(), b"bye");
    server.close(0u32.into(), b"bye");
}

#[test]
fn udp_buffers_are_sized_and_reported_as_the_kernel_sees_them() {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let before = rustix::net::sockopt::socket_recv_buffer_size(&socket).unwrap() / 2;
    let got = identity::size_udp_buffers(&socket);
    // The report is what the kernel holds now, not what was asked for.
    assert_eq!(
        got.recv,
        rustix::net::sockopt::socket_recv_buffer_size(&socket).unwrap() / 2
    );
    assert_eq!(
        got.send,
        rustix::net::sockopt::socket_send_buffer_size(&socket).unwrap() / 2
    );
    assert!(got.recv >= before, "{got:?} < {before}");
    if rustix::process::geteuid().is_root() {
        // Root may pass net.core.rmem_max (SO_RCVBUFFORCE): the whole size, both ways.
        assert!(got.sufficient(), "{got:?}");
        assert_eq!(got.recv, identity::UDP_BUFFER_BYTES);
    } else {
        println!("not root: buffers capped by net.core.rmem_max/wmem_max: {got:?}");
    }
}
