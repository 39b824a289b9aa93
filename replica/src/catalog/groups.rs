//! Groups, volumes, agent links, agents seen, events and a group's retention.

use cdp_shared::types::Seq;
use std::time::Duration;

use sqlx::Sqlite;

use super::{Catalog, GroupRow, VolumeRow, VolumeState, WriteLock, hash_of};
use crate::error::{ReplicaError, Result};
use crate::retention::Retention;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkRow {
    pub connected: bool,
    pub peer: String,
    pub since_ns: i64,
}

/// What `serve` saw of an agent (table `agents`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentSeenRow {
    /// Hex.
    pub fingerprint: String,
    pub first_seen_ns: i64,
    /// The last Hello or end of a connection of the agent.
    pub last_seen_ns: i64,
    pub last_address: String,
}

/// One row of the events table ([`Catalog::events`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct EventRow {
    pub time_ns: i64,
    pub level: String,
    pub group: Option<String>,
    pub volume: Option<String>,
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventLevel {
    Info,
    Warn,
    Error,
}

impl EventLevel {
    fn as_str(self) -> &'static str {
        match self {
            EventLevel::Info => "info",
            EventLevel::Warn => "warn",
            EventLevel::Error => "error",
        }
    }
}

type GroupTuple = (
    i64,
    String,
    String,
    String,
    i64,
    i64,
    Option<Vec<u8>>,
    i64,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
);
const GROUP_COLUMNS: &str = "id, name, owner, generation, base_seq, head_seq, head_hash, retention_window_s, retention_journal_bytes_max, trimming_to, trimmed_end_segment, trimmed_end_offset";

fn group_of(t: GroupTuple) -> Result<GroupRow> {
    Ok(GroupRow {
        id: t.0,
        name: t.1,
        owner: t.2,
        generation: t.3,
        base_seq: Seq(t.4 as u64),
        head_seq: Seq(t.5 as u64),
        head_hash: hash_of(t.6)?,
        retention: Retention {
            window: Duration::from_secs(t.7.max(1) as u64),
            journal_bytes_max: t.8.map(|n| n as u64),
        },
        trimming_to: t.9.map(|n| Seq(n as u64)),
        trimmed_end: match (t.10, t.11) {
            (Some(s), Some(o)) => Some((s as u64, o as u64)),
            _ => None,
        },
    })
}

type VolumeTuple = (i64, i64, i64, String, i64, String, Option<i64>);
const VOLUME_COLUMNS: &str = "id, group_id, agent_volume_id, name, size, state, sync_done_seq";

fn volume_of(t: VolumeTuple) -> Result<VolumeRow> {
    Ok(VolumeRow {
        id: t.0,
        group_id: t.1,
        agent_volume_id: t.2 as u32,
        name: t.3,
        size: t.4 as u64,
        state: super::parse_volume_state(&t.5)?,
        sync_done_seq: t.6.map(|s| Seq(s as u64)),
    })
}

impl Catalog {
    // ---- groups and volumes ----

    pub async fn groups(&self) -> Result<Vec<GroupRow>> {
        let rows: Vec<GroupTuple> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {GROUP_COLUMNS} FROM groups ORDER BY name"
        )))
        .fetch_all(&self.pool)
        .await
        .map_err(ReplicaError::catalog("list groups"))?;
        rows.into_iter().map(group_of).collect()
    }

    pub async fn group_by_name(&self, name: &str) -> Result<Option<GroupRow>> {
        group_by_name_on(&self.pool, name).await
    }

    pub async fn group_by_id(&self, id: i64) -> Result<GroupRow> {
        group_by_id_on(&self.pool, id).await
    }

    /// Creates a group with its volumes (state `new`) in one transaction. `head` is where its
    /// journal starts (base = head; 0 for an agent that starts at seq 1).
    pub async fn create_group(
        &self,
        name: &str,
        owner: &str,
        generation: &str,
        head: Seq,
        retention: &Retention,
        now_ns: i64,
    ) -> Result<GroupRow> {
        let id: i64 = sqlx::query_scalar("INSERT INTO groups (name, owner, generation, base_seq, head_seq, head_hash, created_ns, retention_window_s, retention_journal_bytes_max) VALUES (?, ?, ?, ?, ?, NULL, ?, ?, ?) RETURNING id")
            .bind(name)
            .bind(owner)
            .bind(generation)
            .bind(head.0 as i64)
            .bind(head.0 as i64)
            .bind(now_ns)
            .bind(retention.window.as_secs() as i64)
            .bind(retention.journal_bytes_max.map(|n| n as i64))
            .fetch_one(&self.pool)
            .await
            .map_err(ReplicaError::catalog("create a group"))?;
        self.group_by_id(id).await
    }

    /// Moves an empty group's start (no batch committed yet) to `head`.
    pub async fn rebase_empty_group(&self, group_id: i64, head: Seq) -> Result<()> {
        sqlx::query("UPDATE groups SET base_seq = ?, head_seq = ?, head_hash = NULL WHERE id = ? AND NOT EXISTS (SELECT 1 FROM batches WHERE group_id = ?)")
            .bind(head.0 as i64)
            .bind(head.0 as i64)
            .bind(group_id)
            .bind(group_id)
            .execute(&self.pool)
            .await
            .map_err(ReplicaError::catalog("rebase a group"))?;
        Ok(())
    }

    pub async fn group_has_batches(&self, group_id: i64) -> Result<bool> {
        let n: i64 = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM batches WHERE group_id = ?)")
            .bind(group_id)
            .fetch_one(&self.pool)
            .await
            .map_err(ReplicaError::catalog("read batches"))?;
        Ok(n != 0)
    }

    pub async fn volumes_of_group(&self, group_id: i64) -> Result<Vec<VolumeRow>> {
        volumes_of_group_on(&self.pool, group_id).await
    }

    pub async fn volumes(&self) -> Result<Vec<VolumeRow>> {
        let rows: Vec<VolumeTuple> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {VOLUME_COLUMNS} FROM volumes ORDER BY name"
        )))
        .fetch_all(&self.pool)
        .await
        .map_err(ReplicaError::catalog("list volumes"))?;
        rows.into_iter().map(volume_of).collect()
    }

    pub async fn volume_by_name(&self, name: &str) -> Result<Option<VolumeRow>> {
        volume_by_name_on(&self.pool, name).await
    }

    pub async fn insert_volume(
        &self,
        group_id: i64,
        agent_volume_id: u32,
        name: &str,
        size: u64,
    ) -> Result<VolumeRow> {
        let id: i64 = sqlx::query_scalar("INSERT INTO volumes (group_id, agent_volume_id, name, size, state, sync_done_seq) VALUES (?, ?, ?, ?, 'new', NULL) RETURNING id")
            .bind(group_id)
            .bind(i64::from(agent_volume_id))
            .bind(name)
            .bind(size as i64)
            .fetch_one(&self.pool)
            .await
            .map_err(ReplicaError::catalog("add a volume"))?;
        Ok(VolumeRow {
            id,
            group_id,
            agent_volume_id,
            name: name.to_owned(),
            size,
            state: VolumeState::New,
            sync_done_seq: None,
        })
    }

    // ---- links and events ----

    pub async fn set_link(
        &self,
        group_id: i64,
        connected: bool,
        peer: &str,
        since_ns: i64,
    ) -> Result<()> {
        sqlx::query("INSERT INTO links (group_id, connected, peer, since_ns) VALUES (?, ?, ?, ?) ON CONFLICT (group_id) DO UPDATE SET connected = excluded.connected, peer = excluded.peer, since_ns = excluded.since_ns")
            .bind(group_id)
            .bind(connected)
            .bind(peer)
            .bind(since_ns)
            .execute(&self.pool)
            .await
            .map_err(ReplicaError::catalog("record a link"))?;
        Ok(())
    }

    /// Marks every link down (a previous `serve` may have stopped without doing so).
    pub async fn reset_links(&self, now_ns: i64) -> Result<()> {
        sqlx::query("UPDATE links SET connected = 0, since_ns = ? WHERE connected != 0")
            .bind(now_ns)
            .execute(&self.pool)
            .await
            .map_err(ReplicaError::catalog("reset links"))?;
        Ok(())
    }

    pub async fn link(&self, group_id: i64) -> Result<Option<LinkRow>> {
        let row: Option<(bool, String, i64)> =
            sqlx::query_as("SELECT connected, peer, since_ns FROM links WHERE group_id = ?")
                .bind(group_id)
                .fetch_optional(&self.pool)
                .await
                .map_err(ReplicaError::catalog("read a link"))?;
        Ok(row.map(|(connected, peer, since_ns)| LinkRow {
            connected,
            peer,
            since_ns,
        }))
    }

    /// Every link as last recorded: (group id, link).
    pub async fn links(&self) -> Result<Vec<(i64, LinkRow)>> {
        let rows: Vec<(i64, bool, String, i64)> = sqlx::query_as(
            "SELECT group_id, connected, peer, since_ns FROM links ORDER BY group_id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(ReplicaError::catalog("read the links"))?;
        Ok(rows
            .into_iter()
            .map(|(g, connected, peer, since_ns)| {
                (
                    g,
                    LinkRow {
                        connected,
                        peer,
                        since_ns,
                    },
                )
            })
            .collect())
    }

    /// Records that `serve` had a connection from agent `fingerprint` (hex) at `now_ns`, from
    /// `address` (at its Hello and when the connection ends).
    pub async fn agent_seen(&self, fingerprint: &str, address: &str, now_ns: i64) -> Result<()> {
        sqlx::query("INSERT INTO agents (fingerprint, first_seen_ns, last_seen_ns, last_address) VALUES (?, ?, ?, ?) ON CONFLICT (fingerprint) DO UPDATE SET last_seen_ns = MAX(last_seen_ns, excluded.last_seen_ns), last_address = excluded.last_address")
            .bind(fingerprint)
            .bind(now_ns)
            .bind(now_ns)
            .bind(address)
            .execute(&self.pool)
            .await
            .map_err(ReplicaError::catalog("record when an agent was seen"))?;
        Ok(())
    }

    /// What `serve` saw of every agent that connected, by fingerprint.
    pub async fn agents_seen(&self) -> Result<Vec<AgentSeenRow>> {
        let rows: Vec<(String, i64, i64, String)> = sqlx::query_as(
            "SELECT fingerprint, first_seen_ns, last_seen_ns, last_address FROM agents ORDER BY fingerprint",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(ReplicaError::catalog("read when the agents were seen"))?;
        Ok(rows
            .into_iter()
            .map(
                |(fingerprint, first_seen_ns, last_seen_ns, last_address)| AgentSeenRow {
                    fingerprint,
                    first_seen_ns,
                    last_seen_ns,
                    last_address,
                },
            )
            .collect())
    }

    pub async fn event(
        &self,
        level: EventLevel,
        group: Option<&str>,
        volume: Option<&str>,
        message: &str,
        now_ns: i64,
    ) -> Result<()> {
        sqlx::query("INSERT INTO events (time_ns, level, group_name, volume, message) VALUES (?, ?, ?, ?, ?)")
            .bind(now_ns)
            .bind(level.as_str())
            .bind(group)
            .bind(volume)
            .bind(message)
            .execute(&self.pool)
            .await
            .map_err(ReplicaError::catalog("record an event"))?;
        Ok(())
    }

    /// The latest `limit` events, newest first: of `group`, or of every group (`None`).
    pub async fn events(&self, group: Option<&str>, limit: u32) -> Result<Vec<EventRow>> {
        type Tuple = (i64, String, Option<String>, Option<String>, String);
        let rows: Vec<Tuple> = sqlx::query_as(
            "SELECT time_ns, level, group_name, volume, message FROM events \
             WHERE ?1 IS NULL OR group_name = ?1 ORDER BY time_ns DESC, id DESC LIMIT ?2",
        )
        .bind(group)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(ReplicaError::catalog("read events"))?;
        Ok(rows
            .into_iter()
            .map(|(time_ns, level, group, volume, message)| EventRow {
                time_ns,
                level,
                group,
                volume,
                message,
            })
            .collect())
    }

    /// Sets a group's retention (picked up by a running `serve` at its trimmer's next round).
    pub async fn set_retention(&self, group_id: i64, retention: &Retention) -> Result<()> {
        sqlx::query("UPDATE groups SET retention_window_s = ?, retention_journal_bytes_max = ? WHERE id = ?")
            .bind(retention.window.as_secs() as i64)
            .bind(retention.journal_bytes_max.map(|n| n as i64))
            .bind(group_id)
            .execute(&self.pool)
            .await
            .map_err(ReplicaError::catalog("set a group's retention"))?;
        Ok(())
    }
}

impl WriteLock {
    /// The group row, read inside the transaction.
    pub async fn group(&mut self, group_id: i64) -> Result<GroupRow> {
        group_by_id_on(self.conn()?, group_id).await
    }

    pub async fn volume_by_name(&mut self, name: &str) -> Result<Option<VolumeRow>> {
        volume_by_name_on(self.conn()?, name).await
    }

    /// The number of volumes of a group, read inside the transaction.
    pub async fn volume_count(&mut self, group_id: i64) -> Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM volumes WHERE group_id = ?")
            .bind(group_id)
            .fetch_one(self.conn()?)
            .await
            .map_err(ReplicaError::catalog("count volumes"))?;
        Ok(n as u64)
    }

    /// The volumes of a group, read inside the transaction.
    pub async fn volumes_of_group(&mut self, group_id: i64) -> Result<Vec<VolumeRow>> {
        volumes_of_group_on(self.conn()?, group_id).await
    }

    /// The group named `name`, read inside the transaction.
    pub async fn group_by_name(&mut self, name: &str) -> Result<Option<GroupRow>> {
        group_by_name_on(self.conn()?, name).await
    }
}

// ---- queries on the pool or on one connection ----

async fn group_by_id_on<'e, E: sqlx::Executor<'e, Database = Sqlite>>(
    e: E,
    id: i64,
) -> Result<GroupRow> {
    let row: GroupTuple = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {GROUP_COLUMNS} FROM groups WHERE id = ?"
    )))
    .bind(id)
    .fetch_one(e)
    .await
    .map_err(ReplicaError::catalog("read a group"))?;
    group_of(row)
}

async fn group_by_name_on<'e, E: sqlx::Executor<'e, Database = Sqlite>>(
    e: E,
    name: &str,
) -> Result<Option<GroupRow>> {
    let row: Option<GroupTuple> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {GROUP_COLUMNS} FROM groups WHERE name = ?"
    )))
    .bind(name)
    .fetch_optional(e)
    .await
    .map_err(ReplicaError::catalog("read a group"))?;
    row.map(group_of).transpose()
}

async fn volumes_of_group_on<'e, E: sqlx::Executor<'e, Database = Sqlite>>(
    e: E,
    group_id: i64,
) -> Result<Vec<VolumeRow>> {
    let rows: Vec<VolumeTuple> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {VOLUME_COLUMNS} FROM volumes WHERE group_id = ? ORDER BY agent_volume_id"
    )))
    .bind(group_id)
    .fetch_all(e)
    .await
    .map_err(ReplicaError::catalog("list volumes"))?;
    rows.into_iter().map(volume_of).collect()
}

async fn volume_by_name_on<'e, E: sqlx::Executor<'e, Database = Sqlite>>(
    e: E,
    name: &str,
) -> Result<Option<VolumeRow>> {
    let row: Option<VolumeTuple> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {VOLUME_COLUMNS} FROM volumes WHERE name = ?"
    )))
    .bind(name)
    .fetch_optional(e)
    .await
    .map_err(ReplicaError::catalog("read a volume"))?;
    row.map(volume_of).transpose()
}
