//! The agents of a replica: who may connect (`authorized_agents.toml`, [`crate::datadir`]),
//! when `serve` last had a connection from each (the catalog's `agents` table, written by the
//! server at each Hello and when a connection ends), and the groups each one owns.
//!
//! * [`authorize`] adds an agent (or renames it). It refuses the replica's own fingerprint.
//! * [`deauthorize`] removes one, named by fingerprint or by name; an unknown or ambiguous one
//!   is refused and nothing changes. The file is rewritten atomically; a running `serve`
//!   refuses the agent at its next handshake (the file is read at every handshake) and closes
//!   its open connections within [`crate::server::FENCE_CHECK_INTERVAL`] (each connection
//!   re-reads the file on that tick). Its groups stay on the replica (`forget` removes them).
//! * [`agents`] lists the authorized agents with what `serve` saw of them.

use std::path::Path;

use cdp_shared::identity::Fingerprint;
use serde::Serialize;

use crate::catalog::Catalog;
use crate::catalog::OpenMode;
use crate::clock::{rfc3339, time_of};
use crate::datadir::{self, AuthorizedAgent, DataDir, ServeLock};
use crate::error::{ReplicaError, Result};

/// One authorized agent in `cdp-replica agents`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AgentInfo {
    /// The name given at `authorize` (may be empty).
    pub name: String,
    /// The certificate fingerprint (64 hex characters).
    pub fingerprint: String,
    /// When `serve` last had a connection from it (its last Hello or the end of its last
    /// connection, RFC 3339); null when it never connected.
    pub last_seen: Option<String>,
    /// The address of its last connection; null when it never connected.
    pub last_address: Option<String>,
    /// Whether a running `serve` holds a link of one of its groups right now.
    pub connected: bool,
    /// The groups it owns (protects) on this replica, by name.
    pub groups: Vec<String>,
}

/// Authorizes an agent (takes effect at its next handshake, also while `serve` runs).
/// Returns false when it was already authorized (its name is updated). The replica's own
/// fingerprint is refused.
pub fn authorize(root: &Path, agent: Fingerprint, name: &str) -> Result<bool> {
    let dir = DataDir::existing(root)?;
    if dir.identity()?.fingerprint() == agent {
        return Err(ReplicaError::Agent(format!(
            "{agent} is this replica's own fingerprint (`cdp-replica fingerprint`), not an agent's: authorize the fingerprint `cdp-agent init` printed on the protected machine"
        )));
    }
    let mut agents = datadir::read_agents(&dir)?;
    let added = match agents.iter_mut().find(|a| a.fingerprint == agent) {
        Some(a) => {
            a.name = name.to_owned();
            false
        }
        None => {
            agents.push(AuthorizedAgent {
                fingerprint: agent,
                name: name.to_owned(),
            });
            true
        }
    };
    datadir::write_agents(&dir, &agents)?;
    Ok(added)
}

/// Which authorized agent `who` names: a fingerprint (64 hex characters), or a name given at
/// `authorize`. `Err` is the sentence for an unknown or ambiguous one.
pub fn find_agent(agents: &[AuthorizedAgent], who: &str) -> std::result::Result<usize, String> {
    let who = who.trim();
    if who.is_empty() {
        return Err(
            "--agent is empty: give the agent's fingerprint or its name (`cdp-replica agents` lists them)"
                .to_owned(),
        );
    }
    if let Ok(fp) = who.parse::<Fingerprint>() {
        return agents
            .iter()
            .position(|a| a.fingerprint == fp)
            .ok_or_else(|| {
                format!(
                    "no authorized agent has the fingerprint {fp}: `cdp-replica agents` lists the authorized agents"
                )
            });
    }
    let named: Vec<usize> = (0..agents.len())
        .filter(|&i| agents[i].name == who)
        .collect();
    match named.as_slice() {
        [i] => Ok(*i),
        [] => Err(format!(
            "no authorized agent is named {who:?} (and it is not a fingerprint of 64 hexadecimal characters): `cdp-replica agents` lists the authorized agents"
        )),
        many => Err(format!(
            "{} authorized agents are named {who:?} ({}): deauthorize one by its fingerprint",
            many.len(),
            many.iter()
                .map(|&i| agents[i].fingerprint.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// Removes the agent `who` (a fingerprint or a name) from the authorized list and returns
/// it. Unknown or ambiguous: an error, and the list is left as it was.
pub fn deauthorize(root: &Path, who: &str) -> Result<AuthorizedAgent> {
    let dir = DataDir::existing(root)?;
    let mut agents = datadir::read_agents(&dir)?;
    let i = find_agent(&agents, who).map_err(ReplicaError::Agent)?;
    let removed = agents.remove(i);
    datadir::write_agents(&dir, &agents)?;
    Ok(removed)
}

/// Whether `agent` is in the authorized list right now (`None` when the list cannot be read).
pub fn is_authorized(dir: &DataDir, agent: &Fingerprint) -> Option<bool> {
    match datadir::read_agents(dir) {
        Ok(list) => Some(list.iter().any(|a| a.fingerprint == *agent)),
        Err(e) => {
            tracing::debug!("could not read the authorized agents: {e}");
            None
        }
    }
}

/// The authorized agents, in the order of the file, with what `serve` saw of each.
pub async fn agents(root: &Path) -> Result<Vec<AgentInfo>> {
    let dir = DataDir::existing(root)?;
    let serving = ServeLock::is_held(&dir)?;
    let authorized = datadir::read_agents(&dir)?;
    let catalog = Catalog::open(&dir.catalog(), OpenMode::Existing).await?;
    let result = async {
        let seen = catalog.agents_seen().await?;
        let groups = catalog.groups().await?;
        let links = catalog.links().await?;
        Ok(authorized
            .iter()
            .map(|a| {
                let fp = a.fingerprint.to_string();
                let s = seen.iter().find(|s| s.fingerprint == fp);
                let owned: Vec<&crate::catalog::GroupRow> =
                    groups.iter().filter(|g| g.owner == fp).collect();
                AgentInfo {
                    name: a.name.clone(),
                    last_seen: s.map(|s| rfc3339(&time_of(s.last_seen_ns))),
                    last_address: s.map(|s| s.last_address.clone()),
                    connected: serving && links.iter().any(|(_, l)| l.connected && l.peer == fp),
                    groups: owned.iter().map(|g| g.name.clone()).collect(),
                    fingerprint: fp,
                }
            })
            .collect())
    }
    .await;
    catalog.close().await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(byte: u8, name: &str) -> AuthorizedAgent {
        AuthorizedAgent {
            fingerprint: Fingerprint([byte; 32]),
            name: name.to_owned(),
        }
    }

    #[test]
    fn an_agent_is_found_by_fingerprint_or_unique_name() {
        let list = vec![
            agent(1, "web"),
            agent(2, "db"),
            agent(3, "db"),
            agent(4, ""),
        ];
        assert_eq!(find_agent(&list, "web"), Ok(0));
        assert_eq!(find_agent(&list, &Fingerprint([3; 32]).to_string()), Ok(2));
        assert_eq!(
            find_agent(
                &list,
                &format!(" {} ", Fingerprint([2; 32]).to_string().to_uppercase())
            ),
            Ok(1)
        );
        let e = find_agent(&list, "db").expect_err("ambiguous");
        assert!(
            e.contains("2 authorized agents are named \"db\"")
                && e.contains(&Fingerprint([2; 32]).to_string())
                && e.contains("by its fingerprint"),
            "{e}"
        );
        let e = find_agent(&list, "mail").expect_err("unknown name");
        assert!(e.contains("no authorized agent is named \"mail\""), "{e}");
        let e = find_agent(&list, &Fingerprint([9; 32]).to_string()).expect_err("unknown");
        assert!(e.contains("no authorized agent has the fingerprint"), "{e}");
        let e = find_agent(&list, "  ").expect_err("empty");
        assert!(e.contains("--agent is empty"), "{e}");
    }
}
