//! `cdp-agent run --metrics ADDR` (or `metrics = "ADDR"` in `agent.toml`): `/metrics` in the
//! Prometheus text format (see [`cdp_shared::metrics`]). Each scrape brings the gauges and
//! counters up to date from what `status` shows ([`crate::status::collect`]) and the groups'
//! own counters; a task records each group's RPO lag into a histogram every second.
//!
//! Labels: `group`, and `volume` on what is per volume; `cause` on the cause gauges, which
//! hold 1 for every cause that holds and 0 for the others (a state set, so that a cause that
//! ends reads 0 at once, not its last value).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use cdp_shared::cause::{Cause, Primary};
use cdp_shared::metrics::seconds_of_ms;
use cdp_shared::types::CHUNK_BYTES;
use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use tokio_util::sync::CancellationToken;

use crate::groups::GroupSet;
use crate::link::SharedLink;
use crate::pipeline::Group;

/// How often each group's RPO lag goes into the histogram.
pub const LAG_OBSERVE_INTERVAL: Duration = Duration::from_secs(1);

/// HELP and TYPE of every metric (before the first scrape).
pub fn describe() {
    describe_gauge!(
        "cdp_agent_link_up",
        "1 while the link to the replica is up, else 0."
    );
    describe_gauge!(
        "cdp_agent_link_cause",
        "1 for the named cause of the link being down (README, Causes), 0 for the others."
    );
    describe_gauge!(
        "cdp_agent_volume_cause",
        "1 for every named cause that holds for the volume (README, Causes), 0 for the others."
    );
    describe_gauge!(
        "cdp_agent_rpo_lag_seconds",
        Unit::Seconds,
        "Age of the volume's oldest write not yet durable on the replica (0 when every one is; NaN during the initial sync)."
    );
    describe_histogram!(
        "cdp_agent_rpo_lag_observed_seconds",
        Unit::Seconds,
        "The group's RPO lag, observed every second (not during an initial sync)."
    );
    describe_gauge!(
        "cdp_agent_rpo_target_seconds",
        Unit::Seconds,
        "The group's RPO target (rpo_target in agent.toml)."
    );
    describe_gauge!(
        "cdp_agent_volume_size_bytes",
        Unit::Bytes,
        "Size of the protected volume."
    );
    describe_counter!(
        "cdp_agent_written_bytes_total",
        Unit::Bytes,
        "Bytes the NBD clients wrote to the volume since the agent started."
    );
    describe_gauge!(
        "cdp_agent_dirty_bytes",
        Unit::Bytes,
        "Bytes of the volume's regions (1 MiB each) waiting for a resync."
    );
    describe_gauge!(
        "cdp_agent_sync_done_bytes",
        Unit::Bytes,
        "Bytes the running initial sync or resync of the volume went through (0 when none runs)."
    );
    describe_gauge!(
        "cdp_agent_sync_total_bytes",
        Unit::Bytes,
        "Bytes the running initial sync or resync of the volume goes through (0 when none runs)."
    );
    describe_counter!(
        "cdp_agent_resync_sent_bytes_total",
        Unit::Bytes,
        "Bytes of resync records the volume's resyncs pushed since the agent started."
    );
    describe_gauge!("cdp_agent_sealed_seq", "The group's last sealed batch seq.");
    describe_gauge!(
        "cdp_agent_acked_seq",
        "The group's last batch seq the replica acknowledged as durable."
    );
    describe_counter!(
        "cdp_agent_sealed_batches_total",
        "Batches the group sealed into its spool since the agent started."
    );
    describe_counter!(
        "cdp_agent_sealed_bytes_total",
        Unit::Bytes,
        "Bytes of the batches the group sealed into its spool since the agent started."
    );
    describe_counter!(
        "cdp_agent_sent_batches_total",
        "Batches of the group sent to the replica (resends included) since the agent started."
    );
    describe_counter!(
        "cdp_agent_sent_bytes_total",
        Unit::Bytes,
        "Bytes of the group's batches sent to the replica (resends included) since the agent started."
    );
    describe_counter!(
        "cdp_agent_acked_batches_total",
        "Batches of the group the replica acknowledged since the agent started."
    );
    describe_counter!(
        "cdp_agent_acked_bytes_total",
        Unit::Bytes,
        "Bytes of the group's batches the replica acknowledged since the agent started."
    );
    describe_gauge!(
        "cdp_agent_spool_bytes",
        Unit::Bytes,
        "Bytes of the group's sealed batches not yet acknowledged."
    );
    describe_gauge!(
        "cdp_agent_spool_batches",
        "The group's sealed batches not yet acknowledged."
    );
    describe_gauge!(
        "cdp_agent_spool_cap_bytes",
        Unit::Bytes,
        "The group's spool cap (spool_bytes_max): above it writes are tracked as dirty regions."
    );
    describe_gauge!(
        "cdp_agent_replica_paused",
        "1 while the replica has paused the group's ingest (its disk is full), else 0."
    );
    describe_gauge!(
        "cdp_agent_group_primary",
        "1 for the side that is primary for the group (side=agent|replica: the replica while the group is failed over there, its volumes then served read-only here), else 0."
    );
}

/// Brings every metric up to date from the running agent's state (per scrape).
pub fn refresh(groups: &[Arc<Group>], link: &SharedLink) {
    let st = crate::status::collect(groups, link, &|_| String::new());
    gauge!("cdp_agent_link_up").set(if st.link_connected { 1.0 } else { 0.0 });
    for &c in Cause::ALL.iter().filter(|c| c.state() == "disconnected") {
        let on = st.link_cause == Some(c);
        gauge!("cdp_agent_link_cause", "cause" => c.as_str()).set(f64::from(u8::from(on)));
    }
    for v in &st.volumes {
        let labels = [("group", v.group.clone()), ("volume", v.name.clone())];
        for &c in Cause::ALL {
            let on = v.causes.contains(&c);
            let mut l = labels.to_vec();
            l.push(("cause", c.as_str().to_owned()));
            gauge!("cdp_agent_volume_cause", &l).set(f64::from(u8::from(on)));
        }
        gauge!("cdp_agent_rpo_lag_seconds", &labels)
            .set(v.rpo_lag_ms.map_or(f64::NAN, seconds_of_ms));
        gauge!("cdp_agent_volume_size_bytes", &labels).set(v.size as f64);
        gauge!("cdp_agent_dirty_bytes", &labels)
            .set((v.dirty_regions.unwrap_or(0) * CHUNK_BYTES) as f64);
        counter!("cdp_agent_resync_sent_bytes_total", &labels)
            .absolute(v.resync_bytes_sent.unwrap_or(0));
    }
    for g in groups {
        let labels = [("group", g.name.clone())];
        for vol in &g.volumes {
            let vl = [("group", g.name.clone()), ("volume", vol.name.clone())];
            counter!("cdp_agent_written_bytes_total", &vl)
                .absolute(vol.written_bytes.load(Ordering::Relaxed));
            let (done, total) = sync_bytes(g, vol);
            gauge!("cdp_agent_sync_done_bytes", &vl).set(done as f64);
            gauge!("cdp_agent_sync_total_bytes", &vl).set(total as f64);
        }
        gauge!("cdp_agent_rpo_target_seconds", &labels).set(seconds_of_ms(g.rpo_target_ms()));
        gauge!("cdp_agent_sealed_seq", &labels).set(g.last_sealed().0 as f64);
        gauge!("cdp_agent_acked_seq", &labels).set(g.acked.borrow().0 as f64);
        let t = g.spool.totals();
        counter!("cdp_agent_sealed_batches_total", &labels).absolute(t.appended_batches);
        counter!("cdp_agent_sealed_bytes_total", &labels).absolute(t.appended_bytes);
        counter!("cdp_agent_acked_batches_total", &labels).absolute(t.acked_batches);
        counter!("cdp_agent_acked_bytes_total", &labels).absolute(t.acked_bytes);
        counter!("cdp_agent_sent_batches_total", &labels)
            .absolute(g.sent_batches.load(Ordering::Relaxed));
        counter!("cdp_agent_sent_bytes_total", &labels)
            .absolute(g.sent_bytes.load(Ordering::Relaxed));
        let (batches, bytes) = g.spool.held();
        gauge!("cdp_agent_spool_bytes", &labels).set(bytes as f64);
        gauge!("cdp_agent_spool_batches", &labels).set(batches as f64);
        gauge!("cdp_agent_spool_cap_bytes", &labels).set(g.spool_bytes_max() as f64);
        let paused = st
            .volumes
            .iter()
            .any(|v| v.group == g.name && v.replica_paused.is_some());
        gauge!("cdp_agent_replica_paused", &labels).set(f64::from(u8::from(paused)));
        let primary = g.primary();
        for &side in Primary::ALL {
            let l = [("group", g.name.clone()), ("side", side.label().to_owned())];
            gauge!("cdp_agent_group_primary", &l).set(f64::from(u8::from(primary == side)));
        }
    }
}

/// Bytes done and to do of the volume's running sync or resync; (0, 0) when none runs.
fn sync_bytes(g: &Group, vol: &crate::pipeline::Volume) -> (u64, u64) {
    let syncing = vol.syncing.load(Ordering::Relaxed);
    let gs = g.state();
    let resyncing = gs.dirty_chunks.get(vol.id as usize).is_some_and(|d| *d > 0)
        || g.pending().compare.contains(&vol.id);
    if !(syncing || resyncing) {
        return (0, 0);
    }
    let total = vol.sync_chunks_total.load(Ordering::Relaxed);
    let done = vol.sync_chunks_done.load(Ordering::Relaxed).min(total);
    let bytes = |chunks: u64| (chunks * CHUNK_BYTES).min(vol.size);
    (bytes(done), bytes(total))
}

/// Records every group's RPO lag into the histogram every [`LAG_OBSERVE_INTERVAL`] until
/// `token` is cancelled.
pub async fn observe_lag(groups: Arc<GroupSet>, token: CancellationToken) {
    let mut tick = tokio::time::interval(LAG_OBSERVE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tick.tick() => {}
        }
        for g in groups.snapshot() {
            if let Some(ms) = g.rpo_lag_ms() {
                histogram!("cdp_agent_rpo_lag_observed_seconds", "group" => g.name.clone())
                    .record(seconds_of_ms(ms));
            }
        }
    }
}
