//! The control protocol between agent and replica, without I/O.
//!
//! One QUIC connection per agent. The agent opens one bidirectional *control stream* and sends
//! [`Control::Hello`]; the replica answers [`Control::Welcome`] (or [`Control::Refused`]) and
//! from then on sends [`Control::Ack`] / [`Control::Nack`] on it. Each batch travels alone on its
//! own unidirectional stream as the exact bytes of the batch format ([`crate::batch`]).
//!
//! A control frame is `length u32 LE | JSON body`, the length bounded by
//! [`CONTROL_FRAME_BYTES_MAX`]. [`FrameDecoder`] is the sans-IO reader.

use serde::{Deserialize, Serialize};

use crate::cause::Cause;
use crate::types::{Seq, VolumeId};

/// Version of this control protocol; a peer with another version is refused, with a sentence
/// naming both versions (a `Hello` and a `Refused` decode the same in every version).
///
/// 2: seqs are [`Seq`], a volume's state in a Welcome is a [`VolumeState`] (unknown states are
/// malformed frames), and a Nack that names no batch has `group: null` instead of `""`.
/// 3: the agent sends [`Control::Head`] every [`HEAD_INTERVAL`].
/// 4: fences are per group: a Welcome lists the groups it refuses ([`GroupRefused`]), a
/// connection is told when one of its groups is fenced ([`Control::Fenced`]) or may replicate
/// again ([`Control::Rejoin`], answered by [`Control::Join`] and [`Control::Joined`]), instead
/// of the whole connection being refused or closed.
pub const PROTOCOL_VERSION: u32 = 4;
/// The application close code of a connection the replica closed because its agent was
/// deauthorized.
pub const CLOSE_DEAUTHORIZED: u32 = 3;
// Close code 2 closed a connection one of whose groups was failed over, before protocol 4
// made fences per group ([`Control::Fenced`]); it is not reused.
/// The close code of a connection closed because one of its groups was forgotten.
pub const CLOSE_FORGOTTEN: u32 = 4;
/// Largest control frame body.
pub const CONTROL_FRAME_BYTES_MAX: usize = 1 << 20;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub id: VolumeId,
    pub name: String,
    pub size: u64,
}

/// What the agent says about one consistency group when it connects.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupHello {
    pub name: String,
    pub volumes: Vec<VolumeInfo>,
    /// The last seq the agent has sealed (0 when none).
    pub head: Seq,
    /// The oldest seq the agent can still send (it holds every batch in `[first_held, head]`);
    /// `head + 1` when it holds none.
    pub first_held: Seq,
    /// Header hash (64 hex digits) of batch `head`; empty when `head` is 0 (or from an agent
    /// that does not send it). Lets the replica tell whether its chain runs through the
    /// agent's head ([`GroupWelcome::agent_head_on_chain`]).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub head_hash: String,
}

/// What the replica says about one group in return.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupWelcome {
    pub name: String,
    /// The last seq durable on the replica (0 when none). The agent resumes after it.
    pub durable: Seq,
    /// Changes whenever the replica's copy of the group starts over (new, or restored).
    pub generation: String,
    /// Header hash (64 hex digits) of batch `durable`; empty when `durable` is 0. An agent
    /// that cannot resume from its spool continues its chain from here (and resyncs).
    #[serde(default)]
    pub head_hash: String,
    /// Where each volume of the group stands on the replica.
    #[serde(default)]
    pub volumes: Vec<VolumeWelcome>,
    /// The replica is past the agent's head and holds batch `head` of the Hello with the
    /// Hello's `head_hash`: the batches the agent lacks are its own, acknowledged before it
    /// had spooled them (an agent killed then). The agent continues after `durable` and
    /// resyncs only what its activity log names, instead of comparing every chunk.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub agent_head_on_chain: bool,
}

/// A group of the Hello (or of a [`Control::Join`]) that the replica does not take on this
/// connection, with why; the agent's other groups are welcomed as usual.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRefused {
    pub name: String,
    /// One sentence for the operator.
    pub reason: String,
    /// The named cause (e.g. `disconnected/fenced-by-failover`).
    pub cause: Cause,
}

/// A volume's state on the replica, in [`GroupWelcome`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeWelcome {
    pub id: VolumeId,
    pub state: VolumeState,
}

/// Where a volume stands on the replica (JSON: `"new"`, `"syncing"`, `"protecting"`); the
/// replica's catalog stores the same names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VolumeState {
    /// Announced by the agent; no image yet: the agent must run an initial sync.
    New,
    /// An initial sync began and did not complete (records go straight to the target file,
    /// nothing is journaled): the agent starts it again.
    Syncing,
    /// The replica holds the volume's image and its history: records are journaled, and the
    /// window starts at the seq that completed the sync.
    Protecting,
}

impl VolumeState {
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeState::New => "new",
            VolumeState::Syncing => "syncing",
            VolumeState::Protecting => "protecting",
        }
    }
}

impl std::fmt::Display for VolumeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Most chunk hashes asked for or answered in one message.
pub const HASHES_PER_MESSAGE_MAX: u32 = 1024;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Control {
    Hello {
        protocol: u32,
        groups: Vec<GroupHello>,
    },
    Welcome {
        protocol: u32,
        groups: Vec<GroupWelcome>,
        /// Groups of the Hello refused on this connection (e.g. failed over), each with why.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        refused: Vec<GroupRefused>,
    },
    /// Replica to agent: this group of the connection is refused from now on (it was failed
    /// over); its batches are not taken. The agent stops sending them and keeps spooling.
    Fenced(GroupRefused),
    /// Replica to agent: a refused group of the connection may replicate again (its failover
    /// was undone); the agent answers with [`Control::Join`].
    Rejoin { group: String },
    /// Agent to replica: the group's Hello again, to be admitted on this connection.
    Join { group: GroupHello },
    /// Replica to agent: the answer to a Join (the group's Welcome); a Join refused again is
    /// answered with [`Control::Fenced`].
    Joined { group: GroupWelcome },
    /// The replica will not serve this agent; `reason` is one sentence for the operator, and
    /// `cause` names the refusal when it is one the agent reports apart (a fence); absent from
    /// replicas before it, so a `Refused` still decodes the same in every version.
    Refused {
        reason: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cause: Option<Cause>,
    },
    /// Every batch of `group` up to and including `durable` is durable on the replica.
    Ack { group: String, durable: Seq },
    /// The batch `seq` of `group` was refused (it failed its checks); the agent sends it again.
    /// `group` is `None` (and `seq` 0) when the batch could not be told (its stream was too
    /// long, or its header unreadable).
    Nack {
        group: Option<String>,
        seq: Seq,
        reason: String,
    },
    /// Agent → replica: the blake3 hashes of chunks `first_chunk..first_chunk + count` of a
    /// volume in the replica's latest image (for a hash-compare resync). `count` is at most
    /// [`HASHES_PER_MESSAGE_MAX`].
    HashRequest {
        group: String,
        volume: VolumeId,
        first_chunk: u64,
        count: u32,
    },
    /// Replica → agent: the answer, for the image at `seq` (the group's durable head when the
    /// hashes were taken). Each hash is 64 hex digits; the last chunk of a volume is hashed
    /// over its actual length.
    HashReply {
        group: String,
        volume: VolumeId,
        seq: Seq,
        first_chunk: u64,
        hashes: Vec<String>,
    },
    /// Replica → agent: the hash request could not be answered.
    HashError {
        group: String,
        volume: VolumeId,
        reason: String,
    },
    /// Replica → agent: ingest of `group` is paused (e.g. its disk is full): batches are not
    /// acknowledged until it resumes by itself. `reason` is for the operator.
    Paused { group: String, reason: String },
    /// Replica → agent: ingest of `group` resumed.
    Resumed { group: String },
    /// Agent → replica, every [`HEAD_INTERVAL`]: the group's last sealed seq and its RPO lag
    /// as the agent sees it (age of its oldest write not yet acknowledged; 0 when every batch
    /// is; `None` while a volume of the group is in its initial sync), so that the replica's
    /// status shows the lag too.
    Head {
        group: String,
        seq: Seq,
        lag_ms: Option<u64>,
        /// The group's RPO target (`rpo_target` in `agent.toml`), so that the replica names
        /// an `rpo-breach` against the same target.
        #[serde(default)]
        rpo_target_ms: Option<u64>,
    },
    /// Replica → agent (the verifier): the blake3 of chunk `chunk` of a volume as the device
    /// holds it at a batch boundary. `id` pairs the answer with the question.
    VerifyRequest {
        id: u64,
        group: String,
        volume: VolumeId,
        chunk: u64,
    },
    /// Agent → replica: the chunk's hash (64 hex digits; the last chunk of a volume over its
    /// actual length) and the seq `seq` of the batch boundary it was read at: the replica's
    /// image at `seq` must hold the same bytes in that chunk.
    VerifyReply { id: u64, seq: Seq, hash: String },
    /// Agent → replica: the chunk cannot be verified now (it is being synced or resynced, or
    /// the group's writes are not all in the log); `reason` says which.
    VerifyRefused { id: u64, reason: String },
    /// Replica → agent (verifier repair): send chunks `chunks` of a volume again, as the
    /// device holds them, through the ordered log (at most [`REPAIR_CHUNKS_PER_MESSAGE_MAX`]).
    RepairRequest {
        id: u64,
        group: String,
        volume: VolumeId,
        chunks: Vec<u64>,
    },
    /// Agent → replica: the chunks are marked for resync (durably, in the dirty map); their
    /// bytes arrive in batches after `seq`, and the batch that completes the resync is a
    /// consistent point.
    RepairStarted { id: u64, seq: Seq },
    /// Agent → replica: the repair cannot start; `reason` says why.
    RepairRefused { id: u64, reason: String },
}

/// How often the agent sends [`Control::Head`] for each group.
pub const HEAD_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Chunks one [`Control::RepairRequest`] may name.
pub const REPAIR_CHUNKS_PER_MESSAGE_MAX: usize = 4096;

impl Control {
    pub fn ack(group: &str, durable: Seq) -> Control {
        Control::Ack {
            group: group.to_owned(),
            durable,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("control frame of {0} bytes is longer than the limit of {CONTROL_FRAME_BYTES_MAX}")]
    TooLong(usize),
    #[error("control frame is malformed: {0}")]
    Malformed(String),
}

/// Encodes one control frame.
pub fn encode(msg: &Control) -> Vec<u8> {
    // Serializing these plain types to JSON cannot fail.
    let body =
        serde_json::to_vec(msg).unwrap_or_else(|e| panic!("control message serializes: {e}"));
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// Accumulates bytes from the control stream and yields complete frames.
#[derive(Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    pub fn new() -> FrameDecoder {
        FrameDecoder::default()
    }

    pub fn handle_bytes(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame, if one has arrived.
    pub fn poll_frame(&mut self) -> Result<Option<Control>, WireError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > CONTROL_FRAME_BYTES_MAX {
            return Err(WireError::TooLong(len));
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let msg = serde_json::from_slice(&self.buf[4..4 + len])
            .map_err(|e| WireError::Malformed(e.to_string()));
        self.buf.drain(..4 + len);
        msg.map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_in_pieces() {
        let msgs = vec![
            Control::Hello {
                protocol: PROTOCOL_VERSION,
                groups: vec![GroupHello {
                    name: "g".into(),
                    volumes: vec![VolumeInfo {
                        id: 0,
                        name: "v".into(),
                        size: 1 << 30,
                    }],
                    head: Seq(5),
                    first_held: Seq(3),
                    head_hash: String::new(),
                }],
            },
            Control::ack("g", Seq(5)),
            Control::Head {
                group: "g".into(),
                seq: Seq(5),
                lag_ms: None,
                rpo_target_ms: Some(30_000),
            },
            Control::Nack {
                group: Some("g".into()),
                seq: Seq(6),
                reason: "payload checksum".into(),
            },
        ];
        let bytes: Vec<u8> = msgs.iter().flat_map(encode).collect();
        let mut d = FrameDecoder::new();
        let mut got = Vec::new();
        for piece in bytes.chunks(7) {
            d.handle_bytes(piece);
            while let Some(m) = d.poll_frame().expect("frame") {
                got.push(m);
            }
        }
        assert_eq!(got, msgs);
    }

    fn json(msg: &Control) -> String {
        String::from_utf8(encode(msg)[4..].to_vec()).expect("utf-8")
    }

    #[test]
    fn what_every_version_reads_keeps_its_shape() {
        // A Hello (with its seqs as bare numbers) and a Refused read the same in versions 1
        // and 2, so that a peer of the other version is refused with a sentence it can read.
        let hello = Control::Hello {
            protocol: 1,
            groups: vec![GroupHello {
                name: "g".into(),
                volumes: vec![],
                head: Seq(5),
                first_held: Seq(3),
                head_hash: String::new(),
            }],
        };
        assert_eq!(
            json(&hello),
            r#"{"type":"hello","protocol":1,"groups":[{"name":"g","volumes":[],"head":5,"first_held":3}]}"#
        );
        let v1_refused = br#"{"type":"refused","reason":"this replica speaks control protocol version 2, not 1"}"#;
        let mut d = FrameDecoder::new();
        d.handle_bytes(&(v1_refused.len() as u32).to_le_bytes());
        d.handle_bytes(v1_refused);
        assert!(matches!(d.poll_frame(), Ok(Some(Control::Refused { .. }))));
        assert_eq!(
            json(&Control::ack("g", Seq(7))),
            r#"{"type":"ack","group":"g","durable":7}"#
        );
    }

    #[test]
    fn a_nack_that_names_no_batch_says_so_and_states_are_typed() {
        let nack = Control::Nack {
            group: None,
            seq: Seq::ZERO,
            reason: "unreadable batch header".into(),
        };
        assert_eq!(
            json(&nack),
            r#"{"type":"nack","group":null,"seq":0,"reason":"unreadable batch header"}"#
        );
        let welcome = |state: &str| {
            format!(
                r#"{{"type":"welcome","protocol":2,"groups":[{{"name":"g","durable":0,"generation":"x","volumes":[{{"id":0,"state":"{state}"}}]}}]}}"#
            )
        };
        for (text, state) in [
            ("new", VolumeState::New),
            ("syncing", VolumeState::Syncing),
            ("protecting", VolumeState::Protecting),
        ] {
            let body = welcome(text);
            let mut d = FrameDecoder::new();
            d.handle_bytes(&(body.len() as u32).to_le_bytes());
            d.handle_bytes(body.as_bytes());
            match d.poll_frame() {
                Ok(Some(Control::Welcome { groups, .. })) => {
                    assert_eq!(groups[0].volumes[0].state, state);
                    assert_eq!(state.as_str(), text);
                }
                other => panic!("expected a Welcome, got {other:?}"),
            }
        }
        // A state this version does not know is a malformed frame, not a guess.
        let body = welcome("restoring");
        let mut d = FrameDecoder::new();
        d.handle_bytes(&(body.len() as u32).to_le_bytes());
        d.handle_bytes(body.as_bytes());
        assert!(matches!(d.poll_frame(), Err(WireError::Malformed(_))));
    }

    #[test]
    fn oversized_and_garbage_frames_are_errors() {
        let mut d = FrameDecoder::new();
        d.handle_bytes(&u32::MAX.to_le_bytes());
        assert!(matches!(d.poll_frame(), Err(WireError::TooLong(_))));
        let mut d = FrameDecoder::new();
        d.handle_bytes(&3u32.to_le_bytes());
        d.handle_bytes(b"{x}");
        assert!(matches!(d.poll_frame(), Err(WireError::Malformed(_))));
    }
}
