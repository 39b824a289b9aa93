//! The consistency groups the running agent serves, shared by its tasks. A group leaves the
//! set when it is unprotected (`cdp-agent unprotect`): its token is cancelled, so its age
//! cutter and maintenance task stop, and the sender, told through [`GroupSet::subscribe`],
//! reconnects to the replica without it. Once every task has let go of the group, its
//! devices, activity logs and spool are closed.

use std::sync::{Arc, RwLock};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::pipeline::Group;

pub struct GroupSet {
    groups: RwLock<Vec<(Arc<Group>, CancellationToken)>>,
    changed: watch::Sender<u64>,
}

impl GroupSet {
    /// The set of `groups`, each with a token that is a child of `shutdown`.
    pub fn new(groups: Vec<Arc<Group>>, shutdown: &CancellationToken) -> Arc<GroupSet> {
        let (changed, _) = watch::channel(0);
        Arc::new(GroupSet {
            groups: RwLock::new(
                groups
                    .into_iter()
                    .map(|g| (g, shutdown.child_token()))
                    .collect(),
            ),
            changed,
        })
    }

    /// The groups served now.
    pub fn snapshot(&self) -> Vec<Arc<Group>> {
        self.read().iter().map(|(g, _)| g.clone()).collect()
    }

    pub fn get(&self, name: &str) -> Option<Arc<Group>> {
        self.read()
            .iter()
            .find(|(g, _)| g.name == name)
            .map(|(g, _)| g.clone())
    }

    /// The token the tasks of group `name` stop at (cancelled already when it has left).
    pub fn token(&self, name: &str) -> CancellationToken {
        self.read()
            .iter()
            .find(|(g, _)| g.name == name)
            .map(|(_, t)| t.clone())
            .unwrap_or_else(|| {
                let t = CancellationToken::new();
                t.cancel();
                t
            })
    }

    /// Takes group `name` out of the set: its tasks stop, and subscribers are told.
    pub fn remove(&self, name: &str) -> Option<Arc<Group>> {
        let removed = {
            let mut groups = self.groups.write().unwrap_or_else(|p| p.into_inner());
            let at = groups.iter().position(|(g, _)| g.name == name)?;
            groups.remove(at)
        };
        removed.1.cancel();
        self.changed.send_modify(|v| *v += 1);
        Some(removed.0)
    }

    /// Changes whenever a group leaves.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<(Arc<Group>, CancellationToken)>> {
        self.groups.read().unwrap_or_else(|p| p.into_inner())
    }
}
