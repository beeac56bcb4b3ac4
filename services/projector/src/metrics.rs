//! Metric names (constants, never ids as labels) and the recording helpers.

use std::time::Duration;

use crate::projection::ConsumerPlan;
use crate::worker::Outcome;

pub const EVENTS_APPLIED: &str = "cocoon_projector_events_applied_total";
pub const FRAMES_SKIPPED: &str = "cocoon_projector_frames_skipped_total";
pub const FRAMES_DEAD_LETTERED: &str = "cocoon_projector_frames_dead_lettered_total";
pub const BATCH_RETRIES: &str = "cocoon_projector_batch_retries_total";
pub const BATCH_SECONDS: &str = "cocoon_projector_batch_seconds";

fn labels(plan: &ConsumerPlan) -> [(&'static str, &'static str); 2] {
    [
        ("projection", plan.projection.name()),
        ("stream", plan.stream.name()),
    ]
}

pub fn record_batch(plan: &ConsumerPlan, outcome: &Outcome, elapsed: Duration) {
    let l = labels(plan);
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
