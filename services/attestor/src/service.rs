//! The attestor at run time: a durable consumer of ATTESTATIONS; each `AttestationSubmitted` becomes an
//! `AttestationVerified` or `AttestationRejected` (caused by it), published before the frame is acked.
//!
//! Before a quote is verified, the submission itself is checked; one that fails is refused without a
//! verdict (logged and counted), since anyone can publish a submission naming any worker:
//! - its nonce must be one made by `events::attestations::nonce_at` no longer than `max_nonce_age` ago (and
//!   not in the future by more than a minute), and newer than the last one accepted from that worker, so
//!   an old quote cannot be replayed over a newer verdict;
//! - its public key must be the key the worker registered (WORKERS is followed for registrations).
//!
//! The quote's report data binds the worker id, the key and the nonce, so a quote cannot be presented for
//! another worker.
//!
//! Then the verdict comes from the cache (by quote hash and binding) or from the verifier on the blocking
//! pool, at most `concurrency` at a time.
//!
//! Time: the verification time is the real time, or the one injected (`verify_at`, for tests and for
//! re-checking old quotes against their collateral). With an injected time, the verdict's valid-until is
//! the validity it had left at that time, counted from the real time the verdict is issued.
//!
//! Collateral from a PCCS (`pccs` set): on a cache miss, before the verifier runs, the quote's FMSPC and PCK
//! CA are read from its (not yet verified) PCK certificate. When the verifier holds no collateral for that
//! FMSPC, or holds one whose window has ended at the verification time, or one fetched longer than
//! `pccs_refresh` ago, it is fetched ([`crate::pccs::PccsClient`]) and added to the verifier; fetches for one
//! FMSPC are serialised, so a batch of quotes from one platform fetches once. Verification itself stays
//! IO-free.
//!
//! A failed fetch is not retried forever, because frames are acked together (AckAll) and an unacked
//! batch would stall the stream behind a PCCS outage or a quote naming an FMSPC the PCCS does not know.
//! Instead: a transient failure (network, timeout, HTTP 5xx) is retried twice with a short backoff; if the
//! platform then still has no usable collateral, the submission is answered `AttestationRejected` with
//! reason kind `no_collateral` and the fetch error, a verdict that is *not* cached, so the worker's next
//! submission (agents re-attest periodically) asks again. For `pccs_retry_after` after a failed fetch the
//! same FMSPC is not fetched again (its submissions are rejected the same way), which bounds the load a
//! down PCCS or a forged FMSPC puts on it. A failed refresh of collateral that is still valid only logs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bus::{Bus, ConsumeError, ConsumerSpec, Follower, FrameConsumer, Publisher, PublisherConfig};
use events::attestations::{AttestationRejected, AttestationSubmitted, nonce_time};
use events::{CodecConfig, Event, EventRecord, ProducerId, Stream, Timestamp, WorkerId};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::binding::Binding;
use crate::cache::{CacheKey, VerdictCache};
use crate::pccs::{PccsClient, PccsError};
use crate::pool::{PoolError, verify_blocking};
use crate::verify::{RejectReason, Verdict, Verifier};

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
    /// Fetch collateral from this PCCS when a quote's platform has none (or none valid); `None`: the
    /// verifier's collateral is all there is (files).
    pub pccs: Option<PccsClient>,
    /// Fetched collateral older than this is fetched again (to pick up TCB recoveries before nextUpdate).
    pub pccs_refresh: Duration,
    /// After a failed fetch, the same FMSPC is not fetched again for this long.
    pub pccs_retry_after: Duration,
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
            pccs: None,
            pccs_refresh: Duration::from_secs(24 * 3_600),
            pccs_retry_after: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AttestorError {
    #[error("instance name {0:?} is not a valid producer id")]
    Instance(String),
    #[error(transparent)]
    Consume(#[from] bus::ConsumeError),
    /// WORKERS can no longer be followed: without the registrations, submissions cannot be checked.
    #[error("following the workers' registrations failed: {0}")]
    Registrations(bus::ConsumeError),
    #[error(transparent)]
    Publish(#[from] bus::PublishError),
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttestorReport {
    pub verified: u64,
    pub rejected: u64,
    pub cache_hits: u64,
    /// Submissions refused before verification (stale or replayed nonce, unregistered worker, another key):
    /// no verdict is published for them.
    pub refused: u64,
    /// Collateral fetched from the PCCS (one per platform and refresh), and fetches that failed.
    pub collateral_fetched: u64,
    pub collateral_fetch_failures: u64,
}

/// Registered public keys by worker, from WORKERS, and how far WORKERS has been read.
type Keys = Arc<Mutex<KeyBook>>;

#[derive(Debug, Default)]
struct KeyBook {
    keys: HashMap<WorkerId, Vec<u8>>,
    /// The stream sequence of the last WORKERS frame applied.
    applied: u64,
}

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
    // Replicas take turns on the durable, each acking the frames it handled.
    let spec = ConsumerSpec::new(Stream::Attestations, DURABLE).shared();
    let consumer = FrameConsumer::bind(&bus.jetstream, &spec).await?;
    let keys: Keys = Arc::default();
    let follower = Follower::open(&bus.jetstream, Stream::Workers, Vec::new(), 1).await?;
    let stop_keys = CancellationToken::new();
    let _stop_keys_on_drop = stop_keys.clone().drop_guard();
    // Without registrations every new key would be refused: the run ends with the follower.
    let mut following = tokio::spawn(follow_keys(follower, keys.clone(), stop_keys.clone()));

    let semaphore = Semaphore::new(config.concurrency.max(1));
    let cache = Mutex::new(VerdictCache::new(
        config.cache_capacity,
        config.cache_ttl_verified,
        config.cache_ttl_rejected,
    ));
    let codec = CodecConfig::default();
    let mut report = AttestorReport::default();
    let fetcher = Fetcher::default();
    let newest_nonce = Mutex::new(HashMap::new());
    let ctx = Ctx {
        newest_nonce: &newest_nonce,
        verifier,
        config: &config,
        semaphore: &semaphore,
        cache: &cache,
        keys: &keys,
        bus: &bus,
        fetcher: &fetcher,
    };

    let mut backoff = Duration::from_millis(100);
    while !cancel.is_cancelled() {
        let fetched = tokio::select! {
            () = cancel.cancelled() => break,
            ended = &mut following => return Err(match ended {
                Ok(Err(e)) => AttestorError::Registrations(e),
                Ok(Ok(())) => AttestorError::Registrations(ConsumeError::NoStream { stream: Stream::Workers.name() }),
                Err(e) => AttestorError::Registrations(ConsumeError::Metadata(format!("the registrations task failed: {e}"))),
            }),
            fetched = consumer.fetch(config.batch_frames, config.fetch_wait) => fetched,
        };
        let batch = match fetched {
            Ok(batch) => {
                backoff = Duration::from_millis(100);
                batch
            }
            Err(e @ ConsumeError::NoStream { .. }) => return Err(e.into()),
            Err(e) => {
                // A restarting nats-server or a lost connection: try again. Frames delivered on the way and
                // never received are not acked (each frame is acked on its own), so the server delivers them
                // again after the ack wait.
                tracing::warn!(error = %e, "fetching submissions failed; retrying");
                metrics::counter!("cocoon_attestor_fetch_failures_total").increment(1);
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = tokio::time::sleep(backoff) => {}
                };
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
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
                    tracing::warn!(stream = Stream::Attestations.name(), seq = frame.stream_sequence, error = %e, "skipping an undecodable frame");
                    metrics::counter!("cocoon_attestor_undecodable_frames_total").increment(1);
                }
            }
        }
        let verdicts =
            futures_util::future::join_all(submissions.iter().map(|(_, s)| ctx.decide(s))).await;
        let mut receipts = Vec::with_capacity(verdicts.len());
        for ((cause, submission), decided) in submissions.iter().zip(verdicts) {
            let (event, hit) = match decided {
                Ok(Decision::Verdict(event, hit)) => (*event, hit),
                // Not a verdict about the worker: anyone can publish a submission naming any worker, and a
                // refusal published as a rejection would end that worker's eligibility.
                Ok(Decision::Refused(why)) => {
                    tracing::warn!(worker = %submission.worker_id, reason = %why, event_id = %cause.event_id, "submission refused");
                    metrics::counter!("cocoon_attestor_submissions_refused_total").increment(1);
                    report.refused += 1;
                    continue;
                }
                // Shutting down: nothing acked, the batch comes again.
                Err(PoolError::Closed) => return Ok(fetcher.report(report)),
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
            tracing::info!(worker = %submission.worker_id, verdict = kind, cache_hit = hit, event_id = %record.envelope.event_id,
                submission_id = %cause.event_id, "attestation verdict");
            receipts.push(publisher.publish(&record).await?);
        }
        for receipt in receipts {
            receipt.await?;
        }
        batch.ack().await?;
    }
    Ok(fetcher.report(report))
}

/// What becomes of one submission.
enum Decision {
    /// Publish this verdict (the flag: it came from the cache).
    Verdict(Box<Event>, bool),
    /// Refused before verification (stale, replayed, unregistered worker, another key): no verdict.
    Refused(String),
}

struct Ctx<'a> {
    /// Newest nonce time accepted per worker (bounded by the number of workers).
    newest_nonce: &'a Mutex<HashMap<WorkerId, Timestamp>>,
    verifier: Arc<Verifier>,
    config: &'a AttestorConfig,
    semaphore: &'a Semaphore,
    cache: &'a Mutex<VerdictCache>,
    keys: &'a Keys,
    bus: &'a Bus,
    fetcher: &'a Fetcher,
}

impl Ctx<'_> {
    /// The verdict event for one submission (and whether it came from the cache), or why the submission is
    /// refused without a verdict.
    async fn decide(&self, s: &AttestationSubmitted) -> Result<Decision, PoolError> {
        let now = SystemTime::now();
        if let Err(why) = self.check_submission(s, now).await {
            return Ok(Decision::Refused(why));
        }
        let binding = Binding::Sha512 {
            worker_id: s.worker_id.to_string(),
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
        Ok(Decision::Verdict(
            Box::new(self.shift(verdict, now).into_event(s.worker_id.clone())),
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
        if let Some(pccs) = &self.config.pccs
            && let Err((fmspc, error)) = self.ensure_collateral(pccs, quote, at).await
        {
            // Not cached: the next submission asks the PCCS again.
            let verdict = Verdict::Rejected {
                quote_hash: crate::hex::encode(&Sha256::digest(quote)),
                reason: RejectReason::NoCollateral {
                    fmspc: crate::hex::encode(&fmspc),
                    fetch_error: Some(error.to_string()),
                },
            };
            return Ok((verdict, false));
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

    /// Makes sure the verifier holds usable collateral for the quote's platform, fetching it from the PCCS
    /// if not (see the module doc). `Err`: the platform has no usable collateral, and why. A quote whose
    /// platform cannot be read is left to the verifier, which rejects it.
    async fn ensure_collateral(
        &self,
        pccs: &PccsClient,
        quote: &[u8],
        at: SystemTime,
    ) -> Result<(), ([u8; 6], PccsError)> {
        // Parsing an unverified certificate: off the async threads, and a panic there (a parser bug) only
        // means "no platform", which the verifier then reports as malformed.
        let bytes = quote.to_vec();
        let Ok(Some((fmspc, ca))) = tokio::task::spawn_blocking(move || platform_of(&bytes)).await
        else {
            return Ok(());
        };
        let at_secs = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let usable = |verifier: &Verifier| {
            verifier
                .collateral(&fmspc)
                .is_some_and(|c| c.check_window(at_secs).is_ok())
        };
        let entry = self.fetcher.entry(fmspc);
        let mut entry = entry.lock().await;
        let now = tokio::time::Instant::now();
        let fresh = entry
            .fetched_at
            .is_none_or(|t| now.duration_since(t) < self.config.pccs_refresh);
        let usable_now = usable(&self.verifier);
        if usable_now && fresh {
            return Ok(());
        }
        if let Some(t) = entry.attempted_at
            && now.duration_since(t) < self.config.pccs_retry_after
        {
            // Asked recently: answer as that attempt left things.
            return match (&entry.error, usable_now) {
                (Some(error), false) => Err((fmspc, error.clone())),
                _ => Ok(()),
            };
        }
        entry.attempted_at = Some(now);
        match fetch_with_retries(pccs, &fmspc, ca).await {
            Ok(collateral) => {
                tracing::info!(
                    fmspc = crate::hex::encode(&fmspc),
                    pccs = pccs.base_url(),
                    "collateral fetched"
                );
                self.verifier.add_collateral(collateral);
                // Verdicts were reached against the old collateral (a revocation may have come with the
                // new one): decide again.
                self.cache.lock().unwrap_or_else(|p| p.into_inner()).clear();
                entry.fetched_at = Some(now);
                entry.error = None;
                self.fetcher.fetched.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("cocoon_attestor_collateral_fetches_total", "result" => "ok")
                    .increment(1);
                Ok(())
            }
            Err(error) => {
                tracing::warn!(fmspc = crate::hex::encode(&fmspc), %error, still_usable = usable_now, "fetching collateral failed");
                entry.error = Some(error.clone());
                self.fetcher.failed.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("cocoon_attestor_collateral_fetches_total", "result" => "error")
                    .increment(1);
                if usable_now {
                    Ok(())
                } else {
                    Err((fmspc, error))
                }
            }
        }
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
        {
            // Each worker's nonces only move forward: a submission replayed (or reordered) within the
            // nonce age cannot bring back an older quote over a newer verdict.
            let mut newest = self.newest_nonce.lock().unwrap_or_else(|p| p.into_inner());
            let last = newest
                .entry(s.worker_id.clone())
                .or_insert(Timestamp::from_micros(i64::MIN));
            if made <= *last {
                return Err(format!(
                    "replayed or out-of-order submission: its nonce is from {made}, not after {last}"
                ));
            }
            *last = made;
        }
        // A worker registers (with a new key on every start) just before it submits, and the registrations
        // are read beside the submissions: a key not (yet) the registered one is refused only once WORKERS
        // has been read up to where it ended when this check began, or after `registration_wait`.
        let deadline = tokio::time::Instant::now() + self.config.registration_wait;
        let mut head: Option<u64> = None;
        loop {
            let (registered, applied) = {
                let book = self.keys.lock().unwrap_or_else(|p| p.into_inner());
                (book.keys.get(&s.worker_id).cloned(), book.applied)
            };
            if registered.as_deref() == Some(s.public_key.as_slice()) {
                return Ok(());
            }
            if head.is_none() {
                match bus::last_sequence(&self.bus.jetstream, Stream::Workers).await {
                    Ok(h) => head = Some(h),
                    Err(e) => {
                        tracing::warn!(error = %e, "reading the head of WORKERS failed; waiting")
                    }
                }
            }
            let read_up = head.is_some_and(|h| applied >= h);
            if read_up || tokio::time::Instant::now() >= deadline {
                return Err(match registered {
                    Some(_) => {
                        "the submitted public key is not the key the worker registered".into()
                    }
                    None => format!(
                        "worker {} has not registered (no WorkerRegistered within {} s)",
                        s.worker_id,
                        self.config.registration_wait.as_secs()
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Collateral fetches, one lock per FMSPC (so one fetch per platform at a time), and their counts.
#[derive(Debug, Default)]
struct Fetcher {
    entries: Mutex<HashMap<[u8; 6], Arc<tokio::sync::Mutex<FetchEntry>>>>,
    fetched: AtomicU64,
    failed: AtomicU64,
}

#[derive(Debug, Default)]
struct FetchEntry {
    /// When the collateral the verifier holds was fetched.
    fetched_at: Option<tokio::time::Instant>,
    /// The last fetch attempt, and its error if it failed.
    attempted_at: Option<tokio::time::Instant>,
    error: Option<PccsError>,
}

impl Fetcher {
    fn entry(&self, fmspc: [u8; 6]) -> Arc<tokio::sync::Mutex<FetchEntry>> {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(fmspc)
            .or_default()
            .clone()
    }

    fn report(&self, mut report: AttestorReport) -> AttestorReport {
        report.collateral_fetched = self.fetched.load(Ordering::Relaxed);
        report.collateral_fetch_failures = self.failed.load(Ordering::Relaxed);
        report
    }
}

/// Three tries at most, 0.5 s then 1 s apart, while the failure is transient.
async fn fetch_with_retries(
    pccs: &PccsClient,
    fmspc: &[u8; 6],
    ca: dcap_qvl::config::PckCa,
) -> Result<crate::Collateral, PccsError> {
    let mut backoff = Duration::from_millis(500);
    let mut tries = 1;
    loop {
        match pccs.fetch(fmspc, ca).await {
            Err(e) if e.is_transient() && tries < 3 => {
                tracing::debug!(error = %e, "fetching collateral failed; trying again");
                tokio::time::sleep(backoff).await;
                backoff *= 2;
                tries += 1;
            }
            result => return result,
        }
    }
}

/// The FMSPC and PCK CA a TDX quote's PCK certificate names; `None` when the quote does not parse or is
/// not TDX (the verifier will say so).
fn platform_of(quote: &[u8]) -> Option<([u8; 6], dcap_qvl::config::PckCa)> {
    let quote = dcap_qvl::quote::Quote::parse(quote).ok()?;
    quote.report.as_td10()?;
    let fmspc = dcap_qvl::intel::quote_fmspc(&quote).ok()?;
    let ca = dcap_qvl::intel::quote_ca(&quote).ok()?;
    Some((fmspc, ca))
}

fn rejection(s: &AttestationSubmitted, reason: String) -> Event {
    AttestationRejected {
        worker_id: s.worker_id.clone(),
        quote_hash: crate::hex::encode(&Sha256::digest(&s.quote)),
        reason,
    }
    .into()
}

/// Follows WORKERS into `keys` until `stop`; an error when it can no longer be read.
async fn follow_keys(
    mut follower: Follower,
    keys: Keys,
    stop: CancellationToken,
) -> Result<(), ConsumeError> {
    let codec = CodecConfig::default();
    loop {
        let next = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            next = follower.next() => next,
        };
        let frame = match next {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => return Err(e),
            None if stop.is_cancelled() => return Ok(()),
            None => {
                return Err(ConsumeError::NoStream {
                    stream: Stream::Workers.name(),
                });
            }
        };
        let records = frame.decode(&codec).unwrap_or_default();
        let mut book = keys.lock().unwrap_or_else(|p| p.into_inner());
        for r in records {
            if let Event::WorkerRegistered(w) = r.event {
                book.keys.insert(w.worker_id, w.public_key);
            }
        }
        book.applied = book.applied.max(frame.stream_sequence);
    }
}
