//! Identities and pinned mutual TLS for the agent ↔ replica QUIC link.
//!
//! Every agent and every replica owns one self-signed certificate (its *identity*), kept as
//! `DATA_DIR/identity/cert.der` and `DATA_DIR/identity/key.der`. A peer is known by the
//! [`Fingerprint`] of its certificate — the blake3 hash of the certificate's DER — and nothing
//! else: there is no CA, host names are never checked, and the pin is the authentication. The
//! agent pins exactly one replica fingerprint; the replica asks an [`AuthorizeFn`] at every
//! handshake whether the agent's fingerprint is authorized, so authorizing or revoking an agent
//! takes effect without a restart (TLS session resumption is disabled on both sides for the same
//! reason: a resumed session would skip that check). This module builds the quinn client and
//! server configurations (TLS 1.3 only, ALPN [`ALPN`], the ring provider only) with transport
//! limits sized for batches in flight. Its only disk I/O is reading and writing identity files.

use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{NoInitialCipherSuite, QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::types::{BATCH_PAYLOAD_BYTES_MAX, BATCHES_IN_FLIGHT_DEFAULT};

/// ALPN protocol both sides offer; a peer speaking anything else fails the handshake.
pub const ALPN: &[u8] = b"cdp/1";
/// Server name the agent dials. Only sent in the handshake: the pin, not the name, authenticates.
pub const SERVER_NAME: &str = "cdp-replica";

/// Interval of QUIC keep-alive pings, so that an idle but healthy link is never timed out.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_millis(500);
/// A link silent for this long (no packet at all, keep-alives included) is declared dead: both
/// sides notice a lost peer or link within 2 s (four keep-alives lost in a row at 5 % loss:
/// about 6 in a million windows).
pub const IDLE_TIMEOUT_MS: u32 = 2_000;
/// Largest batch frame the link is sized for (payload bound plus headers, rounded up).
pub const BATCH_STREAM_BYTES_MAX: u64 = 8 << 20;
/// Flow-control window of one stream: a whole batch fits, so a batch stream never stalls on
/// its own window while the receiver is reading.
pub const STREAM_RECEIVE_WINDOW_BYTES: u32 = 16 << 20;
/// Flow-control window of a whole connection: several full batches in flight at once.
pub const CONNECTION_RECEIVE_WINDOW_BYTES: u32 = 64 << 20;
/// Bytes a sender may have unacknowledged at the transport level across all streams.
pub const SEND_WINDOW_BYTES: u64 = CONNECTION_RECEIVE_WINDOW_BYTES as u64;
/// Concurrent unidirectional streams a peer may open: each batch travels on its own stream.
pub const UNI_STREAMS_MAX: u32 = 64;
/// Concurrent bidirectional (control) streams a peer may open.
pub const BIDI_STREAMS_MAX: u32 = 16;
/// Kernel buffer asked for each direction of the link's UDP socket. The default (208 KiB)
/// overflows while the receiver is busy for a moment: the packets dropped there make QUIC's
/// congestion control halve its window, and replication fell behind at a third of the
/// disk's speed (1 % of datagrams dropped, measured on loopback). 16 MiB holds four full
/// batches.
pub const UDP_BUFFER_BYTES: usize = 16 << 20;

const _: () = assert!(BATCH_STREAM_BYTES_MAX >= BATCH_PAYLOAD_BYTES_MAX as u64 + (1 << 20));
const _: () = assert!(STREAM_RECEIVE_WINDOW_BYTES as u64 >= BATCH_STREAM_BYTES_MAX);
const _: () = assert!(CONNECTION_RECEIVE_WINDOW_BYTES as u64 >= 4 * BATCH_STREAM_BYTES_MAX);
const _: () = assert!(CONNECTION_RECEIVE_WINDOW_BYTES >= STREAM_RECEIVE_WINDOW_BYTES);
const _: () = assert!(UNI_STREAMS_MAX as usize >= 2 * BATCHES_IN_FLIGHT_DEFAULT);
const _: () = assert!(KEEP_ALIVE_INTERVAL.as_secs() * 1000 * 3 <= IDLE_TIMEOUT_MS as u64);

/// Directory under the data directory that holds the identity.
const IDENTITY_DIR: &str = "identity";
/// Certificate file (DER) inside [`IDENTITY_DIR`]; its presence marks a complete identity.
const CERT_FILE: &str = "cert.der";
/// PKCS#8 private key file (DER, mode 0600) inside [`IDENTITY_DIR`].
const KEY_FILE: &str = "key.der";
/// Mode of the private key file.
const KEY_FILE_MODE: u32 = 0o600;
/// Mode of the certificate file (public).
const CERT_FILE_MODE: u32 = 0o644;
/// Mode of the identity directory.
const IDENTITY_DIR_MODE: u32 = 0o700;

/// Everything that can go wrong with identities and TLS configuration.
/// Words of [`IdentityError::AgentNotAuthorized`]'s sentence, by which the agent tells the
/// refusal apart: a TLS handshake's refusal reaches it as text only.
pub const NOT_AUTHORIZED_MARK: &str = "is not authorized on this replica";
/// Words of [`IdentityError::ReplicaMismatch`]'s sentence, likewise.
pub const REPLICA_MISMATCH_MARK: &str = "but this agent is pinned to";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "{input:?} is not a certificate fingerprint: {reason} (expected 64 hexadecimal characters)"
    )]
    BadFingerprint { input: String, reason: String },

    #[error("could not generate a self-signed certificate for {common_name:?}: {source}")]
    Generate {
        common_name: String,
        #[source]
        source: rcgen::Error,
    },

    #[error(
        "an identity already exists at {}; refusing to overwrite it (this machine's peers know it by its fingerprint)",
        path.display()
    )]
    AlreadyExists { path: PathBuf },

    #[error("no identity found in {}; run `init` first", dir.display())]
    NotInitialized { dir: PathBuf },

    #[error(
        "the identity in {} is incomplete ({} is missing); an `init` was interrupted: remove that directory and run `init` again",
        dir.display(),
        missing.display()
    )]
    Incomplete { dir: PathBuf, missing: PathBuf },

    #[error("the identity in {} is unusable ({reason}); restore it from a backup or remove it and run `init` again", dir.display())]
    Corrupt { dir: PathBuf, reason: String },

    #[error("could not {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("could not build the TLS configuration: {0}")]
    Tls(#[from] rustls::Error),

    #[error("could not build the QUIC configuration: {0}")]
    Quic(#[from] NoInitialCipherSuite),

    #[error(
        "agent certificate {presented} is not authorized on this replica; run `cdp-replica authorize --data DIR --agent {presented}` to allow it"
    )]
    AgentNotAuthorized { presented: Fingerprint },

    #[error(
        "the replica presented certificate {presented} but this agent is pinned to {expected}; check the replica fingerprint configured on the agent"
    )]
    ReplicaMismatch {
        expected: Fingerprint,
        presented: Fingerprint,
    },
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> IdentityError {
    let path = path.to_path_buf();
    move |source| IdentityError::Io {
        action,
        path,
        source,
    }
}

/// blake3 of a certificate's DER, shown and parsed as 64 lowercase hex characters.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// Fingerprint of a DER-encoded certificate.
    pub fn of_der(der: &[u8]) -> Fingerprint {
        Fingerprint(*blake3::hash(der).as_bytes())
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

impl FromStr for Fingerprint {
    type Err = IdentityError;

    /// Accepts 64 hex characters, either case, with surrounding whitespace trimmed.
    fn from_str(input: &str) -> Result<Fingerprint, IdentityError> {
        let bad = |reason: String| IdentityError::BadFingerprint {
            input: input.to_string(),
            reason,
        };
        let hex = input.trim();
        if hex.len() != 64 {
            return Err(bad(format!("it has {} characters", hex.chars().count())));
        }
        let mut bytes = [0u8; 32];
        for (i, pair) in hex.as_bytes().chunks_exact(2).enumerate() {
            match (hex_digit(pair[0]), hex_digit(pair[1])) {
                (Some(hi), Some(lo)) => bytes[i] = hi << 4 | lo,
                _ => {
                    return Err(bad(format!(
                        "it holds a non-hexadecimal character near position {}",
                        2 * i + 1
                    )));
                }
            }
        }
        Ok(Fingerprint(bytes))
    }
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

impl serde::Serialize for Fingerprint {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Fingerprint {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A self-signed certificate and its private key: who this agent or replica is.
#[derive(Clone)]
pub struct Identity {
    cert_der: Vec<u8>,
    /// PKCS#8 DER.
    key_der: Vec<u8>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// New self-signed identity (rcgen, ECDSA P-256), subject alt name and common name =
    /// `common_name`.
    pub fn generate(common_name: &str) -> Result<Identity, IdentityError> {
        let failed = |source| IdentityError::Generate {
            common_name: common_name.to_string(),
            source,
        };
        let signing_key = rcgen::KeyPair::generate().map_err(failed)?;
        let mut params =
            rcgen::CertificateParams::new(vec![common_name.to_string()]).map_err(failed)?;
        let mut name = rcgen::DistinguishedName::new();
        name.push(rcgen::DnType::CommonName, common_name);
        params.distinguished_name = name;
        let cert = params.self_signed(&signing_key).map_err(failed)?;
        Ok(Identity {
            cert_der: cert.der().to_vec(),
            key_der: signing_key.serialize_der(),
        })
    }

    /// Writes DIR/identity/cert.der and DIR/identity/key.der (key mode 0600). Each file is
    /// written to a temporary file, fsynced, then linked into place without replacing anything
    /// (the key first, so a present cert.der means a complete identity), and the directory is
    /// fsynced. Refuses to overwrite an existing identity.
    pub fn save(&self, data_dir: &Path) -> Result<(), IdentityError> {
        let dir = data_dir.join(IDENTITY_DIR);
        for name in [CERT_FILE, KEY_FILE] {
            let path = dir.join(name);
            if path.try_exists().map_err(io_error("check", &path))? {
                return Err(IdentityError::AlreadyExists { path });
            }
        }
        DirBuilder::new()
            .recursive(true)
            .mode(IDENTITY_DIR_MODE)
            .create(&dir)
            .map_err(io_error("create directory", &dir))?;
        sync_dir(data_dir)?;
        write_new_file(&dir, KEY_FILE, &self.key_der, KEY_FILE_MODE)?;
        write_new_file(&dir, CERT_FILE, &self.cert_der, CERT_FILE_MODE)?;
        sync_dir(&dir)
    }

    /// Loads the identity written by [`Identity::save`]; a missing identity gives an error that
    /// says to run `init`, a key that does not match its certificate an error naming the files.
    pub fn load(data_dir: &Path) -> Result<Identity, IdentityError> {
        let dir = data_dir.join(IDENTITY_DIR);
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);
        let cert_der = match fs::read(&cert_path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(if key_path.exists() {
                    IdentityError::Incomplete {
                        dir,
                        missing: cert_path,
                    }
                } else {
                    IdentityError::NotInitialized { dir }
                });
            }
            Err(e) => return Err(io_error("read", &cert_path)(e)),
        };
        let key_der = match fs::read(&key_path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(IdentityError::Incomplete {
                    dir,
                    missing: key_path,
                });
            }
            Err(e) => return Err(io_error("read", &key_path)(e)),
        };
        let identity = Identity { cert_der, key_der };
        // Parses the key and checks it belongs to the certificate, so a damaged identity is
        // reported here, naming its directory, rather than as a TLS error later.
        rustls::sign::CertifiedKey::from_der(vec![identity.cert()], identity.key(), &provider())
            .map_err(|e| IdentityError::Corrupt {
                dir,
                reason: format!("{KEY_FILE} and {CERT_FILE} do not form a usable key pair: {e}"),
            })?;
        Ok(identity)
    }

    /// Fingerprint of this identity's certificate: what peers pin or authorize.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of_der(&self.cert_der)
    }

    /// The certificate, DER-encoded.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    fn cert(&self) -> CertificateDer<'static> {
        CertificateDer::from(self.cert_der.clone())
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
}

/// Writes `bytes` to `dir/name` through a fsynced temporary file, failing if `dir/name` exists.
fn write_new_file(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> Result<(), IdentityError> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_error("create", &tmp))?;
    // `mode` only applies when the file is created: a leftover temporary file keeps its own.
    file.set_permissions(Permissions::from_mode(mode))
        .map_err(io_error("set permissions of", &tmp))?;
    file.write_all(bytes).map_err(io_error("write", &tmp))?;
    file.sync_all().map_err(io_error("fsync", &tmp))?;
    drop(file);
    // A hard link is a rename that never replaces an existing file.
    let linked = fs::hard_link(&tmp, &path);
    let removed = fs::remove_file(&tmp);
    match linked {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(IdentityError::AlreadyExists { path });
        }
        Err(e) => return Err(io_error("link into place", &path)(e)),
    }
    removed.map_err(io_error("remove", &tmp))
}

fn sync_dir(dir: &Path) -> Result<(), IdentityError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("fsync directory", dir))
}

/// The one crypto provider used everywhere: ring (never aws-lc-rs, see DEPENDENCIES.md).
fn provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// Decides, at every handshake, whether an agent's certificate is authorized (the replica
/// re-reads its list, so `authorize` takes effect without a restart).
pub type AuthorizeFn = Arc<dyn Fn(&Fingerprint) -> bool + Send + Sync>;

/// Server (replica) side: requires a client certificate whose fingerprint `authorize`
/// accepts. An unknown one is refused during the handshake with one `tracing::warn!` line
/// naming its fingerprint and the remedy (so the caller need not log that refusal again);
/// the agent learns of it at its first stream operation.
pub fn server_config(
    identity: &Identity,
    authorize: AuthorizeFn,
) -> Result<quinn::ServerConfig, IdentityError> {
    let provider = Arc::new(provider());
    let verifier = Arc::new(AuthorizedAgents {
        authorize,
        provider: provider.clone(),
    });
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![identity.cert()], identity.key())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    // No resumption: every connection runs a full handshake, so `authorize` is always asked.
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    tls.send_tls13_tickets = 0;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
    config.transport_config(transport_config());
    Ok(config)
}

/// Client (agent) side: presents `identity` and accepts only a server certificate whose
/// fingerprint equals `replica`; a mismatch fails the connection with an error naming both
/// fingerprints. Dial with [`SERVER_NAME`].
pub fn client_config(
    identity: &Identity,
    replica: Fingerprint,
) -> Result<quinn::ClientConfig, IdentityError> {
    let provider = Arc::new(provider());
    let verifier = Arc::new(PinnedReplica {
        replica,
        provider: provider.clone(),
    });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![identity.cert()], identity.key())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.resumption = rustls::client::Resumption::disabled();
    let mut config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
    config.transport_config(transport_config());
    Ok(config)
}

/// The kernel buffer sizes a link's UDP socket got, as the kernel reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpBuffers {
    pub recv: usize,
    pub send: usize,
}

impl UdpBuffers {
    /// Whether both directions got at least [`UDP_BUFFER_BYTES`].
    pub fn sufficient(&self) -> bool {
        self.recv >= UDP_BUFFER_BYTES && self.send >= UDP_BUFFER_BYTES
    }
}

/// Sizes the kernel buffers of a link's UDP socket to [`UDP_BUFFER_BYTES`] each way, past
/// `net.core.rmem_max` / `wmem_max` where the process may (`SO_RCVBUFFORCE`, CAP_NET_ADMIN),
/// else as far as those limits allow, and logs a warning naming the sysctl to raise when the
/// result is short. Never fails: a smaller buffer is slower, not wrong.
pub fn size_udp_buffers(socket: &std::net::UdpSocket) -> UdpBuffers {
    use rustix::net::sockopt;
    if sockopt::set_socket_recv_buffer_size_force(socket, UDP_BUFFER_BYTES).is_err() {
        let _ = sockopt::set_socket_recv_buffer_size(socket, UDP_BUFFER_BYTES);
    }
    if sockopt::set_socket_send_buffer_size_force(socket, UDP_BUFFER_BYTES).is_err() {
        let _ = sockopt::set_socket_send_buffer_size(socket, UDP_BUFFER_BYTES);
    }
    // Linux reports twice the size asked for (it counts its bookkeeping); what counts here
    // is the room for data, so halve it back.
    let got = UdpBuffers {
        recv: sockopt::socket_recv_buffer_size(socket).map_or(0, |n| n / 2),
        send: sockopt::socket_send_buffer_size(socket).map_or(0, |n| n / 2),
    };
    if !got.sufficient() {
        tracing::warn!(
            "the link's UDP socket got {} bytes of receive buffer and {} of send buffer, \
             short of {UDP_BUFFER_BYTES}: packets dropped there slow replication down; \
             raise net.core.rmem_max and net.core.wmem_max to at least {UDP_BUFFER_BYTES} \
             (sysctl) or give the process CAP_NET_ADMIN",
            got.recv,
            got.send
        );
    }
    got
}

/// Transport limits shared by both sides (see the constants above).
fn transport_config() -> Arc<TransportConfig> {
    let mut transport = TransportConfig::default();
    transport
        .keep_alive_interval(Some(KEEP_ALIVE_INTERVAL))
        .max_idle_timeout(Some(IdleTimeout::from(VarInt::from_u32(IDLE_TIMEOUT_MS))))
        .stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW_BYTES))
        .receive_window(VarInt::from_u32(CONNECTION_RECEIVE_WINDOW_BYTES))
        .send_window(SEND_WINDOW_BYTES)
        .max_concurrent_uni_streams(VarInt::from_u32(UNI_STREAMS_MAX))
        .max_concurrent_bidi_streams(VarInt::from_u32(BIDI_STREAMS_MAX));
    Arc::new(transport)
}

/// Wraps an [`IdentityError`] so that rustls carries its message into the connection error.
fn refusal(error: IdentityError) -> rustls::Error {
    rustls::Error::Other(rustls::OtherError(Arc::new(error)))
}

/// The replica's client-certificate check: the fingerprint must be authorized right now.
struct AuthorizedAgents {
    authorize: AuthorizeFn,
    provider: Arc<CryptoProvider>,
}

impl fmt::Debug for AuthorizedAgents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthorizedAgents").finish_non_exhaustive()
    }
}

impl ClientCertVerifier for AuthorizedAgents {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let presented = Fingerprint::of_der(end_entity.as_ref());
        if (self.authorize)(&presented) {
            return Ok(ClientCertVerified::assertion());
        }
        let error = IdentityError::AgentNotAuthorized { presented };
        tracing::warn!(agent = %presented, "refused a connection: {error}");
        Err(refusal(error))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The agent's server-certificate check: exactly the pinned replica fingerprint.
#[derive(Debug)]
struct PinnedReplica {
    replica: Fingerprint,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedReplica {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = Fingerprint::of_der(end_entity.as_ref());
        if presented == self.replica {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(refusal(IdentityError::ReplicaMismatch {
                expected: self.replica,
                presented,
            }))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The agent names a TLS refusal by these words of the sentences (see the marks).
    #[test]
    fn the_refusal_sentences_hold_their_marks() {
        let fp = Fingerprint([7; 32]);
        let refused = IdentityError::AgentNotAuthorized { presented: fp };
        assert!(
            refused.to_string().contains(NOT_AUTHORIZED_MARK),
            "{refused}"
        );
        let mismatch = IdentityError::ReplicaMismatch {
            expected: fp,
            presented: Fingerprint([8; 32]),
        };
        assert!(
            mismatch.to_string().contains(REPLICA_MISMATCH_MARK),
            "{mismatch}"
        );
    }
}
