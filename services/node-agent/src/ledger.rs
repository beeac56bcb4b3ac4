//! The agent's decisions about allocations, without IO: fencing by allocator epoch, de-duplication of
//! attempts, and what a revocation stops.
//!
//! Guarantees: an allocation or revocation older than the newest allocator epoch seen is refused (a deposed
//! allocator cannot place or take back work); an attempt is run at most once per agent run, however often its
//! allocation is delivered; a revoked attempt never reports anything.

use std::collections::{HashMap, HashSet, VecDeque};

use events::TaskId;

/// One attempt of one task.
pub type AttemptKey = (TaskId, u32);

/// Finished attempts remembered for de-duplication; redeliveries come within the consumer's ack wait, so the
/// most recent ones are enough, and the memory of a long-running agent stays bounded.
const REMEMBERED_DONE: usize = 100_000;

/// What to do with a delivered allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// New attempt: queue it.
    Accept,
    /// Placed by an allocator older than one already heard from.
    Stale { epoch: u64, highest: u64 },
    /// This attempt is queued, running or done already.
    Duplicate,
}

/// What to do with a delivered revocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revocation {
    /// The attempt is queued or running: stop it and report nothing more.
    Stop,
    /// From an allocator older than one already heard from.
    Stale { epoch: u64, highest: u64 },
    /// Not queued or running here (finished already, or never seen).
    NotActive,
}

/// Allocations seen in this agent run.
#[derive(Debug, Default)]
pub struct Ledger {
    highest_epoch: u64,
    active: HashSet<AttemptKey>,
    revoked: HashSet<AttemptKey>,
    done: HashSet<AttemptKey>,
    done_order: VecDeque<AttemptKey>,
}

impl Ledger {
    pub fn highest_epoch(&self) -> u64 {
        self.highest_epoch
    }

    /// Fences by epoch: refuses an older one, otherwise raises the newest seen.
    fn fence(&mut self, epoch: u64) -> Result<(), (u64, u64)> {
        if epoch < self.highest_epoch {
            return Err((epoch, self.highest_epoch));
        }
        self.highest_epoch = epoch;
        Ok(())
    }

    pub fn admit(&mut self, key: AttemptKey, epoch: u64) -> Admission {
        if let Err((epoch, highest)) = self.fence(epoch) {
            return Admission::Stale { epoch, highest };
        }
        if self.active.contains(&key) || self.done.contains(&key) {
            return Admission::Duplicate;
        }
        self.active.insert(key);
        Admission::Accept
    }

    pub fn revoke(&mut self, key: AttemptKey, epoch: u64) -> Revocation {
        if let Err((epoch, highest)) = self.fence(epoch) {
            return Revocation::Stale { epoch, highest };
        }
        if self.active.contains(&key) {
            self.revoked.insert(key);
            Revocation::Stop
        } else {
            Revocation::NotActive
        }
    }

    pub fn is_revoked(&self, key: &AttemptKey) -> bool {
        self.revoked.contains(key)
    }

    /// The attempt ended (in any way); a redelivery of its allocation is now a duplicate.
    pub fn finish(&mut self, key: AttemptKey) {
        self.active.remove(&key);
        self.revoked.remove(&key);
        if self.done.insert(key) {
            self.done_order.push_back(key);
            if self.done_order.len() > REMEMBERED_DONE
                && let Some(old) = self.done_order.pop_front()
            {
                self.done.remove(&old);
            }
        }
    }
}

/// Running attempts per GPU index, for simulated telemetry.
pub fn gpu_load<'a>(attempts: impl IntoIterator<Item = &'a [u32]>) -> HashMap<u32, u32> {
    let mut load = HashMap::new();
    for gpus in attempts {
        for &g in gpus {
            *load.entry(g).or_insert(0) += 1;
        }
    }
    load
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u128, attempt: u32) -> AttemptKey {
        (TaskId::from_u128(n), attempt)
    }

    #[test]
    fn given_a_newer_epoch_when_an_older_allocation_arrives_then_it_is_stale() {
        let mut l = Ledger::default();
        assert_eq!(l.admit(key(1, 1), 5), Admission::Accept);
        assert_eq!(
            l.admit(key(2, 1), 4),
            Admission::Stale {
                epoch: 4,
                highest: 5
            }
        );
        assert_eq!(l.admit(key(3, 1), 5), Admission::Accept);
        assert_eq!(l.admit(key(4, 1), 6), Admission::Accept);
        assert_eq!(l.highest_epoch(), 6);
    }

    #[test]
    fn given_an_attempt_when_it_is_delivered_again_then_it_is_a_duplicate_until_forgotten() {
        let mut l = Ledger::default();
        assert_eq!(l.admit(key(1, 1), 1), Admission::Accept);
        assert_eq!(l.admit(key(1, 1), 1), Admission::Duplicate);
        l.finish(key(1, 1));
        assert_eq!(l.admit(key(1, 1), 1), Admission::Duplicate);
        // The next attempt of the same task is new work.
        assert_eq!(l.admit(key(1, 2), 1), Admission::Accept);
    }

    #[test]
    fn given_a_running_attempt_when_revoked_then_it_stops_and_finished_ones_do_not() {
        let mut l = Ledger::default();
        l.admit(key(1, 1), 2);
        l.admit(key(2, 1), 2);
        l.finish(key(2, 1));
        assert_eq!(l.revoke(key(1, 1), 2), Revocation::Stop);
        assert!(l.is_revoked(&key(1, 1)));
        assert_eq!(l.revoke(key(2, 1), 2), Revocation::NotActive);
        assert_eq!(l.revoke(key(9, 1), 2), Revocation::NotActive);
        assert_eq!(
            l.revoke(key(1, 1), 1),
            Revocation::Stale {
                epoch: 1,
                highest: 2
            }
        );
        l.finish(key(1, 1));
        assert!(!l.is_revoked(&key(1, 1)));
    }

    #[test]
    fn done_attempts_are_remembered_up_to_a_bound() {
        let mut l = Ledger::default();
        for n in 0..(REMEMBERED_DONE as u128 + 10) {
            l.admit(key(n, 1), 1);
            l.finish(key(n, 1));
        }
        assert_eq!(l.done.len(), REMEMBERED_DONE);
        assert_eq!(l.admit(key(0, 1), 1), Admission::Accept);
        assert_eq!(
            l.admit(key(REMEMBERED_DONE as u128 + 9, 1), 1),
            Admission::Duplicate
        );
    }

    #[test]
    fn gpu_load_counts_attempts_per_gpu() {
        let a = [0u32, 1];
        let b = [1u32];
        let load = gpu_load([&a[..], &b[..]]);
        assert_eq!(load.get(&0), Some(&1));
        assert_eq!(load.get(&1), Some(&2));
    }
}
