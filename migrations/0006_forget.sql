-- Forget (issue 10): `cdp-replica forget` removes a group or a volume with everything the
-- replica holds of it. Its requests to a running serve, the files it still has to delete, and
-- what it forgot. Conventions as in 0001_catalog.sql. The forget protocol is written out in
-- replica/src/forget.rs.

-- `cdp-replica forget --yes` while `serve` runs: the CLI inserts a row, serve's forget task
-- takes it within about a second and carries the forget out (state requested -> running ->
-- done | failed; `message` says what happened, one sentence).
CREATE TABLE forget_requests (
    id           INTEGER PRIMARY KEY,
    kind         TEXT    NOT NULL CHECK (kind IN ('group', 'volume')),
    name         TEXT    NOT NULL,
    state        TEXT    NOT NULL CHECK (state IN ('requested', 'running', 'done', 'failed')),
    requested_ns INTEGER NOT NULL,
    ended_ns     INTEGER,
    message      TEXT
);

-- Files and directories (relative to the data directory) that a forget has removed from the
-- catalog and not yet from the disk. Inserted in the transaction that deletes the catalog
-- rows; each is deleted once its file is gone. `serve` completes what is left before it
-- starts ingest, and so does the next `forget`.
CREATE TABLE forget_files (
    path TEXT PRIMARY KEY
);

-- What forget removed, and when. A group created again under a forgotten name starts at seq 0
-- (its agent then continues from a fresh chain and syncs every volume again).
CREATE TABLE forgotten (
    kind         TEXT    NOT NULL CHECK (kind IN ('group', 'volume')),
    name         TEXT    NOT NULL,
    forgotten_ns INTEGER NOT NULL,
    PRIMARY KEY (kind, name)
) WITHOUT ROWID;
