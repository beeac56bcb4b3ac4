//! A set that remembers each key for a fixed span of log time, so that what the allocator keeps about
//! finished tasks stays bounded however long it runs.
//!
//! Time is what the caller says it is (the server's store time of the events it applies), never the host's
//! clock: a replay of the log forgets exactly what the live run forgot, and a worker whose clock runs ahead
//! cannot make it forget early.

use std::collections::{HashSet, VecDeque};
use std::hash::Hash;
use std::time::Duration;

use events::time::Timestamp;

#[derive(Debug)]
pub struct RecentSet<K> {
    retention_micros: i64,
    keys: HashSet<K>,
    /// Keys in the order they were remembered, with when: the oldest are forgotten first.
    order: VecDeque<(i64, K)>,
    /// The latest time seen; time never goes back.
    now: i64,
}

impl<K: Hash + Eq + Copy> RecentSet<K> {
    pub fn new(retention: Duration) -> Self {
        Self {
            retention_micros: i64::try_from(retention.as_micros()).unwrap_or(i64::MAX),
            keys: HashSet::new(),
            order: VecDeque::new(),
            now: i64::MIN,
        }
    }

    /// Remembers `key` from `at` (or from the latest time seen, if that is later) for the retention; a key
    /// already remembered keeps its first time. Forgets what has been remembered for longer.
    pub fn insert(&mut self, key: K, at: Timestamp) {
        self.now = self.now.max(at.0);
        if self.keys.insert(key) {
            self.order.push_back((self.now, key));
        }
        self.forget_old();
    }

    pub fn contains(&self, key: &K) -> bool {
        self.keys.contains(key)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    fn forget_old(&mut self) {
        while let Some(&(at, key)) = self.order.front() {
            if self.now.saturating_sub(at) <= self.retention_micros {
                break;
            }
            self.order.pop_front();
            self.keys.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: i64 = 1_000_000;

    #[test]
    fn keys_are_remembered_for_the_retention_and_then_forgotten() {
        let mut set = RecentSet::new(Duration::from_secs(10));
        set.insert(1u32, Timestamp(0));
        set.insert(2, Timestamp(5 * SECOND));
        assert!(set.contains(&1) && set.contains(&2));
        set.insert(3, Timestamp(10 * SECOND));
        assert!(
            set.contains(&1),
            "exactly the retention old: still remembered"
        );
        set.insert(4, Timestamp(10 * SECOND + 1));
        assert!(!set.contains(&1));
        assert!(set.contains(&2) && set.contains(&3) && set.contains(&4));
        assert_eq!(set.len(), 3);
    }

    #[test]
    fn a_key_keeps_its_first_time_and_time_never_goes_back() {
        let mut set = RecentSet::new(Duration::from_secs(10));
        set.insert(1u32, Timestamp(0));
        // A second insert does not extend it, and an event stamped earlier does not turn the clock back.
        set.insert(1, Timestamp(8 * SECOND));
        set.insert(2, Timestamp(3 * SECOND));
        set.insert(3, Timestamp(11 * SECOND));
        assert!(!set.contains(&1));
        assert!(
            set.contains(&2),
            "remembered from 8 s, the latest time seen when it came"
        );
        set.insert(4, Timestamp(19 * SECOND));
        assert!(!set.contains(&2));
        assert_eq!(set.len(), 2);
    }

    #[test]
    fn memory_stays_bounded_at_a_steady_rate() {
        let mut set = RecentSet::new(Duration::from_secs(60));
        for i in 0..1_000_000u64 {
            // 1,000 keys a second for 1,000 seconds.
            set.insert(i, Timestamp(i as i64 * 1_000));
        }
        assert_eq!(set.len(), 60_001);
        assert!(set.order.capacity() < 2 * 65_536);
    }
}
