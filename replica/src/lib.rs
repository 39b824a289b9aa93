//! cdp-replica: the recovery side of cdp. It receives batches from agents over QUIC, keeps for
//! every protected volume a target disk and a journal, and reconstructs any recorded point.
//!
//! # Modules
//! * [`datadir`] — the data directory layout, `replica.toml`, `authorized_agents.toml`,
//!   `serve.lock`.
//! * [`agents`] — `authorize`, `deauthorize` (a running serve closes the agent's connections
//!   within a second) and `agents` (each authorized agent, when it was last seen, its groups).
//! * [`clock`] — now, and how times are shown (RFC 3339, UTC).
//! * [`catalog`] — `meta.db` (SQLite): the only module that talks to SQLite.
//! * [`journal`] — append-only segments, the only code that fsyncs them; written vs durable.
//! * [`target`] — the sparse target files.
//! * [`ingest`] — `plan` (the semantic checks, sans-IO), `order` (the reorder buffer, sans-IO),
//!   `group` (per-group ordering and group
//!   commit), `pause` (a group whose disk is full), `admission` (the Hello), `service`.
//! * [`pause_board`] — `DIR/paused.json`: the paused groups, written in place by `serve`, read
//!   by `status`.
//! * [`server`] — the QUIC shell: handshake, control stream, batch streams, hash requests.
//! * [`agent_ports`] — how the verifier asks a connected agent a question (a leaf).
//! * [`hashes`] — the chunk-hash service (blake3 per 1 MiB chunk of a volume's latest image).
//! * [`reconstruct`] — the reconstruction plan (sans-IO extent map), the `read_at` reader, and
//!   the one reader of journal records (`RecordLoader`).
//! * [`points`](mod@points) — a volume's window, resolving a point spec in it, `points`.
//! * [`restore`](mod@restore) — `restore`: the image at a point to a file or a block device.
//! * [`lazy_image`] — the image at a pinned point planned chunk by chunk as reads reach it
//!   (`export`, `diff`), and why the trimmer cannot disturb it.
//! * [`export`] — `export`: a point served over NBD, read-only or with a throw-away
//!   copy-on-write [`overlay`].
//! * [`failover`] — `failover`: the image of a group at a point made its live volumes, each
//!   served read-write with a persistent overlay, the group fenced (alone), ended by `--undo`
//!   or `--commit`.
//! * [`diff`](mod@diff) — `diff`: the chunks whose bytes differ between two points.
//! * [`forget`] — `forget`: a group or a volume removed with its journal, target files and
//!   catalog rows (crash-safe; carried out by `serve` when it runs).
//! * [`retention`] — a group's window and journal cap, their syntax, and the choice of the
//!   trimmer's next base (sans-IO).
//! * [`trimmer`] — the task per group that applies the oldest batches to the target files and
//!   forgets them (the trim protocol below).
//! * [`pins`] — readers' holds on points: [`pin_point`] / [`PinGuard`].
//! * [`status`](mod@status) — `status`.
//! * [`verifier`] — the background verifier inside `serve`, `verify run|repair|report`
//!   (its JSON is documented there).
//!
//! # The handshake
//! `Hello` names the agent's groups; the replica creates what is new and answers, per group,
//! `Welcome { durable, generation, head_hash, volumes }`: the last durable seq, the header
//! hash (hex) of that batch (empty when `durable` is 0, or for a group rebased before its first
//! batch), and every volume of the group with its state (`new`, `syncing`, `protecting`).
//! An agent whose spool no longer holds what follows `durable` is welcomed too: it continues
//! its chain after `durable` (with `head_hash`) and resyncs. A failed-over group is not
//! welcomed but listed in the Welcome's `refused` (with its reason and cause); the connection
//! tells the agent `Fenced` for a group failed over later and `Rejoin` once its failover ends,
//! which the agent answers with the group's `Join` (answered `Joined`, the group's Welcome).
//!
//! # The commit protocol (what makes a batch acknowledged)
//! A batch arrives alone on its own QUIC stream.
//! 1. The connection task reads it whole (bounded by `BATCH_BYTES_MAX`, into one buffer sized
//!    from its header) and checks it: header, header hash, exact length, payload hash (which
//!    covers every byte of every record), every record's structure; and that its group was
//!    announced in this connection's Hello. A failure is a `Nack` and one warning line; nothing
//!    is written. Record data hashes are checked wherever record data is decoded: records
//!    applied to a syncing volume's target in step 4, and every journal record read by
//!    reconstruction.
//! 2. The batch goes through a bounded channel to its group's ingest task, which keeps the
//!    journal in seq order: seq ≤ head is a duplicate (re-acked when its header hash equals the
//!    stored one, otherwise refused as a conflict); seq > head + 1 waits for the gap (at most
//!    `PENDING_BATCHES_MAX` batches / `PENDING_BYTES_MAX` bytes, beyond that `Nack`).
//! 3. When batch head + 1 is there, a group commit takes the run of in-order batches that are
//!    waiting (at most `GROUP_COMMIT_BYTES_MAX` bytes) — unless the group's journal is over its
//!    cap and the trimmer can bring it under, in which case it waits for the trimmer first. Each is checked against the hash chain
//!    (`prev_hash` = header hash of the batch before it, when that is known) and against the
//!    group's volumes as they will be at its turn (volume ids, ranges, SyncBegin first /
//!    SyncEnd last, no byte change to a volume whose sync has not begun). A batch that fails is
//!    refused (`Nack`) before anything of it is written; the batches after it wait.
//! 4. The journal's durable end is noted (where an undo goes back to). For each batch in seq
//!    order: records of volumes in their initial sync are applied to the target files (pwrite;
//!    zero and trim punch holes); a batch that changes bytes of a protecting volume is appended
//!    whole, byte for byte, to the open journal segment (*written*).
//! 5. fdatasync the segment (and its directory when the segment is new), then fdatasync the
//!    target files written: the journal's *durable* position moves up to *written*.
//! 6. ONE SQLite transaction (WAL, synchronous=FULL): batch rows, record rows of protecting
//!    volumes (segment and position of each record header), bookmarks, volume state changes
//!    (SyncBegin: new → syncing; SyncEnd: syncing → protecting with sync_done_seq), and the
//!    group's head seq and head hash. **The commit of this transaction makes the batches
//!    durable**; nothing is acknowledged before it.
//! 7. `Ack { group, durable: head }` on the control stream of each connection that sent one of
//!    the batches.
//!
//! # A full disk (ENOSPC, EDQUOT, `SQLITE_FULL`) in steps 4–6: the group pauses
//! 1. The failed commit is undone: if step 6 failed, the group's head is read back from the
//!    catalog, and a commit that took effect after all counts as a success. Otherwise the
//!    journal goes back to the durable end noted in step 4 (segment files created since are
//!    deleted, the open segment is truncated back; if that undo itself meets the full disk it
//!    is done first thing at the next attempt). Target writes are not undone: re-applying the
//!    same batches writes the same bytes. The failed SQLite transaction is rolled back and its
//!    connection closed. The batches go back to the group's pending batches, as they were.
//! 2. Nothing is acknowledged. The first time, the group is *paused*: one warning line
//!    (`ingest paused: <reason>`), an event (recorded at the resume if the catalog's disk is
//!    full too), the pause board (`status` shows `state: "paused"` and `ingest_reason`), and
//!    `Paused { group, reason }` to every connection of the group's agent (a connection that
//!    arrives while paused hears it right after its Welcome).
//! 3. Batches keep arriving and wait in the pending bounds (beyond them, a `Nack` that says the
//!    group is paused). Every [`ingest::PAUSE_RETRY_INTERVAL`] (1 s) the group commit runs
//!    again from step 3 with the pending batches.
//! 4. When a commit succeeds: `Resumed { group }` to the connections, an info line and an
//!    event, the board cleared, then the acks as usual.
//!
//! `serve` also starts and stops cleanly on a full disk: its other catalog writes (events,
//! agent links) are then skipped with a log line, and its groups pause at their first commit.
//!
//! Any other failure in steps 4–6 — EIO above all, on a write or an fsync — stops ingest and
//! the server: an fsync that failed so is never retried (the process stops rather than
//! acknowledge what may be lost). On the next start, each group's journal is made to agree
//! with the catalog: the tail of the last committed segment past the last committed batch is
//! truncated, and segments newer than that one are deleted (both logged, and recorded as
//! events). Target writes of a crashed commit are redone when the agent resends the
//! unacknowledged batches (applying them is idempotent).
//!
//! # The window, the trimmer and pins
//! A volume's window runs from max(its group's base, the group's `trimming_to`, the volume's
//! `sync_done_seq`) to the group's head — in `points`, `restore`, `status`, the hash service
//! and every other reader. The group's base B is the point its target files hold: every batch
//! ≤ B is in them. Each group has a retention (`cdp-replica retention`): a window of agent
//! time (default 24 h) and an optional cap on its journal bytes (default none); the trimmer
//! moves B forward to keep to it, never past the head and never past a live pin.
//!
//! `cdp-replica retention` reckons what a change would drop before it applies it
//! ([`set_retention_checked`], [`retention_drop`]): the trimmer's rounds are played out on the
//! catalog without writing ([`trimmer::base_after_trims`], the same inputs and
//! [`retention::choose_trim`]) under the current and the new retention, and the points between
//! the two bases are what the change drops; it is refused unless `--yes` is given.
//!
//! The trim protocol (crash-safe and idempotent; details in [`trimmer`]):
//! 1. (a) One write transaction: drop dead pins, choose B' (the newest seq whose batches are
//!    all older than the window, or further if the cap needs it; at most the oldest live pin
//!    and the head), record `trimming_to = B'`. Readers now see the window start at B'.
//! 2. (b) Apply every journal record with seq in (B, B'] to its target file in seq order
//!    (data: decoded, hash-checked, pwritten; zero/trim: a hole punched).
//! 3. (c) fsync the target files.
//! 4. (d) One transaction: delete records ≤ B', batches and bookmarks < B' (batch B' stays, no
//!    longer journaled: the window's first point); remember where the trimmed journal ended;
//!    base = B'; clear `trimming_to`.
//! 5. (e) Unlink the segments below the first one still needed (the committed end's, and the
//!    lowest a live pin may read).
//!
//! A `trimming_to` left by a crash is completed first ((b)–(e) again) when the trimmer starts.
//!
//! Pins ([`pins`]): every reader pins its point for as long as it reads, with
//! [`pin_point`], which resolves the point and records the pin in one write transaction;
//! SQLite serializes it with the trimmer's step (a), so either the trimmer sees the pin, or the
//! pin sees `trimming_to` and resolves only points ≥ B'. A pin is renewed in the background
//! (TTL [`pins::PIN_TTL`], renewed every [`pins::PIN_RENEW_INTERVAL`]); one that expired, or
//! whose process is gone, is dropped by the trimmer.
//!
//! # Forget
//! `forget` removes a group (or one volume of several) with its journal, target files and
//! rows, in two steps: one transaction deletes the rows and lists the files in
//! `forget_files`, then the files go ([`forget`] has the details, the holds that refuse it,
//! and how a running serve carries it out). `serve` deletes what a crash left listed before
//! it admits any agent; a group created again under a forgotten name starts at seq 0.
//!
//! # The chunk-hash service
//! `HashRequest { group, volume, first_chunk, count }` (a group of the connection's hello,
//! `count` ≤ `HASHES_PER_MESSAGE_MAX`) is answered with `HashReply { seq, hashes }`: the
//! blake3 (hex) of each 1 MiB chunk — the last one over what is left of the volume — of the
//! volume's image at `seq`, the group's durable head when the request was taken. An unknown
//! group or volume, a volume that is not protecting, a range past the end or a bad count get
//! `HashError { reason }` (one sentence). The head is pinned while its chunks are read. See
//! [`hashes`]; the server answers at most
//! [`server::HASH_REQUESTS_PER_CONNECTION_MAX`] requests of a connection at once.
//!
//! # JSON output
//! `status --json`:
//! ```json
//! { "serving": true,
//!   "volumes": [ { "group": "db", "volume": "db-data",
//!                  "state": "protecting",  // paused | syncing | protecting | disconnected
//!                  "volume_state": "protecting", // new | syncing | protecting
//!                  "connected": true, "size": 1073741824,
//!                  "window_first": { "seq": 12, "time": "2024-05-01T12:00:00.123Z" },
//!                  "window_last":  { "seq": 90, "time": "2024-05-01T12:05:00Z" },
//!                  "journal_bytes": 5242880, "head_seq": 90, "base_seq": 11,
//!                  "retention": { "window": "24h", "window_s": 86400,
//!                                 "max_journal_bytes": null },
//!                  "pins": { "count": 1, "oldest_seq": 40 },
//!                  "ingest_reason": null, "paused_since": null,
//!                  "failover": null,
//!                  "degraded": null,
//!                  "window_short": null } ] }
//! ```
//! `failover` is `{ "seq": 123, "state": "active", "since": "…" }` while the volume's group
//! is failed over (`state` `active`, `committing` or `committed`; `since` when it started, or
//! when it was committed), and `state` above then reads `failed over at seq 123` (with
//! ` (committed)` once committed).
//! `degraded` is `{ "mismatches": N, "reason": "…" }` while the verifier's mismatches of the
//! volume are open (then `state` is `degraded`, unless `paused` or failed over), null
//! otherwise.
//! `window_short` is `{ "effective_secs": 3600, "configured_secs": 86400, "reason": "…" }`
//! while the window (agent time from its first point to the group's newest batch) is shorter
//! than the group's configured window although retention has trimmed points away — the
//! journal cap, not the group's youth, limits it; `reason` is one sentence naming the cap and
//! what to do. Null otherwise (and while the group is failed over).
//! `window_first`/`window_last` are `null` before the initial sync completes. `base_seq` is
//! the group's base (the target files' point); `retention` the group's retention
//! (`max_journal_bytes` `null`: no cap); `pins` the group's live pins — readers holding points
//! — and the oldest seq they hold (`null` without pins): the base does not pass it. `state` is
//! `paused` while `serve` runs and cannot commit the group's batches (its disk is full);
//! `ingest_reason` then says why in one sentence (e.g. `"the journal's disk is full (could
//! not append to …: No space left on device (os error 28)); no batch of group db is
//! acknowledged until space is freed there, and ingest resumes by itself (it retries every
//! 1 s)"`) and `paused_since` since when (RFC 3339); both are `null` otherwise.
//!
//! `points --json`: an array, in seq order, of every batch of the volume's group in the
//! volume's window (from its start, above, to the head; a batch carries at most one
//! bookmark):
//! ```json
//! [ { "seq": 12, "time": "2024-05-01T12:00:00.123Z", "received": "2024-05-01T12:00:00.125Z",
//!     "consistent": true, "flush": true, "bookmark": null, "records": 3 } ]
//! ```
//! Times are RFC 3339 in UTC; `time` is the agent's clock, `received` the replica's.
//! `--since`, `--until` (agent time, both included), `--bookmarks` and `--limit N` (then
//! newest first) filter that array; the objects are the same. The catalog filters and limits
//! along the batches' primary key ([`catalog::Catalog::points_page`]), so only the points
//! printed are read into memory.
//!
//! `points --at POINT --json`: the one point `restore --at POINT` would choose:
//! `{ "seq": 90, "time": "...", "bookmark": null, "consistent": true }`.

pub mod agent_ports;
pub mod agents;
pub mod apply;
pub mod catalog;
pub mod clock;
pub mod console;
pub mod datadir;
pub mod diff;
pub mod error;
pub mod export;
pub mod failover;
pub mod forget;
pub mod hashes;
pub mod ingest;
pub mod journal;
pub mod lazy_image;
pub mod metrics;
pub mod overlay;
pub mod pause_board;
pub mod pins;
pub mod points;
pub mod reconstruct;
pub mod restore;
pub mod retention;
pub mod serve;
pub mod server;
pub mod status;
pub mod target;
pub mod trimmer;
pub mod verifier;

use cdp_shared::types::Seq;
use std::fs;
use std::net::SocketAddr;
use std::path::Path;

use cdp_shared::identity::{Fingerprint, Identity};

pub use agents::{AgentInfo, agents, authorize, deauthorize};
pub use catalog::PointsFilter;
pub use cdp_shared::point::PointSpec;
pub use clock::now_ns;
pub use diff::{DiffReport, Extent, diff};
pub use error::{ReplicaError, Result};
pub use export::{Endpoint, ExportHandle, ExportInfo};
pub use pins::{PinGuard, pin_point};
pub use points::{ChosenPoint, PointInfo, points, points_filtered, resolve_point};
pub use restore::{RestoreSummary, open_image, restore};
pub use retention::Retention;
pub use serve::{Server, ServerHandle};
pub use status::{
    Degraded, FailoverStatus, PinsStatus, PointRef, RetentionStatus, StatusReport, VolumeStatus,
    WindowShort, status,
};

use crate::catalog::{Catalog, OpenMode};
use crate::datadir::DataDir;

/// Common name of the replica's certificate.
pub const CERT_COMMON_NAME: &str = "cdp-replica";

/// Prepares a new data directory: configuration, identity, empty authorized agents list,
/// catalog. Refuses a directory that already holds a replica. Returns the fingerprint agents
/// must pin. New groups get the default retention (see [`init_with`]).
pub async fn init(root: &Path, listen: SocketAddr) -> Result<Fingerprint> {
    init_with(root, listen, &Retention::default()).await
}

/// [`init`], with the retention new groups start with (written to `replica.toml`).
pub async fn init_with(
    root: &Path,
    listen: SocketAddr,
    retention: &Retention,
) -> Result<Fingerprint> {
    let dir = DataDir::new(root);
    if dir.catalog().exists() || root.join("identity").exists() {
        return Err(ReplicaError::AlreadyInitialized {
            dir: root.to_path_buf(),
        });
    }
    fs::create_dir_all(root).map_err(ReplicaError::io("create directory", root))?;
    let identity = Identity::generate(CERT_COMMON_NAME)?;
    identity.save(root)?;
    datadir::write_config(&dir, listen, retention)?;
    if !dir.agents().exists() {
        datadir::write_agents(&dir, &[])?;
    }
    for d in [dir.journals(), dir.volumes()] {
        fs::create_dir_all(&d).map_err(ReplicaError::io("create directory", &d))?;
    }
    fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.lock())
        .map_err(ReplicaError::io("create", dir.lock()))?;
    // The catalog last: its presence marks a complete data directory.
    let catalog = Catalog::open(&dir.catalog(), OpenMode::Create).await?;
    catalog.close().await;
    datadir::sync_dir(root)?;
    Ok(identity.fingerprint())
}

/// The replica's certificate fingerprint.
pub fn fingerprint(root: &Path) -> Result<Fingerprint> {
    Ok(DataDir::existing(root)?.identity()?.fingerprint())
}

/// The listen address from `replica.toml` (defaults applied).
pub fn configured_listen(root: &Path) -> Result<SocketAddr> {
    let dir = DataDir::existing(root)?;
    Ok(datadir::load_config(&dir)?.listen)
}

/// The address `serve` serves `/metrics` on by `replica.toml` (`http`), if any.
pub fn configured_http(root: &Path) -> Result<Option<SocketAddr>> {
    let dir = DataDir::existing(root)?;
    Ok(datadir::load_config(&dir)?.http)
}

/// A change of a group's retention; `None` leaves that part as it is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetentionChange {
    pub window: Option<std::time::Duration>,
    /// `Some(None)` removes the cap.
    pub journal_bytes_max: Option<Option<u64>>,
}

/// The points a retention change would drop: those from the window's first point now to the
/// first point the trimmer would keep under the new retention (what it keeps under the current
/// one is not counted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetentionDrop {
    /// Points (batches) dropped.
    pub points: u64,
    /// The first and last point dropped: seq and agent time.
    pub first_seq: Seq,
    pub first_ns: i64,
    pub last_seq: Seq,
    /// The first point kept (the new window's start): seq and agent time.
    pub kept_seq: Seq,
    pub kept_ns: i64,
}

impl RetentionDrop {
    /// The agent time the points dropped span: from the first one dropped to the first one
    /// kept.
    pub fn span_ns(&self) -> i64 {
        self.kept_ns.saturating_sub(self.first_ns)
    }
}

impl std::fmt::Display for RetentionDrop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = |ns: i64| clock::rfc3339(&clock::time_of(ns));
        write!(
            f,
            "{} point{} (seq {} to {}, {} of agent time from {} to {})",
            self.points,
            if self.points == 1 { "" } else { "s" },
            self.first_seq,
            self.last_seq,
            retention::format_span(self.span_ns()),
            t(self.first_ns),
            t(self.kept_ns)
        )
    }
}

/// What changing group `g`'s retention to `new` would drop (see [`RetentionDrop`]), reckoned
/// as the trimmer chooses ([`trimmer::base_after_trims`]) against the catalog's points now;
/// `None` when it drops none.
pub async fn retention_drop(
    catalog: &Catalog,
    g: &catalog::GroupRow,
    new: &Retention,
) -> Result<Option<RetentionDrop>> {
    // Points exist from the first seq at which a volume of the group completed its sync.
    let Some(first_point) = catalog
        .volumes_of_group(g.id)
        .await?
        .iter()
        .filter(|v| v.state == catalog::VolumeState::Protecting)
        .filter_map(|v| v.sync_done_seq)
        .min()
    else {
        return Ok(None);
    };
    let mut reads = catalog.clone();
    let now = trimmer::base_after_trims(&mut reads, g, &g.retention).await?;
    let then = trimmer::base_after_trims(&mut reads, g, new).await?;
    let from = now.max(first_point).max(g.window_floor());
    if then <= from {
        return Ok(None);
    }
    let points = catalog.batch_count_in(g.id, from, Seq(then.0 - 1)).await?;
    let page = |newest_first| catalog::PointsFilter {
        limit: Some(1),
        newest_first,
        ..catalog::PointsFilter::default()
    };
    let first = catalog
        .points_page(g.id, from, Seq(then.0 - 1), &page(false))
        .await?;
    let last = catalog
        .points_page(g.id, from, Seq(then.0 - 1), &page(true))
        .await?;
    let (Some(first), Some(last), Some(kept)) = (
        first.first(),
        last.first(),
        catalog.batch(g.id, then).await?,
    ) else {
        return Ok(None);
    };
    Ok(Some(RetentionDrop {
        points,
        first_seq: first.seq,
        first_ns: first.agent_ns,
        last_seq: last.seq,
        kept_seq: kept.seq,
        kept_ns: kept.agent_ns,
    }))
}

/// `retention` applies `change` to `current`, checking its bounds.
fn changed_retention(current: &Retention, change: &RetentionChange) -> Result<Retention> {
    let mut r = *current;
    if let Some(w) = change.window {
        if w < retention::WINDOW_MIN || w > retention::WINDOW_MAX {
            return Err(ReplicaError::Retention(format!(
                "a window of {} s is outside 1s..3650d",
                w.as_secs()
            )));
        }
        r.window = std::time::Duration::from_secs(w.as_secs());
    }
    if let Some(cap) = change.journal_bytes_max {
        if let Some(n) = cap
            && !(retention::JOURNAL_CAP_MIN_BYTES..=retention::JOURNAL_CAP_MAX_BYTES).contains(&n)
        {
            return Err(ReplicaError::Retention(format!(
                "a journal cap of {n} bytes is outside 1MiB..1EiB"
            )));
        }
        r.journal_bytes_max = cap;
    }
    Ok(r)
}

/// Changes a group's retention (when `change` asks for anything) and returns it as it now is.
/// A running `serve` applies it at its trimmer's next round (within [`trimmer::TRIM_INTERVAL`]).
/// It applies whatever the change drops; `cdp-replica retention` asks first
/// ([`set_retention_checked`]).
pub async fn set_retention(
    root: &Path,
    group: &str,
    change: &RetentionChange,
) -> Result<Retention> {
    Ok(set_retention_checked(root, group, change, true).await?.0)
}

/// [`set_retention`], which first reckons what the change would drop ([`retention_drop`]):
/// when it drops points and `yes` is false, nothing is changed and the error says what it
/// would drop. Returns the retention as it now is and what the change drops.
pub async fn set_retention_checked(
    root: &Path,
    group: &str,
    change: &RetentionChange,
    yes: bool,
) -> Result<(Retention, Option<RetentionDrop>)> {
    let dir = DataDir::existing(root)?;
    let catalog = Catalog::open(&dir.catalog(), OpenMode::Existing).await?;
    let result = async {
        let Some(g) = catalog.group_by_name(group).await? else {
            return Err(ReplicaError::UnknownGroup {
                group: group.to_owned(),
                dir: root.to_path_buf(),
            });
        };
        let r = changed_retention(&g.retention, change)?;
        if r == g.retention {
            return Ok((r, None));
        }
        let dropped = retention_drop(&catalog, &g, &r).await?;
        if let Some(d) = &dropped
            && !yes
        {
            return Err(ReplicaError::Retention(format!(
                "changing group {group} to {r} would drop {d} from its window; nothing was changed: run the command again with --yes to apply it"
            )));
        }
        catalog.set_retention(g.id, &r).await?;
        let msg = format!(
            "retention of group {group} set to {r} (it was {}){}",
            g.retention,
            match &dropped {
                Some(d) => format!(", dropping {d}"),
                None => String::new(),
            }
        );
        tracing::info!("{msg}");
        if let Err(e) = catalog
            .event(catalog::EventLevel::Info, Some(group), None, &msg, now_ns())
            .await
        {
            tracing::warn!("could not record an event: {e}");
        }
        Ok((r, dropped))
    }
    .await;
    catalog.close().await;
    result
}
