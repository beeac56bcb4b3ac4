//! The projections: which streams each reads, which tables it owns, and how its consumers are laid out.

use std::fmt;

use events::{Partitions, Stream, Subject, subjects::Addressing};

/// A projection owns a set of tables and one checkpoint row per (stream, partition) it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Projection {
    /// Tasks, their allocations and results.
    Tasks,
    /// Workers, their GPUs and attestations.
    Workers,
    /// Accruals, settlements, their payouts and tasks, and parked payouts.
    Payments,
}

impl Projection {
    pub const ALL: [Projection; 3] = [Projection::Tasks, Projection::Workers, Projection::Payments];

    pub const fn name(self) -> &'static str {
        match self {
            Projection::Tasks => "tasks",
            Projection::Workers => "workers",
            Projection::Payments => "payments",
        }
    }

    pub fn parse(s: &str) -> Option<Projection> {
        Projection::ALL.into_iter().find(|p| p.name() == s)
    }

    pub const fn streams(self) -> &'static [Stream] {
        match self {
            Projection::Tasks => &[Stream::Tasks, Stream::Allocations, Stream::Results],
            Projection::Workers => &[Stream::Workers, Stream::Attestations],
            Projection::Payments => &[Stream::Payments],
        }
    }

    /// The tables whose rows this projection writes (its counters are derived from them by triggers).
    pub const fn tables(self) -> &'static [&'static str] {
        match self {
            Projection::Tasks => &["tasks", "allocations", "task_results"],
            Projection::Workers => &["workers", "worker_gpus", "attestations"],
            Projection::Payments => &[
                "payment_accruals",
                "settlements",
                "settlement_payouts",
                "settlement_tasks",
                "parked_payouts",
            ],
        }
    }
}

impl fmt::Display for Projection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One durable consumer: a projection, a stream, and the partitions of it that one worker owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerPlan {
    pub projection: Projection,
    pub stream: Stream,
    /// Partition numbers owned; `[0]` for streams addressed by worker or client, read whole.
    pub partitions: Vec<u16>,
    /// How many partitions the stream has: a plan that owns them all reads the stream whole.
    pub stream_partitions: u16,
    pub worker: usize,
    pub workers: usize,
}

impl ConsumerPlan {
    /// The durable name. It carries the layout, so a changed worker count gets fresh consumers (which start
    /// from the database checkpoints anyway).
    pub fn durable(&self, prefix: &str) -> String {
        format!(
            "{prefix}-{}-{}-{}of{}",
            self.projection.name(),
            self.stream.prefix(),
            self.worker + 1,
            self.workers
        )
    }

    /// The consumer's subject filters: one per owned partition, or none when the plan reads the whole stream.
    /// Unfiltered is cheaper for the server: for a consumer that lags by more messages than a block has
    /// subjects, each filtered delivery walks the block's subjects that match (load-tests/RESULTS.md,
    /// "Projector").
    pub fn filter_subjects(&self) -> Vec<String> {
        match self.stream.addressing() {
            Addressing::Partitioned if !self.reads_whole_stream() => self
                .partitions
                .iter()
                .map(|&p| Subject::partition_filter(self.stream, events::Partition(p)))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Whether partition `p` (as [`ConsumerPlan::partition_of`] reads it from a subject) is this plan's.
    pub fn owns(&self, p: u16) -> bool {
        self.reads_whole_stream() || self.partitions.contains(&p)
    }

    /// The share of the stream's partitions the plan owns (1 for a whole stream).
    pub fn share(&self) -> f64 {
        if self.reads_whole_stream() {
            1.0
        } else {
            self.partitions.len() as f64 / f64::from(self.stream_partitions.max(1))
        }
    }

    /// Whether the plan owns every message of its stream.
    pub fn reads_whole_stream(&self) -> bool {
        match self.stream.addressing() {
            Addressing::Partitioned => self.partitions.len() >= usize::from(self.stream_partitions),
            _ => true,
        }
    }

    /// The checkpoint partition of a frame's subject: 0 for a stream read whole, and for a subject that names
    /// no partition of its stream (see [`ConsumerPlan::subject_error`]: partition 0's owner dead-letters it).
    pub fn partition_of(&self, subject: &str) -> u16 {
        match self.stream.addressing() {
            Addressing::Partitioned => self.named_partition(subject).unwrap_or(0),
            _ => 0,
        }
    }

    /// Why a frame of a partitioned stream names no partition of it (`tasks.x.…`, `tasks.99.…` with 8
    /// partitions); `None` when its subject is fine. No filter selects such a frame, so a consumer reads it
    /// only when it reads its stream whole.
    pub fn subject_error(&self, subject: &str) -> Option<String> {
        match self.stream.addressing() {
            Addressing::Partitioned if self.named_partition(subject).is_none() => Some(format!(
                "subject {subject} names no partition of {} (0 to {})",
                self.stream,
                self.stream_partitions.saturating_sub(1)
            )),
            _ => None,
        }
    }

    fn named_partition(&self, subject: &str) -> Option<u16> {
        Subject::partition_number(subject)
            .map(|p| p.0)
            .filter(|&p| p < self.stream_partitions)
    }
}

/// Splits every stream of `projections` over `workers` workers: partition p goes to worker p mod workers;
/// whole streams (allocations, results) are spread by stream.
pub fn plan(
    projections: &[Projection],
    workers: usize,
    partitions: Partitions,
) -> Vec<ConsumerPlan> {
    let workers = workers.max(1);
    let mut plans = Vec::new();
    let mut whole = 0usize;
    for &projection in projections {
        for &stream in projection.streams() {
            match stream.addressing() {
                Addressing::Partitioned => {
                    for worker in 0..workers {
                        let owned: Vec<u16> = partitions
                            .iter()
                            .map(|p| p.0)
                            .filter(|p| usize::from(*p) % workers == worker)
                            .collect();
                        if !owned.is_empty() {
                            plans.push(ConsumerPlan {
                                projection,
                                stream,
                                partitions: owned,
                                stream_partitions: partitions.count(),
                                worker,
                                workers,
                            });
                        }
                    }
                }
                _ => {
                    plans.push(ConsumerPlan {
                        projection,
                        stream,
                        partitions: vec![0],
                        stream_partitions: 1,
                        worker: whole % workers,
                        workers,
                    });
                    whole += 1;
                }
            }
        }
    }
    plans
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_partition_has_exactly_one_owner() {
        for workers in 1..=3 {
            let plans = plan(&Projection::ALL, workers, Partitions::DEFAULT);
            for projection in Projection::ALL {
                for &stream in projection.streams() {
                    let mut owned: Vec<u16> = plans
                        .iter()
                        .filter(|p| p.projection == projection && p.stream == stream)
                        .flat_map(|p| p.partitions.clone())
                        .collect();
                    owned.sort_unstable();
                    let expected: Vec<u16> = match stream.addressing() {
                        Addressing::Partitioned => (0..8).collect(),
                        _ => vec![0],
                    };
                    assert_eq!(
                        owned, expected,
                        "{projection} {stream} with {workers} workers"
                    );
                }
            }
        }
    }

    #[test]
    fn subjects_and_partitions_agree() {
        let plans = plan(&[Projection::Tasks], 2, Partitions::DEFAULT);
        let p = plans
            .iter()
            .find(|p| p.stream == Stream::Tasks && p.worker == 1)
            .unwrap();
        assert_eq!(
            p.filter_subjects(),
            vec!["tasks.1.>", "tasks.3.>", "tasks.5.>", "tasks.7.>"]
        );
        assert_eq!(p.partition_of("tasks.5.worker.w1"), 5);
        assert_eq!(p.subject_error("tasks.5.worker.w1"), None);
        for bad in ["tasks.8.worker.w1", "tasks.x.worker.w1", "tasks"] {
            assert_eq!(p.partition_of(bad), 0, "{bad}");
            assert!(p.subject_error(bad).is_some(), "{bad}");
        }
        assert_eq!(p.durable("projector"), "projector-tasks-tasks-2of2");
    }

    #[test]
    fn a_plan_that_owns_the_whole_stream_reads_it_unfiltered() {
        for plan in plan(&Projection::ALL, 1, Partitions::DEFAULT) {
            assert!(plan.reads_whole_stream(), "{plan:?}");
            assert_eq!(plan.filter_subjects(), Vec::<String>::new(), "{plan:?}");
        }
        for plan in plan(&Projection::ALL, 2, Partitions::DEFAULT) {
            let partitioned = plan.stream.addressing() == Addressing::Partitioned;
            assert_eq!(plan.reads_whole_stream(), !partitioned, "{plan:?}");
            assert_eq!(
                plan.filter_subjects().len(),
                if partitioned { 4 } else { 0 }
            );
        }
    }
}
