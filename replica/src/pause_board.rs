//! The pause board: which groups' ingest is paused (their disk is full) and why, and the
//! head and RPO lag each group's agent last reported ([`Head`]), published by `serve` in
//! `DIR/paused.json` for `status`, which runs in another process. A pause is written at once;
//! heads arrive every second per group and are written at most once a second
//! ([`PauseBoard::flush_heads`]).
//!
//! The board must be writable exactly when the disk is full, so `serve` allocates the file
//! once when it starts ([`PAUSE_BOARD_BYTES`], filled and fsynced) and from then on only
//! overwrites it in place, whole: JSON padded with spaces to the full size, which needs no new
//! block on any filesystem. The board is not a durable record (the events table is): it is
//! rewritten empty at every start and believed only while `serve.lock` is held. A reader that
//! catches a write half done sees JSON that does not parse and reads again.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Mutex;

use rustix::fs::FallocateFlags;
use serde::{Deserialize, Serialize};

use crate::datadir::DataDir;
use crate::error::{ReplicaError, Result};

/// Size of the board file (a thousand groups' heads, with long names, and the pauses).
pub const PAUSE_BOARD_BYTES: usize = 512 << 10;
/// Longest reason kept on the board (characters); longer ones are cut.
pub const PAUSE_REASON_CHARS_MAX: usize = 1000;
/// Times `status` reads the board again when it caught a write half done.
const READ_ATTEMPTS: usize = 5;

// At least 8 paused groups with the longest reasons fit, even fully escaped.
const _: () = assert!(PAUSE_BOARD_BYTES >= 8 * (PAUSE_REASON_CHARS_MAX * 6 + 256));

/// Why and since when a group's ingest is paused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pause {
    pub reason: String,
    /// UTC nanoseconds since the Unix epoch.
    pub since_ns: i64,
}

/// What a group's agent last reported of its head (`Control::Head`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    /// The agent's last sealed seq.
    pub seq: u64,
    /// The agent's RPO lag then; `None` during an initial sync.
    pub lag_ms: Option<u64>,
    /// When the replica received the report (its clock, UTC nanoseconds).
    pub at_ns: i64,
    /// The group's RPO target as the agent has it configured (`None` from agents before it).
    #[serde(default)]
    pub rpo_target_ms: Option<u64>,
}

impl Head {
    /// The RPO lag as the replica can vouch for it at `now_ns`: 0 when the agent reported 0
    /// within the last [`HEAD_FRESH_NS`]; otherwise the reported lag plus the report's age
    /// (an agent not heard from may have written since). `None` during an initial sync.
    pub fn lag_ms_at(&self, now_ns: i64) -> Option<u64> {
        let lag = self.lag_ms?;
        let age_ns = now_ns.saturating_sub(self.at_ns).max(0);
        if lag == 0 && age_ns <= HEAD_FRESH_NS {
            return Some(0);
        }
        Some(lag.saturating_add((age_ns / 1_000_000) as u64))
    }
}

/// A report of lag 0 younger than this still reads as 0 (the agent reports every second).
pub const HEAD_FRESH_NS: i64 = 2_500_000_000;

/// The board's contents.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Board {
    /// Paused groups by name.
    pub groups: BTreeMap<String, Pause>,
    /// The last head each group's agent reported since `serve` started, by group name.
    #[serde(default)]
    pub heads: BTreeMap<String, Head>,
    /// Paused groups left out because the board was full.
    #[serde(default)]
    pub omitted: usize,
}

/// The board as the file holds it: JSON padded with spaces to exactly [`PAUSE_BOARD_BYTES`]
/// (groups that do not fit are counted in `omitted`). Sans-IO.
pub fn encode(groups: &BTreeMap<String, Pause>, heads: &BTreeMap<String, Head>) -> Vec<u8> {
    let mut board = Board {
        heads: heads.clone(),
        ..Board::default()
    };
    for (name, p) in groups {
        let reason: String = p.reason.chars().take(PAUSE_REASON_CHARS_MAX).collect();
        board.groups.insert(
            name.clone(),
            Pause {
                reason,
                since_ns: p.since_ns,
            },
        );
    }
    loop {
        // Plain maps of strings and integers always serialize.
        let mut bytes = serde_json::to_vec(&board).unwrap_or_default();
        if bytes.len() <= PAUSE_BOARD_BYTES {
            bytes.resize(PAUSE_BOARD_BYTES, b' ');
            return bytes;
        }
        // Heads go first, half of them per attempt (the next reports bring them back); then
        // pauses, one by one, counted.
        if !board.heads.is_empty() {
            let keep = board.heads.len() / 2;
            board.heads = std::mem::take(&mut board.heads)
                .into_iter()
                .take(keep)
                .collect();
            continue;
        }
        let Some(last) = board.groups.keys().next_back().cloned() else {
            return vec![b' '; PAUSE_BOARD_BYTES];
        };
        board.groups.remove(&last);
        board.omitted += 1;
    }
}

/// Parses the board file; `None` when it does not parse (a write half done). An empty or
/// blank file is an empty board.
pub fn decode(bytes: &[u8]) -> Option<Board> {
    let text = bytes.trim_ascii_end();
    if text.is_empty() {
        return Some(Board::default());
    }
    serde_json::from_slice(text).ok()
}

/// The writer side, owned by `serve`'s ingest.
pub struct PauseBoard {
    path: PathBuf,
    /// None when the board could not be prepared at start (then `status` cannot show pauses;
    /// logs, events and the agents still hear of them).
    file: Option<File>,
    groups: Mutex<Contents>,
}

#[derive(Default)]
struct Contents {
    pauses: BTreeMap<String, Pause>,
    heads: BTreeMap<String, Head>,
    /// Heads changed since the board was last written.
    heads_changed: bool,
    /// Bytes of JSON the file held after the last write: past them it holds only spaces, so
    /// a write covers the new JSON or the old one, whichever is longer, not the whole file.
    written_len: usize,
}

impl PauseBoard {
    /// Prepares the board for a starting `serve`: allocates the file and writes it empty. A
    /// failure is logged and leaves a board that writes nothing.
    pub fn open(dir: &DataDir) -> PauseBoard {
        let path = dir.pause_board();
        let file = match Self::prepare(&path) {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::warn!(
                    "{e}; `status` will not be able to show a paused ingest until `serve` restarts with space on the disk"
                );
                // Whatever an earlier serve left there must not be shown (cutting a file
                // never needs space).
                if let Ok(f) = OpenOptions::new().write(true).open(&path) {
                    let _ = f.set_len(0);
                }
                None
            }
        };
        PauseBoard {
            path,
            file,
            groups: Mutex::new(Contents::default()),
        }
    }

    fn prepare(path: &std::path::Path) -> Result<File> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(ReplicaError::io("open the pause board", path))?;
        match rustix::fs::fallocate(&file, FallocateFlags::empty(), 0, PAUSE_BOARD_BYTES as u64) {
            Ok(()) | Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::NOSYS) => {}
            Err(e) => {
                return Err(ReplicaError::io("allocate the pause board", path)(e.into()));
            }
        }
        file.set_len(PAUSE_BOARD_BYTES as u64)
            .map_err(ReplicaError::io("size the pause board", path))?;
        file.write_all_at(&encode(&BTreeMap::new(), &BTreeMap::new()), 0)
            .map_err(ReplicaError::io("write the pause board", path))?;
        file.sync_all()
            .map_err(ReplicaError::io("fsync the pause board", path))?;
        Ok(file)
    }

    /// Marks `group` paused (`Some`) or running (`None`) and rewrites the board in place.
    /// A write failure is logged; it never stops ingest.
    pub fn set(&self, group: &str, pause: Option<Pause>) {
        let Ok(mut c) = self.groups.lock() else {
            return;
        };
        match pause {
            Some(p) => c.pauses.insert(group.to_owned(), p),
            None => c.pauses.remove(group),
        };
        self.write(&mut c);
    }

    /// Notes the head `group`'s agent reported; written by the next [`Self::flush_heads`].
    pub fn set_head(&self, group: &str, head: Head) {
        if let Ok(mut c) = self.groups.lock() {
            c.heads.insert(group.to_owned(), head);
            c.heads_changed = true;
        }
    }

    /// Forgets the head of `group` (forgotten on the replica).
    pub fn remove_head(&self, group: &str) {
        if let Ok(mut c) = self.groups.lock() {
            c.heads_changed |= c.heads.remove(group).is_some();
        }
    }

    /// Writes the board if a head changed since it was last written (`serve` calls it every
    /// second).
    pub fn flush_heads(&self) {
        if let Ok(mut c) = self.groups.lock()
            && c.heads_changed
        {
            self.write(&mut c);
        }
    }

    fn write(&self, c: &mut Contents) {
        c.heads_changed = false;
        let Some(file) = &self.file else {
            return;
        };
        let bytes = encode(&c.pauses, &c.heads);
        let len = bytes.trim_ascii_end().len();
        let upto = len.max(c.written_len).min(bytes.len());
        match file.write_all_at(&bytes[..upto], 0) {
            Ok(()) => c.written_len = len,
            // Unknown how much was written: the next write covers the whole file.
            Err(e) => {
                c.written_len = PAUSE_BOARD_BYTES;
                tracing::warn!(
                    "could not write the pause board {}: {e}",
                    self.path.display()
                );
            }
        }
    }
}

/// Reads the board (`status`). A board that never parses, or is missing, reads as empty.
pub fn read(dir: &DataDir) -> Result<Board> {
    let path = dir.pause_board();
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Board::default()),
        Err(e) => return Err(ReplicaError::io("open the pause board", &path)(e)),
    };
    let mut buf = vec![0u8; PAUSE_BOARD_BYTES];
    for _ in 0..READ_ATTEMPTS {
        let mut got = 0;
        while got < buf.len() {
            match file.read_at(&mut buf[got..], got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ReplicaError::io("read the pause board", &path)(e)),
            }
        }
        if let Some(board) = decode(&buf[..got]) {
            return Ok(board);
        }
    }
    tracing::warn!(
        "the pause board {} does not parse; ignoring it",
        path.display()
    );
    Ok(Board::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_board_round_trips_at_a_fixed_size_and_drops_what_does_not_fit() {
        let mut groups = BTreeMap::new();
        assert_eq!(
            decode(&encode(&groups, &BTreeMap::new())),
            Some(Board::default())
        );
        groups.insert(
            "db".to_owned(),
            Pause {
                reason: "the journal's disk is full".into(),
                since_ns: 42,
            },
        );
        let bytes = encode(&groups, &BTreeMap::new());
        assert_eq!(bytes.len(), PAUSE_BOARD_BYTES);
        let board = decode(&bytes).expect("decodes");
        assert_eq!(board.groups, groups);
        assert_eq!(board.omitted, 0);
        // A torn write does not parse.
        assert_eq!(decode(&bytes[..10]), None);
        // Too many long reasons: some groups are left out, and counted.
        let long = "x".repeat(5 * PAUSE_REASON_CHARS_MAX);
        const N: usize = 1000;
        let many: BTreeMap<String, Pause> = (0..N as i64)
            .map(|i| {
                (
                    format!("g{i:04}"),
                    Pause {
                        reason: long.clone(),
                        since_ns: i,
                    },
                )
            })
            .collect();
        let heads: BTreeMap<String, Head> = (0..10)
            .map(|i| {
                let head = Head {
                    seq: i,
                    lag_ms: Some(0),
                    at_ns: 0,
                    rpo_target_ms: Some(30_000),
                };
                (format!("h{i}"), head)
            })
            .collect();
        let board = decode(&encode(&many, &heads)).expect("decodes");
        assert!(board.heads.is_empty(), "heads give way to pauses");
        assert!(board.omitted > 0 && board.groups.len() + board.omitted == N);
        assert!(
            board
                .groups
                .values()
                .all(|p| p.reason.len() == PAUSE_REASON_CHARS_MAX)
        );
    }

    #[test]
    fn a_heads_lag_is_zero_only_while_fresh_and_grows_with_its_age() {
        let h = |lag_ms| Head {
            seq: 1,
            lag_ms,
            at_ns: 1_000_000_000,
            rpo_target_ms: None,
        };
        assert_eq!(h(Some(0)).lag_ms_at(2_000_000_000), Some(0));
        assert_eq!(
            h(Some(0)).lag_ms_at(1_000_000_000 + HEAD_FRESH_NS + 1),
            Some(2500)
        );
        assert_eq!(h(Some(40)).lag_ms_at(1_500_000_000), Some(540));
        assert_eq!(h(None).lag_ms_at(9_000_000_000), None);
        // A report from the future (clock stepped back) is not a negative age.
        assert_eq!(h(Some(7)).lag_ms_at(0), Some(7));
    }

    #[test]
    fn a_thousand_heads_fit_beside_the_pauses() {
        let heads: BTreeMap<String, Head> = (0..1000)
            .map(|i| {
                (
                    format!("group-with-a-longish-name-{i:04}"),
                    Head {
                        seq: u64::MAX,
                        lag_ms: Some(u64::MAX),
                        at_ns: i64::MAX,
                        rpo_target_ms: Some(u64::MAX),
                    },
                )
            })
            .collect();
        let pauses: BTreeMap<String, Pause> = (0..8)
            .map(|i| {
                (
                    format!("g{i}"),
                    Pause {
                        reason: "\"".repeat(PAUSE_REASON_CHARS_MAX),
                        since_ns: 1,
                    },
                )
            })
            .collect();
        let board = decode(&encode(&pauses, &heads)).expect("decodes");
        assert_eq!((board.heads.len(), board.groups.len()), (1000, 8));
    }

    #[test]
    fn a_board_is_written_in_place_and_read_back() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = DataDir::new(tmp.path());
        assert_eq!(read(&dir).expect("missing board"), Board::default());
        let board = PauseBoard::open(&dir);
        let pause = Pause {
            reason: "full".into(),
            since_ns: 7,
        };
        board.set("g", Some(pause.clone()));
        assert_eq!(read(&dir).expect("read").groups.get("g"), Some(&pause));
        board.set("g", None);
        assert!(read(&dir).expect("read").groups.is_empty());
        // A shorter board written over a longer one leaves no tail of the old one.
        let bytes = std::fs::read(dir.pause_board()).expect("read the file");
        assert_eq!(decode(&bytes), Some(Board::default()));
        // Heads are written by the flush, not by the report.
        let head = Head {
            seq: 9,
            lag_ms: Some(0),
            at_ns: 100,
            rpo_target_ms: None,
        };
        board.set_head("g", head);
        assert!(read(&dir).expect("read").heads.is_empty());
        board.flush_heads();
        assert_eq!(read(&dir).expect("read").heads.get("g"), Some(&head));
        let len = std::fs::metadata(dir.pause_board()).expect("stat").len();
        assert_eq!(len, PAUSE_BOARD_BYTES as u64);
    }
}
