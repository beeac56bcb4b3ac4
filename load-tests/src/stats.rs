//! What the whole-system load test counts, without IO: each task's steps (submitted, allocated, started,
//! completed, accrued, paid) folded into per-second buckets with latency percentiles, the end-of-run check that
//! nothing was lost or done twice, and whether a memory series is flat.
//!
//! Times are microseconds since the start of the load. Steps may arrive in any order (an allocation can be
//! seen before the producer hears its submission acknowledged); a latency is recorded when both of its ends
//! are known, in the second of the later one.

use std::collections::HashMap;

use events::TaskId;

/// Microseconds since the start of the load.
pub type Micros = u64;

/// One step of a task's life, as the driver sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The producer's publish was acknowledged; `sent` is when the submission started (the latency origin).
    Submitted { sent: Micros },
    /// The fleet received an allocation (any attempt).
    Allocated,
    /// The fleet published TaskStarted and it was acknowledged.
    Started,
    /// The fleet's TaskCompleted was acknowledged; `ran` is the attempt's wall time (the simulated work).
    Completed { ran: Micros },
    /// The settler's PaymentAccrued was read from PAYMENTS.
    Accrued,
    /// A settlement carrying the task was confirmed on chain with the worker's transfer sent.
    Paid,
}

/// Counters of one second.
#[derive(Debug, Clone, Default)]
pub struct Bucket {
    pub submitted: u64,
    pub allocated: u64,
    pub started: u64,
    pub completed: u64,
    pub accrued: u64,
    pub paid: u64,
    /// Latencies in microseconds, of the tasks whose later end fell in this second.
    pub to_allocated: Vec<u32>,
    pub to_completed: Vec<u32>,
    pub to_paid: Vec<u32>,
    /// Submission to completion less the attempt's own run time: what the pool added.
    pub overhead: Vec<u32>,
}

/// p50, p95, p99 and max of a set of latencies, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Percentiles {
    pub count: usize,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    /// `None` for an empty set.
    pub fn of(latencies_us: &[u32]) -> Option<Percentiles> {
        if latencies_us.is_empty() {
            return None;
        }
        let mut sorted = latencies_us.to_vec();
        sorted.sort_unstable();
        let at = |p: f64| f64::from(sorted[nearest_rank(sorted.len(), p)]) / 1000.0;
        Some(Percentiles {
            count: sorted.len(),
            p50: at(0.50),
            p95: at(0.95),
            p99: at(0.99),
            max: at(1.0),
        })
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Track {
    sent: Option<Micros>,
    allocated: Option<Micros>,
    completed: Option<Micros>,
    ran: Micros,
    paid: Option<Micros>,
    submissions: u8,
    allocations: u8,
    completions: u8,
    accruals: u8,
    payments: u8,
}

/// Every task of the run and the per-second buckets.
#[derive(Debug, Default)]
pub struct Tracker {
    tasks: HashMap<TaskId, Track>,
    pub buckets: Vec<Bucket>,
    /// Tasks with at least one submission, completion, payment: kept as steps arrive, for progress.
    submitted: u64,
    completed: u64,
    paid: u64,
}

/// The end-of-run account.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    pub submitted: u64,
    /// Tasks allocated at least once, and allocations in all (attempts after a requeue count again).
    pub allocated: u64,
    pub allocations: u64,
    pub completed: u64,
    pub accrued: u64,
    pub paid: u64,
    /// Submitted but never completed / completed but never paid / submitted but never accrued.
    pub not_completed: u64,
    pub not_paid: u64,
    pub not_accrued: u64,
    /// Done more than once: a second TaskCompleted, PaymentAccrued or confirmed payment of one task.
    pub completed_twice: u64,
    pub accrued_twice: u64,
    pub paid_twice: u64,
    /// Steps of tasks this run did not submit (another producer on the server, or a bug).
    pub unknown: u64,
}

impl Totals {
    /// Everything submitted was completed, accrued and paid exactly once, and nothing else was.
    pub fn is_exact(&self) -> bool {
        self.submitted > 0
            && self.completed == self.submitted
            && self.accrued == self.submitted
            && self.paid == self.submitted
            && self.not_completed == 0
            && self.not_paid == 0
            && self.not_accrued == 0
            && self.completed_twice == 0
            && self.accrued_twice == 0
            && self.paid_twice == 0
            && self.unknown == 0
    }
}

impl Tracker {
    pub fn new() -> Tracker {
        Tracker::default()
    }

    fn bucket(&mut self, at: Micros) -> &mut Bucket {
        let second = (at / 1_000_000) as usize;
        if self.buckets.len() <= second {
            self.buckets.resize_with(second + 1, Bucket::default);
        }
        &mut self.buckets[second]
    }

    /// Folds one step of `task` seen at `at`.
    pub fn record(&mut self, task: TaskId, step: Step, at: Micros) {
        let track = *self.tasks.entry(task).or_default();
        let mut next = track;
        let mut latencies: Vec<(Micros, LatencyKind, u32)> = Vec::new();
        let lat =
            |from: Micros, to: Micros| u32::try_from(to.saturating_sub(from)).unwrap_or(u32::MAX);
        match step {
            Step::Submitted { sent } => {
                next.submissions = next.submissions.saturating_add(1);
                if track.sent.is_none() {
                    next.sent = Some(sent);
                    if let Some(a) = track.allocated {
                        latencies.push((a, LatencyKind::Allocated, lat(sent, a)));
                    }
                    if let Some(c) = track.completed {
                        latencies.push((c, LatencyKind::Completed, lat(sent, c)));
                        latencies.push((c, LatencyKind::Overhead, lat(sent + track.ran, c)));
                    }
                    if let Some(p) = track.paid {
                        latencies.push((p, LatencyKind::Paid, lat(sent, p)));
                    }
                }
                self.bucket(at).submitted += 1;
            }
            Step::Allocated => {
                next.allocations = next.allocations.saturating_add(1);
                if track.allocated.is_none() {
                    next.allocated = Some(at);
                    if let Some(s) = track.sent {
                        latencies.push((at, LatencyKind::Allocated, lat(s, at)));
                    }
                }
                self.bucket(at).allocated += 1;
            }
            Step::Started => self.bucket(at).started += 1,
            Step::Completed { ran } => {
                next.completions = next.completions.saturating_add(1);
                if track.completed.is_none() {
                    next.completed = Some(at);
                    next.ran = ran;
                    if let Some(s) = track.sent {
                        latencies.push((at, LatencyKind::Completed, lat(s, at)));
                        latencies.push((at, LatencyKind::Overhead, lat(s + ran, at)));
                    }
                }
                self.bucket(at).completed += 1;
            }
            Step::Accrued => {
                next.accruals = next.accruals.saturating_add(1);
                self.bucket(at).accrued += 1;
            }
            Step::Paid => {
                next.payments = next.payments.saturating_add(1);
                if track.paid.is_none() {
                    next.paid = Some(at);
                    if let Some(s) = track.sent {
                        latencies.push((at, LatencyKind::Paid, lat(s, at)));
                    }
                }
                self.bucket(at).paid += 1;
            }
        }
        self.submitted += u64::from(track.submissions == 0 && next.submissions > 0);
        self.completed += u64::from(track.completions == 0 && next.completions > 0);
        self.paid += u64::from(track.payments == 0 && next.payments > 0);
        self.tasks.insert(task, next);
        for (when, kind, value) in latencies {
            let b = self.bucket(when);
            match kind {
                LatencyKind::Allocated => b.to_allocated.push(value),
                LatencyKind::Completed => b.to_completed.push(value),
                LatencyKind::Paid => b.to_paid.push(value),
                LatencyKind::Overhead => b.overhead.push(value),
            }
        }
    }

    /// Tasks submitted, completed and paid so far (each counted once), for the drain's progress.
    pub fn progress(&self) -> (u64, u64, u64) {
        (self.submitted, self.completed, self.paid)
    }

    /// The account of every task.
    pub fn totals(&self) -> Totals {
        let mut t = Totals::default();
        for track in self.tasks.values() {
            if track.submissions == 0 {
                t.unknown += 1;
                continue;
            }
            t.submitted += 1;
            t.allocated += u64::from(track.allocations > 0);
            t.allocations += u64::from(track.allocations);
            t.completed += u64::from(track.completions > 0);
            t.accrued += u64::from(track.accruals > 0);
            t.paid += u64::from(track.payments > 0);
            t.not_completed += u64::from(track.completions == 0);
            t.not_accrued += u64::from(track.accruals == 0);
            t.not_paid += u64::from(track.completions > 0 && track.payments == 0);
            t.completed_twice += u64::from(track.completions > 1);
            t.accrued_twice += u64::from(track.accruals > 1);
            t.paid_twice += u64::from(track.payments > 1);
        }
        t
    }

    /// Latency percentiles over the buckets of seconds `[from, to)`.
    pub fn latency_over(&self, from: usize, to: usize, kind: LatencyKind) -> Option<Percentiles> {
        let all: Vec<u32> = self
            .buckets
            .get(from.min(self.buckets.len())..to.min(self.buckets.len()))
            .unwrap_or(&[])
            .iter()
            .flat_map(|b| match kind {
                LatencyKind::Allocated => b.to_allocated.iter(),
                LatencyKind::Completed => b.to_completed.iter(),
                LatencyKind::Paid => b.to_paid.iter(),
                LatencyKind::Overhead => b.overhead.iter(),
            })
            .copied()
            .collect();
        Percentiles::of(&all)
    }
}

/// Which latency: from submission to the first allocation, the completion, or the payment; or the completion's
/// less the attempt's run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LatencyKind {
    Allocated,
    Completed,
    Paid,
    Overhead,
}

/// How a memory series behaved over the load, after its warm-up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Flatness {
    /// Where the judged window starts (seconds): the warm-up ends there.
    pub from_s: f64,
    /// Least-squares slope over the judged window (warm-up's end to the load's end), MiB per minute.
    pub slope_mib_per_min: f64,
    /// That slope times the window's length: how much it grew there.
    pub growth_mib: f64,
    /// Mean over the judged window.
    pub mean_mib: f64,
    /// The band holding 90% of the window's samples (5th and 95th percentiles), and its highest sample.
    pub p5_mib: f64,
    pub p95_mib: f64,
    pub max_mib: f64,
    pub flat: bool,
}

impl Flatness {
    /// p95/p5: how wide the band is.
    pub fn ratio(&self) -> f64 {
        if self.p5_mib > 0.0 {
            self.p95_mib / self.p5_mib
        } else {
            f64::INFINITY
        }
    }
}

/// Growth over the judged window below this share of the mean (or [`FLAT_GROWTH_MIB`], whichever is larger)
/// counts as flat.
pub const FLAT_GROWTH_SHARE: f64 = 0.05;
pub const FLAT_GROWTH_MIB: f64 = 4.0;
/// The 5th–95th percentile band over the judged window at most this wide as p95/p5 (or [`FLAT_SPREAD_MIB`]).
pub const FLAT_RATIO: f64 = 1.10;
pub const FLAT_SPREAD_MIB: f64 = 8.0;
/// The warm-up is at least this share of the load, and at most [`WARM_UP_MAX_SHARE`] of it.
pub const WARM_UP_MIN_SHARE: f64 = 0.2;
pub const WARM_UP_MAX_SHARE: f64 = 0.5;

/// When memory is judged from, in a load of `load_end` seconds whose longest-lived bounded state (a cache of
/// recent ids, an accrual window) is kept `retention_s` seconds: a cache fills for as long as it keeps its
/// entries, and one kept in generations (the allocator's finished tasks) holds up to 1.5 times that. So the
/// warm-up is 1.5 × `retention_s`, at least 20% of the load and at most half of it (a run too short for its
/// retention is then judged on its second half, warm-up included, which errs towards "grows").
pub fn warm_up(load_end: f64, retention_s: f64) -> f64 {
    (1.5 * retention_s).clamp(load_end * WARM_UP_MIN_SHARE, load_end * WARM_UP_MAX_SHARE)
}

/// Whether the series `(seconds, MiB)` stayed flat over `[from, load_end]` (the load after its warm-up, see
/// [`warm_up`]): it neither grows (least-squares over the window) nor swings (the band of 90% of the samples;
/// a single second's spike, a transient batch buffer, is not growth and is reported as the maximum). `None`
/// with fewer than four samples in the window.
pub fn flatness(points: &[(f64, f64)], from: f64, load_end: f64) -> Option<Flatness> {
    let window: Vec<(f64, f64)> = points
        .iter()
        .copied()
        .filter(|(t, v)| *t >= from && *t <= load_end && v.is_finite())
        .collect();
    if window.len() < 4 {
        return None;
    }
    let n = window.len() as f64;
    let mean = window.iter().map(|p| p.1).sum::<f64>() / n;
    let slope = slope(&window);
    let growth = slope * (window[window.len() - 1].0 - window[0].0);
    let mut values: Vec<f64> = window.iter().map(|p| p.1).collect();
    values.sort_by(f64::total_cmp);
    let at = |q: f64| values[nearest_rank(values.len(), q)];
    let (p5, p95, max) = (at(0.05), at(0.95), values[values.len() - 1]);
    let grows = growth > (mean * FLAT_GROWTH_SHARE).max(FLAT_GROWTH_MIB);
    let swings = p95 - p5 > (p5 * (FLAT_RATIO - 1.0)).max(FLAT_SPREAD_MIB);
    Some(Flatness {
        from_s: from,
        slope_mib_per_min: slope * 60.0,
        growth_mib: growth,
        mean_mib: mean,
        p5_mib: p5,
        p95_mib: p95,
        max_mib: max,
        flat: !grows && !swings,
    })
}

/// The index of the `q` quantile (0..=1) in a sorted slice of `len` > 0 values, by nearest rank.
fn nearest_rank(len: usize, q: f64) -> usize {
    (((len - 1) as f64 * q).round() as usize).min(len - 1)
}

/// Least-squares slope of `(x, y)` points (0 with fewer than two distinct x).
pub fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return 0.0;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let cov: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let var: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if var > 0.0 { cov / var } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Micros = 1_000_000;

    #[test]
    fn steps_in_order_give_latencies_in_the_later_second() {
        let mut t = Tracker::new();
        let task = TaskId::new();
        t.record(task, Step::Submitted { sent: 100 }, 5_000);
        t.record(task, Step::Allocated, 10_100);
        t.record(task, Step::Started, 11_000);
        t.record(task, Step::Completed { ran: S }, 2 * S + 100);
        t.record(task, Step::Accrued, 2 * S + 200);
        t.record(task, Step::Paid, 9 * S + 100);
        assert_eq!(t.buckets[0].submitted, 1);
        assert_eq!(t.buckets[0].to_allocated, vec![10_000]);
        assert_eq!(t.buckets[2].to_completed, vec![2_000_000]);
        assert_eq!(t.buckets[2].overhead, vec![1_000_000]);
        assert_eq!(t.buckets[9].to_paid, vec![9_000_000]);
        let totals = t.totals();
        assert!(totals.is_exact(), "{totals:?}");
        assert_eq!(t.progress(), (1, 1, 1));
    }

    #[test]
    fn an_allocation_seen_before_the_ack_still_counts() {
        let mut t = Tracker::new();
        let task = TaskId::new();
        t.record(task, Step::Allocated, 3_000);
        t.record(task, Step::Submitted { sent: 1_000 }, 6_000);
        assert_eq!(t.buckets[0].to_allocated, vec![2_000]);
        assert_eq!(t.buckets[0].allocated, 1);
        assert_eq!(t.buckets[0].submitted, 1);
    }

    #[test]
    fn losses_and_doubles_are_counted() {
        let mut t = Tracker::new();
        let lost = TaskId::new();
        let unpaid = TaskId::new();
        let twice = TaskId::new();
        let stranger = TaskId::new();
        for task in [lost, unpaid, twice] {
            t.record(task, Step::Submitted { sent: 0 }, 1);
            t.record(task, Step::Allocated, 2);
        }
        t.record(lost, Step::Allocated, 3);
        for task in [unpaid, twice] {
            t.record(task, Step::Completed { ran: 1 }, 4);
            t.record(task, Step::Accrued, 5);
        }
        t.record(twice, Step::Completed { ran: 1 }, 6);
        t.record(twice, Step::Paid, 7);
        t.record(twice, Step::Paid, 8);
        t.record(stranger, Step::Completed { ran: 1 }, 9);
        let totals = t.totals();
        assert_eq!(
            totals,
            Totals {
                submitted: 3,
                allocated: 3,
                allocations: 4,
                completed: 2,
                accrued: 2,
                paid: 1,
                not_completed: 1,
                not_paid: 1,
                not_accrued: 1,
                completed_twice: 1,
                accrued_twice: 0,
                paid_twice: 1,
                unknown: 1,
            }
        );
        assert!(!totals.is_exact());
        assert_eq!(t.progress(), (3, 3, 1));
        assert!(!Totals::default().is_exact());
    }

    #[test]
    fn percentiles_in_milliseconds() {
        let lat: Vec<u32> = (1..=100).map(|i| i * 1_000).collect();
        let p = Percentiles::of(&lat).unwrap();
        assert_eq!(p.count, 100);
        assert_eq!(p.p50, 51.0);
        assert_eq!(p.p95, 95.0);
        assert_eq!(p.p99, 99.0);
        assert_eq!(p.max, 100.0);
        assert!(Percentiles::of(&[]).is_none());
        let mut t = Tracker::new();
        for i in 0..10u64 {
            let task = TaskId::new();
            t.record(task, Step::Submitted { sent: i * S }, i * S);
            t.record(task, Step::Allocated, i * S + 1_000 * (i + 1));
        }
        let p = t.latency_over(5, 100, LatencyKind::Allocated).unwrap();
        assert_eq!(p.count, 5);
        assert_eq!(p.max, 10.0);
        assert!(t.latency_over(50, 100, LatencyKind::Paid).is_none());
    }

    #[test]
    fn flat_and_growing_series() {
        let flat: Vec<(f64, f64)> = (0..300)
            .map(|s| (f64::from(s), 100.0 + f64::from(s % 7)))
            .collect();
        let f = flatness(&flat, 60.0, 300.0).unwrap();
        assert!(f.flat, "{f:?}");
        assert!(f.slope_mib_per_min.abs() < 1.0);
        // A leak: 0.2 MiB/s, 48 MiB over the 240 s judged.
        let leak: Vec<(f64, f64)> = (0..300)
            .map(|s| (f64::from(s), 300.0 + 0.2 * f64::from(s)))
            .collect();
        let f = flatness(&leak, 60.0, 300.0).unwrap();
        assert!(!f.flat, "{f:?}");
        assert!((f.slope_mib_per_min - 12.0).abs() < 1e-6);
        assert!((f.growth_mib - 47.8).abs() < 0.5, "{f:?}");
        // A cache filling for 150 s, then flat: flat once the warm-up is past, growing if judged from 60 s.
        let fill: Vec<(f64, f64)> = (0..600)
            .map(|s| (f64::from(s), 20.0 + 0.1 * f64::from(s.min(150))))
            .collect();
        assert!(flatness(&fill, warm_up(600.0, 150.0), 600.0).unwrap().flat);
        assert!(!flatness(&fill, 60.0, 600.0).unwrap().flat);
        // Single-second spikes (a transient buffer) stay out of the band but show as the maximum.
        let spiky: Vec<(f64, f64)> = (0..300)
            .map(|s| (f64::from(s), if s % 50 == 0 { 60.0 } else { 30.0 }))
            .collect();
        let f = flatness(&spiky, 60.0, 300.0).unwrap();
        assert!(f.flat, "{f:?}");
        assert_eq!((f.p95_mib, f.max_mib), (30.0, 60.0));
        // A level that keeps swinging by 30% is not flat, though it does not grow.
        let swinging: Vec<(f64, f64)> = (0..300)
            .map(|s| (f64::from(s), if (s / 20) % 2 == 0 { 100.0 } else { 130.0 }))
            .collect();
        let f = flatness(&swinging, 60.0, 300.0).unwrap();
        assert!(!f.flat && f.ratio() > 1.25, "{f:?}");
        assert!(flatness(&flat, 298.0, 300.0).is_none());
    }

    #[test]
    fn warm_up_is_one_and_a_half_retentions_within_a_fifth_and_a_half_of_the_load() {
        assert_eq!(warm_up(600.0, 150.0), 225.0);
        assert_eq!(warm_up(600.0, 10.0), 120.0);
        assert_eq!(warm_up(300.0, 150.0), 150.0);
    }

    #[test]
    fn slope_of_a_line() {
        let pts: Vec<(f64, f64)> = (0..10)
            .map(|i| (f64::from(i), 3.0 * f64::from(i) + 1.0))
            .collect();
        assert!((slope(&pts) - 3.0).abs() < 1e-9);
        assert_eq!(slope(&pts[..1]), 0.0);
    }
}
