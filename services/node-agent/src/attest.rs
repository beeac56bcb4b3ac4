//! Attestation: where the worker's TDX quote comes from, and its periodic submission.
//!
//! A quote binds the worker: its report data is SHA-512 over the worker id, its public key and a fresh
//! nonce per submission that starts with the time it was made ([`events::attestations::binding_report_data`]). The agent submits on start and again every `reattest_interval`, so that a new verdict
//! arrives before the previous one expires and the worker stays eligible.
//!
//! - On a TDX guest the quote comes from the Linux configfs-tsm interface
//!   (`/sys/kernel/config/tsm/report`): make a report entry, write the report data to `inblob`, read the quote
//!   from `outblob`, remove the entry.
//! - For development a quote can be read from a file. It carries whatever report data it was made with, so it
//!   does not bind this worker's key: a real attestor rejects it for the binding.
//! - Elsewhere there is no quote: the agent submits nothing and says that the worker stays unattested.

use std::path::{Path, PathBuf};
use std::time::Duration;

use events::attestations::{AttestationSubmitted, binding_report_data, nonce_at};
use events::{EventRecord, ProducerId, Timestamp, WorkerId};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

/// Where configfs-tsm lives on a Linux TDX guest.
pub const CONFIGFS_TSM: &str = "/sys/kernel/config/tsm/report";

/// Where quotes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuoteSource {
    /// A TDX guest's configfs-tsm report directory.
    ConfigfsTsm(PathBuf),
    /// Development: a quote file, submitted as is.
    File(PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    #[error("configfs-tsm at {path}: {what}: {source}")]
    Tsm {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the quote file {path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the quote is empty")]
    Empty,
    #[error("quote generation stopped: {0}")]
    Join(String),
}

impl QuoteSource {
    /// The configfs-tsm interface when this machine is a TDX guest that offers it.
    pub fn detect() -> Option<QuoteSource> {
        Self::detect_at(Path::new(CONFIGFS_TSM))
    }

    fn detect_at(dir: &Path) -> Option<QuoteSource> {
        dir.is_dir()
            .then(|| QuoteSource::ConfigfsTsm(dir.to_path_buf()))
    }

    /// A quote carrying `report_data`, off the async threads.
    pub async fn quote(&self, report_data: [u8; 64]) -> Result<Vec<u8>, AttestError> {
        let source = self.clone();
        tokio::task::spawn_blocking(move || source.quote_blocking(&report_data))
            .await
            .map_err(|e| AttestError::Join(e.to_string()))?
    }

    fn quote_blocking(&self, report_data: &[u8; 64]) -> Result<Vec<u8>, AttestError> {
        let quote = match self {
            QuoteSource::File(path) => std::fs::read(path).map_err(|source| AttestError::File {
                path: path.clone(),
                source,
            })?,
            QuoteSource::ConfigfsTsm(dir) => {
                let entry = dir.join(format!("cocoon-{}-{}", std::process::id(), unique_suffix()));
                let tsm = |what: &'static str| {
                    let path = entry.clone();
                    move |source| AttestError::Tsm { path, what, source }
                };
                std::fs::create_dir(&entry).map_err(tsm("creating the report entry"))?;
                let quote = std::fs::write(entry.join("inblob"), report_data)
                    .map_err(tsm("writing the report data"))
                    .and_then(|()| {
                        std::fs::read(entry.join("outblob")).map_err(tsm("reading the quote"))
                    });
                // The entry is removed whatever happened; a failure to remove it is not the caller's problem.
                if let Err(e) = std::fs::remove_dir(&entry) {
                    tracing::warn!(entry = %entry.display(), error = %e, "could not remove the configfs-tsm entry");
                }
                quote?
            }
        };
        if quote.is_empty() {
            return Err(AttestError::Empty);
        }
        Ok(quote)
    }
}

fn unique_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("{nanos:x}")
}

/// 24 bytes that differ per submission (worker, time, counter); not secret, only unique.
fn nonce_tail(worker: &WorkerId, counter: u64) -> [u8; 24] {
    let mut h = Sha256::new();
    h.update(worker.as_str().as_bytes());
    h.update(unique_suffix().as_bytes());
    h.update(counter.to_le_bytes());
    h.update(std::process::id().to_le_bytes());
    let digest = h.finalize();
    let mut tail = [0u8; 24];
    tail.copy_from_slice(&digest[..24]);
    tail
}

/// The submission for one attestation round: a fresh nonce, the quote for it.
pub async fn submission(
    source: &QuoteSource,
    worker: &WorkerId,
    public_key: &[u8],
    counter: u64,
) -> Result<AttestationSubmitted, AttestError> {
    let nonce = nonce_at(Timestamp::now(), nonce_tail(worker, counter));
    let quote = source
        .quote(binding_report_data(worker.as_str(), public_key, &nonce))
        .await?;
    Ok(AttestationSubmitted {
        worker_id: worker.clone(),
        quote,
        public_key: public_key.to_vec(),
        nonce,
    })
}

/// One worker's periodic attestation.
#[derive(Debug, Clone)]
pub struct Attester {
    pub source: QuoteSource,
    pub worker: WorkerId,
    pub public_key: Vec<u8>,
    pub producer: ProducerId,
    pub publisher: bus::Publisher,
    /// Between submissions.
    pub interval: Duration,
    /// After a failed round or a rejection (at most `interval`).
    pub retry: Duration,
    /// To follow this worker's verdicts: a rejection is answered with a new submission after `retry`
    /// rather than at the next `interval` (a transient rejection, e.g. a nonce gone stale while the
    /// attestor was down, must not keep the worker ineligible for long).
    pub jetstream: Option<async_nats::jetstream::Context>,
}

impl Attester {
    /// Submits now and every `interval` until `stop`; returns how many submissions were stored.
    pub async fn run(self, stop: CancellationToken) -> u64 {
        let mut submitted = 0u64;
        let mut counter = 0u64;
        let mut verdicts = match &self.jetstream {
            Some(js) => self.follow_verdicts(js).await,
            None => None,
        };
        loop {
            counter += 1;
            let wait = match self.round(counter).await {
                Ok(()) => {
                    submitted += 1;
                    tracing::info!(worker = %self.worker, "attestation submitted");
                    self.interval
                }
                Err(e) => {
                    tracing::warn!(worker = %self.worker, error = %e, "attestation round failed; retrying");
                    self.retry.min(self.interval)
                }
            };
            let sleep = tokio::time::sleep(wait);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return submitted,
                    () = &mut sleep => break,
                    rejected = next_rejection(&mut verdicts, &self.worker) => {
                        tracing::warn!(worker = %self.worker, reason = %rejected, "attestation rejected; submitting again soon");
                        sleep.as_mut().reset(tokio::time::Instant::now() + self.retry.min(self.interval));
                    }
                }
            }
        }
    }

    async fn follow_verdicts(&self, js: &async_nats::jetstream::Context) -> Option<bus::Follower> {
        // Only the attestor's verdicts about this worker (`attestations.<p>.attestor.<worker>`): a worker's
        // credentials may read nothing else of ATTESTATIONS.
        let subject = events::Subject::keyed(
            events::Stream::Attestations,
            self.worker.as_str().as_bytes(),
            self.publisher.config().partitions,
            events::Origin::Attestor(&self.worker),
        );
        let from = bus::last_sequence(js, events::Stream::Attestations)
            .await
            .ok()?
            + 1;
        match bus::Follower::open_named(
            js,
            events::Stream::Attestations,
            vec![subject.to_string()],
            from,
            Some(bus::auth::verdicts_consumer(&self.worker)),
        )
        .await
        {
            Ok(follower) => Some(follower),
            Err(e) => {
                tracing::warn!(worker = %self.worker, error = %e, "cannot follow the verdicts; re-attesting on schedule only");
                None
            }
        }
    }

    async fn round(&self, counter: u64) -> Result<(), String> {
        let event = submission(&self.source, &self.worker, &self.public_key, counter)
            .await
            .map_err(|e| e.to_string())?;
        let record = EventRecord::new(self.producer.clone(), event);
        let receipt = self
            .publisher
            .publish(&record)
            .await
            .map_err(|e| e.to_string())?;
        receipt.await.map(|_| ()).map_err(|e| e.to_string())
    }
}

/// The reason of the next rejection of `worker` (waits forever without a follower, or once it ends).
async fn next_rejection(verdicts: &mut Option<bus::Follower>, worker: &WorkerId) -> String {
    let codec = events::CodecConfig::default();
    loop {
        let Some(follower) = verdicts.as_mut() else {
            return std::future::pending().await;
        };
        match follower.next().await {
            Some(Ok(frame)) => {
                for record in frame.decode(&codec).unwrap_or_default() {
                    if let events::Event::AttestationRejected(r) = record.event
                        && r.worker_id == *worker
                    {
                        return r.reason;
                    }
                }
            }
            Some(Err(_)) | None => *verdicts = None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_configfs_tsm_means_no_quote_source() {
        let dir = std::env::temp_dir().join(format!("no-tsm-{}", unique_suffix()));
        assert_eq!(QuoteSource::detect_at(&dir), None);
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(
            QuoteSource::detect_at(&dir),
            Some(QuoteSource::ConfigfsTsm(dir.clone()))
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_file_source_submits_the_file_with_a_fresh_timed_nonce() {
        let path = std::env::temp_dir().join(format!("quote-{}", unique_suffix()));
        std::fs::write(&path, b"a quote").unwrap();
        let source = QuoteSource::File(path.clone());
        let worker = WorkerId::new("w-attest").unwrap();
        let before = Timestamp::now();
        let a = submission(&source, &worker, &[3; 32], 1).await.unwrap();
        let b = submission(&source, &worker, &[3; 32], 2).await.unwrap();
        assert_eq!(a.quote, b"a quote");
        assert_eq!(a.public_key, vec![3; 32]);
        assert_ne!(a.nonce, b.nonce);
        let made = events::attestations::nonce_time(&a.nonce).unwrap();
        assert!(made.as_millis() >= before.as_millis() && made <= Timestamp::now());
        std::fs::remove_file(&path).unwrap();
        let err = submission(&source, &worker, &[3; 32], 3).await.unwrap_err();
        assert!(matches!(err, AttestError::File { .. }), "{err}");
    }

    #[tokio::test]
    async fn configfs_tsm_writes_the_report_data_and_reads_the_quote() {
        // A plain directory standing in for configfs-tsm: the kernel would create `outblob` in the entry;
        // here it is missing, so this checks that the agent writes the report data and fails typed.
        let dir = std::env::temp_dir().join(format!("tsm-{}", unique_suffix()));
        std::fs::create_dir_all(&dir).unwrap();
        let source = QuoteSource::ConfigfsTsm(dir.clone());
        let err = source.quote([7; 64]).await.unwrap_err();
        assert!(
            matches!(
                err,
                AttestError::Tsm {
                    what: "reading the quote",
                    ..
                }
            ),
            "{err}"
        );
        let entry = std::fs::read_dir(&dir)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        assert_eq!(std::fs::read(entry.join("inblob")).unwrap(), vec![7; 64]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
