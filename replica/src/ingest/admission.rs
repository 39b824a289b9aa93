//! Admission of an agent's groups and volumes: the reply to its Hello.

use std::collections::{HashMap, HashSet};

use cdp_shared::cause::Cause;
use cdp_shared::identity::Fingerprint;
use cdp_shared::types::Seq;
use cdp_shared::types::check_name;
use cdp_shared::wire::{GroupHello, GroupRefused, GroupWelcome, PROTOCOL_VERSION, VolumeWelcome};
use tokio::sync::oneshot;

use super::IngestService;
use super::group::GroupMsg;
use super::service::GroupSlot;
use crate::catalog::{Catalog, EventLevel};
use crate::clock::now_ns;
use crate::error::{Decided, ReplicaError, Result};
use crate::target::TargetFile;

/// What a Hello admits: the Welcome of each group taken on the connection, and the groups
/// refused one by one (a fence), with why.
#[derive(Clone, Debug, Default)]
pub struct Admitted {
    pub welcomes: Vec<GroupWelcome>,
    pub refused: Vec<GroupRefused>,
}

impl IngestService {
    /// Admits an agent's groups (the reply to its Hello). The outer error is the replica's own
    /// failure; the inner one a refusal of the whole Hello for the agent (a malformed or
    /// conflicting announcement). A failed-over group is refused alone ([`Admitted::refused`]):
    /// the agent's other groups are welcomed.
    pub async fn hello(
        &self,
        agent: &Fingerprint,
        protocol: u32,
        hello: &[GroupHello],
    ) -> Decided<Admitted> {
        if protocol != PROTOCOL_VERSION {
            return Ok(Err(format!(
                "this replica speaks control protocol version {PROTOCOL_VERSION}, not {protocol}; upgrade the older side"
            ).into()));
        }
        let owner = agent.to_string();
        let mut groups = self.inner.groups.lock().await;
        // Pass 1: check everything before changing anything.
        if let Err(why) = self.check_hello(&owner, hello).await? {
            return Ok(Err(why));
        }
        // Pass 2: create what is new, but for fenced groups.
        let mut admitted = Admitted::default();
        for gh in hello {
            match fence_of(&self.inner.catalog, &gh.name).await? {
                Some(refused) => admitted.refused.push(refused),
                None => admitted
                    .welcomes
                    .push(self.admit_group(&owner, gh, &mut groups).await?),
            }
        }
        Ok(Ok(admitted))
    }

    /// Admits one group on a connection already welcomed (the agent's `Join`, after the
    /// replica said the group may replicate again): the same checks and creation as in a
    /// Hello. `Ok(Ok(Err))` is the group refused again (still fenced).
    pub async fn join(
        &self,
        agent: &Fingerprint,
        gh: &GroupHello,
    ) -> Decided<std::result::Result<GroupWelcome, GroupRefused>> {
        let owner = agent.to_string();
        let mut groups = self.inner.groups.lock().await;
        if let Err(why) = self.check_hello(&owner, std::slice::from_ref(gh)).await? {
            return Ok(Err(why));
        }
        if let Some(refused) = fence_of(&self.inner.catalog, &gh.name).await? {
            return Ok(Ok(Err(refused)));
        }
        Ok(Ok(Ok(self.admit_group(&owner, gh, &mut groups).await?)))
    }

    /// Pass 1 of a Hello: every check, before anything is changed. `Ok(Err)` is the refusal.
    async fn check_hello(&self, owner: &str, hello: &[GroupHello]) -> Decided<()> {
        let catalog = &self.inner.catalog;
        let mut seen = HashSet::new();
        for gh in hello {
            if let Err(e) = check_name("group", &gh.name) {
                return Ok(Err(e.into()));
            }
            if !seen.insert(gh.name.as_str()) {
                return Ok(Err(format!("group {} is announced twice", gh.name).into()));
            }
            if self
                .inner
                .forgetting
                .lock()
                .is_ok_and(|f| f.contains(&gh.name))
            {
                return Ok(Err(format!(
                    "group {} is being forgotten on this replica (cdp-replica forget); once that is done it is new to the replica: connect again",
                    gh.name
                ).into()));
            }
            let mut ids = HashSet::new();
            let mut names = HashSet::new();
            for v in &gh.volumes {
                if let Err(e) = check_name("volume", &v.name) {
                    return Ok(Err(e.into()));
                }
                if !ids.insert(v.id) || !names.insert(v.name.as_str()) {
                    return Ok(Err(format!(
                        "group {} announces volume id {} or name {} twice",
                        gh.name, v.id, v.name
                    )
                    .into()));
                }
                if v.size == 0 {
                    return Ok(Err(format!(
                        "volume {} of group {} has size 0",
                        v.name, gh.name
                    )
                    .into()));
                }
            }
            let existing = catalog.group_by_name(&gh.name).await?;
            let group_id = existing.as_ref().map(|g| g.id);
            if let Some(g) = &existing {
                if g.owner != owner {
                    return Ok(Err(format!(
                        "group {} belongs to another agent ({}) on this replica; rename the group or remove it from the replica",
                        gh.name, g.owner
                    ).into()));
                }
                let known = catalog.volumes_of_group(g.id).await?;
                for v in &gh.volumes {
                    if let Some(k) = known.iter().find(|k| k.agent_volume_id == v.id)
                        && (k.name != v.name || k.size != v.size)
                    {
                        return Ok(Err(format!(
                            "volume id {} of group {} is {} of {} bytes on this replica, not {} of {} bytes; a volume cannot be renamed or resized while protected",
                            v.id, gh.name, k.name, k.size, v.name, v.size
                        ).into()));
                    }
                }
            }
            for v in &gh.volumes {
                if let Some(k) = catalog.volume_by_name(&v.name).await?
                    && (Some(k.group_id) != group_id || k.agent_volume_id != v.id)
                {
                    return Ok(Err(format!(
                        "volume name {} is already used by another volume on this replica; choose another name",
                        v.name
                    ).into()));
                }
            }
        }
        Ok(Ok(()))
    }

    /// Pass 2 of a Hello, for one group: creates the group and its volumes when new, starts
    /// its task, has it reload the catalog, and returns its Welcome.
    async fn admit_group(
        &self,
        owner: &str,
        gh: &GroupHello,
        groups: &mut HashMap<String, GroupSlot>,
    ) -> Result<GroupWelcome> {
        let catalog = &self.inner.catalog;
        let now = now_ns();
        // A group created again after a forget starts at seq 0: its agent knows the old
        // group's generation, continues on a fresh chain and syncs every volume again.
        let start = if catalog.forgotten("group", &gh.name).await?.is_some() {
            Seq::ZERO
        } else {
            Seq(gh.first_held.0.saturating_sub(1))
        };
        let g = match catalog.group_by_name(&gh.name).await? {
            Some(g) => {
                if !catalog.group_has_batches(g.id).await? && g.head_seq != start {
                    catalog.rebase_empty_group(g.id, start).await?;
                }
                g
            }
            None => {
                let generation: [u8; 16] = rand::random();
                let generation: String = generation.iter().map(|b| format!("{b:02x}")).collect();
                let retention = self.inner.retention_default;
                let g = catalog
                    .create_group(&gh.name, owner, &generation, start, &retention, now)
                    .await?;
                let msg = format!(
                    "group {} created for agent {owner} (retention: {retention})",
                    gh.name
                );
                tracing::info!("{msg}");
                catalog
                    .event(EventLevel::Info, Some(&gh.name), None, &msg, now)
                    .await?;
                g
            }
        };
        if gh.first_held > g.head_seq.next() && catalog.group_has_batches(g.id).await? {
            // The agent's spool no longer holds what follows the head (it overflowed, or
            // was lost): the agent continues its chain after the head and resyncs.
            tracing::info!(
                group = %gh.name,
                "the agent holds batches from {} on but this replica is durable up to {}: the agent continues after {} and resyncs",
                gh.first_held,
                g.head_seq,
                g.head_seq
            );
        }
        let known = catalog.volumes_of_group(g.id).await?;
        for v in &gh.volumes {
            if known.iter().any(|k| k.agent_volume_id == v.id) {
                continue;
            }
            let path = self.inner.dir.target(&v.name);
            let size = v.size;
            tokio::task::spawn_blocking(move || TargetFile::create(&path, size)).await??;
            catalog.insert_volume(g.id, v.id, &v.name, v.size).await?;
            let msg = format!(
                "volume {} ({} bytes) added to group {}; waiting for its initial sync",
                v.name, v.size, gh.name
            );
            tracing::info!("{msg}");
            catalog
                .event(
                    EventLevel::Info,
                    Some(&gh.name),
                    Some(&v.name),
                    &msg,
                    now_ns(),
                )
                .await?;
        }
        let slot = match groups.get(&gh.name) {
            Some(slot) => slot,
            None => {
                let slot = self.spawn_group(g.id).await?;
                groups.entry(gh.name.clone()).or_insert(slot)
            }
        };
        let (done_tx, done_rx) = oneshot::channel();
        if slot.tx.send(GroupMsg::Reload(done_tx)).await.is_err() {
            return Err(ReplicaError::Ingest(
                self.fatal_error()
                    .unwrap_or_else(|| format!("group {} is shutting down", gh.name)),
            ));
        }
        done_rx
            .await
            .map_err(|_| ReplicaError::Ingest(format!("group {} stopped", gh.name)))??;
        let g = catalog.group_by_id(g.id).await?;
        let volumes = catalog
            .volumes_of_group(g.id)
            .await?
            .iter()
            .map(|v| VolumeWelcome {
                id: v.agent_volume_id,
                state: v.state,
            })
            .collect();
        let head_hash = match g.head_hash {
            Some(h) if g.head_seq > Seq::ZERO => blake3::Hash::from_bytes(h).to_hex().to_string(),
            _ => String::new(),
        };
        let agent_head_on_chain = agent_head_on_chain(catalog, g.id, g.head_seq, gh).await?;
        Ok(GroupWelcome {
            name: g.name,
            durable: g.head_seq,
            generation: g.generation,
            head_hash,
            volumes,
            agent_head_on_chain,
        })
    }
}

/// The refusal of group `name` while it has a failover row (see `failover`), if it has one.
pub(crate) async fn fence_of(catalog: &Catalog, name: &str) -> Result<Option<GroupRefused>> {
    match catalog.group_by_name(name).await? {
        Some(g) => fence_of_group(catalog, g.id, &g.name).await,
        None => Ok(None),
    }
}

/// [`fence_of`] for a group whose catalog id is known (one query).
pub(crate) async fn fence_of_group(
    catalog: &Catalog,
    group_id: i64,
    name: &str,
) -> Result<Option<GroupRefused>> {
    Ok(catalog.failover(group_id).await?.map(|f| GroupRefused {
        name: name.to_owned(),
        reason: f.refusal(name),
        cause: Cause::DisconnectedFencedByFailover,
    }))
}

/// Whether this replica, durable up to `head_seq`, is past the agent's head and holds batch
/// `head` of the Hello with the Hello's hash (see [`GroupWelcome::agent_head_on_chain`]).
/// Unknown (no hash sent, the batch trimmed from the window) is `false`: the agent then
/// compares every chunk.
async fn agent_head_on_chain(
    catalog: &crate::catalog::Catalog,
    group_id: i64,
    head_seq: Seq,
    gh: &GroupHello,
) -> Result<bool> {
    if gh.head == Seq::ZERO || gh.head >= head_seq {
        return Ok(false);
    }
    let Ok(sent) = blake3::Hash::from_hex(&gh.head_hash) else {
        return Ok(false);
    };
    Ok(catalog.batch_hash(group_id, gh.head).await? == Some(*sent.as_bytes()))
}
