//! The agents' ports: how a service of the replica (the verifier) asks the agent that holds a
//! group's link a question and waits for its answer. A leaf: it knows the wire's `Control`
//! messages and nothing of QUIC; `server` registers each connection's port.
//!
//! The replica also asks: `VerifyRequest` and `RepairRequest` go out on the control stream of
//! the connection that holds a group's link, through [`AgentPorts`] — a registry group id →
//! [`AgentPort`] (the connection's outbox, and its map of questions waiting for an answer, id →
//! oneshot), registered after the Welcome and removed when the connection ends. The answers
//! (`VerifyReply`, `VerifyRefused`, `RepairStarted`, `RepairRefused`) are routed by `id` to the
//! waiting asker; an answer nobody waits for (its asker gave up) is ignored with a debug line.
//! At most [`QUESTIONS_PER_CONNECTION_MAX`] questions of a connection are outstanding at once
//! (askers beyond wait for a slot). With no agent connected, [`AgentPorts::ask`] answers
//! [`Asked::NoAgent`] at once and the asker decides (the verifier waits and tries again).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cdp_shared::wire::Control;
use tokio::sync::{Semaphore, mpsc, oneshot};

/// Questions of the replica (verify, repair) outstanding at once on one connection.
pub const QUESTIONS_PER_CONNECTION_MAX: usize = 8;

/// The control stream of the connection that holds a group's link, for the replica's
/// questions (see the module docs). Cheap to clone.
#[derive(Clone)]
pub struct AgentPort {
    conn: u64,
    outbox: mpsc::Sender<Control>,
    waiting: Arc<Mutex<HashMap<u64, oneshot::Sender<Control>>>>,
    slots: Arc<Semaphore>,
}

/// What became of a question.
#[derive(Debug)]
pub enum Asked {
    /// No agent holds the group's link.
    NoAgent,
    /// The connection ended before the answer.
    Lost,
    /// No answer within the time given.
    Timeout,
    Answer(Control),
}

/// The registry group id → [`AgentPort`] of the connected agents. Cheap to clone.
#[derive(Clone, Default)]
pub struct AgentPorts {
    ports: Arc<Mutex<HashMap<i64, AgentPort>>>,
    next_id: Arc<AtomicU64>,
}

impl AgentPorts {
    pub fn new() -> AgentPorts {
        AgentPorts::default()
    }

    /// Whether an agent holds the link of `group_id`.
    pub fn connected(&self, group_id: i64) -> bool {
        self.ports
            .lock()
            .map(|p| p.contains_key(&group_id))
            .unwrap_or(false)
    }

    pub(crate) fn register(&self, group_ids: &[i64], port: &AgentPort) {
        if let Ok(mut ports) = self.ports.lock() {
            for g in group_ids {
                ports.insert(*g, port.clone());
            }
        }
    }

    pub(crate) fn unregister(&self, group_ids: &[i64], conn: u64) {
        if let Ok(mut ports) = self.ports.lock() {
            for g in group_ids {
                if ports.get(g).is_some_and(|p| p.conn == conn) {
                    ports.remove(g);
                }
            }
        }
    }

    /// Sends the question `make(id)` to the agent of `group_id` and waits at most `timeout`
    /// for its answer (the wait for a free slot included). Cancellation-safe.
    pub async fn ask(
        &self,
        group_id: i64,
        make: impl FnOnce(u64) -> Control,
        timeout: Duration,
    ) -> Asked {
        let Some(port) = self
            .ports
            .lock()
            .ok()
            .and_then(|p| p.get(&group_id).cloned())
        else {
            return Asked::NoAgent;
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let _slot =
            match tokio::time::timeout_at(deadline, port.slots.clone().acquire_owned()).await {
                Ok(Ok(s)) => s,
                Ok(Err(_)) => return Asked::Lost,
                Err(_) => return Asked::Timeout,
            };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = oneshot::channel();
        if let Ok(mut w) = port.waiting.lock() {
            w.insert(id, tx);
        }
        let forget = || {
            if let Ok(mut w) = port.waiting.lock() {
                w.remove(&id);
            }
        };
        match tokio::time::timeout_at(deadline, port.outbox.send(make(id))).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                forget();
                return Asked::Lost;
            }
            Err(_) => {
                forget();
                return Asked::Timeout;
            }
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(answer)) => Asked::Answer(answer),
            Ok(Err(_)) => Asked::Lost,
            Err(_) => {
                forget();
                Asked::Timeout
            }
        }
    }
}

impl AgentPort {
    /// The port of connection `conn`, whose control stream's outbox is `outbox`.
    pub(crate) fn new(conn: u64, outbox: mpsc::Sender<Control>) -> AgentPort {
        AgentPort {
            conn,
            outbox,
            waiting: Arc::new(Mutex::new(HashMap::new())),
            slots: Arc::new(Semaphore::new(QUESTIONS_PER_CONNECTION_MAX)),
        }
    }

    /// The connection ended: every asker still waiting learns it ([`Asked::Lost`]).
    pub(crate) fn hang_up(&self) {
        if let Ok(mut w) = self.waiting.lock() {
            w.clear();
        }
    }

    /// Hands an answer to its asker; false when nobody waits for it.
    pub(crate) fn answer(&self, id: u64, msg: Control) -> bool {
        let tx = self.waiting.lock().ok().and_then(|mut w| w.remove(&id));
        match tx {
            Some(tx) => tx.send(msg).is_ok(),
            None => false,
        }
    }
}

/// Which connection holds each group's link (group id → connection id): set by the QUIC
/// shell from the Welcome to the end of the connection, asked by the forget service (a forget
/// is refused while the group's agent holds its link). Cheap to clone.
#[derive(Clone, Default)]
pub struct Links {
    held: Arc<Mutex<HashMap<i64, u64>>>,
}

impl Links {
    pub fn new() -> Links {
        Links::default()
    }

    /// Connection `conn` holds the links of `group_ids` now (taking them from any other).
    pub(crate) fn hold(&self, group_ids: &[i64], conn: u64) {
        if let Ok(mut held) = self.held.lock() {
            for gid in group_ids {
                held.insert(*gid, conn);
            }
        }
    }

    /// Connection `conn` ended: the links of `group_ids` it still holds are released.
    /// Returns those released (a newer connection may hold the others).
    pub(crate) fn release(&self, group_ids: &[i64], conn: u64) -> Vec<i64> {
        let mut released = Vec::new();
        if let Ok(mut held) = self.held.lock() {
            for gid in group_ids {
                if held.get(gid) == Some(&conn) {
                    held.remove(gid);
                    released.push(*gid);
                }
            }
        }
        released
    }

    /// Whether a connection holds the link of `group_id`.
    pub fn held(&self, group_id: i64) -> bool {
        self.held
            .lock()
            .map(|h| h.contains_key(&group_id))
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(conn: u64) -> (AgentPort, mpsc::Receiver<Control>) {
        let (outbox, rx) = mpsc::channel(16);
        (
            AgentPort {
                conn,
                outbox,
                waiting: Arc::new(Mutex::new(HashMap::new())),
                slots: Arc::new(Semaphore::new(QUESTIONS_PER_CONNECTION_MAX)),
            },
            rx,
        )
    }

    #[test]
    fn a_link_is_released_only_by_the_connection_that_holds_it() {
        let links = Links::new();
        links.hold(&[1, 2], 10);
        assert!(links.held(1) && links.held(2) && !links.held(3));
        // A newer connection of the same agent takes group 2 over.
        links.hold(&[2], 11);
        // The old connection ends: it releases group 1 only.
        assert_eq!(links.release(&[1, 2], 10), vec![1]);
        assert!(!links.held(1));
        assert!(links.held(2), "held by the newer connection");
        assert_eq!(links.release(&[2], 11), vec![2]);
        assert!(!links.held(2));
        assert!(links.release(&[2], 11).is_empty(), "released once");
    }

    fn question(id: u64) -> Control {
        Control::VerifyRequest {
            id,
            group: "g".into(),
            volume: 0,
            chunk: 3,
        }
    }

    #[tokio::test]
    async fn questions_are_routed_by_id() {
        let ports = AgentPorts::new();
        let short = Duration::from_millis(50);
        assert!(matches!(
            ports.ask(7, question, short).await,
            Asked::NoAgent
        ));
        let (p, mut rx) = port(1);
        ports.register(&[7], &p);
        assert!(ports.connected(7));
        // The agent answers the questions in reverse order; each asker gets its own answer.
        let answerer = {
            let p = p.clone();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for _ in 0..3 {
                    match rx.recv().await {
                        Some(Control::VerifyRequest { id, .. }) => ids.push(id),
                        other => panic!("expected a question, got {other:?}"),
                    }
                }
                for id in ids.into_iter().rev() {
                    assert!(p.answer(
                        id,
                        Control::VerifyReply {
                            id,
                            seq: cdp_shared::types::Seq(id * 10),
                            hash: String::new()
                        }
                    ));
                }
                // An answer nobody waits for is dropped.
                assert!(!p.answer(
                    999,
                    Control::VerifyRefused {
                        id: 999,
                        reason: String::new()
                    }
                ));
                rx
            })
        };
        let asks = (0..3).map(|_| {
            let ports = ports.clone();
            async move { ports.ask(7, question, DEFAULT_TEST_WAIT).await }
        });
        for answer in futures_join(asks).await {
            match answer {
                Asked::Answer(Control::VerifyReply { id, seq, .. }) => assert_eq!(seq.0, id * 10),
                other => panic!("expected a reply, got {other:?}"),
            }
        }
        let _rx = answerer.await.expect("answerer");
        // No answer in time: Timeout, and the question is forgotten.
        assert!(matches!(
            ports.ask(7, question, short).await,
            Asked::Timeout
        ));
        assert!(p.waiting.lock().expect("lock").is_empty());
        // Another connection took the link: unregistering the old one leaves it.
        let (p2, _rx2) = port(2);
        ports.register(&[7], &p2);
        ports.unregister(&[7], 1);
        assert!(ports.connected(7));
        ports.unregister(&[7], 2);
        assert!(!ports.connected(7));
    }

    const DEFAULT_TEST_WAIT: Duration = Duration::from_secs(10);

    async fn futures_join<F: std::future::Future<Output = Asked> + Send + 'static>(
        futs: impl Iterator<Item = F>,
    ) -> Vec<Asked> {
        let handles: Vec<_> = futs.map(tokio::spawn).collect();
        let mut out = Vec::new();
        for h in handles {
            out.push(h.await.expect("ask"));
        }
        out
    }
}
