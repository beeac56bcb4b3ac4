//! The attestor at run time: a durable consumer of ATTESTATIONS; each `AttestationSubmitted` becomes an
//! `AttestationVerified` or `AttestationRejected` (caused by it), published before the frame is acked.
//!
//! Before a quote is verified, the submission itself is checked:
//! - its nonce must be one made by `events::attestations::nonce_at` no longer than `max_nonce_age` ago (and
//!   not in the future by more than a minute), so an old quote cannot be replayed;
//! - its public key must be the key the worker registered (WORKERS is followed for registrations), so a
//!   worker cannot present another worker's quote and key as its own.
//!
//! Then the verdict comes from the cache (by quote hash and binding) or from the verifier on the blocking
//! pool, at most `concurrency` at a time.
//!
//! Time: the verification time is the real time, or the one injected (`verify_at`, for tests and for
//! re-checking old quotes against their collateral). With an injected time, the verdict's valid-until is
//! the validity it had left at that time, counted from the real time the verdict is issued.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bus::{Bus, ConsumerSpec, Follower, FrameConsumer, Publisher, PublisherConfig};
use events::attestations::{AttestationRejected, AttestationSubmitted, nonce_time};
use events::{CodecConfig, Event, EventRecord, ProducerId, Stream, Timestamp, WorkerId};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::binding::Binding;
use crate::cache::{CacheKey, VerdictCache};
use crate::pool::{PoolError, verify_blocking};
use crate::verify::{Verdict, Verifier};

pub const DURABLE: &str = "attestor";

#[derive(Debug, Clone)]
pub struct AttestorConfig {
    /// The producer id of the verdicts.
    pub instance: String,
    /// Verifications at once, at most.
    pub concurrency: usize,
    pub cache_capacity: usize,
    pub cache_ttl_verified: Duration,
    pub cache_ttl_rejected: Duration,
    /// A submission whose nonce is older than this is refused.
    pub max_nonce_age: Duration,
    /// Verify at this time instead of now (tests, re-checking old quotes).
    pub verify_at: Option<SystemTime>,
    /// DEVELOPMENT AND TESTS ONLY: quotes carrying exactly one of these report data are accepted without
    /// the key binding (sample quotes bind no key of ours). Empty in production.
    pub dev_accept_report_data: Vec<[u8; 64]>,
    /// How long a submission waits for its worker's registration to be read.
    pub registration_wait: Duration,
    pub batch_frames: usize,
    pub fetch_wait: Duration,
}

impl Default for AttestorConfig {
    fn default() -> Self {
        Self {
            instance: "attestor-1".into(),
            concurrency: std::thread::available_parallelism().map_or(2, |n| n.get()),
            cache_capacity: 10_000,
            cache_ttl_verified: Duration::from_secs(3_600),
            cache_ttl_rejected: Duration::from_secs(300),
            max_nonce_age: Duration::from_secs(600),
            verify_at: None,
            dev_accept_report_data: Vec::new(),
            registration_wait: Duration::from_secs(10),
            batch_frames: 64,
            fetch_wait: Duration::from_millis(500),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AttestorError {
    #[error("instance name {0:?} is not a valid producer id")]
    Instance(String),
    #[error(transparent)]
    Consume(#[from] bus::ConsumeError),
    #[error(transparent)]
    Publish(#[from] bus::PublishError),
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttestorReport {
    pub verified: u64,
    pub rejected: u64,
    pub cache_hits: u64,
}

/// Registered public keys by worker, from WORKERS.
type Keys = Arc<Mutex<HashMap<WorkerId, Vec<u8>>>>;

/// Runs until `cancel`; the batch in flight is finished first.
pub async fn run(
    bus: Bus,
    verifier: Arc<Verifier>,
    config: AttestorConfig,
    cancel: CancellationToken,
) -> Result<AttestorReport, AttestorError> {
    let producer = ProducerId::new(config.instance.clone())
        .map_err(|_| AttestorError::Instance(config.instance.clone()))?;
    let publisher = Publisher::new(bus.jetstream.clone(), PublisherConfig::default())?;
    let spec = ConsumerSpec::new(Stream::Attestations, DURABLE);
    let consumer = FrameConsumer::bind(&bus.jetstream, &spec).await?;
    let keys: Keys = Arc::default();
    let follower = Follower::open(&bus.jetstream, Stream::Workers, Vec::new(), 1).await?;
    let stop_keys = CancellationToken::new();
    let _stop_keys_on_drop = stop_keys.clone().drop_guard();
    tokio::spawn(follow_keys(follower, keys.clone(), stop_keys.clone()));

    let semaphore = Semaphore::new(config.concurrency.max(1));
    let cache = Mutex::new(VerdictCache::new(
        config.cache_capacity,
        config.cache_ttl_verified,
        config.cache_ttl_rejected,
    ));
    let codec = CodecConfig::default();
    let mut report = AttestorReport::default();
    let ctx = Ctx {
        verifier,
        config: &config,
        semaphore: &semaphore,
        cache: &cache,
        keys: &keys,
    };

    while !cancel.is_cancelled() {
        let batch = tokio::select! {
            () = cancel.cancelled() => break,
            batch = consumer.fetch(config.batch_frames, config.fetch_wait) => batch?,
        };
        if batch.is_empty() {
            continue;
        }
        let mut submissions = Vec::new();
        for frame in &batch.frames {
            match frame.decode(&codec) {
                Ok(records) => {
                    submissions.extend(records.into_iter().filter_map(|r| match r.event {
                        Event::AttestationSubmitted(s) => Some((r.envelope, s)),
                        _ => None,
                    }))
                }
                // The projector dead-letters it with the reason; here it only must not stall the stream.
                Err(e) => {
                    tracing::warn!(seq = frame.stream_sequence, error = %e, "skipping an undecodable frame");
                    metrics::counter!("cocoon_attestor_undecodable_frames_total").increment(1);
                }
            }
        }
        let verdicts =
            futures_util::future::join_all(submissions.iter().map(|(_, s)| ctx.decide(s))).await;
        let mut receipts = Vec::with_capacity(verdicts.len());
        for ((cause, submission), decided) in submissions.iter().zip(verdicts) {
            let (event, hit) = match decided {
                Ok(decided) => decided,
                // Shutting down: nothing acked, the batch comes again.
                Err(PoolError::Closed) => return Ok(report),
                Err(PoolError::Panicked(why)) => (
                    rejection(
                        submission,
                        format!("internal verifier failure (not a finding about the quote): {why}"),
                    ),
                    false,
                ),
            };
            match &event {
                Event::AttestationVerified(_) => report.verified += 1,
                _ => report.rejected += 1,
            }
            report.cache_hits += u64::from(hit);
            let kind = if matches!(event, Event::AttestationVerified(_)) {
                "verified"
            } else {
                "rejected"
            };
            metrics::counter!("cocoon_attestor_verdicts_total", "verdict" => kind, "cache" => if hit { "hit" } else { "miss" })
                .increment(1);
            let record = EventRecord::caused_by(cause, producer.clone(), event);
            receipts.push(publisher.publish(&record).await?);
        }
        for receipt in receipts {
            receipt.await?;
        }
        batch.ack().await?;
    }
    Ok(report)
}

struct Ctx<'a> {
    verifier: Arc<Verifier>,
    config: &'a AttestorConfig,
    semaphore: &'a Semaphore,
    cache: &'a Mutex<VerdictCache>,
    keys: &'a Keys,
}

impl Ctx<'_> {
    /// The verdict event for one submission, and whether it came from the cache.
    async fn decide(&self, s: &AttestationSubmitted) -> Result<(Event, bool), PoolError> {
        let now = SystemTime::now();
        if let Err(why) = self.check_submission(s, now).await {
            return Ok((rejection(s, why), false));
        }
        let binding = Binding::Sha512 {
            public_key: s.public_key.clone(),
            nonce: s.nonce.clone(),
        };
        let (verdict, hit) = self.verdict(&s.quote, binding, now).await?;
        let (verdict, hit) = match verdict.reason() {
            Some(crate::RejectReason::Binding(e))
                if self.config.dev_accept_report_data.contains(&*e.actual) =>
            {
                tracing::warn!(worker = %s.worker_id, "accepting a quote by its report data: DEVELOPMENT exception");
                self.verdict(&s.quote, Binding::Exact(*e.actual), now)
                    .await?
            }
            _ => (verdict, hit),
        };
        Ok((
            self.shift(verdict, now).into_event(s.worker_id.clone()),
            hit,
        ))
    }

    async fn verdict(
        &self,
        quote: &[u8],
        binding: Binding,
        now: SystemTime,
    ) -> Result<(Verdict, bool), PoolError> {
        // The cache runs on the verification clock, the one its verdicts' valid-until is on.
        let at = self.config.verify_at.unwrap_or(now);
        let key = CacheKey::new(quote, &binding);
        let cached = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key, at);
        if let Some(v) = cached {
            return Ok((v, true));
        }
        let verdict = verify_blocking(
            self.verifier.clone(),
            self.semaphore,
            quote.to_vec(),
            binding,
            at,
        )
        .await?;
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, verdict.clone(), at);
        Ok((verdict, false))
    }

    /// With an injected verification time, the remaining validity at that time, counted from now.
    fn shift(&self, verdict: Verdict, now: SystemTime) -> Verdict {
        let (
            Some(at),
            Verdict::Verified {
                quote_hash,
                tcb_status,
                measurements,
                valid_until,
            },
        ) = (self.config.verify_at, &verdict)
        else {
            return verdict;
        };
        let left = valid_until.as_micros() - Timestamp::from_system_time(at).as_micros();
        Verdict::Verified {
            quote_hash: quote_hash.clone(),
            tcb_status: tcb_status.clone(),
            measurements: measurements.clone(),
            valid_until: Timestamp::from_micros(
                Timestamp::from_system_time(now)
                    .as_micros()
                    .saturating_add(left.max(0)),
            ),
        }
    }

    async fn check_submission(
        &self,
        s: &AttestationSubmitted,
        now: SystemTime,
    ) -> Result<(), String> {
        let made = nonce_time(&s.nonce)
            .ok_or("the nonce is not a timed nonce (32 bytes, Unix milliseconds first)")?;
        let now_ts = Timestamp::from_system_time(now);
        let age_ms = now_ts.as_millis() - made.as_millis();
        if age_ms > i64::try_from(self.config.max_nonce_age.as_millis()).unwrap_or(i64::MAX) {
            return Err(format!(
                "stale submission: its nonce was made {} s ago (at most {} s)",
                age_ms / 1000,
                self.config.max_nonce_age.as_secs()
            ));
        }
        if age_ms < -60_000 {
            return Err(format!("the nonce is {} s in the future", -age_ms / 1000));
        }
        let deadline = tokio::time::Instant::now() + self.config.registration_wait;
        loop {
            let registered = self
                .keys
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&s.worker_id)
                .cloned();
            match registered {
                Some(key) if key == s.public_key => return Ok(()),
                Some(_) => {
                    return Err(
                        "the submitted public key is not the key the worker registered".into(),
                    );
                }
                None if tokio::time::Instant::now() >= deadline => {
                    return Err(format!(
                        "worker {} has not registered (no WorkerRegistered within {} s)",
                        s.worker_id,
                        self.config.registration_wait.as_secs()
                    ));
                }
                None => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}

fn rejection(s: &AttestationSubmitted, reason: String) -> Event {
    AttestationRejected {
        worker_id: s.worker_id.clone(),
        quote_hash: crate::hex::encode(&Sha256::digest(&s.quote)),
        reason,
    }
    .into()
}

async fn follow_keys(mut follower: Follower, keys: Keys, stop: CancellationToken) {
    let codec = CodecConfig::default();
    loop {
        let next = tokio::select! {
            () = stop.cancelled() => return,
            next = follower.next() => next,
        };
        let frame = match next {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "reading WORKERS failed; registrations are no longer followed");
                return;
            }
            None => return,
        };
        let Ok(records) = frame.decode(&codec) else {
            continue;
        };
        let mut keys = keys.lock().unwrap_or_else(|p| p.into_inner());
        for r in records {
            if let Event::WorkerRegistered(w) = r.event {
                keys.insert(w.worker_id, w.public_key);
            }
        }
    }
}
