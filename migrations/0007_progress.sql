-- Progress of long work (issue 13, scope 7), so that `status` (and the console) shows it with
-- its rate and time left whichever process does it. Conventions as in 0001_catalog.sql.

-- A reader's progress through its pinned image: bytes read so far and of how many (NULL: a
-- reader without an end, such as an export). Written by the holder about every second; the
-- pin's created_ns is when it started.
ALTER TABLE pins ADD COLUMN done_bytes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE pins ADD COLUMN total_bytes INTEGER;

-- A repair's progress: its phase ('asking' the agent to resend, 'resending' until a
-- consistent point after the resend is durable, 'checking' each chunk again), the chunks
-- checked again of the chunks to repair, and when serve took it.
ALTER TABLE repair_requests ADD COLUMN started_ns INTEGER;
ALTER TABLE repair_requests ADD COLUMN phase TEXT;
ALTER TABLE repair_requests ADD COLUMN chunks_done INTEGER NOT NULL DEFAULT 0;
ALTER TABLE repair_requests ADD COLUMN chunks_total INTEGER NOT NULL DEFAULT 0;

-- How many restores and exports each volume had, for the replica's /metrics
-- (`cdp_replica_restores_total`, `cdp_replica_exports_total`): a restore counts 'done' or
-- 'failed' when it ends (once it has pinned its point), an export 'started' once it serves.
CREATE TABLE reader_totals (
    volume_id INTEGER NOT NULL REFERENCES volumes(id),
    kind      TEXT    NOT NULL CHECK (kind IN ('restore', 'export')),
    outcome   TEXT    NOT NULL CHECK (outcome IN ('done', 'failed', 'started')),
    count     INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (volume_id, kind, outcome)
) WITHOUT ROWID;
