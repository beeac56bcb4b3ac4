//! Several projector processes sharing the partitions: instance I of N runs the consumers of partition p of
//! every keyed stream when p mod N == I, and every whole stream (ALLOCATIONS, RESULTS) belongs to one instance.
//!
//! The layout is the single-process one ([`plan`]) for `workers × N` workers, of which instance I runs the
//! workers w with w mod N == I. So:
//! - every partition of every projection has exactly one owner among the N instances, whatever `workers`
//!   each of them runs (only N and the projection list must agree);
//! - durable names carry the whole layout (`…-3of4`), so they differ between instances and stay the same
//!   across restarts of one; with N = 1 they are those of a single process, unchanged;
//! - checkpoints stay per (projection, stream, partition) and need nothing new: an instance that is down
//!   leaves its partitions where their checkpoints are until it comes back, and two instances that overlapped
//!   by mistake would still apply each frame once (both lock the checkpoint row in their transaction).

use events::Partitions;

use crate::projection::{ConsumerPlan, Projection, plan};

/// This process's share of the partitions: instance `index` of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Instance {
    index: usize,
    count: usize,
}

/// Why an instance number is not valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InstanceError {
    #[error("the number of instances must be at least 1")]
    NoInstances,
    #[error("instance {index} does not exist: with {count} instances they are numbered 0 to {}", count - 1)]
    OutOfRange { index: usize, count: usize },
}

impl Instance {
    /// The only instance: it owns every partition.
    pub const SOLE: Instance = Instance { index: 0, count: 1 };

    pub fn new(index: usize, count: usize) -> Result<Instance, InstanceError> {
        if count == 0 {
            return Err(InstanceError::NoInstances);
        }
        if index >= count {
            return Err(InstanceError::OutOfRange { index, count });
        }
        Ok(Instance { index, count })
    }

    pub const fn index(self) -> usize {
        self.index
    }

    pub const fn count(self) -> usize {
        self.count
    }

    /// Whether this instance projects partition `p` of the keyed streams.
    pub fn owns_partition(self, p: u16) -> bool {
        usize::from(p) % self.count == self.index
    }
}

impl Default for Instance {
    fn default() -> Self {
        Instance::SOLE
    }
}

/// The consumers `instance` runs with `workers` partition workers of its own.
pub fn instance_plan(
    projections: &[Projection],
    workers: usize,
    instance: Instance,
    partitions: Partitions,
) -> Vec<ConsumerPlan> {
    plan(projections, workers.max(1) * instance.count, partitions)
        .into_iter()
        .filter(|p| p.worker % instance.count == instance.index)
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use events::{Stream, subjects::Addressing};

    use super::*;

    #[test]
    fn instances_are_validated() {
        assert_eq!(Instance::new(0, 0), Err(InstanceError::NoInstances));
        assert_eq!(
            Instance::new(2, 2),
            Err(InstanceError::OutOfRange { index: 2, count: 2 })
        );
        assert_eq!(Instance::new(1, 2).map(Instance::index), Ok(1));
        assert_eq!(Instance::default(), Instance::SOLE);
    }

    #[test]
    fn every_partition_has_one_owner_among_the_instances() {
        for count in 1..=4 {
            // Instances may run different numbers of workers; ownership depends only on the count.
            for workers in [1, 2, 3] {
                let mut owned: Vec<(Projection, Stream, u16, usize)> = Vec::new();
                let mut durables = BTreeSet::new();
                for index in 0..count {
                    let instance = Instance::new(index, count).unwrap();
                    let own_workers = workers + index % 2;
                    for p in
                        instance_plan(&Projection::ALL, own_workers, instance, Partitions::DEFAULT)
                    {
                        assert!(durables.insert(p.durable("projector")), "{p:?}");
                        for &partition in &p.partitions {
                            if p.stream.addressing() == Addressing::Partitioned {
                                assert!(instance.owns_partition(partition), "{p:?}");
                            }
                            owned.push((p.projection, p.stream, partition, index));
                        }
                    }
                }
                let mut expected = Vec::new();
                for projection in Projection::ALL {
                    for &stream in projection.streams() {
                        let partitions: Vec<u16> = match stream.addressing() {
                            Addressing::Partitioned => (0..8).collect(),
                            _ => vec![0],
                        };
                        expected.extend(partitions.into_iter().map(|p| (projection, stream, p)));
                    }
                }
                let mut got: Vec<(Projection, Stream, u16)> =
                    owned.iter().map(|&(j, s, p, _)| (j, s, p)).collect();
                got.sort();
                expected.sort();
                assert_eq!(got, expected, "{count} instances, {workers} workers");
            }
        }
    }

    #[test]
    fn one_instance_keeps_the_single_process_layout() {
        for workers in 1..=3 {
            assert_eq!(
                instance_plan(
                    &Projection::ALL,
                    workers,
                    Instance::SOLE,
                    Partitions::DEFAULT
                ),
                plan(&Projection::ALL, workers, Partitions::DEFAULT)
            );
        }
    }

    #[test]
    fn two_instances_split_even_and_odd_partitions_with_distinct_durables() {
        let plans = |index| {
            instance_plan(
                &[Projection::Tasks],
                1,
                Instance::new(index, 2).unwrap(),
                Partitions::DEFAULT,
            )
        };
        let tasks = |plans: Vec<ConsumerPlan>| {
            plans
                .into_iter()
                .find(|p| p.stream == Stream::Tasks)
                .unwrap()
        };
        let (first, second) = (tasks(plans(0)), tasks(plans(1)));
        assert_eq!(first.partitions, vec![0, 2, 4, 6]);
        assert_eq!(second.partitions, vec![1, 3, 5, 7]);
        assert_eq!(first.durable("projector"), "projector-tasks-tasks-1of2");
        assert_eq!(second.durable("projector"), "projector-tasks-tasks-2of2");
        // The whole streams are spread: one each.
        let whole = |index| {
            plans(index)
                .into_iter()
                .filter(|p| p.stream != Stream::Tasks)
                .map(|p| p.stream)
                .collect::<Vec<_>>()
        };
        assert_eq!(whole(0), vec![Stream::Allocations]);
        assert_eq!(whole(1), vec![Stream::Results]);
    }
}
