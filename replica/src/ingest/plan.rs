//! The sans-IO core of ingest: what one batch means for its group's volumes.

use cdp_shared::types::Seq;
use std::collections::HashMap;

use cdp_shared::batch::{CheckedBatch, RecordKind};
use cdp_shared::types::CHUNK_BYTES;

use super::VolumeEntry;
use crate::catalog::VolumeState;

/// A change a record makes to a syncing volume's target file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetOp {
    /// Write data record `record` (its index in the batch).
    Write { volume: u32, record: usize },
    /// Make the range read as zeros (zero and trim records).
    Zero {
        volume: u32,
        offset: u64,
        length: u32,
    },
}

/// A record row before the batch's place in the journal is known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlannedRow {
    pub volume_id: i64,
    pub chunk: u64,
    pub idx: u32,
    pub chunk_offset: u32,
    pub length: u32,
    pub kind: RecordKind,
    /// Position of the record header within the payload.
    pub payload_pos: usize,
}

/// What committing one batch means.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchPlan {
    /// Append the whole batch to the journal (it changes bytes of a protecting volume).
    pub journal: bool,
    pub target_ops: Vec<TargetOp>,
    pub rows: Vec<PlannedRow>,
    pub state_changes: Vec<StateChange>,
}

/// A volume's state changed by a batch (its sync began, or ended).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateChange {
    /// The volume's id inside its group (the agent's).
    pub volume: u32,
    pub state: VolumeState,
    /// The seq whose batch completed the volume's initial sync, when it did.
    pub sync_done_seq: Option<Seq>,
}

/// The semantic checks of one batch and its plan, against `volumes` as they stand when the
/// batch's turn comes (sans-IO). `Err` is the one-line reason the batch is refused. It reads
/// the records as the batch's check decoded them.
pub fn plan_batch(
    batch: &CheckedBatch,
    group: &str,
    volumes: &HashMap<u32, VolumeEntry>,
) -> std::result::Result<BatchPlan, String> {
    let seq = batch.header().seq;
    let count = batch.record_count();
    let mut states: HashMap<u32, VolumeState> = HashMap::new();
    let mut plan = BatchPlan {
        journal: false,
        target_ops: Vec::new(),
        rows: Vec::new(),
        state_changes: Vec::new(),
    };
    for (i, r) in batch.records().enumerate() {
        let h = r.header;
        let Some(v) = volumes.get(&h.volume) else {
            return Err(format!(
                "record {i} names volume id {}, which is not a volume of group {group}",
                h.volume
            ));
        };
        let state = *states.get(&h.volume).unwrap_or(&v.state);
        match h.kind {
            RecordKind::SyncBegin => {
                if i != 0 {
                    return Err(format!(
                        "record {i} is a SyncBegin, which may only be the first record of a batch"
                    ));
                }
                if state == VolumeState::New {
                    states.insert(h.volume, VolumeState::Syncing);
                    plan.state_changes.push(StateChange {
                        volume: h.volume,
                        state: VolumeState::Syncing,
                        sync_done_seq: None,
                    });
                }
            }
            RecordKind::SyncEnd => {
                if i + 1 != count {
                    return Err(format!(
                        "record {i} is a SyncEnd, which may only be the last record of a batch"
                    ));
                }
                match state {
                    VolumeState::New => {
                        return Err(format!(
                            "record {i} ends a sync of volume {} that never began",
                            v.name
                        ));
                    }
                    VolumeState::Syncing => {
                        states.insert(h.volume, VolumeState::Protecting);
                        plan.state_changes.push(StateChange {
                            volume: h.volume,
                            state: VolumeState::Protecting,
                            sync_done_seq: Some(seq),
                        });
                    }
                    VolumeState::Protecting => {}
                }
            }
            RecordKind::Data | RecordKind::Zero | RecordKind::Trim => {
                let end = h.offset + u64::from(h.length);
                if end > v.size {
                    return Err(format!(
                        "record {i} reaches byte {end} of volume {}, which has {} bytes",
                        v.name, v.size
                    ));
                }
                match state {
                    VolumeState::New => {
                        return Err(format!(
                            "record {i} changes volume {}, whose initial sync has not begun (a SyncBegin must come first)",
                            v.name
                        ));
                    }
                    VolumeState::Syncing => plan.target_ops.push(match h.kind {
                        RecordKind::Data => TargetOp::Write {
                            volume: h.volume,
                            record: i,
                        },
                        _ => TargetOp::Zero {
                            volume: h.volume,
                            offset: h.offset,
                            length: h.length,
                        },
                    }),
                    VolumeState::Protecting => {
                        plan.journal = true;
                        plan.rows.push(PlannedRow {
                            volume_id: v.id,
                            chunk: h.offset / CHUNK_BYTES,
                            idx: i as u32,
                            chunk_offset: (h.offset % CHUNK_BYTES) as u32,
                            length: h.length,
                            kind: h.kind,
                            payload_pos: r.payload_pos,
                        });
                    }
                }
            }
        }
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cdp_shared::Seq;
    use cdp_shared::batch::{BatchFlags, RecordEncoder, SealParams, encode_marker, seal};

    fn volumes(state: VolumeState) -> HashMap<u32, VolumeEntry> {
        [(
            1,
            VolumeEntry {
                id: 10,
                agent_id: 1,
                name: "v".into(),
                size: 4 << 20,
                state,
            },
        )]
        .into_iter()
        .collect()
    }

    fn build(records: impl FnOnce(&mut Vec<u8>) -> u32) -> CheckedBatch {
        let mut payload = Vec::new();
        let n = records(&mut payload);
        let params = SealParams {
            group: "g",
            seq: Seq(5),
            agent_time_ns: 1,
            flags: BatchFlags(0),
            bookmark: None,
            prev_hash: [0; 32],
            record_count: n,
        };
        CheckedBatch::new(seal(&params, &payload).0.into()).expect("a sealed batch checks")
    }

    #[test]
    fn sync_records_go_to_the_target_and_protected_ones_to_the_journal() {
        let mut enc = RecordEncoder::new();
        let batch = build(|p| {
            encode_marker(1, RecordKind::SyncBegin, 0, 0, 0, p);
            enc.encode_data(1, 0, &[1u8; 4096], 0, p);
            encode_marker(1, RecordKind::Zero, 8192, 4096, 0, p);
            encode_marker(1, RecordKind::SyncEnd, 0, 0, 0, p);
            4
        });
        let plan = plan_batch(&batch, "g", &volumes(VolumeState::New)).expect("plan");
        assert!(!plan.journal);
        assert_eq!(plan.target_ops.len(), 2);
        // The write names the data record by its index in the batch.
        assert_eq!(
            plan.target_ops[0],
            TargetOp::Write {
                volume: 1,
                record: 1
            }
        );
        let data = batch.record(1).expect("record 1");
        assert_eq!(
            (data.header.kind, data.header.length),
            (RecordKind::Data, 4096)
        );
        assert_eq!(
            plan.state_changes,
            vec![
                StateChange {
                    volume: 1,
                    state: VolumeState::Syncing,
                    sync_done_seq: None
                },
                StateChange {
                    volume: 1,
                    state: VolumeState::Protecting,
                    sync_done_seq: Some(Seq(5))
                }
            ]
        );

        let plan = plan_batch(&batch, "g", &volumes(VolumeState::Protecting)).expect("plan");
        assert!(plan.journal);
        assert_eq!(plan.rows.len(), 2);
        assert!(plan.state_changes.is_empty());
    }

    #[test]
    fn semantic_errors_are_refused() {
        let mut enc = RecordEncoder::new();
        let data_first = build(|p| {
            enc.encode_data(1, 0, &[1u8; 512], 0, p);
            1
        });
        assert!(
            plan_batch(&data_first, "g", &volumes(VolumeState::New))
                .expect_err("new volume")
                .contains("SyncBegin must come first")
        );
        assert!(plan_batch(&data_first, "g", &volumes(VolumeState::Syncing)).is_ok());

        let late_begin = build(|p| {
            enc.encode_data(1, 0, &[1u8; 512], 0, p);
            encode_marker(1, RecordKind::SyncBegin, 0, 0, 0, p);
            2
        });
        assert!(
            plan_batch(&late_begin, "g", &volumes(VolumeState::Syncing))
                .expect_err("late")
                .contains("first record")
        );

        let early_end = build(|p| {
            encode_marker(1, RecordKind::SyncEnd, 0, 0, 0, p);
            enc.encode_data(1, 0, &[1u8; 512], 0, p);
            2
        });
        assert!(
            plan_batch(&early_end, "g", &volumes(VolumeState::Syncing))
                .expect_err("early")
                .contains("last record")
        );

        let past_end = build(|p| {
            encode_marker(1, RecordKind::Trim, 4 << 20, 512, 0, p);
            1
        });
        assert!(
            plan_batch(&past_end, "g", &volumes(VolumeState::Protecting))
                .expect_err("past end")
                .contains("which has")
        );

        let stranger = build(|p| {
            encode_marker(7, RecordKind::Trim, 0, 512, 0, p);
            1
        });
        assert!(
            plan_batch(&stranger, "g", &volumes(VolumeState::Protecting))
                .expect_err("unknown volume")
                .contains("volume id 7")
        );
    }
}
