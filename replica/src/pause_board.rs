//! The pause board: which groups' ingest is paused (their disk is full) and why, published
//! by `serve` in `DIR/paused.json` for `status`, which runs in another process.
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

/// Size of the board file.
pub const PAUSE_BOARD_BYTES: usize = 64 << 10;
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

/// The board's contents.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Board {
    /// Paused groups by name.
    pub groups: BTreeMap<String, Pause>,
    /// Paused groups left out because the board was full.
    #[serde(default)]
    pub omitted: usize,
}

/// The board as the file holds it: JSON padded with spaces to exactly [`PAUSE_BOARD_BYTES`]
/// (groups that do not fit are counted in `omitted`). Sans-IO.
pub fn encode(groups: &BTreeMap<String, Pause>) -> Vec<u8> {
    let mut board = Board::default();
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
    groups: Mutex<BTreeMap<String, Pause>>,
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
            groups: Mutex::new(BTreeMap::new()),
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
        file.write_all_at(&encode(&BTreeMap::new()), 0)
            .map_err(ReplicaError::io("write the pause board", path))?;
        file.sync_all()
            .map_err(ReplicaError::io("fsync the pause board", path))?;
        Ok(file)
    }

    /// Marks `group` paused (`Some`) or running (`None`) and rewrites the board in place.
    /// A write failure is logged; it never stops ingest.
    pub fn set(&self, group: &str, pause: Option<Pause>) {
        let Ok(mut groups) = self.groups.lock() else {
            return;
        };
        match pause {
            Some(p) => groups.insert(group.to_owned(), p),
            None => groups.remove(group),
        };
        if let Some(file) = &self.file
            && let Err(e) = file.write_all_at(&encode(&groups), 0)
        {
            tracing::warn!(
                "could not write the pause board {}: {e}",
                self.path.display()
            );
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
        assert_eq!(decode(&encode(&groups)), Some(Board::default()));
        groups.insert(
            "db".to_owned(),
            Pause {
                reason: "the journal's disk is full".into(),
                since_ns: 42,
            },
        );
        let bytes = encode(&groups);
        assert_eq!(bytes.len(), PAUSE_BOARD_BYTES);
        let board = decode(&bytes).expect("decodes");
        assert_eq!(board.groups, groups);
        assert_eq!(board.omitted, 0);
        // A torn write does not parse.
        assert_eq!(decode(&bytes[..10]), None);
        // Too many long reasons: some groups are left out, and counted.
        let long = "x".repeat(5 * PAUSE_REASON_CHARS_MAX);
        let many: BTreeMap<String, Pause> = (0..200)
            .map(|i| {
                (
                    format!("g{i:03}"),
                    Pause {
                        reason: long.clone(),
                        since_ns: i,
                    },
                )
            })
            .collect();
        let board = decode(&encode(&many)).expect("decodes");
        assert!(board.omitted > 0 && board.groups.len() + board.omitted == 200);
        assert!(
            board
                .groups
                .values()
                .all(|p| p.reason.len() == PAUSE_REASON_CHARS_MAX)
        );
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
        let len = std::fs::metadata(dir.pause_board()).expect("stat").len();
        assert_eq!(len, PAUSE_BOARD_BYTES as u64);
    }
}
