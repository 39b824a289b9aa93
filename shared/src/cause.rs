//! Named causes: the closed set of machine-readable reasons that `status` (both binaries, text
//! and `--json`) gives next to every state, `state/why` (`resyncing/overflow`), plus two
//! conditions that hold beside any state (`rpo-breach`, `history-short`). The README's cause
//! table lists each with what to do; a test keeps the two in step.
//!
//! A volume's `cause` is the one that decides its `state` (the part before the `/`); its
//! `causes` are every cause that holds, that one first, so that an alert can match a cause
//! whatever else is going on (a volume can be `resyncing/overflow` while its link is down and
//! its RPO target is exceeded).

use serde::{Deserialize, Deserializer, Serialize, Serializer};

macro_rules! causes {
    ($($variant:ident => $name:literal, $meaning:literal;)*) => {
        /// One named cause (see the module documentation).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Cause {
            $(#[doc = $meaning] $variant,)*
        }

        impl Cause {
            /// Every cause, in the README's order.
            pub const ALL: &'static [Cause] = &[$(Cause::$variant,)*];

            /// Its name, as `status --json` writes it.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Cause::$variant => $name,)*
                }
            }

            /// What it means, one sentence.
            pub fn meaning(self) -> &'static str {
                match self {
                    $(Cause::$variant => $meaning,)*
                }
            }
        }
    };
}

causes! {
    Protecting => "protecting/ok",
        "Every write is recorded and shipped; the RPO lag is that of the batches in flight.";
    SyncingInitial => "syncing/initial",
        "The volume's initial sync copies it to the replica; it is not protected until it ends.";
    ResyncingAfterCrash => "resyncing/after-crash",
        "The agent stopped uncleanly (or lost spooled batches, or its dirty map): the regions it may not have shipped are being resent.";
    ResyncingAfterRestart => "resyncing/after-restart",
        "The agent was stopped with regions still to resend (e.g. after an overflow); it resends them now.";
    ResyncingOverflow => "resyncing/overflow",
        "The spool overflowed; the regions written meanwhile are being resent.";
    ResyncingHashCompare => "resyncing/hash-compare",
        "Agent and replica histories diverged (spool lost or replica restored); chunks are compared by hash and the differing ones resent.";
    ResyncingWriteError => "resyncing/write-error",
        "A write to the protected device failed part way; its regions are being resent.";
    ResyncingRepair => "resyncing/repair",
        "`cdp-replica verify repair` asked for chunks the verifier found different; they are being resent.";
    OverflowSpoolFull => "overflow/spool-full",
        "The spool reached its cap (the replica is slow or unreachable): writes are tracked as dirty regions, there is no consistent point until the resync after it ends.";
    DisconnectedLinkDown => "disconnected/link-down",
        "The link to the replica is down (network, or the other side stopped); the agent spools and reconnects by itself.";
    DisconnectedUnauthorized => "disconnected/unauthorized",
        "The replica does not accept this agent's certificate (never authorized, or deauthorized).";
    DisconnectedFencedByFailover => "disconnected/fenced-by-failover",
        "The volume is failed over on the replica; the replica refuses its agent until the failover is undone.";
    DisconnectedReplicaMismatch => "disconnected/replica-mismatch",
        "The replica's certificate is not the one this agent is pinned to.";
    DisconnectedRefused => "disconnected/refused",
        "The replica refused the agent for another reason (protocol version, a forgotten group, a volume of another size); status names it.";
    DisconnectedNotServing => "disconnected/not-serving",
        "`cdp-replica serve` is not running on this data directory.";
    StoppedNotRunning => "stopped/not-running",
        "`cdp-agent run` is not running on this data directory.";
    StoppedSyncIncomplete => "stopped/sync-incomplete",
        "`cdp-agent run` is not running and the volume's initial sync has not completed.";
    PausedReplicaDiskFull => "paused/replica-disk-full",
        "The replica cannot commit the group's batches (its disk is full); it retries, and the agent spools meanwhile.";
    DegradedVerifyMismatch => "degraded/verify-mismatch",
        "The verifier found chunks of the replica that differ from the agent's device at the same point.";
    FailedOverActive => "failed-over/active",
        "The volume is failed over on the replica (served from a point of its window).";
    FailedOverCommitting => "failed-over/committing",
        "A failover commit is writing the failover image into the target.";
    FailedOverCommitted => "failed-over/committed",
        "The failover was committed: the target holds the failover image.";
    RpoBreach => "rpo-breach",
        "The RPO lag exceeds the group's `rpo_target` (agent.toml, default 30s).";
    HistoryShort => "history-short",
        "The window holds less history than the group's retention (the journal cap trimmed it).";
}

impl Cause {
    /// The state it decides: the part of its name before the `/` (the whole name for the two
    /// conditions).
    pub fn state(self) -> &'static str {
        let name = self.as_str();
        name.split_once('/').map_or(name, |(state, _)| state)
    }

    /// The cause named `name`, if it is one.
    pub fn parse(name: &str) -> Option<Cause> {
        Cause::ALL.iter().copied().find(|c| c.as_str() == name)
    }
}

/// `stopped/not-running`: what is said of something that does not run.
impl Default for Cause {
    fn default() -> Cause {
        Cause::StoppedNotRunning
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Cause {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Cause {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Cause, D::Error> {
        let name = String::deserialize(d)?;
        Cause::parse(&name)
            .ok_or_else(|| serde::de::Error::custom(format!("{name:?} is not a named cause")))
    }
}

/// Which side is primary for a group: whose copy takes the group's writes (issue 14). Said
/// by `status` on both sides (text and JSON) and by the metrics; an agent serves a group
/// read-only while the replica is primary for it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Primary {
    /// The agent's devices (protection runs agent → replica).
    #[default]
    #[serde(rename = "agent")]
    Agent,
    /// The replica: the group is failed over there (active, committing or committed).
    #[serde(rename = "replica (failed over)")]
    Replica,
}

impl Primary {
    /// Every side, in the metrics' order.
    pub const ALL: &'static [Primary] = &[Primary::Agent, Primary::Replica];

    /// As `status` writes it: `agent`, `replica (failed over)`.
    pub fn as_str(self) -> &'static str {
        match self {
            Primary::Agent => "agent",
            Primary::Replica => "replica (failed over)",
        }
    }

    /// The metrics' label value: `agent`, `replica`.
    pub fn label(self) -> &'static str {
        match self {
            Primary::Agent => "agent",
            Primary::Replica => "replica",
        }
    }
}

impl std::fmt::Display for Primary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The causes that hold, the deciding one first and no cause twice.
pub fn ordered(first: Cause, rest: impl IntoIterator<Item = Cause>) -> Vec<Cause> {
    let mut out = vec![first];
    for c in rest {
        if !out.contains(&c) {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_primary_side_reads_and_round_trips_as_status_writes_it() {
        for &p in Primary::ALL {
            let json = serde_json::to_string(&p).expect("serialize");
            assert_eq!(json, format!("\"{p}\""));
            assert_eq!(serde_json::from_str::<Primary>(&json).expect("parse"), p);
        }
        assert_eq!(Primary::Replica.to_string(), "replica (failed over)");
        assert_eq!(Primary::Replica.label(), "replica");
        assert!(serde_json::from_str::<Primary>("\"nobody\"").is_err());
    }

    #[test]
    fn names_are_unique_round_trip_and_their_state_is_the_prefix() {
        let mut names: Vec<_> = Cause::ALL.iter().map(|c| c.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Cause::ALL.len(), "a name is used twice");
        for &c in Cause::ALL {
            let json = serde_json::to_string(&c).expect("serialize");
            assert_eq!(json, format!("\"{}\"", c.as_str()));
            assert_eq!(serde_json::from_str::<Cause>(&json).expect("parse"), c);
            assert!(c.as_str().starts_with(c.state()));
            assert!(!c.meaning().is_empty());
        }
        assert_eq!(Cause::ResyncingOverflow.state(), "resyncing");
        assert_eq!(Cause::RpoBreach.state(), "rpo-breach");
        assert!(serde_json::from_str::<Cause>("\"resyncing/whatever\"").is_err());
    }

    #[test]
    fn ordered_keeps_the_deciding_cause_first_and_drops_repeats() {
        let v = ordered(
            Cause::ResyncingOverflow,
            [
                Cause::DisconnectedLinkDown,
                Cause::ResyncingOverflow,
                Cause::RpoBreach,
            ],
        );
        assert_eq!(
            v,
            [
                Cause::ResyncingOverflow,
                Cause::DisconnectedLinkDown,
                Cause::RpoBreach
            ]
        );
    }

    /// The README's cause table lists every cause, so an operator can look any of them up.
    #[test]
    fn the_readme_lists_every_cause() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
            .expect("read README.md");
        for &c in Cause::ALL {
            assert!(
                readme.contains(&format!("| `{}` |", c.as_str())),
                "README.md's cause table has no row for `{c}`"
            );
        }
    }
}
