//! A set that remembers each key for a fixed span of log time, so that what the allocator keeps about
//! finished tasks stays bounded however long it runs.
//!
//! Time is what the caller says it is (the server's store time of the events it applies), never the host's
//! clock: a replay of the log forgets exactly what the live run forgot, and a worker whose clock runs ahead
//! cannot make it forget early.
//!
//! Keys live in generations, each a hash set covering half the retention of log time. A generation is
//! forgotten whole once its newest key is older than the retention, and its table, cleared, becomes the next
//! generation: at a steady rate no table grows, shrinks or is reallocated once the first ones are sized, so
//! resident memory stays flat (a single set with removals would leave tombstones and double its table now
//! and then). A key is remembered for at least the retention and at most one and a half times it.

use std::collections::{HashSet, VecDeque};
use std::hash::Hash;
use std::time::Duration;

use events::time::Timestamp;

#[derive(Debug)]
pub struct RecentSet<K> {
    retention_micros: i64,
    /// How much log time one generation covers: half the retention.
    span_micros: i64,
    /// Newest first: when each generation began, and its keys. A generation takes keys for one span from its
    /// start (a key that comes later starts a new one), so its newest key is at most as old as its end.
    generations: VecDeque<(i64, HashSet<K>)>,
    /// The table of the last generation forgotten, cleared, for the next generation to reuse.
    spare: Option<HashSet<K>>,
    /// The latest time seen; time never goes back.
    now: i64,
}

impl<K: Hash + Eq + Copy> RecentSet<K> {
    pub fn new(retention: Duration) -> Self {
        let retention_micros = i64::try_from(retention.as_micros()).unwrap_or(i64::MAX);
        Self {
            retention_micros,
            span_micros: (retention_micros / 2).max(1),
            generations: VecDeque::new(),
            spare: None,
            now: i64::MIN,
        }
    }

    /// Remembers `key` from `at` (or from the latest time seen, if that is later) for the retention; a key
    /// already remembered keeps its first time. Forgets what has been remembered for longer.
    pub fn insert(&mut self, key: K, at: Timestamp) {
        self.now = self.now.max(at.0);
        self.rotate();
        if self.contains(&key) {
            return;
        }
        if let Some((_, current)) = self.generations.front_mut() {
            current.insert(key);
        }
    }

    pub fn contains(&self, key: &K) -> bool {
        self.generations.iter().any(|(_, keys)| keys.contains(key))
    }

    pub fn len(&self) -> usize {
        self.generations.iter().map(|(_, keys)| keys.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.generations.iter().all(|(_, keys)| keys.is_empty())
    }

    /// Starts a new generation when the current one has covered its span, and forgets every generation that
    /// ended more than the retention ago (so each of its keys is older than that).
    fn rotate(&mut self) {
        let due = self
            .generations
            .front()
            .is_none_or(|(start, _)| self.now.saturating_sub(*start) >= self.span_micros);
        if due {
            let keys = self.spare.take().unwrap_or_default();
            self.generations.push_front((self.now, keys));
        }
        while let Some((start, _)) = self.generations.back() {
            let ended_at = start.saturating_add(self.span_micros);
            if self.now.saturating_sub(ended_at) <= self.retention_micros {
                break;
            }
            let Some((_, mut keys)) = self.generations.pop_back() else {
                break;
            };
            keys.clear();
            if self
                .spare
                .as_ref()
                .is_none_or(|spare| spare.capacity() < keys.capacity())
            {
                self.spare = Some(keys);
            }
        }
    }

    /// The tables' capacity, summed: what the set holds memory for.
    #[cfg(test)]
    fn capacity(&self) -> usize {
        self.generations
            .iter()
            .map(|(_, keys)| keys.capacity())
            .chain(self.spare.iter().map(HashSet::capacity))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: i64 = 1_000_000;

    #[test]
    fn keys_are_remembered_for_the_retention_and_forgotten_by_one_and_a_half_times_it() {
        let mut set = RecentSet::new(Duration::from_secs(10));
        set.insert(1u32, Timestamp(0));
        set.insert(2, Timestamp(5 * SECOND));
        assert!(set.contains(&1) && set.contains(&2));
        set.insert(3, Timestamp(10 * SECOND));
        assert!(
            set.contains(&1),
            "exactly the retention old: still remembered"
        );
        set.insert(4, Timestamp(14 * SECOND));
        assert!(set.contains(&1), "never forgotten before the retention");
        set.insert(5, Timestamp(15 * SECOND + 1));
        assert!(!set.contains(&1), "forgotten by 1.5 × the retention");
        assert!(set.contains(&2) && set.contains(&3) && set.contains(&4) && set.contains(&5));
        assert_eq!(set.len(), 4);
    }

    #[test]
    fn a_key_keeps_its_first_time_and_time_never_goes_back() {
        let mut set = RecentSet::new(Duration::from_secs(10));
        set.insert(1u32, Timestamp(0));
        // A second insert does not extend it, and an event stamped earlier does not turn the clock back.
        set.insert(1, Timestamp(8 * SECOND));
        set.insert(2, Timestamp(3 * SECOND));
        assert_eq!(set.len(), 2, "{set:?}");
        set.insert(3, Timestamp(16 * SECOND));
        assert!(!set.contains(&1));
        assert!(
            set.contains(&2),
            "remembered from 8 s, the latest time seen when it came"
        );
        set.insert(4, Timestamp(25 * SECOND));
        assert!(!set.contains(&2));
        assert_eq!(set.len(), 2);
    }

    #[test]
    fn memory_stays_flat_at_a_steady_rate() {
        let mut set = RecentSet::new(Duration::from_secs(60));
        let mut capacity_after_warm_up = 0;
        for i in 0..1_000_000u64 {
            // 1,000 keys a second for 1,000 seconds.
            set.insert(i, Timestamp(i as i64 * 1_000));
            if i == 200_000 {
                capacity_after_warm_up = set.capacity();
            }
        }
        let remembered = set.len();
        assert!(
            (60_001..=90_001).contains(&remembered),
            "{remembered} remembered"
        );
        for key in 1_000_000 - 60_000..1_000_000 {
            assert!(set.contains(&key), "{key} forgotten within the retention");
        }
        assert_eq!(
            set.capacity(),
            capacity_after_warm_up,
            "tables are reused, never reallocated"
        );
    }
}
