//! The catch-up decision (DESIGN 3.3; see the module doc of `link`): from the replica's
//! welcome, resume a group from the spool, or continue after the replica's head and resync.
//!
//! [`decide`] is the decision, sans-IO: it reads a [`GroupView`] (what the agent holds of the
//! group), the welcome and the generation this agent last saw, and returns a [`CatchUp`].
//! [`catch_up`] is its shell: it gathers the view, reads and writes the generation file, logs,
//! queues the resyncs and rebases the group.

use std::sync::Arc;

use anyhow::{Context, Result};
use cdp_shared::Seq;
use cdp_shared::batch::Hash;
use cdp_shared::types::VolumeId;
use cdp_shared::wire;

use super::parse_hash;
use crate::pipeline::Group;

/// What the agent holds of a group when the replica welcomes it: all [`decide`] reads of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct GroupView {
    pub(super) name: String,
    /// The last seq sealed.
    pub(super) head: Seq,
    /// The oldest seq the spool still holds; `head + 1` when it holds none.
    pub(super) first_held: Seq,
    /// The header hash of this agent's batch at the welcome's durable seq, if the spool knows
    /// it (it holds that batch, or it is the newest acknowledged one).
    pub(super) durable_hash: Option<Hash>,
    pub(super) volumes: Vec<VolumeView>,
}

/// A volume of a [`GroupView`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct VolumeView {
    pub(super) id: VolumeId,
    /// Its initial sync is running.
    pub(super) syncing: bool,
    /// An initial sync of it is queued (or running: the queue keeps it until it ends).
    pub(super) initial_sync_queued: bool,
    /// Its initial sync ended in this run, in a batch after the welcome's durable seq: the
    /// spool holds it whole (a replica that lists the volume `new` has not received it yet,
    /// e.g. it was away while the sync ran), and resuming delivers it.
    pub(super) sync_in_spool: bool,
}

/// How a group catches up with the replica, as [`decide`] finds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum CatchUp {
    /// The spool holds every batch after the replica's `durable` seq, on the chain the
    /// replica holds: acknowledge up to `durable` and send from `durable + 1`.
    Resume {
        durable: Seq,
        /// The welcome's generation is not the one this agent saved: save it.
        record_generation: bool,
    },
    /// The spool cannot bring the replica up to date: continue the chain after the replica's
    /// seq and resync (see [`Rebase`]).
    Rebase(Rebase),
}

/// Why the group cannot resume from its spool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum RebaseReason {
    /// The replica's copy of the group is another one than last time (its generation
    /// changed, e.g. after a `forget`): whatever its seq, it is not on this agent's chain.
    NewGeneration { known: String },
    /// The replica has no complete image of these volumes (listed `new`), while this agent
    /// considers them sent (no initial sync of theirs queued or running).
    ImagesLost(Vec<VolumeId>),
    /// The replica is past this agent's head.
    ReplicaAhead,
    /// The replica is past this agent's head on this agent's own chain: it acknowledged
    /// batches the spool had not written yet when the agent stopped (the spool writes only
    /// what the replica has not acknowledged). Their writes are on the device and on the
    /// replica; whatever came after them is in the activity log, whose chunks are dirty since
    /// the start. Nothing is compared.
    ReplicaAheadOnChain,
    /// The spool no longer holds the batch after the replica's seq (it overflowed, was lost
    /// or damaged).
    SpoolGap,
    /// The replica's batch at its seq is not this agent's (another header hash): the chains
    /// forked there. The agent stopped with batches the replica had acknowledged before the
    /// spool wrote them, then sealed new batches under the same seqs before it reconnected
    /// (the replica was away); resuming would send batches the replica refuses for ever.
    Forked,
}

/// A decision to continue the group's chain after the replica's head.
///
/// The shell applies it through [`Group::rebase`], which counts the rebase (`rebases`) before
/// it publishes `after` as acknowledged: a `bookmark --wait` on the abandoned chain sees the
/// count change and answers that the bookmark was lost, instead of reading an acknowledged seq
/// of the new chain, perhaps past its bookmark's, as its bookmark being durable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Rebase {
    /// The replica's durable seq: the new chain continues after it.
    pub(super) after: Seq,
    /// The header hash of batch `after` (zeros when `after` is 0).
    pub(super) hash: Hash,
    pub(super) reason: RebaseReason,
    /// Volumes the replica holds a complete image of: a hash-compare resync each, unless an
    /// initial sync of theirs is queued when the shell applies this.
    pub(super) compare: Vec<VolumeId>,
    /// Volumes the replica has no complete image of (`new`, `syncing`, or a state this agent
    /// does not know): an initial sync each, from the start.
    pub(super) initial_sync: Vec<VolumeId>,
    /// The welcome's generation is not the one this agent saved: save it.
    pub(super) record_generation: bool,
}

impl CatchUp {
    /// The replica's durable seq: acknowledged once the decision is applied.
    pub(super) fn durable(&self) -> Seq {
        match self {
            CatchUp::Resume { durable, .. } => *durable,
            CatchUp::Rebase(r) => r.after,
        }
    }

    /// Whether the welcome's generation must be saved.
    pub(super) fn record_generation(&self) -> bool {
        match self {
            CatchUp::Resume {
                record_generation, ..
            } => *record_generation,
            CatchUp::Rebase(r) => r.record_generation,
        }
    }
}

/// The replica sent a head hash that is not 64 hex digits, and the group has to rebase on it.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("the replica sent no valid head hash for group {group}")]
pub(super) struct BadHeadHash {
    group: String,
}

/// Where a volume stands on the replica, from the welcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OnReplica {
    /// `protecting`: a complete image.
    Protecting,
    /// `new`, or not listed: no image.
    New,
    /// `syncing` (an initial sync began and did not complete) or a state this agent does not
    /// know: no complete image.
    Incomplete,
}

fn on_replica(w: &wire::GroupWelcome, id: VolumeId) -> OnReplica {
    // A replica that lists no volumes (an older one) says nothing about them.
    if w.volumes.is_empty() {
        return OnReplica::Protecting;
    }
    match w.volumes.iter().find(|v| v.id == id).map(|v| v.state) {
        Some(wire::VolumeState::Protecting) => OnReplica::Protecting,
        Some(wire::VolumeState::New) | None => OnReplica::New,
        Some(wire::VolumeState::Syncing) => OnReplica::Incomplete,
    }
}

/// Decides, from the replica's welcome, how a group catches up (see the module doc of
/// `link`), in this order:
/// * the replica's copy of the group is another one than last time (its generation changed):
///   continue after its head; volumes it holds are compared by hash, the others synced again;
/// * the replica has no complete image of a volume this agent considers sent: the same;
/// * the spool holds every batch after the replica's seq (and the replica is not past this
///   agent's head): resume from it;
/// * otherwise continue after the replica's head and compare every volume by hash.
///
/// `known_generation` is the replica generation this agent saved last time, if any. Fails
/// only when the group has to rebase and the welcome's head hash is not valid.
pub(super) fn decide(
    view: &GroupView,
    w: &wire::GroupWelcome,
    known_generation: Option<&str>,
) -> Result<CatchUp, BadHeadHash> {
    let durable = w.durable;
    let record_generation = known_generation != Some(w.generation.as_str());
    let replaced = known_generation.filter(|k| *k != w.generation);
    let lost: Vec<VolumeId> = view
        .volumes
        .iter()
        .filter(|v| {
            on_replica(w, v.id) == OnReplica::New
                && !v.initial_sync_queued
                && !v.syncing
                && !v.sync_in_spool
        })
        .map(|v| v.id)
        .collect();
    let reason = if let Some(known) = replaced {
        RebaseReason::NewGeneration {
            known: known.to_owned(),
        }
    } else if !lost.is_empty() {
        RebaseReason::ImagesLost(lost)
    } else if durable > view.head && w.agent_head_on_chain && view.head.0 > 0 {
        RebaseReason::ReplicaAheadOnChain
    } else if durable > view.head {
        RebaseReason::ReplicaAhead
    } else if durable.next() < view.first_held {
        RebaseReason::SpoolGap
    } else if durable.0 > 0
        && let (Some(ours), Some(theirs)) = (view.durable_hash, parse_hash(&w.head_hash))
        && ours != theirs
    {
        RebaseReason::Forked
    } else {
        return Ok(CatchUp::Resume {
            durable,
            record_generation,
        });
    };
    let hash = if durable.0 == 0 {
        [0u8; 32]
    } else {
        parse_hash(&w.head_hash).ok_or_else(|| BadHeadHash {
            group: view.name.clone(),
        })?
    };
    let (mut compare, initial_sync): (Vec<VolumeId>, Vec<VolumeId>) = view
        .volumes
        .iter()
        .map(|v| v.id)
        .partition(|id| on_replica(w, *id) == OnReplica::Protecting);
    if reason == RebaseReason::ReplicaAheadOnChain {
        compare.clear();
    }
    Ok(CatchUp::Rebase(Rebase {
        after: durable,
        hash,
        reason,
        compare,
        initial_sync,
        record_generation,
    }))
}

fn generation_path(g: &Group) -> std::path::PathBuf {
    g.state_dir().join(format!("{}.generation", g.name))
}

/// What the agent holds of `g` now.
fn view_of(g: &Group, durable: Seq) -> GroupView {
    let head = g.last_sealed();
    let first_held = g.spool.first_held().unwrap_or(head.next());
    let queued = g.pending().initial_sync.clone();
    GroupView {
        name: g.name.clone(),
        head,
        first_held,
        durable_hash: g.spool.hash_of(durable),
        volumes: g
            .volumes
            .iter()
            .map(|v| VolumeView {
                id: v.id,
                syncing: v.syncing.load(std::sync::atomic::Ordering::Relaxed),
                initial_sync_queued: queued.contains(&v.id),
                sync_in_spool: v.synced_at.load(std::sync::atomic::Ordering::Relaxed) > durable.0,
            })
            .collect(),
    }
}

/// The shell of [`decide`]: gathers the view of `g`, decides, and applies the decision (the
/// resyncs, the rebase, the generation file). Returns the replica's durable seq, which the
/// caller acknowledges.
pub(super) fn catch_up(g: &Arc<Group>, w: &wire::GroupWelcome) -> Result<Seq> {
    let view = view_of(g, w.durable);
    let gen_path = generation_path(g);
    let known_generation = std::fs::read_to_string(&gen_path)
        .ok()
        .map(|s| s.trim().to_owned());
    let decision = decide(&view, w, known_generation.as_deref())?;
    if let CatchUp::Rebase(r) = &decision {
        rebase(g, w, &view, r)?;
    }
    if decision.record_generation() {
        crate::fsutil::write_atomic(&gen_path, format!("{}\n", w.generation).as_bytes())
            .with_context(|| format!("write {}", gen_path.display()))?;
    }
    Ok(decision.durable())
}

/// Applies a [`Rebase`]: logs it, queues the resyncs, then rebases the group.
///
/// Two parts stay here rather than in [`decide`], because they must see the state at the
/// moment they are applied, under the maintenance queue's lock, not at the moment the view
/// was taken: a volume to compare is not queued for a compare while an initial sync of it is
/// queued, and a volume synced again whose initial sync is running is told to restart it.
fn rebase(g: &Arc<Group>, w: &wire::GroupWelcome, view: &GroupView, r: &Rebase) -> Result<()> {
    let (durable, first_held, head) = (r.after, view.first_held, view.head);
    match &r.reason {
        RebaseReason::NewGeneration { known } => {
            tracing::warn!(group = %g.name, "the replica's copy of group {} is a new one (generation {} instead of {}): the agent continues after its seq {durable} and resyncs", g.name, w.generation, known);
        }
        RebaseReason::ReplicaAheadOnChain => {
            tracing::info!(
                group = %g.name,
                "the replica is at seq {durable}, past this agent's head {head}, on this agent's chain (batches acknowledged before they were spooled): the agent continues after seq {durable} and resyncs the chunks its activity log names"
            );
        }
        RebaseReason::Forked => {
            tracing::warn!(
                group = %g.name,
                "the replica's batch {durable} is not this agent's: the chains forked there (the agent stopped with batches the replica had acknowledged before its spool wrote them, and sealed others under their seqs before it reconnected); the agent continues after seq {durable} and compares every chunk"
            );
        }
        RebaseReason::ImagesLost(_) | RebaseReason::ReplicaAhead | RebaseReason::SpoolGap => {
            tracing::warn!(
                group = %g.name,
                "the replica is at seq {durable} but this agent's spool holds seqs {first_held}..={head}: the agent continues after seq {durable} and resyncs"
            );
        }
    }
    let mut pending = g.pending();
    for v in &g.volumes {
        if r.compare.contains(&v.id) {
            if !pending.initial_sync.contains(&v.id) {
                pending.compare.insert(v.id);
            }
        } else if r.initial_sync.contains(&v.id) {
            tracing::warn!(group = %g.name, volume = %v.name, "the replica has no complete image of volume {}: it is synced again from the start", v.name);
            pending.compare.remove(&v.id);
            pending.initial_sync.insert(v.id);
            g.await_initial_sync([v.id]);
        }
    }
    // Counted with the queue still locked: a sync or resync running now sees the new count
    // (it is void: its records may be gone with the old chain) and stays queued, and one that
    // ends first is marked done before the queue above takes it again (see
    // `maintenance::done_unless_rebased`).
    g.rebase(durable, r.hash).context("reset the spool")?;
    drop(pending);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cdp_shared::wire::{GroupWelcome, VolumeWelcome};

    const HASH_HEX: &str = "0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20";

    fn hash() -> Hash {
        let mut h = [0u8; 32];
        for (i, b) in h.iter_mut().enumerate() {
            *b = i as u8 + 1;
        }
        h
    }

    /// A group of `volumes` volumes, none syncing or queued for a sync.
    fn view(head: u64, first_held: u64, volumes: u32) -> GroupView {
        GroupView {
            name: "g".into(),
            head: Seq(head),
            first_held: Seq(first_held),
            durable_hash: None,
            volumes: (0..volumes)
                .map(|id| VolumeView {
                    id,
                    syncing: false,
                    initial_sync_queued: false,
                    sync_in_spool: false,
                })
                .collect(),
        }
    }

    fn welcome(durable: u64, generation: &str, states: &[&str]) -> GroupWelcome {
        GroupWelcome {
            name: "g".into(),
            durable: Seq(durable),
            generation: generation.into(),
            head_hash: if durable == 0 {
                String::new()
            } else {
                HASH_HEX.into()
            },
            volumes: states
                .iter()
                .enumerate()
                .map(|(id, s)| VolumeWelcome {
                    id: id as VolumeId,
                    state: match *s {
                        "new" => wire::VolumeState::New,
                        "syncing" => wire::VolumeState::Syncing,
                        "protecting" => wire::VolumeState::Protecting,
                        other => panic!("no volume state {other}"),
                    },
                })
                .collect(),
            agent_head_on_chain: false,
        }
    }

    fn rebase_of(c: CatchUp) -> Rebase {
        match c {
            CatchUp::Rebase(r) => r,
            other => panic!("expected a rebase, got {other:?}"),
        }
    }

    #[test]
    fn resumes_when_the_spool_holds_every_batch_after_the_replicas_seq() {
        let w = welcome(5, "gen-a", &["protecting", "protecting"]);
        let c = decide(&view(10, 4, 2), &w, Some("gen-a")).expect("decide");
        assert_eq!(
            c,
            CatchUp::Resume {
                durable: Seq(5),
                record_generation: false
            }
        );
    }

    #[test]
    fn resumes_at_both_ends_of_the_spool() {
        let w = |d| welcome(d, "gen-a", &["protecting"]);
        // The replica holds the batch just before the oldest one held.
        let c = decide(&view(10, 6, 1), &w(5), Some("gen-a")).expect("decide");
        assert_eq!(c.durable(), Seq(5));
        assert!(matches!(c, CatchUp::Resume { .. }));
        // The replica holds everything, and the spool is empty.
        let c = decide(&view(10, 11, 1), &w(10), Some("gen-a")).expect("decide");
        assert!(matches!(
            c,
            CatchUp::Resume {
                durable: Seq(10),
                ..
            }
        ));
        // A new group: nothing sealed, nothing on the replica.
        let c = decide(&view(0, 1, 1), &w(0), Some("gen-a")).expect("decide");
        assert!(matches!(
            c,
            CatchUp::Resume {
                durable: Seq(0),
                ..
            }
        ));
    }

    #[test]
    fn a_first_welcome_resumes_and_records_the_generation() {
        let w = welcome(5, "gen-a", &["protecting"]);
        let c = decide(&view(10, 4, 1), &w, None).expect("decide");
        assert_eq!(
            c,
            CatchUp::Resume {
                durable: Seq(5),
                record_generation: true
            }
        );
    }

    #[test]
    fn a_spool_that_no_longer_holds_what_follows_durable_rebases_and_compares() {
        let w = welcome(5, "gen-a", &["protecting", "protecting"]);
        let r = rebase_of(decide(&view(10, 7, 2), &w, Some("gen-a")).expect("decide"));
        assert_eq!(
            r,
            Rebase {
                after: Seq(5),
                hash: hash(),
                reason: RebaseReason::SpoolGap,
                compare: vec![0, 1],
                initial_sync: vec![],
                record_generation: false,
            }
        );
    }

    /// The fault a restart while the replica was away produced: the spool holds the batch at
    /// the replica's seq, but another one than the replica's (the chains forked). Resuming
    /// sent batches the replica refused for ever; the agent rebases and compares instead.
    #[test]
    fn a_replica_whose_batch_at_its_seq_is_not_the_agents_rebases_and_compares() {
        let w = welcome(7, "gen-a", &["protecting", "protecting"]);
        let mut v = view(17, 6, 2);
        v.durable_hash = Some(hash());
        match decide(&v, &w, Some("gen-a")).expect("decide") {
            CatchUp::Resume { durable, .. } => assert_eq!(durable, Seq(7)),
            other => panic!("the same batch resumes, got {other:?}"),
        }
        v.durable_hash = Some([9u8; 32]);
        let r = rebase_of(decide(&v, &w, Some("gen-a")).expect("decide"));
        assert_eq!(r.reason, RebaseReason::Forked);
        assert_eq!(r.after, Seq(7));
        assert_eq!(r.hash, hash());
        assert_eq!(r.compare, vec![0, 1]);
        assert!(r.initial_sync.is_empty());
        // Not known (the spool no longer holds it): the replica's nacks are the only judge.
        v.durable_hash = None;
        assert!(matches!(
            decide(&v, &w, Some("gen-a")).expect("decide"),
            CatchUp::Resume { .. }
        ));
    }

    #[test]
    fn a_replica_past_the_agents_head_rebases() {
        let w = welcome(12, "gen-a", &["protecting"]);
        let r = rebase_of(decide(&view(10, 4, 1), &w, Some("gen-a")).expect("decide"));
        assert_eq!(r.reason, RebaseReason::ReplicaAhead);
        assert_eq!(r.after, Seq(12));
        assert_eq!(r.compare, vec![0]);
    }

    #[test]
    fn a_replica_past_the_agents_head_on_its_chain_rebases_without_a_compare() {
        let w = GroupWelcome {
            agent_head_on_chain: true,
            ..welcome(12, "gen-a", &["protecting", "syncing"])
        };
        let r = rebase_of(decide(&view(10, 4, 2), &w, Some("gen-a")).expect("decide"));
        assert_eq!(r.reason, RebaseReason::ReplicaAheadOnChain);
        assert_eq!(r.after, Seq(12));
        assert_eq!(r.compare, Vec::<VolumeId>::new(), "nothing to compare");
        assert_eq!(
            r.initial_sync,
            vec![1],
            "an incomplete image is still synced"
        );
        // An agent with nothing sealed has no head to find on the chain: every chunk is
        // compared.
        let r = rebase_of(decide(&view(0, 1, 2), &w, Some("gen-a")).expect("decide"));
        assert_eq!(r.reason, RebaseReason::ReplicaAhead);
        assert_eq!(r.compare, vec![0]);
        // A new generation wins over the chain.
        let r = rebase_of(decide(&view(10, 4, 2), &w, Some("gen-z")).expect("decide"));
        assert!(matches!(r.reason, RebaseReason::NewGeneration { .. }));
        assert_eq!(r.compare, vec![0]);
    }

    #[test]
    fn a_new_generation_rebases_even_when_the_spool_could_resume() {
        let w = welcome(5, "gen-b", &["protecting", "new"]);
        let r = rebase_of(decide(&view(10, 4, 2), &w, Some("gen-a")).expect("decide"));
        assert_eq!(
            r,
            Rebase {
                after: Seq(5),
                hash: hash(),
                reason: RebaseReason::NewGeneration {
                    known: "gen-a".into()
                },
                compare: vec![0],
                initial_sync: vec![1],
                record_generation: true,
            }
        );
    }

    /// The past fault: a `bookmark --wait` took bookmark 40 on this chain; the replica, a new
    /// copy after a forget, is at seq 100 (or exactly 40) of another chain. A resume would
    /// acknowledge 100 ≥ 40 and the waiter would report its bookmark durable: it must be a
    /// rebase, whose application counts a rebase that ends the wait with an error.
    #[test]
    fn a_bookmark_waiter_is_never_told_durable_on_an_abandoned_chain() {
        for durable in [40, 100] {
            let w = welcome(durable, "gen-b", &["protecting"]);
            let c = decide(&view(40, 31, 1), &w, Some("gen-a")).expect("decide");
            let r = rebase_of(c);
            assert_eq!(r.after, Seq(durable));
            assert!(matches!(r.reason, RebaseReason::NewGeneration { .. }));
        }
        // On the same chain, a replica at the bookmark's seq does make it durable.
        let w = welcome(40, "gen-a", &["protecting"]);
        let c = decide(&view(40, 31, 1), &w, Some("gen-a")).expect("decide");
        assert!(matches!(
            c,
            CatchUp::Resume {
                durable: Seq(40),
                ..
            }
        ));
    }

    #[test]
    fn a_lost_image_rebases_and_syncs_that_volume_again() {
        let w = welcome(5, "gen-a", &["protecting", "new"]);
        let r = rebase_of(decide(&view(10, 4, 2), &w, Some("gen-a")).expect("decide"));
        assert_eq!(
            r,
            Rebase {
                after: Seq(5),
                hash: hash(),
                reason: RebaseReason::ImagesLost(vec![1]),
                compare: vec![0],
                initial_sync: vec![1],
                record_generation: false,
            }
        );
    }

    /// The fault behind a hung CI run: the agent ran initial syncs while its link was still
    /// coming up, so the replica (at seq 0) listed the volumes `new`; the catch-up took the
    /// finished one for lost, rebased, and synced it again. Its sync is in the spool after
    /// the replica's seq: resuming delivers it.
    #[test]
    fn a_new_volume_whose_initial_sync_ended_in_the_spool_after_durable_resumes() {
        let w = welcome(0, "gen-a", &["new", "new"]);
        let mut v = view(4, 1, 2);
        v.volumes[0].sync_in_spool = true;
        v.volumes[1].initial_sync_queued = true;
        match decide(&v, &w, None).expect("decide") {
            CatchUp::Resume { durable, .. } => assert_eq!(durable, Seq(0)),
            other => panic!("expected a resume, got {other:?}"),
        }
        // Without it, the finished volume is lost.
        v.volumes[0].sync_in_spool = false;
        let r = rebase_of(decide(&v, &w, None).expect("decide"));
        assert_eq!(r.reason, RebaseReason::ImagesLost(vec![0]));
        assert_eq!(r.initial_sync, vec![0, 1]);
    }

    #[test]
    fn a_volume_the_replica_does_not_list_is_new() {
        let w = welcome(5, "gen-a", &["protecting"]);
        let r = rebase_of(decide(&view(10, 4, 2), &w, Some("gen-a")).expect("decide"));
        assert_eq!(r.reason, RebaseReason::ImagesLost(vec![1]));
        assert_eq!(r.initial_sync, vec![1]);
    }

    #[test]
    fn a_new_volume_whose_initial_sync_is_queued_or_running_is_not_lost() {
        let w = welcome(5, "gen-a", &["protecting", "new"]);
        let mut v = view(10, 4, 2);
        v.volumes[1].initial_sync_queued = true;
        assert!(matches!(
            decide(&v, &w, Some("gen-a")).expect("decide"),
            CatchUp::Resume {
                durable: Seq(5),
                ..
            }
        ));
        let mut v = view(10, 4, 2);
        v.volumes[1].syncing = true;
        assert!(matches!(
            decide(&v, &w, Some("gen-a")).expect("decide"),
            CatchUp::Resume {
                durable: Seq(5),
                ..
            }
        ));
    }

    #[test]
    fn a_volume_the_replica_is_syncing_resumes_but_is_synced_again_on_a_rebase() {
        let w = welcome(5, "gen-a", &["protecting", "syncing", "syncing"]);
        assert!(matches!(
            decide(&view(10, 4, 3), &w, Some("gen-a")).expect("decide"),
            CatchUp::Resume { .. }
        ));
        let r = rebase_of(decide(&view(10, 7, 3), &w, Some("gen-a")).expect("decide"));
        assert_eq!(r.reason, RebaseReason::SpoolGap);
        assert_eq!(r.compare, vec![0]);
        assert_eq!(r.initial_sync, vec![1, 2]);
    }

    #[test]
    fn a_replica_that_lists_no_volumes_says_nothing_about_them() {
        let w = welcome(5, "gen-a", &[]);
        assert!(matches!(
            decide(&view(10, 4, 2), &w, Some("gen-a")).expect("decide"),
            CatchUp::Resume { .. }
        ));
        let r = rebase_of(decide(&view(10, 7, 2), &w, Some("gen-a")).expect("decide"));
        assert_eq!(r.compare, vec![0, 1]);
        assert!(r.initial_sync.is_empty());
    }

    #[test]
    fn a_rebase_without_a_known_generation_is_not_a_new_generation() {
        let w = welcome(5, "gen-a", &["protecting"]);
        let r = rebase_of(decide(&view(10, 7, 1), &w, None).expect("decide"));
        assert_eq!(r.reason, RebaseReason::SpoolGap);
        assert!(r.record_generation);
    }

    #[test]
    fn the_head_hash_is_read_only_for_a_rebase_after_a_nonzero_seq() {
        let mut w = welcome(5, "gen-a", &["protecting"]);
        w.head_hash = "not hex".into();
        // A resume does not need it.
        assert!(matches!(
            decide(&view(10, 4, 1), &w, Some("gen-a")).expect("decide"),
            CatchUp::Resume { .. }
        ));
        // A rebase does.
        assert_eq!(
            decide(&view(10, 7, 1), &w, Some("gen-a")),
            Err(BadHeadHash { group: "g".into() })
        );
        assert_eq!(
            BadHeadHash { group: "g".into() }.to_string(),
            "the replica sent no valid head hash for group g"
        );
        // After seq 0 the chain starts from zeros, whatever the replica sent.
        let mut w = welcome(0, "gen-b", &["protecting"]);
        w.head_hash = "not hex".into();
        let r = rebase_of(decide(&view(10, 4, 1), &w, Some("gen-a")).expect("decide"));
        assert_eq!(r.after, Seq(0));
        assert_eq!(r.hash, [0u8; 32]);
    }

    /// The shell half of the past fault: after a rebase onto a replica past the bookmark's
    /// seq, whoever sees the new acknowledged seq also sees the rebase counted, so
    /// `bookmark --wait` (which waits while `acked < seq` and the count is unchanged) reports
    /// the bookmark lost, not durable.
    #[tokio::test]
    async fn a_rebase_is_counted_before_its_seq_is_acknowledged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let g = crate::pipeline::test_group(dir.path(), 1 << 20);
        let first = welcome(0, "gen-a", &["protecting"]);
        assert_eq!(catch_up(&g, &first).expect("first catch-up"), Seq(0));
        let crate::pipeline::Cut { seq, rebases, .. } = g.bookmark("b").await.expect("bookmark");
        let mut acked = g.acked.subscribe();
        acked.borrow_and_update();

        let forgotten = welcome(seq.0 + 5, "gen-b", &["protecting"]);
        let durable = catch_up(&g, &forgotten).expect("catch-up");
        assert_eq!(durable, Seq(seq.0 + 5));
        assert!(acked.has_changed().expect("watch"));
        assert!(*acked.borrow_and_update() >= seq);
        assert_ne!(g.rebases(), rebases, "the waiter must see the rebase");
        assert_eq!(g.last_sealed(), durable);
        assert!(g.pending().compare.contains(&0));
        let saved = std::fs::read_to_string(dir.path().join("state/g.generation")).expect("gen");
        assert_eq!(saved.trim(), "gen-b");
    }
}
