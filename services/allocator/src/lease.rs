//! One active allocator at a time: a lease in the NATS KV bucket `cocoon-allocator`, key `lease`.
//!
//! - The value names the holder, its epoch and when the lease expires (wall clock, milliseconds). Every
//!   write is a compare-and-set on the key's revision, so two contenders can never both win.
//! - A new holder's epoch is one more than the previous holder's (and than any epoch found in the log), and
//!   every allocation carries it: a worker ignores allocations older than the newest epoch it saw.
//! - The holder renews every `ttl / 3`. It counts itself active only until `renewed_at + ttl - margin`
//!   measured on its own monotonic clock from *before* the renewal it sent, so it stops allocating before
//!   any standby can take over. A standby takes over only after the expiry written in the value has passed.
//!   Hosts' wall clocks must agree to well within `margin` (NTP).
//!
//! The active allocator also writes its pool policy under key `policy`, so that anything listing workers
//! can say when unattested workers are admitted.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, kv};
use serde::{Deserialize, Serialize};

pub const BUCKET: &str = "cocoon-allocator";
pub const LEASE_KEY: &str = "lease";
pub const POLICY_KEY: &str = "policy";

/// What the lease key holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseValue {
    pub holder: String,
    pub epoch: u64,
    /// Unix milliseconds.
    pub expires_at_ms: u64,
}

/// The pool policy the active allocator applies, for display.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyValue {
    pub holder: String,
    pub epoch: u64,
    /// Development only: unattested workers are admitted.
    pub allow_unattested: bool,
    pub max_attempts: u32,
    pub heartbeat_timeout_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("cannot open the KV bucket {BUCKET}: {0}")]
    Bucket(String),
    #[error("lease store: {0}")]
    Store(String),
}

/// Where this instance stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Holds the lease with `epoch` until the instant (own monotonic clock, margin already taken off).
    Active {
        epoch: u64,
        until: Instant,
    },
    Standby,
}

impl Standing {
    pub fn active_epoch(&self, now: Instant) -> Option<u64> {
        match *self {
            Standing::Active { epoch, until } if now < until => Some(epoch),
            _ => None,
        }
    }
}

/// Opens (or creates) the bucket.
pub async fn bucket(js: &jetstream::Context, replicas: usize) -> Result<kv::Store, LeaseError> {
    match js.get_key_value(BUCKET).await {
        Ok(store) => Ok(store),
        Err(_) => js
            .create_key_value(kv::Config {
                bucket: BUCKET.to_owned(),
                description: "allocator lease and pool policy".to_owned(),
                history: 1,
                num_replicas: replicas.max(1),
                ..Default::default()
            })
            .await
            .map_err(|e| LeaseError::Bucket(e.to_string())),
    }
}

/// Reads the pool policy the active allocator published, if any.
pub async fn read_policy(js: &jetstream::Context) -> Result<Option<PolicyValue>, LeaseError> {
    let Ok(store) = js.get_key_value(BUCKET).await else {
        return Ok(None);
    };
    let entry = store
        .get(POLICY_KEY)
        .await
        .map_err(|e| LeaseError::Store(e.to_string()))?;
    Ok(entry.and_then(|bytes| serde_json::from_slice(&bytes).ok()))
}

/// Reads the lease as it stands, if any.
pub async fn read_lease(store: &kv::Store) -> Result<Option<LeaseValue>, LeaseError> {
    let entry = store
        .get(LEASE_KEY)
        .await
        .map_err(|e| LeaseError::Store(e.to_string()))?;
    Ok(entry.and_then(|bytes| serde_json::from_slice(&bytes).ok()))
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Takes, keeps and loses the lease for one instance.
#[derive(Debug)]
pub struct Lease {
    store: kv::Store,
    holder: String,
    ttl: Duration,
    margin: Duration,
    /// Revision of our last successful write while we hold it.
    revision: Option<u64>,
    epoch: u64,
}

impl Lease {
    pub fn new(store: kv::Store, holder: impl Into<String>, ttl: Duration) -> Self {
        Self {
            store,
            holder: holder.into(),
            ttl,
            margin: ttl / 4,
            revision: None,
            epoch: 0,
        }
    }

    pub fn renew_interval(&self) -> Duration {
        (self.ttl / 3).max(Duration::from_millis(10))
    }

    fn value(&self, epoch: u64) -> bytes::Bytes {
        let value = LeaseValue {
            holder: self.holder.clone(),
            epoch,
            expires_at_ms: unix_ms() + u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX),
        };
        serde_json::to_vec(&value)
            .expect("lease value serializes")
            .into()
    }

    /// One step: renew if we hold it, take it if it is free or expired. `min_epoch` is the highest epoch
    /// found in the log, so a wiped bucket cannot hand out an old epoch again.
    pub async fn step(&mut self, min_epoch: u64) -> Result<Standing, LeaseError> {
        let sent = Instant::now();
        if self.revision.is_some() && min_epoch > self.epoch {
            // The log holds an epoch above ours (the bucket was wiped, or it was read late): move
            // above it, under the same compare-and-set, so this holder's decisions are fenced correctly.
            tracing::warn!(
                epoch = self.epoch,
                seen = min_epoch,
                "raising the lease epoch above the log's"
            );
            self.epoch = min_epoch + 1;
        }
        if let Some(revision) = self.revision {
            match self
                .store
                .update(LEASE_KEY, self.value(self.epoch), revision)
                .await
            {
                Ok(revision) => {
                    self.revision = Some(revision);
                    return Ok(self.active(sent));
                }
                Err(e) => {
                    tracing::warn!(error = %e, epoch = self.epoch, "lost the allocator lease");
                    self.revision = None;
                }
            }
        }
        let entry = self
            .store
            .entry(LEASE_KEY)
            .await
            .map_err(|e| LeaseError::Store(e.to_string()))?;
        let current = entry.as_ref().and_then(|e| {
            (e.operation == kv::Operation::Put)
                .then(|| serde_json::from_slice::<LeaseValue>(&e.value).ok())
                .flatten()
        });
        let epoch = current.as_ref().map_or(0, |c| c.epoch).max(min_epoch) + 1;
        let outcome = match (&entry, &current) {
            (None, _) => self.store.create(LEASE_KEY, self.value(epoch)).await.ok(),
            (Some(e), Some(c)) if c.expires_at_ms < unix_ms() => self
                .store
                .update(LEASE_KEY, self.value(epoch), e.revision)
                .await
                .ok(),
            // Deleted or unreadable: take it over by revision as well.
            (Some(e), None) => self
                .store
                .update(LEASE_KEY, self.value(epoch), e.revision)
                .await
                .ok(),
            _ => None,
        };
        match outcome {
            Some(revision) => {
                self.revision = Some(revision);
                self.epoch = epoch;
                tracing::info!(epoch, holder = %self.holder, "took the allocator lease");
                Ok(self.active(sent))
            }
            None => Ok(Standing::Standby),
        }
    }

    fn active(&self, sent: Instant) -> Standing {
        Standing::Active {
            epoch: self.epoch,
            until: sent + self.ttl.saturating_sub(self.margin),
        }
    }

    /// Gives the lease up (on shutdown) so a standby need not wait for it to expire.
    pub async fn release(&mut self) {
        if let Some(revision) = self.revision.take() {
            let expired = LeaseValue {
                holder: self.holder.clone(),
                epoch: self.epoch,
                expires_at_ms: 0,
            };
            let bytes = serde_json::to_vec(&expired).expect("lease value serializes");
            let _ = self.store.update(LEASE_KEY, bytes.into(), revision).await;
        }
    }
}
