-- Failover of whole consistency groups (issue 14). Conventions as in 0001_catalog.sql; the
-- protocol that writes these rows is written out in replica/src/failover.rs.

-- A failover covers every volume of its group (each served as its own NBD export), so the row
-- no longer names one volume: `failovers` is rebuilt without `volume_id`. Everything else is
-- as in 0003_failover.sql: one row per group; `active` and `committing` hold the point like a
-- pin and fence the group (only that group: the agent's other groups keep replicating).
CREATE TABLE failovers_new (
    group_id     INTEGER PRIMARY KEY REFERENCES groups(id),
    -- The failover point.
    seq          INTEGER NOT NULL,
    -- The lowest journal segment the image at `seq` may read; NULL when it reads none.
    segment_min  INTEGER,
    state        TEXT    NOT NULL CHECK (state IN ('active', 'committing', 'committed')),
    started_ns   INTEGER NOT NULL,
    -- When `--commit` completed; NULL before.
    committed_ns INTEGER
);
INSERT INTO failovers_new (group_id, seq, segment_min, state, started_ns, committed_ns)
    SELECT group_id, seq, segment_min, state, started_ns, committed_ns FROM failovers;
DROP TABLE failovers;
ALTER TABLE failovers_new RENAME TO failovers;
