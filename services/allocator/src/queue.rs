//! The multi-level priority queue of waiting tasks: three bands (priorities 7–10, 4–6, 1–3), first in first
//! out inside a band, with aging so that low priority never starves.
//!
//! Aging: a task that has waited `aging_interval` counts as one band higher, two intervals two bands higher.
//! Tasks are served by (effective band, time queued): once a low task has aged into the high band it goes
//! before every high task that arrived after it, however many keep arriving. So a task waits at most about
//! `2 × aging_interval` plus the time to serve what was queued before it in the top band.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::time::Duration;

use events::Timestamp;
use events::payload::Priority;

/// A priority band; lower index is served first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Band {
    /// Priorities 7–10.
    High = 0,
    /// Priorities 4–6.
    Medium = 1,
    /// Priorities 1–3.
    Low = 2,
}

impl Band {
    pub fn of(priority: Priority) -> Band {
        match priority.get() {
            7..=10 => Band::High,
            4..=6 => Band::Medium,
            _ => Band::Low,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Band::High => "high",
            Band::Medium => "medium",
            Band::Low => "low",
        }
    }
}

#[derive(Debug, Clone)]
struct Entry<K> {
    key: K,
    queued_at: Timestamp,
}

/// Waiting tasks by band. `K` is the task key (a task id, or a small index in benchmarks).
#[derive(Debug, Clone)]
pub struct TaskQueue<K> {
    bands: [BTreeMap<u64, Entry<K>>; 3],
    where_is: HashMap<K, (Band, u64)>,
    next_seq: u64,
    last_queued_at: Timestamp,
    aging_interval: Duration,
}

impl<K: Clone + Eq + Hash> TaskQueue<K> {
    pub fn new(aging_interval: Duration) -> Self {
        Self {
            bands: Default::default(),
            where_is: HashMap::new(),
            next_seq: 0,
            last_queued_at: Timestamp::from_micros(i64::MIN),
            aging_interval: aging_interval.max(Duration::from_millis(1)),
        }
    }

    pub fn len(&self) -> usize {
        self.where_is.len()
    }

    pub fn is_empty(&self) -> bool {
        self.where_is.is_empty()
    }

    pub fn len_of(&self, band: Band) -> usize {
        self.bands[band as usize].len()
    }

    pub fn contains(&self, key: &K) -> bool {
        self.where_is.contains_key(key)
    }

    /// Queues `key` at the back of its band. Queuing a key that is already queued keeps its place.
    /// A `queued_at` earlier than the previous push's counts as that one (the bands stay in time order).
    pub fn push(&mut self, key: K, priority: Priority, queued_at: Timestamp) {
        if self.where_is.contains_key(&key) {
            return;
        }
        let queued_at = queued_at.max(self.last_queued_at);
        self.last_queued_at = queued_at;
        let band = Band::of(priority);
        let seq = self.next_seq;
        self.next_seq += 1;
        self.bands[band as usize].insert(
            seq,
            Entry {
                key: key.clone(),
                queued_at,
            },
        );
        self.where_is.insert(key, (band, seq));
    }

    /// Takes `key` out of the queue; false when it was not queued.
    pub fn remove(&mut self, key: &K) -> bool {
        match self.where_is.remove(key) {
            Some((band, seq)) => {
                self.bands[band as usize].remove(&seq);
                true
            }
            None => false,
        }
    }

    /// The band a task queued at `queued_at` counts as at `now`.
    pub fn effective_band(&self, band: Band, queued_at: Timestamp, now: Timestamp) -> usize {
        let waited = now.as_micros().saturating_sub(queued_at.as_micros()).max(0) as u128;
        let steps = waited / self.aging_interval.as_micros().max(1);
        (band as usize).saturating_sub(usize::try_from(steps).unwrap_or(usize::MAX))
    }

    /// Up to `limit` keys in the order they are to be served at `now`.
    pub fn peek_order(&self, now: Timestamp, limit: usize) -> Vec<K> {
        let mut cursors: Vec<_> = self.bands.iter().map(|b| b.iter().peekable()).collect();
        let bands = [Band::High, Band::Medium, Band::Low];
        let mut out = Vec::with_capacity(limit.min(self.len()));
        while out.len() < limit {
            // Each band's keys are non-decreasing in (effective band, queued_at, seq), so a merge of the
            // three heads yields the global order.
            let mut best: Option<(usize, (usize, Timestamp, u64))> = None;
            for (i, cursor) in cursors.iter_mut().enumerate() {
                if let Some((seq, entry)) = cursor.peek() {
                    let order = (
                        self.effective_band(bands[i], entry.queued_at, now),
                        entry.queued_at,
                        **seq,
                    );
                    if best.as_ref().is_none_or(|(_, b)| order < *b) {
                        best = Some((i, order));
                    }
                }
            }
            let Some((i, _)) = best else { break };
            if let Some((_, entry)) = cursors[i].next() {
                out.push(entry.key.clone());
            }
        }
        out
    }

    /// Removes and returns the next key to serve at `now`.
    pub fn pop(&mut self, now: Timestamp) -> Option<K> {
        let key = self.peek_order(now, 1).into_iter().next()?;
        self.remove(&key);
        Some(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(v: u8) -> Priority {
        Priority::new(v).unwrap()
    }

    fn at(ms: i64) -> Timestamp {
        Timestamp::from_micros(ms * 1000)
    }

    #[test]
    fn bands_are_seven_to_ten_four_to_six_one_to_three() {
        let bands: Vec<Band> = (1..=10).map(|v| Band::of(p(v))).collect();
        use Band::*;
        assert_eq!(
            bands,
            [
                Low, Low, Low, Medium, Medium, Medium, High, High, High, High
            ]
        );
    }

    #[test]
    fn higher_bands_first_and_fifo_inside_a_band() {
        let mut q = TaskQueue::new(Duration::from_secs(10));
        q.push("low", p(1), at(0));
        q.push("med-a", p(5), at(1));
        q.push("high-a", p(7), at(2));
        q.push("med-b", p(4), at(3));
        q.push("high-b", p(10), at(4));
        let order = q.peek_order(at(5), 10);
        assert_eq!(order, ["high-a", "high-b", "med-a", "med-b", "low"]);
        assert_eq!(q.pop(at(5)), Some("high-a"));
        assert_eq!(q.len(), 4);
        assert_eq!(q.len_of(Band::High), 1);
    }

    #[test]
    fn aging_lifts_a_waiting_task_one_band_per_interval() {
        let mut q = TaskQueue::new(Duration::from_secs(5));
        q.push("low", p(2), at(0));
        q.push("med", p(5), at(4_000));
        q.push("high", p(9), at(6_000));
        // At 6 s the low task (waited 6 s) counts as medium and is older than "med": it goes first among
        // the mediums, still after "high".
        assert_eq!(q.peek_order(at(6_000), 3), ["high", "low", "med"]);
        // At 10 s it has waited two intervals and counts as high; "med" has waited one and counts as high
        // too: all three are in the top band, served by the time they were queued.
        assert_eq!(q.peek_order(at(10_000), 3), ["low", "med", "high"]);
        // At 8 s "low" (8 s) counts as medium, "med" (4 s) still medium, "high" high.
        assert_eq!(q.peek_order(at(8_000), 3), ["high", "low", "med"]);
    }

    #[test]
    fn low_priority_never_starves_under_a_flood_of_high() {
        let mut q = TaskQueue::new(Duration::from_millis(100));
        q.push(0u32, p(1), at(0));
        // A new high task arrives every 10 ms and one task is served every 10 ms: without aging the low
        // task would wait forever.
        let mut served_at = None;
        for step in 1..=1_000u32 {
            let now = at(i64::from(step) * 10);
            q.push(step, p(10), now);
            if q.pop(now) == Some(0) {
                served_at = Some(step);
                break;
            }
        }
        let step = served_at.expect("the low task was served");
        // Two intervals (200 ms = 20 steps) of aging, then it is the oldest in the top band.
        assert!(step <= 21, "served at step {step}");
    }

    #[test]
    fn a_key_is_queued_once_and_removal_is_exact() {
        let mut q = TaskQueue::new(Duration::from_secs(1));
        q.push("a", p(5), at(0));
        q.push("a", p(9), at(1));
        assert_eq!(q.len(), 1);
        assert_eq!(q.len_of(Band::Medium), 1);
        assert!(q.remove(&"a"));
        assert!(!q.remove(&"a"));
        assert!(q.is_empty());
        assert_eq!(q.pop(at(2)), None);
    }
}
