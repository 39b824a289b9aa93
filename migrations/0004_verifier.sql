-- The verifier (issue 6): results of chunk checks, open and repaired mismatches, on-demand
-- runs, the uniform sweep's cursor, and repair requests. Conventions as in 0001_catalog.sql.
-- `cdp-replica verify run|repair` talk to the running `serve` through `verify_runs` and
-- `repair_requests` (a row 'requested' by the CLI, taken by serve's verifier within about a
-- second, then 'running' and 'done' or 'failed'); see replica/src/verifier.rs.

-- One check of one chunk: the agent's hash of the chunk at a batch boundary `seq` against the
-- replica's reconstruction at the same seq. Bounded: rows older than 7 days, and beyond the
-- newest 1,000,000 per volume, are deleted by serve.
CREATE TABLE verify_results (
    id           INTEGER PRIMARY KEY,
    time_ns      INTEGER NOT NULL,
    volume_id    INTEGER NOT NULL REFERENCES volumes(id),
    chunk        INTEGER NOT NULL,
    -- The batch boundary checked; NULL when the agent gave none (skipped, timeout).
    seq          INTEGER,
    -- 64 hex digits; NULL when not known.
    agent_hash   TEXT,
    replica_hash TEXT,
    outcome      TEXT    NOT NULL CHECK (outcome IN ('match', 'mismatch', 'skipped', 'timeout')),
    -- Why (mismatch, skipped, timeout); NULL for a match.
    reason       TEXT,
    duration_us  INTEGER NOT NULL,
    -- The on-demand run that made the check; NULL for the background verifier.
    run_id       INTEGER
);

CREATE INDEX verify_results_by_time ON verify_results (volume_id, time_ns);
CREATE INDEX verify_results_by_outcome ON verify_results (volume_id, outcome);

-- A chunk found to differ. Open while repaired_ns IS NULL (the volume is degraded); at most
-- one open row per (volume, chunk). `repaired_seq` is the first point known good again.
CREATE TABLE verify_mismatches (
    id           INTEGER PRIMARY KEY,
    volume_id    INTEGER NOT NULL REFERENCES volumes(id),
    chunk        INTEGER NOT NULL,
    seq          INTEGER NOT NULL,
    found_ns     INTEGER NOT NULL,
    reason       TEXT    NOT NULL,
    agent_hash   TEXT    NOT NULL,
    replica_hash TEXT,
    repaired_ns  INTEGER,
    repaired_seq INTEGER
);

CREATE INDEX verify_mismatches_by_volume ON verify_mismatches (volume_id, repaired_ns, chunk);

-- An on-demand run (`verify run`): state requested -> running -> done | failed.
CREATE TABLE verify_runs (
    id           INTEGER PRIMARY KEY,
    volume_id    INTEGER NOT NULL REFERENCES volumes(id),
    -- 1: every chunk of the volume; 0: a sample (recently written chunks, then the sweep).
    full         INTEGER NOT NULL,
    -- Chunks per second at most; NULL: as fast as the concurrency allows.
    rate_per_sec REAL,
    state        TEXT    NOT NULL CHECK (state IN ('requested', 'running', 'done', 'failed')),
    requested_ns INTEGER NOT NULL,
    started_ns   INTEGER,
    ended_ns     INTEGER,
    chunks_total INTEGER NOT NULL,
    chunks_done  INTEGER NOT NULL DEFAULT 0,
    mismatches   INTEGER NOT NULL DEFAULT 0,
    -- Chunks the agent refused or did not answer in time (recorded as skipped / timeout).
    skipped      INTEGER NOT NULL DEFAULT 0,
    error        TEXT
);

CREATE INDEX verify_runs_by_state ON verify_runs (state, id);

-- The uniform sweep of the background verifier: the next chunk it checks, per volume.
CREATE TABLE verify_sweep (
    volume_id  INTEGER PRIMARY KEY REFERENCES volumes(id),
    next_chunk INTEGER NOT NULL
);

-- `verify repair`: resend the volume's open mismatched chunks from the agent and verify them
-- again. state requested -> running -> done | failed; `message` says what happened.
CREATE TABLE repair_requests (
    id           INTEGER PRIMARY KEY,
    volume_id    INTEGER NOT NULL REFERENCES volumes(id),
    state        TEXT    NOT NULL CHECK (state IN ('requested', 'running', 'done', 'failed')),
    requested_ns INTEGER NOT NULL,
    ended_ns     INTEGER,
    message      TEXT
);
