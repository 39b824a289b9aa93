-- The replica's catalog (meta.db): what is in the journal and where, per consistency group.
--
-- Conventions
-- * Times are UTC integer nanoseconds since the Unix epoch (`*_ns`).
-- * Seqs, offsets and sizes are INTEGER (SQLite's i64; every value fits).
-- * Hashes are 32-byte BLOBs (blake3).
-- * Only the replica's catalog module (replica/src/catalog.rs) reads or writes this database.
--   `init` and `serve` apply migrations; `status`, `points` and `restore` only read.
-- * Rows that describe the journal are written in ONE transaction per group commit, after the
--   journal segment and the target files it touched have been fsynced: a committed row always
--   describes bytes that are on disk.

-- A consistency group: a set of volumes whose writes are ordered in one log (one seq space).
CREATE TABLE groups (
    id          INTEGER PRIMARY KEY,
    name        TEXT    NOT NULL UNIQUE,
    -- Fingerprint (64 hex characters) of the agent that created the group; only it may send.
    owner       TEXT    NOT NULL,
    -- Random hex string made when the group is created; changes when the replica's copy
    -- of the group starts over. Reported to the agent in Welcome.
    generation  TEXT    NOT NULL,
    -- The target disks' point: every batch <= base_seq is in the target files.
    base_seq    INTEGER NOT NULL DEFAULT 0,
    -- The last durable seq (journal fsynced and rows committed); 0 when none.
    head_seq    INTEGER NOT NULL DEFAULT 0,
    -- header_hash of batch head_seq (the next batch's prev_hash); NULL when unknown.
    head_hash   BLOB,
    created_ns  INTEGER NOT NULL
);

-- A protected volume. `id` is the replica-wide number used in `records` (small, compact).
CREATE TABLE volumes (
    id              INTEGER PRIMARY KEY,
    group_id        INTEGER NOT NULL REFERENCES groups(id),
    -- The agent's volume id inside the group (the `volume` field of records on the wire).
    agent_volume_id INTEGER NOT NULL,
    -- Unique across the replica: names the target file volumes/<name>/target.
    name            TEXT    NOT NULL UNIQUE,
    size            INTEGER NOT NULL,
    -- new: announced, initial sync not begun; syncing: records go straight to the target;
    -- protecting: records are journaled.
    state           TEXT    NOT NULL CHECK (state IN ('new', 'syncing', 'protecting')),
    -- The seq of the batch that completed the initial sync: the volume's window starts there.
    -- NULL until then.
    sync_done_seq   INTEGER,
    UNIQUE (group_id, agent_volume_id)
);

-- Every durable batch, journaled or not (batches that only hold records of syncing volumes
-- are applied to the target files and have no segment).
CREATE TABLE batches (
    group_id     INTEGER NOT NULL,
    seq          INTEGER NOT NULL,
    agent_ns     INTEGER NOT NULL,
    received_ns  INTEGER NOT NULL,
    durable_ns   INTEGER NOT NULL,
    -- BatchFlags: 1 flush, 2 bookmark, 4 sync, 8 inconsistent.
    flags        INTEGER NOT NULL,
    bookmark     TEXT,
    -- Where the batch's bytes are: segment number, byte position of its header, its length.
    -- All three NULL when the batch was not journaled.
    segment      INTEGER,
    position     INTEGER,
    length       INTEGER,
    record_count INTEGER NOT NULL,
    header_hash  BLOB    NOT NULL,
    PRIMARY KEY (group_id, seq)
) WITHOUT ROWID;

-- One row per journaled byte-changing record of a protecting volume. Kept compact (this is
-- the table that grows): no hash (it is in the record header in the segment, checked on
-- every read), the offset within the chunk rather than within the volume.
--
-- Primary key (volume_id, chunk, seq, idx): "records of volume V, chunk C, seq <= S" is one
-- index range, and a scan of volume V in key order yields each chunk's records in seq order,
-- which is the order in which they are overlaid. The index records_by_seq makes "records of
-- volume V with seq <= S" an index range too (the trimmer's delete, per-batch listings).
CREATE TABLE records (
    volume_id    INTEGER NOT NULL,
    chunk        INTEGER NOT NULL,
    seq          INTEGER NOT NULL,
    -- Index of the record in its batch (0-based).
    idx          INTEGER NOT NULL,
    -- Byte offset within the chunk: the volume offset is chunk * 1 MiB + chunk_offset.
    chunk_offset INTEGER NOT NULL,
    length       INTEGER NOT NULL,
    -- RecordKind: 1 data, 2 zero, 3 trim.
    kind         INTEGER NOT NULL,
    segment      INTEGER NOT NULL,
    -- Byte position of the record header in the segment file.
    position     INTEGER NOT NULL,
    PRIMARY KEY (volume_id, chunk, seq, idx)
) WITHOUT ROWID;

CREATE INDEX records_by_seq ON records (volume_id, seq);

-- Bookmarks: a name given by the agent to a batch boundary. A name may be reused; the
-- latest batch carrying it wins when it is resolved.
CREATE TABLE bookmarks (
    group_id INTEGER NOT NULL,
    name     TEXT    NOT NULL,
    seq      INTEGER NOT NULL,
    PRIMARY KEY (group_id, name, seq)
) WITHOUT ROWID;

-- The agent link of each group, as last seen by `serve`.
CREATE TABLE links (
    group_id  INTEGER PRIMARY KEY REFERENCES groups(id),
    connected INTEGER NOT NULL,
    peer      TEXT    NOT NULL,
    since_ns  INTEGER NOT NULL
);

-- Things an operator may want to know about later (refusals, truncations, state changes).
CREATE TABLE events (
    id         INTEGER PRIMARY KEY,
    time_ns    INTEGER NOT NULL,
    level      TEXT    NOT NULL CHECK (level IN ('info', 'warn', 'error')),
    group_name TEXT,
    volume     TEXT,
    message    TEXT    NOT NULL
);
