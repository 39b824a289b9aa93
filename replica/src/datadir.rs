//! The replica's data directory: where each file lives, the configuration file (lenient TOML,
//! validated once), the authorized agents list, and the `serve.lock` flock that marks a running
//! `serve`.
//!
//! ```text
//! DIR/replica.toml              listen address, [retention] of new groups (defaults apply
//!                               to anything missing)
//! DIR/identity/                 the replica's certificate and key (identity::Identity::save)
//! DIR/authorized_agents.toml    [[agent]] fingerprint = "<hex>", name = "..."
//! DIR/meta.db                   the catalog (SQLite, WAL)
//! DIR/volumes/<name>/target     target disk of each volume (sparse file)
//! DIR/journal/<group>/<16 digits>.seg   journal segments
//! DIR/serve.lock                flock held while `serve` runs
//! DIR/paused.json               groups whose ingest is paused, for `status` (pause_board)
//! ```

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use cdp_shared::identity::{Fingerprint, Identity};
use rustix::fs::FlockOperation;
use serde::{Deserialize, Serialize};

use crate::error::{ReplicaError, Result};
use crate::retention::{
    Retention, format_duration, format_size, parse_bytes, parse_duration, parse_size,
};

/// Default address `serve` listens on (UDP, QUIC).
pub const LISTEN_DEFAULT: &str = "127.0.0.1:7400";
/// Longest configuration or authorized-agents file read.
pub const SMALL_FILE_BYTES_MAX: u64 = 1 << 20;

const CONFIG_FILE: &str = "replica.toml";
const AGENTS_FILE: &str = "authorized_agents.toml";
const CATALOG_FILE: &str = "meta.db";
const LOCK_FILE: &str = "serve.lock";
const PAUSE_BOARD_FILE: &str = "paused.json";
const VOLUMES_DIR: &str = "volumes";
const JOURNAL_DIR: &str = "journal";
const TARGET_FILE: &str = "target";

/// Paths inside one data directory.
#[derive(Clone, Debug)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    pub fn new(root: &Path) -> DataDir {
        DataDir {
            root: root.to_path_buf(),
        }
    }

    /// A data directory that `init` has prepared; otherwise the "run init first" error.
    pub fn existing(root: &Path) -> Result<DataDir> {
        let dir = DataDir::new(root);
        if !dir.catalog().is_file() {
            return Err(ReplicaError::NotInitialized {
                dir: root.to_path_buf(),
            });
        }
        Ok(dir)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn config(&self) -> PathBuf {
        self.root.join(CONFIG_FILE)
    }
    pub fn agents(&self) -> PathBuf {
        self.root.join(AGENTS_FILE)
    }
    pub fn catalog(&self) -> PathBuf {
        self.root.join(CATALOG_FILE)
    }
    pub fn lock(&self) -> PathBuf {
        self.root.join(LOCK_FILE)
    }
    pub fn pause_board(&self) -> PathBuf {
        self.root.join(PAUSE_BOARD_FILE)
    }
    pub fn volumes(&self) -> PathBuf {
        self.root.join(VOLUMES_DIR)
    }
    pub fn target(&self, volume: &str) -> PathBuf {
        self.root.join(VOLUMES_DIR).join(volume).join(TARGET_FILE)
    }
    pub fn journals(&self) -> PathBuf {
        self.root.join(JOURNAL_DIR)
    }
    pub fn journal(&self, group: &str) -> PathBuf {
        self.root.join(JOURNAL_DIR).join(group)
    }

    /// Loads the identity, mapping "no identity" to the "run init first" error.
    pub fn identity(&self) -> Result<Identity> {
        if !self.catalog().is_file() {
            return Err(ReplicaError::NotInitialized {
                dir: self.root.clone(),
            });
        }
        Ok(Identity::load(&self.root)?)
    }
}

fn read_small(path: &Path) -> Result<Option<String>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ReplicaError::io("open", path)(e)),
    };
    let mut text = String::new();
    io::Read::read_to_string(&mut io::Read::take(file, SMALL_FILE_BYTES_MAX), &mut text)
        .map_err(ReplicaError::io("read", path))?;
    Ok(Some(text))
}

/// Writes `text` to `path` through a fsynced temporary file renamed into place.
pub(crate) fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(ReplicaError::io("create", &tmp))?;
    f.write_all(text.as_bytes())
        .map_err(ReplicaError::io("write", &tmp))?;
    f.sync_all().map_err(ReplicaError::io("fsync", &tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(ReplicaError::io("rename into place", path))?;
    if let Some(parent) = path.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(ReplicaError::io("fsync directory", dir))
}

/// `replica.toml` as written: every field optional.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConfigToml {
    /// UDP address `serve` listens on.
    pub listen: Option<String>,
    /// TCP address `serve` serves `/metrics` on (`--http` overrides it); none: not served.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
    /// The retention of groups created from now on.
    pub retention: RetentionToml,
    /// The background verifier.
    pub verifier: VerifierToml,
    /// Journal segment files.
    pub journal: JournalToml,
}

/// `[journal]` of `replica.toml`, read when `serve` starts.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JournalToml {
    /// Size at which a group's journal segment file is rotated, e.g. "256MiB" (the default).
    pub segment_size: Option<String>,
}

/// Smallest `[journal] segment_size` accepted.
pub const SEGMENT_SIZE_MIN: u64 = 64 << 10;
/// Largest `[journal] segment_size` accepted, and the default: the journal's
/// `SEGMENT_BYTES_TARGET` (`journal` asserts they are equal; `datadir` is below `journal`).
pub const SEGMENT_SIZE_MAX: u64 = 256 << 20;

/// `[verifier]` of `replica.toml`, read when `serve` starts.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VerifierToml {
    /// Chunks the background verifier checks per second (default 2; 0 turns it off).
    pub chunks_per_sec: Option<f64>,
    /// Resend mismatched chunks from the agent as soon as they are found (default false).
    pub auto_repair: Option<bool>,
}

/// The validated `[verifier]` section.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct VerifierConfig {
    /// 0: no background verification (on-demand runs still work).
    pub chunks_per_sec: f64,
    pub auto_repair: bool,
}

/// Default background verification budget.
pub const VERIFY_CHUNKS_PER_SEC_DEFAULT: f64 = 2.0;
/// Highest budget accepted.
pub const VERIFY_CHUNKS_PER_SEC_MAX: f64 = 10_000.0;

impl Default for VerifierConfig {
    fn default() -> Self {
        VerifierConfig {
            chunks_per_sec: VERIFY_CHUNKS_PER_SEC_DEFAULT,
            auto_repair: false,
        }
    }
}

/// `[retention]` of `replica.toml`: the retention a new group starts with (a group's own is in
/// the catalog, changed with `cdp-replica retention`).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionToml {
    /// The window, e.g. "24h" (default 24h).
    pub window: Option<String>,
    /// The journal cap, e.g. "100GiB", or "none" (default none).
    pub max_journal: Option<String>,
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct ReplicaConfig {
    pub listen: SocketAddr,
    /// Where `serve` serves `/metrics`, if anywhere.
    pub http: Option<SocketAddr>,
    /// The retention of groups created from now on.
    pub retention: Retention,
    pub verifier: VerifierConfig,
    /// Where journal segments are rotated (bytes; [`SEGMENT_SIZE_MAX`] by
    /// default).
    pub journal_segment_bytes: u64,
}

impl ConfigToml {
    pub fn parse_and_validate(self, path: &Path) -> Result<ReplicaConfig> {
        let invalid = |reason: String| ReplicaError::Config {
            path: path.to_path_buf(),
            reason,
        };
        let listen = self.listen.as_deref().unwrap_or(LISTEN_DEFAULT);
        let listen = listen.parse::<SocketAddr>().map_err(|e| {
            invalid(format!(
                "listen = {listen:?} is not an address like {LISTEN_DEFAULT} ({e})"
            ))
        })?;
        let http = match self.http.as_deref() {
            None => None,
            Some(h) => Some(h.parse::<SocketAddr>().map_err(|e| {
                invalid(format!(
                    "http = {h:?} is not an address like 127.0.0.1:9102 ({e})"
                ))
            })?),
        };
        let mut retention = Retention::default();
        if let Some(w) = &self.retention.window {
            retention.window =
                parse_duration(w).map_err(|e| invalid(format!("[retention] window: {e}")))?;
        }
        if let Some(m) = &self.retention.max_journal {
            retention.journal_bytes_max =
                parse_size(m).map_err(|e| invalid(format!("[retention] max_journal: {e}")))?;
        }
        let mut verifier = VerifierConfig::default();
        if let Some(r) = self.verifier.chunks_per_sec {
            if !(0.0..=VERIFY_CHUNKS_PER_SEC_MAX).contains(&r) {
                return Err(invalid(format!(
                    "[verifier] chunks_per_sec = {r} is outside 0..={VERIFY_CHUNKS_PER_SEC_MAX} (0 turns the background verifier off)"
                )));
            }
            verifier.chunks_per_sec = r;
        }
        if let Some(a) = self.verifier.auto_repair {
            verifier.auto_repair = a;
        }
        let journal_segment_bytes = match &self.journal.segment_size {
            None => SEGMENT_SIZE_MAX,
            Some(text) => match parse_bytes(text) {
                Ok(n) if (SEGMENT_SIZE_MIN..=SEGMENT_SIZE_MAX).contains(&n) => n,
                Ok(_) => {
                    return Err(invalid(format!(
                        "[journal] segment_size = {text:?} is outside {}..={} (smaller segments mean more files, never less data)",
                        format_size(SEGMENT_SIZE_MIN),
                        format_size(SEGMENT_SIZE_MAX)
                    )));
                }
                Err(why) => {
                    return Err(invalid(format!(
                        "[journal] segment_size = {text:?} is not a size: {why}; write a whole number and a unit, such as 1MiB or 256MiB"
                    )));
                }
            },
        };
        Ok(ReplicaConfig {
            listen,
            http,
            retention,
            verifier,
            journal_segment_bytes,
        })
    }
}

/// Reads and validates `replica.toml`; a missing file means the defaults.
pub fn load_config(dir: &DataDir) -> Result<ReplicaConfig> {
    let path = dir.config();
    let toml_text = read_small(&path)?.unwrap_or_default();
    let raw: ConfigToml = toml::from_str(&toml_text).map_err(|e| ReplicaError::Config {
        path: path.clone(),
        reason: e.to_string().trim().replace('\n', " "),
    })?;
    raw.parse_and_validate(&path)
}

pub fn write_config(dir: &DataDir, listen: SocketAddr, retention: &Retention) -> Result<()> {
    let cap = match retention.journal_bytes_max {
        Some(n) => format_size(n),
        None => "none".to_owned(),
    };
    let text = format!(
        "# cdp-replica configuration\n# UDP address that `cdp-replica serve` listens on (QUIC).\nlisten = \"{listen}\"\n\n\
         # The retention a group starts with when its agent first connects; change a group's own\n\
         # later with `cdp-replica retention --group NAME`.\n\
         [retention]\n\
         # How far back points are kept, in agent time before the group's newest batch: 30s, 15m, 24h, 7d.\n\
         window = \"{}\"\n\
         # Cap on the group's journal bytes (512MiB, 100GiB, 1TB), or \"none\".\n\
         max_journal = \"{cap}\"\n\n\
         # The background verifier, read when `serve` starts.\n\
         [verifier]\n\
         # Chunks (1 MiB) compared with the agent per second; 0 turns it off.\n\
         chunks_per_sec = 2\n\
         # Resend mismatched chunks from the agent as soon as they are found.\n\
         auto_repair = false\n\n\
         # Journal segment files, read when `serve` starts.\n\
         [journal]\n\
         # A group's journal segment is rotated at this size (64KiB to 256MiB).\n\
         segment_size = \"256MiB\"\n",
        format_duration(retention.window)
    );
    write_atomically(&dir.config(), &text)
}

/// One authorized agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizedAgent {
    pub fingerprint: Fingerprint,
    #[serde(default)]
    pub name: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentsToml {
    #[serde(default)]
    agent: Vec<AuthorizedAgent>,
}

/// The authorized agents (empty when the file is missing).
pub fn read_agents(dir: &DataDir) -> Result<Vec<AuthorizedAgent>> {
    let path = dir.agents();
    let Some(text) = read_small(&path)? else {
        return Ok(Vec::new());
    };
    let parsed: AgentsToml = toml::from_str(&text).map_err(|e| ReplicaError::AuthorizedAgents {
        path,
        reason: e.to_string().trim().replace('\n', " "),
    })?;
    Ok(parsed.agent)
}

pub fn write_agents(dir: &DataDir, agents: &[AuthorizedAgent]) -> Result<()> {
    let body = toml::to_string(&AgentsToml {
        agent: agents.to_vec(),
    })
    .map_err(|e| ReplicaError::AuthorizedAgents {
        path: dir.agents(),
        reason: e.to_string(),
    })?;
    write_atomically(
        &dir.agents(),
        &format!(
            "# Agents allowed to connect (cdp-replica authorize, deauthorize). Re-read at every handshake\n# and every 500 ms by each open connection.\n{body}"
        ),
    )
}

/// The flock on `serve.lock`, held while `serve` runs; released when dropped.
#[derive(Debug)]
pub struct ServeLock {
    _file: File,
}

impl ServeLock {
    /// Takes the lock, or fails with "another serve is running".
    pub fn acquire(dir: &DataDir) -> Result<ServeLock> {
        let path = dir.lock();
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(ReplicaError::io("open", &path))?;
        match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(ServeLock { _file: file }),
            Err(rustix::io::Errno::WOULDBLOCK) => Err(ReplicaError::AlreadyServing {
                dir: dir.root().to_path_buf(),
            }),
            Err(e) => Err(ReplicaError::io("lock", &path)(e.into())),
        }
    }

    /// Whether a `serve` holds the lock right now.
    pub fn is_held(dir: &DataDir) -> Result<bool> {
        let path = dir.lock();
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(ReplicaError::io("open", &path)(e)),
        };
        match rustix::fs::flock(&file, FlockOperation::NonBlockingLockShared) {
            Ok(()) => {
                // Released when `file` is closed.
                Ok(false)
            }
            Err(rustix::io::Errno::WOULDBLOCK) => Ok(true),
            Err(e) => Err(ReplicaError::io("check the lock", &path)(e.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example file with every commented key (and table header) uncommented.
    fn uncommented(text: &str) -> String {
        text.lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest)
                    if rest.starts_with('[')
                        || rest.split_once(" = ").is_some_and(|(k, _)| {
                            !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                        }) =>
                {
                    rest.to_owned()
                }
                _ => l.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The example `replica.toml` that `make install` installs is valid as it is and with
    /// every key uncommented.
    #[test]
    fn the_example_file_is_valid_with_and_without_its_comments() {
        let path = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../packaging/examples/replica.toml"
        ));
        let text = fs::read_to_string(path).expect("read the example");
        let all = uncommented(&text);
        assert!(
            all.contains("\nhttp = ") && all.contains("\nauto_repair = "),
            "{all}"
        );
        for t in [text.clone(), all] {
            let c: ConfigToml = toml::from_str(&t).unwrap_or_else(|e| panic!("{e}\n{t}"));
            c.parse_and_validate(path)
                .unwrap_or_else(|e| panic!("{e}\n{t}"));
        }
    }

    #[test]
    fn config_defaults_and_validation() {
        let p = Path::new("/x/replica.toml");
        let c: ConfigToml = toml::from_str("").expect("empty config");
        assert_eq!(
            c.parse_and_validate(p).expect("valid").listen.to_string(),
            LISTEN_DEFAULT
        );
        let e = toml::from_str::<ConfigToml>("listen = \"0.0.0.0:9\"\nunknown = 1")
            .expect_err("an unknown key is refused");
        assert!(e.to_string().contains("unknown field `unknown`"), "{e}");
        let c: ConfigToml = toml::from_str("listen = \"nowhere\"").expect("parses");
        let e = c.parse_and_validate(p).expect_err("invalid address");
        assert!(e.to_string().contains("nowhere"), "{e}");
        let c: ConfigToml =
            toml::from_str("[retention]\nwindow = \"2h\"\nmax_journal = \"1GiB\"").expect("parses");
        let r = c.parse_and_validate(p).expect("valid").retention;
        assert_eq!(r.window.as_secs(), 7200);
        assert_eq!(r.journal_bytes_max, Some(1 << 30));
        let c: ConfigToml = toml::from_str("[retention]\nwindow = \"two weeks\"").expect("parses");
        let e = c.parse_and_validate(p).expect_err("invalid window");
        assert!(e.to_string().contains("[retention] window"), "{e}");
        // [verifier]: defaults, a budget, off, out of range.
        let c: ConfigToml = toml::from_str("").expect("empty config");
        assert_eq!(
            c.parse_and_validate(p).expect("valid").verifier,
            VerifierConfig::default()
        );
        let c: ConfigToml =
            toml::from_str("[verifier]\nchunks_per_sec = 0.5\nauto_repair = true").expect("parses");
        let v = c.parse_and_validate(p).expect("valid").verifier;
        assert_eq!((v.chunks_per_sec, v.auto_repair), (0.5, true));
        let c: ConfigToml = toml::from_str("[verifier]\nchunks_per_sec = 0").expect("parses");
        assert_eq!(
            c.parse_and_validate(p)
                .expect("valid")
                .verifier
                .chunks_per_sec,
            0.0
        );
        let c: ConfigToml = toml::from_str("[verifier]\nchunks_per_sec = -1").expect("parses");
        let e = c.parse_and_validate(p).expect_err("negative budget");
        assert!(e.to_string().contains("[verifier] chunks_per_sec"), "{e}");
    }

    #[test]
    fn the_config_written_by_init_reads_back() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = DataDir::new(tmp.path());
        let listen: SocketAddr = "127.0.0.1:7401".parse().expect("addr");
        for retention in [
            Retention::default(),
            Retention {
                window: std::time::Duration::from_secs(90),
                journal_bytes_max: Some(100 << 30),
            },
        ] {
            write_config(&dir, listen, &retention).expect("write");
            let c = load_config(&dir).expect("load");
            assert_eq!((c.listen, c.retention), (listen, retention));
            assert_eq!(c.verifier, VerifierConfig::default());
            assert_eq!(c.journal_segment_bytes, SEGMENT_SIZE_MAX);
        }
    }

    #[test]
    fn an_unknown_key_is_refused_with_its_name_and_the_file() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = DataDir::new(tmp.path());
        for (text, key) in [
            ("listne = \"127.0.0.1:1\"\n", "listne"),
            ("[retention]\nwindw = \"1h\"\n", "windw"),
            ("[verifier]\nchunks_per_second = 5\n", "chunks_per_second"),
            ("[journal]\nsegment_bytes = \"1MiB\"\n", "segment_bytes"),
            ("[retenton]\nwindow = \"1h\"\n", "retenton"),
        ] {
            fs::write(dir.config(), text).expect("write");
            let e = load_config(&dir).expect_err(key).to_string();
            assert!(e.contains(&dir.config().display().to_string()), "{e}");
            assert!(e.contains(&format!("unknown field `{key}`")), "{e}");
        }
        fs::write(dir.config(), "[retention]\nwindow = \"1h30m\"\n").expect("write");
        let c = load_config(&dir).expect("1h30m is a window");
        assert_eq!(c.retention.window, std::time::Duration::from_secs(5400));
        fs::write(
            dir.agents(),
            format!(
                "[[agent]]\nfingerprint = \"{}\"\nnmae = \"a\"\n",
                "ab".repeat(32)
            ),
        )
        .expect("write");
        let e = read_agents(&dir).expect_err("unknown key").to_string();
        assert!(
            e.contains("nmae") && e.contains(&dir.agents().display().to_string()),
            "{e}"
        );
    }

    #[test]
    fn the_segment_size_is_bounded() {
        let parse = |t: &str| {
            toml::from_str::<ConfigToml>(t)
                .expect("toml")
                .parse_and_validate(Path::new("replica.toml"))
        };
        let ok = parse("[journal]\nsegment_size = \"1MiB\"\n").expect("1MiB");
        assert_eq!(ok.journal_segment_bytes, 1 << 20);
        // Below a journal cap's minimum, as the trimmer's crash test runs it.
        let small = parse("[journal]\nsegment_size = \"128KiB\"\n").expect("128KiB");
        assert_eq!(small.journal_segment_bytes, 128 << 10);
        for bad in ["1KiB", "1GiB", "none", "lots"] {
            let e = parse(&format!("[journal]\nsegment_size = \"{bad}\"\n"))
                .expect_err(bad)
                .to_string();
            assert!(e.contains("[journal] segment_size"), "{bad}: {e}");
        }
    }

    #[test]
    fn lock_is_exclusive() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = DataDir::new(tmp.path());
        assert!(!ServeLock::is_held(&dir).expect("check"));
        let lock = ServeLock::acquire(&dir).expect("first lock");
        assert!(ServeLock::is_held(&dir).expect("check"));
        assert!(matches!(
            ServeLock::acquire(&dir),
            Err(ReplicaError::AlreadyServing { .. })
        ));
        drop(lock);
        assert!(!ServeLock::is_held(&dir).expect("check"));
    }
}
