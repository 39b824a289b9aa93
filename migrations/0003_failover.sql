-- Failover (issue 5): the image of a volume at a point made the live volume on the replica
-- side. Conventions as in 0001_catalog.sql. The protocol that writes these rows is written out
-- in replica/src/failover.rs.

-- One failover per consistency group (only groups of one volume can fail over for now).
-- While a row is `active` or `committing`:
-- * the trimmer moves the group's base to at most `seq` and unlinks no journal segment
--   numbered `segment_min` or higher (a pin that never expires: the row holds the point,
--   whether or not a process serves the failover);
-- * the group is fenced: `serve` refuses its agent at Hello, and commits none of its batches.
-- `active`: the journal after `seq` is kept, so `failover --undo` (which deletes the row) gives
-- back every point as it was. `committing`: `failover --commit` passed its point of no return
-- (the target disk is being rewritten); reads of the volume are refused until a `--commit`
-- completes. `committed`: the target disk holds the failover image, the points after `seq`
-- are gone, and the agent stays refused (failback is not built yet).
CREATE TABLE failovers (
    group_id     INTEGER PRIMARY KEY REFERENCES groups(id),
    volume_id    INTEGER NOT NULL REFERENCES volumes(id),
    -- The failover point.
    seq          INTEGER NOT NULL,
    -- The lowest journal segment the image at `seq` may read; NULL when it reads none.
    segment_min  INTEGER,
    state        TEXT    NOT NULL CHECK (state IN ('active', 'committing', 'committed')),
    started_ns   INTEGER NOT NULL,
    -- When `--commit` completed; NULL before.
    committed_ns INTEGER
);
