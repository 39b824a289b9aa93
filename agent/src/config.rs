//! The agent's configuration (`agent.toml`: the replica and the protected volumes), in two
//! layers: [`AgentConfigFile`], the lenient serde form with its defaults, which the commands
//! that edit the file (`init`, `protect`, `unprotect`) read and save, replaced atomically (see
//! [`write_atomic`]); and [`AgentConfig`], the typed form every runtime user takes, made from
//! the file by one validation ([`AgentConfigFile::validate`]).

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use cdp_shared::units::{DurationValue, SizeValue};

use crate::fsutil::write_atomic;

pub const CONFIG_FILE: &str = "agent.toml";
/// Default cap of the spool (bytes of batches not yet acknowledged).
pub const SPOOL_BYTES_MAX_DEFAULT: u64 = 4 << 30;
/// Smallest spool cap accepted: two batches of the hard maximum size.
pub const SPOOL_BYTES_MAX_MIN: u64 = 2 * cdp_shared::types::BATCH_PAYLOAD_BYTES_MAX as u64;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VolumeConfig {
    pub name: String,
    pub device: PathBuf,
    pub group: String,
    /// The volume's id inside its group, fixed at `protect`.
    pub id: u32,
}

/// `agent.toml` as written: every key, with the defaults of the keys a file may leave out.
/// Only [`AgentConfigFile::validate`] turns it into what the agent runs with. A key it does not
/// know is refused (a mistyped key would otherwise leave its default in force unnoticed).
/// Sizes and durations take the syntax of [`cdp_shared::units`] (`"4GiB"`, `"20ms"`); a bare
/// number is bytes for a size, milliseconds for `batch_age`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfigFile {
    /// The replica, `HOST:PORT`.
    pub replica: String,
    /// The replica's certificate fingerprint (hex).
    pub replica_fingerprint: String,
    /// Age limit of an open batch (`"20ms"`; a bare number is milliseconds, and the key's
    /// older name `batch_age_ms` is still read).
    #[serde(default = "default_batch_age", alias = "batch_age_ms")]
    pub batch_age: DurationValue,
    /// Batches sent but not acknowledged, at most.
    #[serde(default = "default_in_flight")]
    pub batches_in_flight: usize,
    /// Read rate limit of the initial sync, bytes per second (0: unlimited), so that a first
    /// sync does not saturate the device or the link.
    #[serde(default = "default_sync_rate")]
    pub sync_bytes_per_sec_max: SizeValue,
    /// Cap of each group's spool, in bytes. Above it the group tracks dirty regions instead
    /// of batches, and resyncs them when the replica has caught up.
    #[serde(default = "default_spool_bytes_max")]
    pub spool_bytes_max: SizeValue,
    /// Chunks (1 MiB) each volume's activity log holds: what is resynced after a crash.
    #[serde(default = "default_al_chunks")]
    pub activity_log_chunks: usize,
    /// NBD connections served at once, in the handshake or in transmission; one more is
    /// refused. `run` lowers it to what the agent's file-descriptor limit leaves.
    #[serde(default = "default_nbd_connections_max")]
    pub nbd_connections_max: usize,
    /// RPO target of every group (`"30s"`; a bare number is seconds): above it `status`
    /// names the cause `rpo-breach`, on the agent and on the replica.
    #[serde(default = "default_rpo_target")]
    pub rpo_target: DurationValue,
    /// Where `run` serves `/metrics` (`"127.0.0.1:9101"`); `--metrics` overrides it. Not
    /// served when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<std::net::SocketAddr>,
    /// Per-group settings (`[group.NAME]`), over the ones above.
    #[serde(default, rename = "group", skip_serializing_if = "BTreeMap::is_empty")]
    pub groups: BTreeMap<String, GroupConfigFile>,
    #[serde(default, rename = "volume")]
    pub volumes: Vec<VolumeConfig>,
}

/// One group's settings in `agent.toml` (`[group.NAME]`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GroupConfigFile {
    /// The group's RPO target, instead of the file's `rpo_target`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpo_target: Option<DurationValue>,
}

/// Default RPO target of a group.
pub const RPO_TARGET_DEFAULT: Duration = Duration::from_secs(30);

fn default_rpo_target() -> DurationValue {
    DurationValue::of(RPO_TARGET_DEFAULT)
}
fn default_batch_age() -> DurationValue {
    DurationValue::of(Duration::from_millis(
        cdp_shared::types::BATCH_AGE_MS_DEFAULT,
    ))
}
fn default_sync_rate() -> SizeValue {
    SizeValue::Bytes(0)
}
fn default_spool_bytes_max() -> SizeValue {
    SizeValue::of(SPOOL_BYTES_MAX_DEFAULT)
}
fn default_al_chunks() -> usize {
    crate::activity_log::CAPACITY_DEFAULT
}
fn default_nbd_connections_max() -> usize {
    cdp_shared::nbd::server::CONNECTIONS_MAX_DEFAULT
}
fn default_in_flight() -> usize {
    cdp_shared::types::BATCHES_IN_FLIGHT_DEFAULT
}

/// A value of `agent.toml` the agent refuses; the message names its key.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{key} must be at least 1 (1ms for a duration)")]
    Zero { key: &'static str },
    #[error("spool_bytes_max must be at least {} (two batches)", cdp_shared::units::format_size(*min))]
    SpoolTooSmall { min: u64 },
    #[error("{key} = {value}: {why}; write {example}")]
    Unit {
        key: &'static str,
        value: String,
        why: String,
        example: &'static str,
    },
}

impl ConfigError {
    /// The key of the refused value.
    pub fn key(&self) -> &'static str {
        match self {
            ConfigError::Zero { key } => key,
            ConfigError::SpoolTooSmall { .. } => "spool_bytes_max",
            ConfigError::Unit { key, .. } => key,
        }
    }
}

/// The configuration the agent runs with: `agent.toml` validated, in units.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// The replica, `HOST:PORT`.
    pub replica: String,
    /// The replica's certificate fingerprint (hex), parsed where the link is set up.
    pub replica_fingerprint: String,
    /// Age limit of an open batch (at least 1 ms).
    pub batch_age_max: Duration,
    /// Batches sent but not acknowledged, at most (at least 1).
    pub batches_in_flight: usize,
    /// Read rate limit of the initial sync, bytes per second (0: unlimited).
    pub sync_bytes_per_sec_max: u64,
    /// Cap of each group's spool, in bytes (at least [`SPOOL_BYTES_MAX_MIN`]).
    pub spool_bytes_max: u64,
    /// Chunks each volume's activity log holds (at least 1).
    pub activity_log_chunks: usize,
    /// NBD connections served at once, before `run` fits it to the descriptor limit (at
    /// least 1).
    pub nbd_connections_max: usize,
    /// RPO target of the groups without one of their own (at least 1 ms).
    pub rpo_target: Duration,
    /// Groups' own RPO targets.
    pub group_rpo_targets: BTreeMap<String, Duration>,
    /// Where `run` serves `/metrics`, if anywhere.
    pub metrics: Option<std::net::SocketAddr>,
    pub volumes: Vec<VolumeConfig>,
}

impl AgentConfigFile {
    /// A new agent's file: the replica, every default, no volume.
    pub fn new(replica: &str, replica_fingerprint: &str) -> AgentConfigFile {
        AgentConfigFile {
            replica: replica.to_owned(),
            replica_fingerprint: replica_fingerprint.to_owned(),
            batch_age: default_batch_age(),
            batches_in_flight: default_in_flight(),
            sync_bytes_per_sec_max: default_sync_rate(),
            spool_bytes_max: default_spool_bytes_max(),
            activity_log_chunks: default_al_chunks(),
            nbd_connections_max: default_nbd_connections_max(),
            rpo_target: default_rpo_target(),
            metrics: None,
            groups: BTreeMap::new(),
            volumes: Vec::new(),
        }
    }

    /// Reads and parses `agent.toml` without validating its values.
    fn read(data_dir: &Path) -> Result<AgentConfigFile> {
        let path = data_dir.join(CONFIG_FILE);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                bail!(
                    "no agent in {}: run `cdp-agent init --data {}` first",
                    data_dir.display(),
                    data_dir.display()
                )
            }
            Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
        };
        toml::from_str(&text)
            .with_context(|| format!("{} is not a valid agent configuration", path.display()))
    }

    /// Reads `agent.toml` for an edit, refusing it as [`AgentConfig::load`] would, so that an
    /// edit never starts from a file the agent does not run with.
    pub fn load(data_dir: &Path) -> Result<AgentConfigFile> {
        let file = AgentConfigFile::read(data_dir)?;
        file.validate().map_err(|e| in_file(data_dir, e))?;
        Ok(file)
    }

    pub fn save(&self, data_dir: &Path) -> Result<()> {
        let text = toml::to_string(self).context("serialize the agent configuration")?;
        let path = data_dir.join(CONFIG_FILE);
        write_atomic(&path, text.as_bytes()).with_context(|| format!("write {}", path.display()))
    }

    /// The one validation: the typed configuration, or the first value refused.
    pub fn validate(&self) -> Result<AgentConfig, ConfigError> {
        let spool_bytes_max = size("spool_bytes_max", &self.spool_bytes_max)?;
        if spool_bytes_max < SPOOL_BYTES_MAX_MIN {
            return Err(ConfigError::SpoolTooSmall {
                min: SPOOL_BYTES_MAX_MIN,
            });
        }
        let sync_bytes_per_sec_max = size("sync_bytes_per_sec_max", &self.sync_bytes_per_sec_max)?;
        let batch_age_max = self
            .batch_age
            .duration(Duration::from_millis(1))
            .map_err(|why| ConfigError::Unit {
                key: "batch_age",
                value: self.batch_age.to_string(),
                why,
                example: "a duration such as 20ms or 1s",
            })?;
        if batch_age_max < Duration::from_millis(1) {
            return Err(ConfigError::Zero { key: "batch_age" });
        }
        at_least_one("batches_in_flight", self.batches_in_flight as u64)?;
        at_least_one("activity_log_chunks", self.activity_log_chunks as u64)?;
        at_least_one("nbd_connections_max", self.nbd_connections_max as u64)?;
        let rpo_target = parse_rpo_target("rpo_target", &self.rpo_target)?;
        let mut group_rpo_targets = BTreeMap::new();
        for (name, g) in &self.groups {
            if let Some(t) = &g.rpo_target {
                group_rpo_targets.insert(name.clone(), parse_rpo_target("group.*.rpo_target", t)?);
            }
        }
        Ok(AgentConfig {
            replica: self.replica.clone(),
            replica_fingerprint: self.replica_fingerprint.clone(),
            batch_age_max,
            batches_in_flight: self.batches_in_flight,
            sync_bytes_per_sec_max,
            spool_bytes_max,
            activity_log_chunks: self.activity_log_chunks,
            nbd_connections_max: self.nbd_connections_max,
            rpo_target,
            group_rpo_targets,
            metrics: self.metrics,
            volumes: self.volumes.clone(),
        })
    }
}

fn size(key: &'static str, value: &SizeValue) -> Result<u64, ConfigError> {
    value.bytes().map_err(|why| ConfigError::Unit {
        key,
        value: value.to_string(),
        why,
        example: "a size such as 512MiB or 4GiB",
    })
}

fn parse_rpo_target(key: &'static str, value: &DurationValue) -> Result<Duration, ConfigError> {
    let d = value
        .duration(Duration::from_secs(1))
        .map_err(|why| ConfigError::Unit {
            key,
            value: value.to_string(),
            why,
            example: "a duration such as 30s or 5m",
        })?;
    if d < Duration::from_millis(1) {
        return Err(ConfigError::Zero { key });
    }
    Ok(d)
}

fn at_least_one(key: &'static str, value: u64) -> Result<(), ConfigError> {
    if value == 0 {
        return Err(ConfigError::Zero { key });
    }
    Ok(())
}

/// A refused value as an operator reads it: the file, then the key and what it must be.
fn in_file(data_dir: &Path, e: ConfigError) -> anyhow::Error {
    anyhow::anyhow!("{}: {e}", data_dir.join(CONFIG_FILE).display())
}

impl AgentConfig {
    /// Reads and validates `agent.toml`.
    pub fn load(data_dir: &Path) -> Result<AgentConfig> {
        AgentConfigFile::read(data_dir)?
            .validate()
            .map_err(|e| in_file(data_dir, e))
    }

    /// The RPO target of `group`.
    pub fn rpo_target(&self, group: &str) -> Duration {
        self.group_rpo_targets
            .get(group)
            .copied()
            .unwrap_or(self.rpo_target)
    }

    /// Volumes by group, in a stable order.
    pub fn groups(&self) -> BTreeMap<String, Vec<VolumeConfig>> {
        let mut groups: BTreeMap<String, Vec<VolumeConfig>> = BTreeMap::new();
        for v in &self.volumes {
            groups.entry(v.group.clone()).or_default().push(v.clone());
        }
        groups
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file() -> AgentConfigFile {
        AgentConfigFile::new("127.0.0.1:7000", &"ab".repeat(32))
    }

    /// The file `init` writes and `protect` extends.
    const WRITTEN: &str = r#"replica = "127.0.0.1:7000"
replica_fingerprint = "abababababababababababababababababababababababababababababababab"
batch_age = "20ms"
batches_in_flight = 32
sync_bytes_per_sec_max = 0
spool_bytes_max = "4GiB"
activity_log_chunks = 4096
nbd_connections_max = 256
rpo_target = "30s"

[[volume]]
name = "v1"
device = "/tmp/cfgx-dev"
group = "v1"
id = 0
"#;

    #[test]
    fn the_file_format_is_unchanged() {
        let mut f = file();
        let empty = toml::to_string(&f).expect("serialize");
        assert_eq!(
            empty,
            WRITTEN[..WRITTEN.find("\n[[volume]]").unwrap()].to_owned() + "volume = []\n"
        );
        f.volumes.push(VolumeConfig {
            name: "v1".to_owned(),
            device: PathBuf::from("/tmp/cfgx-dev"),
            group: "v1".to_owned(),
            id: 0,
        });
        assert_eq!(toml::to_string(&f).expect("serialize"), WRITTEN);
        let back: AgentConfigFile = toml::from_str(WRITTEN).expect("parse");
        assert_eq!(toml::to_string(&back).expect("serialize"), WRITTEN);
    }

    #[test]
    fn a_file_of_only_the_replica_takes_every_default() {
        let f: AgentConfigFile =
            toml::from_str("replica = \"h:1\"\nreplica_fingerprint = \"x\"\n").expect("parse");
        let c = f.validate().expect("valid");
        assert_eq!(
            c.batch_age_max,
            Duration::from_millis(cdp_shared::types::BATCH_AGE_MS_DEFAULT)
        );
        assert_eq!(
            c.batches_in_flight,
            cdp_shared::types::BATCHES_IN_FLIGHT_DEFAULT
        );
        assert_eq!(c.sync_bytes_per_sec_max, 0);
        assert_eq!(c.spool_bytes_max, SPOOL_BYTES_MAX_DEFAULT);
        assert_eq!(c.activity_log_chunks, crate::activity_log::CAPACITY_DEFAULT);
        assert_eq!(
            c.nbd_connections_max,
            cdp_shared::nbd::server::CONNECTIONS_MAX_DEFAULT
        );
        assert!(c.volumes.is_empty());
        let d = file().validate().expect("the defaults are valid");
        assert_eq!(d.batch_age_max, c.batch_age_max);
        assert_eq!(d.spool_bytes_max, c.spool_bytes_max);
    }

    #[test]
    fn each_refused_value_names_its_key() {
        type Edit = fn(&mut AgentConfigFile);
        let cases: [(&str, Edit); 8] = [
            ("batch_age", |f| f.batch_age = DurationValue::Number(0)),
            ("batch_age", |f| {
                f.batch_age = DurationValue::Text("soon".into())
            }),
            ("spool_bytes_max", |f| {
                f.spool_bytes_max = SizeValue::Text("4 GB-ish".into())
            }),
            ("sync_bytes_per_sec_max", |f| {
                f.sync_bytes_per_sec_max = SizeValue::Text("fast".into())
            }),
            ("batches_in_flight", |f| f.batches_in_flight = 0),
            ("activity_log_chunks", |f| f.activity_log_chunks = 0),
            ("nbd_connections_max", |f| f.nbd_connections_max = 0),
            ("spool_bytes_max", |f| {
                f.spool_bytes_max = SizeValue::Bytes(SPOOL_BYTES_MAX_MIN - 1)
            }),
        ];
        for (key, edit) in cases {
            let mut f = file();
            edit(&mut f);
            let e = f.validate().expect_err(key);
            assert_eq!(e.key(), key);
            assert!(e.to_string().starts_with(key), "{key}: {e}");
        }
        let mut f = file();
        f.spool_bytes_max = SizeValue::Bytes(SPOOL_BYTES_MAX_MIN);
        f.batch_age = DurationValue::Number(1);
        f.batches_in_flight = 1;
        f.activity_log_chunks = 1;
        f.nbd_connections_max = 1;
        let c = f.validate().expect("the smallest values are valid");
        assert_eq!(c.batch_age_max, Duration::from_millis(1));
        assert_eq!(c.spool_bytes_max, SPOOL_BYTES_MAX_MIN);
    }

    #[test]
    fn load_names_the_file_and_the_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = AgentConfig::load(dir.path()).expect_err("no file");
        assert!(e.to_string().contains("cdp-agent init"), "{e}");
        let mut f = file();
        f.batches_in_flight = 0;
        f.save(dir.path()).expect("save");
        for e in [
            AgentConfig::load(dir.path()).expect_err("refused"),
            AgentConfigFile::load(dir.path()).expect_err("refused for an edit too"),
        ] {
            let msg = e.to_string();
            assert!(msg.contains(CONFIG_FILE), "{msg}");
            assert!(
                msg.contains("batches_in_flight must be at least 1"),
                "{msg}"
            );
        }
        f.batches_in_flight = 3;
        f.save(dir.path()).expect("save");
        let c = AgentConfig::load(dir.path()).expect("valid");
        assert_eq!(c.batches_in_flight, 3);
        assert_eq!(
            AgentConfigFile::load(dir.path())
                .expect("valid")
                .batches_in_flight,
            3
        );
    }

    #[test]
    fn sizes_and_durations_take_units_and_old_files_still_read() {
        let base = "replica = \"h:1\"\nreplica_fingerprint = \"x\"\n";
        let parse = |extra: &str| -> AgentConfig {
            toml::from_str::<AgentConfigFile>(&format!("{base}{extra}"))
                .expect("parse")
                .validate()
                .expect("valid")
        };
        let c = parse(
            "batch_age = \"1s\"\nspool_bytes_max = \"512MiB\"\nsync_bytes_per_sec_max = \"100MiB\"\n",
        );
        assert_eq!(c.batch_age_max, Duration::from_secs(1));
        assert_eq!(c.spool_bytes_max, 512 << 20);
        assert_eq!(c.sync_bytes_per_sec_max, 100 << 20);
        // A file written before the units: bare numbers, `batch_age_ms`.
        let c =
            parse("batch_age_ms = 50\nspool_bytes_max = 1073741824\nsync_bytes_per_sec_max = 0\n");
        assert_eq!(c.batch_age_max, Duration::from_millis(50));
        assert_eq!(c.spool_bytes_max, 1 << 30);
        assert_eq!(c.sync_bytes_per_sec_max, 0);
        let c = parse("batch_age = \"1m30s\"\n");
        assert_eq!(c.batch_age_max, Duration::from_secs(90));
    }

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

    /// The example `agent.toml` that `make install` installs is valid as it is and with
    /// every key uncommented (so its keys and values are ones the agent takes).
    #[test]
    fn the_example_file_is_valid_with_and_without_its_comments() {
        let text = fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../packaging/examples/agent.toml"
        ))
        .expect("read the example");
        let all = uncommented(&text);
        assert!(
            all.contains("\nrpo_target = ") && all.contains("\n[[volume]]"),
            "{all}"
        );
        for t in [text.clone(), all] {
            let f: AgentConfigFile = toml::from_str(&t).unwrap_or_else(|e| panic!("{e}\n{t}"));
            f.validate().unwrap_or_else(|e| panic!("{e}\n{t}"));
        }
    }

    #[test]
    fn rpo_targets_default_to_30s_and_a_group_can_have_its_own() {
        let base = "replica = \"h:1\"\nreplica_fingerprint = \"x\"\n";
        let parse = |extra: &str| {
            toml::from_str::<AgentConfigFile>(&format!("{base}{extra}"))
                .expect("parse")
                .validate()
        };
        let c = parse("").expect("valid");
        assert_eq!(c.rpo_target("any"), RPO_TARGET_DEFAULT);
        let c = parse("rpo_target = \"1m\"\n[group.db]\nrpo_target = \"5s\"\n[group.web]\n")
            .expect("valid");
        assert_eq!(c.rpo_target("db"), Duration::from_secs(5));
        assert_eq!(c.rpo_target("web"), Duration::from_secs(60));
        assert_eq!(c.rpo_target("other"), Duration::from_secs(60));
        // A bare number is seconds; zero and a wrong unit are refused with the key.
        assert_eq!(
            parse("rpo_target = 10\n").expect("valid").rpo_target("g"),
            Duration::from_secs(10)
        );
        assert_eq!(
            parse("rpo_target = \"0s\"\n").expect_err("zero").key(),
            "rpo_target"
        );
        assert_eq!(
            parse("[group.db]\nrpo_target = \"5 fortnights\"\n")
                .expect_err("unit")
                .key(),
            "group.*.rpo_target"
        );
        let unknown =
            toml::from_str::<AgentConfigFile>(&format!("{base}[group.db]\nrpo = \"5s\"\n"));
        assert!(
            unknown.is_err_and(|e| e.to_string().contains("unknown field `rpo`")),
            "a mistyped group key is refused"
        );
        // Saved and read back, the group table survives.
        let file =
            toml::from_str::<AgentConfigFile>(&format!("{base}[group.db]\nrpo_target = \"5s\"\n"))
                .expect("parse");
        let again: AgentConfigFile =
            toml::from_str(&toml::to_string(&file).expect("ser")).expect("parse");
        assert_eq!(
            again.validate().expect("valid").rpo_target("db"),
            Duration::from_secs(5)
        );
    }

    #[test]
    fn an_unknown_key_is_refused_with_its_name_and_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        file().save(dir.path()).expect("save");
        let path = dir.path().join(CONFIG_FILE);
        let good = fs::read_to_string(&path)
            .expect("read")
            .replace("volume = []\n", "");
        for (text, key) in [
            (
                good.replace("batches_in_flight", "batches_inflight"),
                "batches_inflight",
            ),
            (
                format!(
                    "{good}\n[[volume]]\nname = \"v\"\ndevice = \"/d\"\ngroup = \"v\"\nid = 0\ndevcie = \"/e\"\n"
                ),
                "devcie",
            ),
        ] {
            fs::write(&path, text).expect("write");
            for e in [
                AgentConfig::load(dir.path()).expect_err("refused"),
                AgentConfigFile::load(dir.path()).expect_err("refused for an edit too"),
            ] {
                let msg = format!("{e:#}");
                assert!(msg.contains(&path.display().to_string()), "{msg}");
                assert!(msg.contains(&format!("unknown field `{key}`")), "{msg}");
            }
        }
    }
}
