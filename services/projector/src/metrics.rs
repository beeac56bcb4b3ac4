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
/// newest frame applied).
pub fn record_batch(
    plan: &ConsumerPlan,
    outcome: &Outcome,
    elapsed: Duration,
    last: Option<&bus::ReceivedFrame>,
) {
    let l = labels(plan);
    metrics::histogram!(BATCH_EVENTS, &l).record(outcome.events as f64);
    if let Some(last) = last {
        let frames = outcome.frames.max(1) as f64;
        metrics::gauge!(LAG_FRAMES, &l).set(last.pending as f64);
        metrics::gauge!(LAG_EVENTS, &l).set(last.pending as f64 * outcome.events as f64 / frames);
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
