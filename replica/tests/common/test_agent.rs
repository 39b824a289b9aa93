//! The agent side of the tests that SIGKILL a real `cdp-replica serve` at random moments
//! (crash, trimmer_crash): it keeps every batch not yet acknowledged, reconnects to each new
//! `serve` on the same port, announces what it still holds and streams again.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::ops::{Range, RangeInclusive};
use std::path::Path;
use std::time::Duration;

use cdp_shared::identity::{Fingerprint, Identity};
use cdp_shared::wire::{Control, GroupHello};
use rand::Rng;
use rand::rngs::StdRng;

use super::serve::Serve;
use super::{AgentSim, QuicAgent};

/// Where the first `serve` of a run listens (then the port it got, for every restart).
pub const FIRST_LISTEN: &str = "127.0.0.1:0";

/// The agent of a crash test; `extra` is what a test keeps besides (its own model…).
pub struct TestAgent<X = ()> {
    pub identity: Identity,
    pub sim: AgentSim,
    /// The last seq the agent saw acknowledged.
    pub acked: u64,
    /// The seq of the batch that completed the initial sync.
    pub synced: u64,
    pub rng: StdRng,
    pub extra: X,
}

/// A `serve` just started, and the agent connected to it.
pub struct Restarted {
    pub serve: Serve,
    pub q: QuicAgent,
    /// What the agent had seen acknowledged before this start.
    pub acked_before: u64,
    /// The group's durable seq, from the Welcome.
    pub durable: u64,
}

impl<X> TestAgent<X> {
    /// The hello of a restarted agent: it holds every batch after the last acknowledged one.
    pub fn hello(&self) -> GroupHello {
        GroupHello {
            first_held: cdp_shared::types::Seq(self.acked + 1),
            ..self.sim.hello()
        }
    }

    /// Takes `durable` as acknowledged, dropping the batches it covers.
    pub fn saw_ack(&mut self, durable: u64) {
        if durable > self.acked {
            self.acked = durable;
            self.sim.batches.retain(|&s, _| s > durable);
        }
    }

    /// Connects and says hello; returns the agent connection and the group's durable seq.
    pub async fn connect(&self, replica: Fingerprint, addr: SocketAddr) -> (QuicAgent, u64) {
        let mut q = QuicAgent::connect(&self.identity, replica, addr)
            .await
            .expect("connect");
        match q.hello(vec![self.hello()]).await.expect("welcome") {
            Control::Welcome { groups, .. } => (q, groups[0].durable.0),
            other => panic!("expected Welcome, got {other:?}"),
        }
    }

    /// Streams batches: first again every one not acknowledged, then new ones (made by
    /// `new_batch`), at most `window` unacknowledged; never returns (it is cut short by the
    /// kill). Cancellation-safe: an ack read but not yet counted is just an ack the agent did
    /// not see.
    pub async fn stream(&mut self, q: &mut QuicAgent, window: u64, new_batch: fn(&mut Self)) {
        let mut next = self.acked + 1;
        loop {
            while next <= self.acked + window {
                if next > self.sim.seq {
                    new_batch(self);
                }
                let bytes = self.sim.batches[&next].clone();
                q.send_batch(&bytes).await.expect("send a batch");
                next += 1;
                // Let the kill timer in; sends rarely block on loopback.
                tokio::task::yield_now().await;
            }
            match q.next_control().await.expect("control message") {
                Control::Ack { durable, .. } => self.saw_ack(durable.0),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    /// One time in `one_in` (drawn first; never before the first start, which picks the
    /// port): a `serve` SIGKILLed while it starts (recovering its journal), after a random
    /// delay of `delay_ms`. Returns whether it did.
    pub async fn maybe_kill_while_starting(
        &mut self,
        root: &Path,
        listen: &str,
        log: &Path,
        env: &[(&str, String)],
        one_in: u32,
        delay_ms: Range<u64>,
    ) -> bool {
        if !(self.rng.random_ratio(1, one_in) && listen != FIRST_LISTEN) {
            return false;
        }
        let serve = Serve::spawn(root, listen, log, env);
        let delay = self.rng.random_range(delay_ms);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        serve.kill();
        true
    }

    /// Starts `serve` on `listen` (set to its address once it listens), connects and says
    /// hello.
    pub async fn restart(
        &self,
        root: &Path,
        listen: &mut String,
        log: &Path,
        env: &[(&str, String)],
        replica: Fingerprint,
    ) -> Restarted {
        let mut serve = Serve::spawn(root, listen, log, env);
        let addr = serve.wait_listening();
        *listen = addr.to_string();
        let acked_before = self.acked;
        let (q, durable) = self.connect(replica, addr).await;
        Restarted {
            serve,
            q,
            acked_before,
            durable,
        }
    }

    /// The first checks after a restart: every batch acknowledged before the kill is durable,
    /// and nothing durable was never sent; the durable seq counts as acknowledged.
    pub fn check_durable(&mut self, acked_before: u64, durable: u64) {
        assert!(
            durable >= acked_before,
            "batch {acked_before} was acknowledged before the kill, but the replica is durable only up to {durable}"
        );
        assert!(durable <= self.sim.seq, "durable {durable} was never sent");
        self.saw_ack(durable);
    }

    /// Streams for a random while of `stream_ms`, then SIGKILLs `serve` mid-ingest.
    pub async fn stream_then_kill(
        &mut self,
        serve: Serve,
        mut q: QuicAgent,
        window: u64,
        stream_ms: RangeInclusive<u64>,
        new_batch: fn(&mut Self),
    ) {
        let stream_ms = self.rng.random_range(stream_ms);
        tokio::select! {
            _ = self.stream(&mut q, window, new_batch) => unreachable!("stream never returns"),
            _ = tokio::time::sleep(Duration::from_millis(stream_ms)) => {}
        }
        serve.kill();
        drop(q);
    }

    /// The end of a run: at least one new batch (the replica may have made every batch sent
    /// so far durable before the last kill, the ack unread, and then nothing would be sent and
    /// no ack come), and every batch not acknowledged sent. Returns the last seq.
    pub async fn send_the_rest(&mut self, q: &QuicAgent, new_batch: fn(&mut Self)) -> u64 {
        new_batch(self);
        let last = self.sim.seq;
        for seq in self.acked + 1..=last {
            q.send_batch(&self.sim.batches[&seq])
                .await
                .expect("send a batch");
        }
        last
    }
}
