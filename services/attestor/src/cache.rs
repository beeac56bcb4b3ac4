//! A bounded verdict cache keyed by quote hash and binding, so a redelivered or resubmitted quote is not
//! verified twice.
//!
//! A verdict depends on the quote, the expected report data, the policy, the collateral and the time.
//! The key covers the first two; the cache belongs to one [`Verifier`](crate::Verifier), so build a new
//! cache (or [`clear`](VerdictCache::clear) it) when the policy or collateral changes; time is covered
//! by expiry: an entry lives for its TTL and never past a `Verified` verdict's `valid_until`. Freshness
//! of the nonce is the caller's concern: a hit says the quote verified, not that it is new.
//!
//! Time is passed in, so tests need no clock.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use crate::binding::Binding;
use crate::verify::Verdict;

/// SHA-256 of the quote and the report data the binding expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey {
    quote_hash: [u8; 32],
    report_data: [u8; 64],
}

impl CacheKey {
    pub fn new(quote: &[u8], binding: &Binding) -> Self {
        Self {
            quote_hash: Sha256::digest(quote).into(),
            report_data: binding.expected_report_data(),
        }
    }
}

#[derive(Debug)]
struct Entry {
    verdict: Verdict,
    expires_at: SystemTime,
    seq: u64,
}

/// Verdicts by [`CacheKey`], at most `capacity` of them; the oldest inserted is evicted first.
#[derive(Debug)]
pub struct VerdictCache {
    capacity: usize,
    ttl_verified: Duration,
    ttl_rejected: Duration,
    entries: HashMap<CacheKey, Entry>,
    /// Insertion order: sequence number → key.
    order: BTreeMap<u64, CacheKey>,
    next_seq: u64,
}

impl VerdictCache {
    /// A cache of at most `capacity` verdicts; `Verified` ones live `ttl_verified` (and never past their
    /// `valid_until`), `Rejected` ones `ttl_rejected` (shorter: a rejection for expired collateral may not
    /// hold once the collateral is refreshed).
    pub fn new(capacity: usize, ttl_verified: Duration, ttl_rejected: Duration) -> Self {
        Self {
            capacity,
            ttl_verified,
            ttl_rejected,
            entries: HashMap::new(),
            order: BTreeMap::new(),
            next_seq: 0,
        }
    }

    /// The verdict cached for `key`, unless expired at `now` (an expired entry is dropped).
    pub fn get(&mut self, key: &CacheKey, now: SystemTime) -> Option<Verdict> {
        let entry = self.entries.get(key)?;
        if now < entry.expires_at {
            return Some(entry.verdict.clone());
        }
        self.remove(key);
        None
    }

    /// Caches `verdict` for `key` as of `now`, evicting the oldest entries beyond capacity. A `Verified`
    /// verdict already past its `valid_until` is not cached.
    pub fn insert(&mut self, key: CacheKey, verdict: Verdict, now: SystemTime) {
        if self.capacity == 0 {
            return;
        }
        let expires_at = match &verdict {
            Verdict::Verified { valid_until, .. } => now
                .checked_add(self.ttl_verified)
                .unwrap_or(now)
                .min(valid_until.to_system_time()),
            Verdict::Rejected { .. } => now.checked_add(self.ttl_rejected).unwrap_or(now),
        };
        if expires_at <= now {
            return;
        }
        self.remove(&key);
        while self.entries.len() >= self.capacity {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            self.entries.remove(&oldest);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.order.insert(seq, key);
        self.entries.insert(
            key,
            Entry {
                verdict,
                expires_at,
                seq,
            },
        );
    }

    pub fn remove(&mut self, key: &CacheKey) -> Option<Verdict> {
        let entry = self.entries.remove(key)?;
        self.order.remove(&entry.seq);
        Some(entry.verdict)
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.order.clear();
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use events::Timestamp;
    use events::attestations::Measurements;

    use super::*;
    use crate::verify::RejectReason;

    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_750_000_000 + secs)
    }

    fn key(i: u8) -> CacheKey {
        CacheKey::new(&[i; 100], &Binding::Exact([i; 64]))
    }

    fn verified(valid_until: SystemTime) -> Verdict {
        let m = "00".repeat(48);
        Verdict::Verified {
            quote_hash: "h".into(),
            tcb_status: "UpToDate".into(),
            measurements: Measurements {
                mrtd: m.clone(),
                rtmr0: m.clone(),
                rtmr1: m.clone(),
                rtmr2: m.clone(),
                rtmr3: m,
            },
            valid_until: Timestamp::from_system_time(valid_until),
        }
    }

    fn rejected() -> Verdict {
        Verdict::Rejected {
            quote_hash: "h".into(),
            reason: RejectReason::Malformed { detail: "x".into() },
        }
    }

    fn cache() -> VerdictCache {
        VerdictCache::new(3, Duration::from_secs(600), Duration::from_secs(60))
    }

    #[test]
    fn a_repeat_hits() {
        let mut c = cache();
        assert_eq!(c.get(&key(1), t(0)), None);
        c.insert(key(1), verified(t(10_000)), t(0));
        assert_eq!(c.get(&key(1), t(1)), Some(verified(t(10_000))));
        assert_eq!(c.get(&key(1), t(599)), Some(verified(t(10_000))));
    }

    #[test]
    fn the_binding_is_part_of_the_key() {
        let mut c = cache();
        c.insert(key(1), rejected(), t(0));
        let same_quote_other_binding = CacheKey::new(&[1; 100], &Binding::Exact([2; 64]));
        assert_eq!(c.get(&same_quote_other_binding, t(1)), None);
        let sha = |nonce: &[u8]| {
            CacheKey::new(
                &[1; 100],
                &Binding::Sha512 {
                    worker_id: "w".into(),
                    public_key: b"k".to_vec(),
                    nonce: nonce.to_vec(),
                },
            )
        };
        assert_ne!(sha(b"n1"), sha(b"n2"));
    }

    #[test]
    fn entries_miss_after_their_ttl() {
        let mut c = cache();
        c.insert(key(1), verified(t(10_000)), t(0));
        c.insert(key(2), rejected(), t(0));
        assert!(c.get(&key(2), t(59)).is_some());
        assert_eq!(c.get(&key(2), t(60)), None, "rejections live 60 s");
        assert!(c.get(&key(1), t(599)).is_some());
        assert_eq!(c.get(&key(1), t(600)), None, "verdicts live 600 s");
        assert!(c.is_empty(), "expired entries are dropped on lookup");
    }

    #[test]
    fn a_verified_entry_never_outlives_its_valid_until() {
        let mut c = cache();
        c.insert(key(1), verified(t(100)), t(0));
        assert!(c.get(&key(1), t(99)).is_some());
        assert_eq!(c.get(&key(1), t(100)), None);
        c.insert(key(2), verified(t(5)), t(5));
        assert!(c.is_empty(), "an already-expired verdict is not cached");
    }

    #[test]
    fn the_size_bound_evicts_the_oldest() {
        let mut c = cache();
        for i in 1..=3 {
            c.insert(key(i), rejected(), t(u64::from(i)));
        }
        // Re-inserting key 1 makes it the newest; key 2 is now the oldest.
        c.insert(key(1), rejected(), t(4));
        c.insert(key(4), rejected(), t(5));
        assert_eq!(c.len(), 3);
        assert_eq!(c.get(&key(2), t(6)), None);
        for i in [1, 3, 4] {
            assert!(c.get(&key(i), t(6)).is_some(), "key {i}");
        }
        let mut empty = VerdictCache::new(0, Duration::from_secs(1), Duration::from_secs(1));
        empty.insert(key(1), rejected(), t(0));
        assert!(empty.is_empty());
    }
}
