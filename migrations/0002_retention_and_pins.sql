-- Retention, the trimmer, and reader pins (issue 5). Conventions as in 0001_catalog.sql.
--
-- The window of a volume starts at max(base_seq, trimming_to, the volume's sync_done_seq)
-- and ends at head_seq. The trim protocol that moves base_seq is written out in
-- replica/src/trimmer.rs.

-- How long the window of a group is: batches whose agent time is more than this many seconds
-- older than the agent time of the group's newest batch may be trimmed. 24 h for groups that
-- existed before this migration.
ALTER TABLE groups ADD COLUMN retention_window_s INTEGER NOT NULL DEFAULT 86400;
-- Cap on the group's journal bytes (the bytes of its batches in journal segments, as
-- `status` shows them); NULL: no cap.
ALTER TABLE groups ADD COLUMN retention_journal_bytes_max INTEGER;
-- The trimmer's intent: the base it is moving to (set in step (a) of the trim protocol,
-- cleared with the move of base_seq in step (d)); NULL when no trim is under way. Readers
-- treat the window as starting there already.
ALTER TABLE groups ADD COLUMN trimming_to INTEGER;
-- Where the last trimmed journaled batch ended (segment number, byte offset): the committed
-- end of the journal once no journaled batch row is left after the base. NULL until the
-- trimmer has removed a journaled batch.
ALTER TABLE groups ADD COLUMN trimmed_end_segment INTEGER;
ALTER TABLE groups ADD COLUMN trimmed_end_offset INTEGER;

-- A reader's hold on a point: while the row exists the trimmer moves the group's base to at
-- most `seq` and unlinks no journal segment numbered `segment_min` or higher. A pin is live
-- while `expires_ns` is in the future (its holder renews it) and, when it was taken in this
-- machine's pid namespace, while process `pid` exists; the trimmer deletes dead pins, in the
-- same transaction in which it stops respecting them.
CREATE TABLE pins (
    id          INTEGER PRIMARY KEY,
    group_id    INTEGER NOT NULL REFERENCES groups(id),
    volume_id   INTEGER NOT NULL REFERENCES volumes(id),
    -- The pinned point.
    seq         INTEGER NOT NULL,
    -- The lowest journal segment the reader may read; NULL when it reads none.
    segment_min INTEGER,
    -- Who holds it, for people (`restore to /path`, `hash service`).
    holder      TEXT    NOT NULL,
    pid         INTEGER NOT NULL,
    -- The holder's pid namespace (`readlink /proc/self/ns/pid`); NULL when unknown.
    pid_ns      TEXT,
    created_ns  INTEGER NOT NULL,
    expires_ns  INTEGER NOT NULL
);

CREATE INDEX pins_by_group ON pins (group_id, seq);
