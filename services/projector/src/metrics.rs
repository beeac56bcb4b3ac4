//! Metric names (constants, never ids as labels) and the recording helpers.

use std::time::Duration;

use crate::projection::ConsumerPlan;
use crate::worker::Outcome;

pub const EVENTS_APPLIED: &str = "cocoon_projector_events_applied_total";
pub const FRAMES_SKIPPED: &str = "cocoon_projector_frames_skipped_total";
pub const FRAMES_DEAD_LETTERED: &str = "cocoon_projector_frames_dead_lettered_total";
pub const BATCH_RETRIES: &str = "cocoon_projector_batch_retries_total";
pub const BATCH_SECONDS: &str = "cocoon_projector_batch_seconds";
pub const BATCH_EVENTS: &str = "cocoon_projector_batch_events";
pub const LAG_FRAMES: &str = "cocoon_projector_lag_frames";
pub const LAG_EVENTS: &str = "cocoon_projector_lag_events";
pub const LAG_SECONDS: &str = "cocoon_projector_lag_seconds";

fn labels(plan: &ConsumerPlan) -> [(&'static str, &'static str); 2] {
    [
        ("projection", plan.projection.name()),
        ("stream", plan.stream.name()),
    ]
}

/// After a committed batch: throughput, batch size and latency, and the lag behind the stream's head
/// (frames still pending for this consumer, events estimated from this batch's frames, and the age of the
/// newest frame applied). `owned_share` is the share of the consumer's pending frames that are the plan's
/// own: below 1 when the consumer reads a stream whole for a plan that owns some of its partitions.
pub fn record_batch(
    plan: &ConsumerPlan,
    outcome: &Outcome,
    elapsed: Duration,
    last: Option<&bus::ReceivedFrame>,
    owned_share: f64,
) {
    let l = labels(plan);
    metrics::histogram!(BATCH_EVENTS, &l).record(outcome.events as f64);
    if let Some(last) = last {
        let frames = outcome.frames.max(1) as f64;
        let pending = (last.pending as f64 * owned_share).round();
        metrics::gauge!(LAG_FRAMES, &l).set(pending);
        metrics::gauge!(LAG_EVENTS, &l).set(pending * outcome.events as f64 / frames);
        let age = (events::Timestamp::now().as_micros() - last.stored_at.as_micros()).max(0);
        metrics::gauge!(LAG_SECONDS, &l).set(if last.pending == 0 {
            0.0
        } else {
            age as f64 / 1e6
        });
    }
    metrics::counter!(EVENTS_APPLIED, &l).increment(outcome.events as u64);
    metrics::counter!(FRAMES_SKIPPED, &l).increment(outcome.skipped as u64);
    metrics::histogram!(BATCH_SECONDS, &l).record(elapsed.as_secs_f64());
}

pub fn record_dead_letter(plan: &ConsumerPlan) {
    metrics::counter!(FRAMES_DEAD_LETTERED, &labels(plan)).increment(1);
}

pub fn record_retry(plan: &ConsumerPlan) {
    metrics::counter!(BATCH_RETRIES, &labels(plan)).increment(1);
}
