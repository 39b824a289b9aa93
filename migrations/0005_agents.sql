-- Agents (issue 10): when `serve` last had a connection from each agent, for
-- `cdp-replica agents`. Conventions as in 0001_catalog.sql.

-- What `serve` saw of each agent that connected (the authorized list itself is
-- authorized_agents.toml). Written when the agent says Hello and when its connection ends.
CREATE TABLE agents (
    -- The agent's certificate fingerprint (64 hex characters).
    fingerprint   TEXT    PRIMARY KEY,
    first_seen_ns INTEGER NOT NULL,
    last_seen_ns  INTEGER NOT NULL,
    -- The UDP address of its last connection.
    last_address  TEXT    NOT NULL
);
