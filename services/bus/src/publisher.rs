//! The batching publisher: events are grouped per subject into frames, flushed on a count, a byte size or a
//! linger time, published with many acks in flight, and the caller is pushed back when the window is full.
//!
//! Guarantees:
//! - order per subject: frames of one subject are handed to the connection in the order they were closed, and
//!   a frame is closed under the same lock that appends to it;
//! - nothing is dropped silently: each event's [`Receipt`] resolves to its log position or to the error of
//!   its frame, and [`Publisher::flush`] reports every frame that failed since the previous flush;
//! - bounded memory: at most `max_pending_events` events are buffered or awaiting an ack; `publish` waits for
//!   room beyond that (backpressure);
//! - a frame published twice is stored once: its `Nats-Msg-Id` is derived from every event id it carries, in
//!   order (see [`FrameKey`]), so a resend is deduplicated while a frame that merely starts with an event
//!   already stored (a retried event batched with new ones) is stored, not dropped with the new events.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use events::frame::{FrameSealer, RawFrame, encode_event_into};
use events::{CodecConfig, EventId, EventRecord, FrameBuilder, Partitions};
use futures_util::FutureExt;
use futures_util::future::Shared;
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, Semaphore, mpsc, oneshot};

/// How frames are formed and how much may be in flight.
#[derive(Debug, Clone, Copy)]
pub struct PublisherConfig {
    /// Close a frame at this many events.
    pub max_events: u32,
    /// Close a frame before its encoded (uncompressed) size passes this many bytes.
    pub max_bytes: usize,
    /// Close a frame this long after its first event, however small.
    pub linger: Duration,
    /// Events buffered or awaiting their ack before `publish` waits.
    pub max_pending_events: usize,
    pub partitions: Partitions,
    pub codec: CodecConfig,
}

impl Default for PublisherConfig {
    fn default() -> Self {
        Self {
            max_events: 50,
            max_bytes: 256 * 1024,
            linger: Duration::from_millis(5),
            // 64 frames of 50 in flight, as the brief's benchmark.
            max_pending_events: 64 * 50,
            partitions: Partitions::DEFAULT,
            codec: CodecConfig::default(),
        }
    }
}

/// Where an event landed in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub stream: String,
    /// Stream sequence of the frame that carries the event.
    pub sequence: u64,
    /// The event's index inside its frame.
    pub index: u32,
    /// The server had already stored this frame (same `Nats-Msg-Id` within the duplicate window).
    pub duplicate: bool,
}

/// Why events were not published.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    #[error("no stream takes subject {subject}; provision the streams first")]
    NoStream { subject: String },
    #[error(
        "no ack for a frame on {subject} in time; it may or may not be stored (a resend is deduplicated)"
    )]
    TimedOut { subject: String },
    #[error("frame on {subject} is larger than the server accepts: {reason}")]
    TooLarge { subject: String, reason: String },
    #[error("frame on {subject} was refused: {reason}")]
    Rejected { subject: String, reason: String },
    #[error("event could not be encoded: {0}")]
    Encode(String),
    #[error("the publisher shut down before the frame was acknowledged")]
    Closed,
    #[error("{frames} frames ({events} events) failed since the last flush; first: {first}")]
    Failed {
        frames: usize,
        events: usize,
        first: Box<PublishError>,
    },
}

impl PublishError {
    /// Publishing the same event again cannot succeed: it does not fit in a frame or cannot be encoded.
    /// Anything else may pass: a timeout, a missing stream, a closed publisher, and a refusal by the server
    /// (which also covers its passing troubles, such as JetStream being unavailable for a moment).
    pub fn is_permanent(&self) -> bool {
        match self {
            PublishError::TooLarge { .. } | PublishError::Encode(_) => true,
            PublishError::Failed { first, .. } => first.is_permanent(),
            PublishError::Rejected { .. }
            | PublishError::NoStream { .. }
            | PublishError::TimedOut { .. }
            | PublishError::Closed => false,
        }
    }

    fn from_nats(subject: &str, e: &jetstream::context::PublishError) -> Self {
        use jetstream::context::PublishErrorKind as K;
        let subject = subject.to_owned();
        match e.kind() {
            K::StreamNotFound => PublishError::NoStream { subject },
            K::TimedOut => PublishError::TimedOut { subject },
            K::MaxPayloadExceeded => PublishError::TooLarge {
                subject,
                reason: e.to_string(),
            },
            _ => PublishError::Rejected {
                subject,
                reason: e.to_string(),
            },
        }
    }
}

type FrameOutcome = Result<(String, u64, bool), PublishError>;
type SharedOutcome = Shared<oneshot::Receiver<FrameOutcome>>;

/// Resolves to the event's [`Position`] once its frame is acknowledged, or to the frame's error.
/// Dropping it is allowed: the outcome is still counted and reported by [`Publisher::flush`].
#[must_use = "a receipt tells whether the event was stored"]
#[derive(Debug)]
pub struct Receipt {
    frame: SharedOutcome,
    index: u32,
}

impl Future for Receipt {
    type Output = Result<Position, PublishError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let index = self.index;
        self.frame.poll_unpin(cx).map(|outcome| match outcome {
            Ok(Ok((stream, sequence, duplicate))) => Ok(Position {
                stream,
                sequence,
                index,
                duplicate,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(PublishError::Closed),
        })
    }
}

/// The de-duplication key of a frame, built as its events are appended.
///
/// A frame of one event is keyed by that event's id. A frame of several is keyed by its first event's id, its
/// event count and a digest of every event id in order: `<first>.<count>.<32 hex digits>`. Keying a frame by its
/// first event alone would make the server drop, as a "duplicate", a frame that only begins with an event it
/// already stored (a caller retrying that event after a timeout, batched with events never sent before), and
/// with it the new events, while their receipts reported success.
#[derive(Clone, Debug)]
pub struct FrameKey {
    first: EventId,
    count: u32,
    digest: Sha256,
}

impl FrameKey {
    pub fn new(first: EventId) -> FrameKey {
        let mut key = FrameKey {
            first,
            count: 0,
            digest: Sha256::new(),
        };
        key.push(first);
        key
    }

    /// The key of a frame whose events have these ids, in order.
    pub fn of(first: EventId, rest: impl IntoIterator<Item = EventId>) -> FrameKey {
        let mut key = FrameKey::new(first);
        for id in rest {
            key.push(id);
        }
        key
    }

    /// Adds the next event of the frame (the first is added by [`FrameKey::new`]).
    pub fn push(&mut self, event: EventId) {
        self.count += 1;
        self.digest.update(event.as_uuid().as_bytes());
    }

    /// The frame's `Nats-Msg-Id`.
    pub fn message_id(&self) -> String {
        if self.count <= 1 {
            return self.first.to_string();
        }
        let digest = self.digest.clone().finalize();
        let mut id = format!("{}.{}.", self.first, self.count);
        for byte in &digest[..16] {
            use std::fmt::Write;
            let _ = write!(id, "{byte:02x}");
        }
        id
    }
}

/// A frame being filled for one subject.
struct OpenFrame {
    builder: FrameBuilder,
    opened: Instant,
    key: FrameKey,
    tx: oneshot::Sender<FrameOutcome>,
    outcome: SharedOutcome,
}

/// A frame handed to the sender task.
struct ClosedFrame {
    subject: String,
    raw: RawFrame,
    key: FrameKey,
    tx: oneshot::Sender<FrameOutcome>,
}

/// State shared with the tasks that await acks.
struct Tracker {
    window: Semaphore,
    /// Events handed to `publish` and not yet resolved.
    pending: AtomicUsize,
    settled: Notify,
    failures: Mutex<Failures>,
    /// [`Publisher::abandon`] was called: nothing more is sent.
    abandoned: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct Failures {
    frames: usize,
    events: usize,
    first: Option<PublishError>,
}

impl Tracker {
    /// Resolves a frame that will not be sent (the publisher was abandoned) as [`PublishError::Closed`].
    fn refuse_closed(&self, events: usize, tx: oneshot::Sender<FrameOutcome>) {
        let outcome = Err(PublishError::Closed);
        self.resolve(events, &outcome);
        let _ = tx.send(outcome);
    }

    fn resolve(&self, events: usize, outcome: &FrameOutcome) {
        if let Err(e) = outcome {
            let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
            failures.frames += 1;
            failures.events += events;
            failures.first.get_or_insert_with(|| e.clone());
        }
        self.window.add_permits(events);
        if self.pending.fetch_sub(events, Ordering::AcqRel) == events {
            self.settled.notify_waiters();
        }
    }
}

struct Inner {
    config: PublisherConfig,
    open: Mutex<HashMap<String, OpenFrame>>,
    frames_tx: mpsc::UnboundedSender<ClosedFrame>,
    tracker: Arc<Tracker>,
}

impl Inner {
    fn close(&self, subject: String, frame: OpenFrame) {
        let closed = ClosedFrame {
            subject,
            raw: { frame.builder }.finish(),
            key: frame.key,
            tx: frame.tx,
        };
        // The sender lives as long as any frame can be sent; if it is gone, the receipts see `Closed`.
        let _ = self.frames_tx.send(closed);
    }

    fn close_all(&self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        for (subject, frame) in open.drain() {
            self.close(subject, frame);
        }
    }

    fn close_lingering(&self, now: Instant) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let due: Vec<String> = open
            .iter()
            .filter(|(_, f)| now.duration_since(f.opened) >= self.config.linger)
            .map(|(s, _)| s.clone())
            .collect();
        for subject in due {
            if let Some(frame) = open.remove(&subject) {
                self.close(subject, frame);
            }
        }
    }
}

impl Drop for Inner {
    /// Frames still open when the last handle goes are sent, not dropped (unless abandoned).
    fn drop(&mut self) {
        if !self.tracker.abandoned.load(Ordering::Acquire) {
            self.close_all();
        }
    }
}

/// The batching publisher. Cheap to clone; all clones share the frames and the window.
#[derive(Clone)]
pub struct Publisher {
    shared: Arc<Inner>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("config", &self.shared.config)
            .field("pending", &self.pending())
            .finish()
    }
}

impl Publisher {
    /// Starts the publisher's background tasks on the current runtime.
    pub fn new(js: jetstream::Context, config: PublisherConfig) -> Result<Publisher, PublishError> {
        let sealer =
            FrameSealer::new(config.codec).map_err(|e| PublishError::Encode(e.to_string()))?;
        let (frames_tx, frames_rx) = mpsc::unbounded_channel();
        let tracker = Arc::new(Tracker {
            window: Semaphore::new(config.max_pending_events.max(1)),
            pending: AtomicUsize::new(0),
            settled: Notify::new(),
            failures: Mutex::new(Failures::default()),
            abandoned: std::sync::atomic::AtomicBool::new(false),
        });
        let shared = Arc::new(Inner {
            config,
            open: Mutex::new(HashMap::new()),
            frames_tx,
            tracker: tracker.clone(),
        });
        tokio::spawn(send_frames(js, sealer, frames_rx, tracker));
        tokio::spawn(close_lingering_frames(
            Arc::downgrade(&shared),
            config.linger,
        ));
        Ok(Publisher { shared })
    }

    pub fn config(&self) -> &PublisherConfig {
        &self.shared.config
    }

    /// Sends nothing more: the open frames are dropped and the frames closed but not yet sent are not sent
    /// (their receipts and the next flush see [`PublishError::Closed`]); frames already sent may still be
    /// stored. For a process that must not publish any more (an allocator fenced out by a successor).
    pub fn abandon(&self) {
        let tracker = &self.shared.tracker;
        tracker.abandoned.store(true, Ordering::Release);
        let mut open = self.shared.open.lock().unwrap_or_else(|p| p.into_inner());
        for (_, frame) in open.drain() {
            tracker.refuse_closed(frame.builder.len() as usize, frame.tx);
        }
    }

    /// Events accepted and not yet acknowledged or failed.
    pub fn pending(&self) -> usize {
        self.shared.tracker.pending.load(Ordering::Acquire)
    }

    /// Adds an event to its subject's frame, waiting first while the window is full.
    /// The returned receipt resolves when the frame is acknowledged.
    pub async fn publish(&self, record: &EventRecord) -> Result<Receipt, PublishError> {
        thread_local! {
            /// The event's encoding, reused: publishing allocates nothing per event once warm.
            static ELEMENT: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let subject = record.subject(self.shared.config.partitions);
        let tracker = &self.shared.tracker;
        if tracker.abandoned.load(Ordering::Acquire) {
            return Err(PublishError::Closed);
        }
        tracker
            .window
            .acquire()
            .await
            .map_err(|_| PublishError::Closed)?
            .forget();
        tracker.pending.fetch_add(1, Ordering::AcqRel);
        // Encoded and appended without an await in between, so the thread-local buffer is never held across one.
        let appended = ELEMENT.with(|buf| {
            let mut buf = buf.borrow_mut();
            buf.clear();
            encode_event_into(record, &mut buf).map_err(|e| PublishError::Encode(e.to_string()))?;
            self.append(subject.as_str(), record.envelope.event_id, &buf)
        });
        match appended {
            Ok(receipt) => Ok(receipt),
            Err(e) => {
                tracker.window.add_permits(1);
                if tracker.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
                    tracker.settled.notify_waiters();
                }
                Err(e)
            }
        }
    }

    fn append(
        &self,
        subject: &str,
        event_id: EventId,
        element: &[u8],
    ) -> Result<Receipt, PublishError> {
        let shared = &*self.shared;
        let config = &shared.config;
        let mut open = shared.open.lock().unwrap_or_else(|p| p.into_inner());
        // Close the subject's frame first if this event would push it past the byte limit.
        if let Some(frame) = open.get(subject)
            && frame.builder.encoded_len() + element.len() > config.max_bytes
            && let Some(frame) = open.remove(subject)
        {
            shared.close(subject.to_owned(), frame);
        }
        // Look up before inserting: the subject is copied only when its frame opens, not per event.
        let opens = !open.contains_key(subject);
        if opens {
            let (tx, rx) = oneshot::channel();
            open.insert(
                subject.to_owned(),
                OpenFrame {
                    builder: FrameBuilder::new(config.codec),
                    opened: Instant::now(),
                    key: FrameKey::new(event_id),
                    tx,
                    outcome: rx.shared(),
                },
            );
        }
        let Some(frame) = open.get_mut(subject) else {
            return Err(PublishError::Closed);
        };
        let index = frame.builder.len();
        let pushed = frame.builder.push_encoded(element);
        if let Err(e) = pushed {
            // A frame this event opened holds nothing: drop it rather than send it empty.
            if opens {
                open.remove(subject);
            }
            return Err(PublishError::Encode(e.to_string()));
        }
        if !opens {
            frame.key.push(event_id);
        }
        let receipt = Receipt {
            frame: frame.outcome.clone(),
            index,
        };
        if frame.builder.len() >= config.max_events
            && let Some(frame) = open.remove(subject)
        {
            shared.close(subject.to_owned(), frame);
        }
        Ok(receipt)
    }

    /// Sends every open frame now and waits until every accepted event is acknowledged or failed.
    /// Returns an error summarising every frame that failed since the previous flush.
    pub async fn flush(&self) -> Result<(), PublishError> {
        self.shared.close_all();
        let tracker = &self.shared.tracker;
        loop {
            let settled = tracker.settled.notified();
            if tracker.pending.load(Ordering::Acquire) == 0 {
                break;
            }
            settled.await;
        }
        let mut failures = tracker.failures.lock().unwrap_or_else(|p| p.into_inner());
        let failed = std::mem::take(&mut *failures);
        match failed.first {
            None => Ok(()),
            Some(first) => Err(PublishError::Failed {
                frames: failed.frames,
                events: failed.events,
                first: Box::new(first),
            }),
        }
    }
}

/// Closes frames that have waited `linger`. Stops when the publisher is gone.
async fn close_lingering_frames(shared: Weak<Inner>, linger: Duration) {
    let tick = (linger / 2).max(Duration::from_micros(500));
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        match shared.upgrade() {
            Some(shared) => shared.close_lingering(Instant::now()),
            None => return,
        }
    }
}

/// Compression above this size runs on the blocking pool, so a large frame does not stall the runtime.
const BLOCKING_SEAL_BYTES: usize = 64 * 1024;

/// Seals and publishes closed frames in order, and resolves them as their acks come back.
async fn send_frames(
    js: jetstream::Context,
    mut sealer: FrameSealer,
    mut frames: mpsc::UnboundedReceiver<ClosedFrame>,
    tracker: Arc<Tracker>,
) {
    while let Some(frame) = frames.recv().await {
        let events = frame.raw.event_count as usize;
        if tracker.abandoned.load(Ordering::Acquire) {
            tracker.refuse_closed(events, frame.tx);
            continue;
        }
        let codec = *sealer.config();
        let sealed = if frame.raw.body.len() > BLOCKING_SEAL_BYTES {
            let raw = frame.raw;
            tokio::task::spawn_blocking(move || FrameSealer::new(codec)?.seal(raw))
                .await
                .unwrap_or_else(|e| {
                    Err(events::EncodeError::Serialize {
                        kind: "frame",
                        reason: e.to_string(),
                    })
                })
        } else {
            sealer.seal(frame.raw)
        };
        let sealed = match sealed {
            Ok(sealed) => sealed,
            Err(e) => {
                let outcome = Err(PublishError::Encode(e.to_string()));
                tracker.resolve(events, &outcome);
                let _ = frame.tx.send(outcome);
                continue;
            }
        };
        // Abandoned while this frame was sealed.
        if tracker.abandoned.load(Ordering::Acquire) {
            tracker.refuse_closed(events, frame.tx);
            continue;
        }
        let mut headers = async_nats::HeaderMap::new();
        for (name, value) in sealed.headers.pairs() {
            headers.insert(name, value.as_str());
        }
        let publish = PublishMessage::build()
            .payload(Bytes::from(sealed.body))
            .headers(headers)
            .message_id(frame.key.message_id());
        let subject = frame.subject;
        let tx = frame.tx;
        match js.send_publish(subject.clone(), publish).await {
            Ok(ack) => {
                let tracker = tracker.clone();
                // Awaiting the ack elsewhere keeps many frames in flight.
                tokio::spawn(async move {
                    let outcome = ack
                        .await
                        .map(|a| (a.stream, a.sequence, a.duplicate))
                        .map_err(|e| PublishError::from_nats(&subject, &e));
                    if let Err(e) = &outcome {
                        tracing::warn!(%subject, error = %e, "frame publish failed");
                    }
                    tracker.resolve(events, &outcome);
                    let _ = tx.send(outcome);
                });
            }
            Err(e) => {
                let outcome = Err(PublishError::from_nats(&subject, &e));
                tracing::warn!(%subject, error = %e, "frame publish failed");
                tracker.resolve(events, &outcome);
                let _ = tx.send(outcome);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ids: &[u128]) -> String {
        FrameKey::of(
            EventId::from_u128(ids[0]),
            ids[1..].iter().map(|&id| EventId::from_u128(id)),
        )
        .message_id()
    }

    #[test]
    fn a_frame_of_one_event_is_keyed_by_its_id() {
        assert_eq!(key(&[7]), EventId::from_u128(7).to_string());
    }

    #[test]
    fn a_frame_key_covers_every_event_in_order() {
        assert_eq!(key(&[1, 2, 3]), key(&[1, 2, 3]));
        let first = EventId::from_u128(1).to_string();
        assert!(key(&[1, 2, 3]).starts_with(&format!("{first}.3.")));
        for other in [&[1, 2][..], &[1, 2, 4], &[1, 3, 2], &[1, 2, 3, 4], &[1]] {
            assert_ne!(key(&[1, 2, 3]), key(other), "{other:?}");
        }
    }
}
