//! The frame consumer: durable pull consumers that fetch frames in batches and hand the caller each frame with
//! its stream sequence, so the caller commits its work first and acks the last message after (AckAll).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{
    self,
    consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull},
};
use bytes::Bytes;
use events::{CodecConfig, DecodeError, EventRecord, FrameHeaders, Stream, Timestamp};
use futures_util::StreamExt;

use crate::provision::DEFAULT_ACK_WAIT;

/// A durable consumer to create or reuse.
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    pub stream: Stream,
    /// Durable name; from the consuming service's constants, e.g. `projector-tasks-p0`.
    pub durable: String,
    /// Subjects to take; empty means the whole stream.
    pub filter_subjects: Vec<String>,
    /// Where a new consumer starts; an existing one keeps its position.
    pub start: DeliverPolicy,
    pub ack_wait: Duration,
    /// Frames delivered and not yet acked, at most.
    pub max_ack_pending: i64,
    /// Several processes take turns on this durable (replicas of one service): each frame is acked on its
    /// own (AckPolicy::Explicit), so that one process's ack never covers frames another received, and what
    /// a process received and never acked is delivered again after `ack_wait`. Otherwise one process owns
    /// the durable and acks a batch by its last frame (AckPolicy::All).
    pub shared: bool,
}

impl ConsumerSpec {
    pub fn new(stream: Stream, durable: impl Into<String>) -> Self {
        Self {
            stream,
            durable: durable.into(),
            filter_subjects: Vec::new(),
            start: DeliverPolicy::All,
            ack_wait: DEFAULT_ACK_WAIT,
            max_ack_pending: 10_000,
            shared: false,
        }
    }

    /// Replicas of one service take turns on the durable; see [`ConsumerSpec::shared`].
    pub fn shared(mut self) -> Self {
        self.shared = true;
        self
    }

    pub fn filter_subjects(
        mut self,
        subjects: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        self.filter_subjects = subjects.into_iter().map(Into::into).collect();
        self
    }

    /// Start a new consumer after `sequence` (e.g. a database checkpoint).
    pub fn start_after(mut self, sequence: u64) -> Self {
        self.start = if sequence == 0 {
            DeliverPolicy::All
        } else {
            DeliverPolicy::ByStartSequence {
                start_sequence: sequence + 1,
            }
        };
        self
    }

    fn ack_policy(&self) -> AckPolicy {
        if self.shared {
            AckPolicy::Explicit
        } else {
            AckPolicy::All
        }
    }

    fn config(&self) -> pull::Config {
        let (filter_subject, filter_subjects) = filters(&self.filter_subjects);
        pull::Config {
            durable_name: Some(self.durable.clone()),
            filter_subject,
            filter_subjects,
            deliver_policy: self.start,
            // One owner: one ack covers every earlier message (commit a batch, ack its last frame). Shared:
            // each frame acked on its own.
            ack_policy: self.ack_policy(),
            ack_wait: self.ack_wait,
            max_ack_pending: self.max_ack_pending,
            ..Default::default()
        }
    }
}

/// Why consuming failed. Fetch errors are transient (retry with backoff); the caller decides.
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    #[error("stream {stream} is missing; provision the streams first")]
    NoStream { stream: &'static str },
    #[error("consumer {durable} on {stream}: {reason}")]
    Consumer {
        stream: &'static str,
        durable: String,
        reason: String,
    },
    #[error("fetch from {durable} failed: {reason}")]
    Fetch { durable: String, reason: String },
    #[error("ack on {durable} failed: {reason}")]
    Ack { durable: String, reason: String },
    #[error("message without JetStream metadata: {0}")]
    Metadata(String),
    /// The server delivered messages this consumer never received (sent to a pull request whose answer was
    /// lost or given up on, as in a reconnect). Acking past them (AckAll) would ack them unseen: start again
    /// from the caller's own position or the ack floor.
    #[error(
        "delivery gap on {durable}: delivery {got} arrived after {expected_after}; the deliveries between were lost"
    )]
    Gap {
        durable: String,
        expected_after: u64,
        got: u64,
    },
}

/// One frame as delivered: where it sits in the stream, and its bytes. Decode it with [`ReceivedFrame::decode`].
#[derive(Debug, Clone)]
pub struct ReceivedFrame {
    pub stream_sequence: u64,
    pub subject: String,
    /// When the server stored the frame.
    pub stored_at: Timestamp,
    /// Messages still waiting for this consumer after this one.
    pub pending: u64,
    pub headers: Option<async_nats::HeaderMap>,
    pub body: Bytes,
}

impl ReceivedFrame {
    /// The frame's events, or a typed error saying why the bytes are not a frame, or why its events do not
    /// belong on its subject (an event whose origin is not the one its subject names): dead-letter it.
    pub fn decode(&self, codec: &CodecConfig) -> Result<Vec<EventRecord>, DecodeError> {
        let headers: FrameHeaders = crate::frame_headers(self.headers.as_ref())?;
        let records = events::decode_frame(codec, &headers, &self.body)?;
        events::check_origin(&self.subject, &records)?;
        Ok(records)
    }
}

/// Frames fetched together; ack the batch after the work is committed.
#[derive(Debug)]
pub struct FetchedBatch {
    pub frames: Vec<ReceivedFrame>,
    /// The messages to ack: the last one (AckAll), or every one (a shared durable).
    acks: Vec<jetstream::Message>,
    durable: String,
}

impl FetchedBatch {
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Acks the batch and waits for the server's confirmation: its last frame, which acks every frame of it
    /// (AckAll), or each frame on a shared durable.
    pub async fn ack(self) -> Result<(), ConsumeError> {
        let acked = futures_util::future::join_all(self.acks.iter().map(|m| m.double_ack())).await;
        match acked.into_iter().find_map(Result::err) {
            None => Ok(()),
            Some(e) => Err(ConsumeError::Ack {
                durable: self.durable,
                reason: e.to_string(),
            }),
        }
    }
}

async fn stream_of(
    js: &jetstream::Context,
    stream: Stream,
) -> Result<jetstream::stream::Stream, ConsumeError> {
    js.get_stream(stream.name())
        .await
        .map_err(|_| ConsumeError::NoStream {
            stream: stream.name(),
        })
}

/// Removes the durable `name` from `stream` if the server holds it; `Ok(false)` when the server says it is
/// not there, an error when the server cannot say.
pub async fn remove_durable(
    js: &jetstream::Context,
    stream: Stream,
    name: &str,
) -> Result<bool, ConsumeError> {
    let handle = stream_of(js, stream).await?;
    let consumer_error = |reason: String| ConsumeError::Consumer {
        stream: stream.name(),
        durable: name.to_owned(),
        reason,
    };
    match handle.consumer_info(name).await {
        Ok(_) => handle
            .delete_consumer(name)
            .await
            .map(|_| true)
            .map_err(|e| consumer_error(e.to_string())),
        Err(e) if e.kind() == jetstream::context::ConsumerInfoErrorKind::NotFound => Ok(false),
        Err(e) => Err(consumer_error(format!("reading the durable's state: {e}"))),
    }
}

/// The frame a JetStream message carries, with its place in the stream.
fn received_frame(message: &jetstream::Message) -> Result<ReceivedFrame, ConsumeError> {
    let info = message
        .info()
        .map_err(|e| ConsumeError::Metadata(e.to_string()))?;
    Ok(ReceivedFrame {
        stream_sequence: info.stream_sequence,
        subject: message.subject.to_string(),
        stored_at: Timestamp::from_micros(
            i64::try_from(info.published.unix_timestamp_nanos() / 1000).unwrap_or(i64::MAX),
        ),
        pending: info.pending,
        headers: message.headers.clone(),
        body: message.payload.clone(),
    })
}

/// A durable pull consumer of frames.
#[derive(Debug)]
pub struct FrameConsumer {
    consumer: PullConsumer,
    stream: &'static str,
    durable: String,
    /// The consumer's delivery sequence of the last message received (each delivery, redeliveries too, takes
    /// the next). Not checked on a shared durable, whose other processes take deliveries too.
    last_delivery: AtomicU64,
    shared: bool,
}

impl FrameConsumer {
    /// Creates the durable consumer, or binds to it if it exists. An existing durable goes on from where it
    /// is, except that what it delivered and nobody acked is delivered again: a durable of one owner (AckAll)
    /// that an earlier process received frames from and did not ack, or one created with another ack policy
    /// than `spec`'s, is created again after its ack floor. (Otherwise the next batch's ack would cover
    /// frames the dead process never finished.)
    pub async fn bind(js: &jetstream::Context, spec: &ConsumerSpec) -> Result<Self, ConsumeError> {
        let bound = Self::bind_as_is(js, spec).await?;
        let info = bound.consumer.cached_info();
        let unfinished = !spec.shared && info.num_ack_pending > 0;
        if unfinished || info.config.ack_policy != spec.ack_policy() {
            let floor = info.ack_floor.stream_sequence;
            tracing::info!(durable = %spec.durable, after = floor, unacked = info.num_ack_pending,
                "durable created again after its ack floor: it holds deliveries nobody acked, or another ack policy");
            return Self::recreate(js, &spec.clone().start_after(floor)).await;
        }
        Ok(bound)
    }

    /// [`FrameConsumer::bind`] without looking at what the durable holds.
    async fn bind_as_is(
        js: &jetstream::Context,
        spec: &ConsumerSpec,
    ) -> Result<Self, ConsumeError> {
        let stream_name = spec.stream.name();
        let stream = stream_of(js, spec.stream).await?;
        let consumer = stream
            .get_or_create_consumer(&spec.durable, spec.config())
            .await
            .map_err(|e| ConsumeError::Consumer {
                stream: stream_name,
                durable: spec.durable.clone(),
                reason: e.to_string(),
            })?;
        // Deliveries go on from the durable's count: one taken by a pull request of an earlier process, still
        // outstanding, is a gap, as it should be (nobody here saw it).
        let delivered = consumer.cached_info().delivered.consumer_sequence;
        Ok(Self {
            consumer,
            stream: stream_name,
            durable: spec.durable.clone(),
            last_delivery: AtomicU64::new(delivered),
            shared: spec.shared,
        })
    }

    /// Deletes the durable consumer if it exists and creates it anew from `spec`, so that its position is
    /// `spec.start` (e.g. a database checkpoint) rather than its old ack floor.
    pub async fn recreate(
        js: &jetstream::Context,
        spec: &ConsumerSpec,
    ) -> Result<Self, ConsumeError> {
        // Only a durable the server says is not there is absent. Any other failure (a timeout while a cluster
        // elects a leader) is returned: binding to the old durable would go on after frames it counts as
        // delivered, which the caller may never have seen.
        remove_durable(js, spec.stream, &spec.durable).await?;
        Self::bind_as_is(js, spec).await
    }

    pub fn durable(&self) -> &str {
        &self.durable
    }

    /// Makes the durable deliver again everything after its ack floor, and returns the floor.
    ///
    /// After a failed fetch (a restarting nats-server, a lost connection) frames the server counts as
    /// delivered may never have arrived; the next batch's ack (AckAll) would cover them unseen. A caller that
    /// keeps no checkpoint of its own rewinds to what it has acked instead (its work must tolerate seeing a
    /// frame again).
    pub async fn rewind_to_ack_floor(
        &mut self,
        js: &jetstream::Context,
        spec: &ConsumerSpec,
    ) -> Result<u64, ConsumeError> {
        let consumer_error = |reason: String| ConsumeError::Consumer {
            stream: spec.stream.name(),
            durable: spec.durable.clone(),
            reason,
        };
        let info = self
            .consumer
            .info()
            .await
            .map_err(|e| consumer_error(e.to_string()))?;
        let floor = info.ack_floor.stream_sequence;
        let spec = spec.clone().start_after(floor);
        *self = Self::recreate(js, &spec).await?;
        Ok(floor)
    }

    /// [`Self::rewind_to_ack_floor`] after waiting `backoff`, retried (the wait doubling up to 5 s) until it
    /// succeeds or the stream is gone ([`ConsumeError::NoStream`]). `backoff` is left at the next wait; the
    /// caller resets it once fetches succeed again. Cancel it by dropping the future.
    pub async fn rewind_to_ack_floor_retrying(
        &mut self,
        js: &jetstream::Context,
        spec: &ConsumerSpec,
        backoff: &mut Duration,
    ) -> Result<u64, ConsumeError> {
        loop {
            tokio::time::sleep(*backoff).await;
            *backoff = (*backoff * 2).min(Duration::from_secs(5));
            match self.rewind_to_ack_floor(js, spec).await {
                Ok(floor) => {
                    tracing::info!(durable = %spec.durable, after = floor, "consumer rewound to its ack floor");
                    return Ok(floor);
                }
                Err(e @ ConsumeError::NoStream { .. }) => return Err(e),
                Err(e) => {
                    tracing::warn!(durable = %spec.durable, error = %e, "rewinding the consumer failed; retrying")
                }
            }
        }
    }

    /// Frames the server holds for this durable beyond what it has delivered. More than zero while fetches
    /// come back empty means the durable is not being served (in a cluster, its leader was lost).
    pub async fn pending(&mut self) -> Result<u64, ConsumeError> {
        let info = self
            .consumer
            .info()
            .await
            .map_err(|e| ConsumeError::Consumer {
                stream: self.stream,
                durable: self.durable.clone(),
                reason: e.to_string(),
            })?;
        Ok(info.num_pending)
    }

    /// Fetches up to `max_frames`: whatever is available now, or, when nothing is, the first frame to arrive
    /// within `max_wait` plus whatever came with it. Returns an empty batch when nothing arrived.
    ///
    /// A pull that waits for a full batch would hold frames past their ack wait under a slow trickle (and
    /// collect their redeliveries); taking what is there keeps latency low and batches full under backlog.
    pub async fn fetch(
        &self,
        max_frames: usize,
        max_wait: Duration,
    ) -> Result<FetchedBatch, ConsumeError> {
        self.fetch_gathering(max_frames, max_wait, Duration::ZERO)
            .await
    }

    /// As [`FrameConsumer::fetch`], but a batch that has frames and is not full waits up to `gather` for more
    /// (up to `max_frames`): fewer, larger batches while frames keep arriving, at up to `gather` more latency.
    pub async fn fetch_gathering(
        &self,
        max_frames: usize,
        max_wait: Duration,
        gather: Duration,
    ) -> Result<FetchedBatch, ConsumeError> {
        let mut batch = FetchedBatch {
            frames: Vec::with_capacity(max_frames),
            acks: Vec::new(),
            durable: self.durable.clone(),
        };
        self.pull(&mut batch, max_frames, None).await?;
        if batch.frames.is_empty() && !max_wait.is_zero() {
            self.pull(&mut batch, 1, Some(max_wait)).await?;
            if !batch.frames.is_empty() && max_frames > 1 {
                self.pull(&mut batch, max_frames - 1, None).await?;
            }
        }
        let have = batch.frames.len();
        if have > 0 && have < max_frames && !gather.is_zero() {
            self.pull(&mut batch, max_frames - have, Some(gather))
                .await?;
        }
        Ok(batch)
    }

    /// One pull request: `wait` = None returns at once with what is available.
    async fn pull(
        &self,
        batch: &mut FetchedBatch,
        max: usize,
        wait: Option<Duration>,
    ) -> Result<(), ConsumeError> {
        let fetch_err = |e: &dyn std::fmt::Display| ConsumeError::Fetch {
            durable: self.durable.clone(),
            reason: e.to_string(),
        };
        let mut messages = match wait {
            None => self.consumer.fetch().max_messages(max).messages().await,
            Some(wait) => {
                self.consumer
                    .batch()
                    .max_messages(max)
                    .expires(wait)
                    .messages()
                    .await
            }
        }
        .map_err(|e| fetch_err(&e))?;
        while let Some(message) = messages.next().await {
            let message = message.map_err(|e| fetch_err(&e))?;
            let delivery = message
                .info()
                .map_err(|e| ConsumeError::Metadata(e.to_string()))?
                .consumer_sequence;
            let last = self.last_delivery.swap(delivery, Ordering::Relaxed);
            if !self.shared && delivery != last + 1 {
                return Err(ConsumeError::Gap {
                    durable: self.durable.clone(),
                    expected_after: last,
                    got: delivery,
                });
            }
            batch.frames.push(received_frame(&message)?);
            if !self.shared {
                batch.acks.clear();
            }
            batch.acks.push(message);
        }
        Ok(())
    }
}

fn ordered_err(stream: Stream, e: &dyn std::fmt::Display) -> ConsumeError {
    ConsumeError::Consumer {
        stream: stream.name(),
        durable: "(ordered)".into(),
        reason: e.to_string(),
    }
}

/// An ephemeral ordered consumer of `subjects` (all when empty) of `handle`'s stream from sequence `from`.
/// One filter goes in `filter_subject`, several in `filter_subjects`: with one, the create request's subject
/// names it (`$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>`), so NATS permissions can confine a user to
/// consumers of its own subjects.
fn filters(subjects: &[String]) -> (String, Vec<String>) {
    match subjects {
        [one] => (one.clone(), Vec::new()),
        many => (String::new(), many.to_vec()),
    }
}

async fn ordered_consumer(
    handle: &jetstream::stream::Stream,
    stream: Stream,
    subjects: Vec<String>,
    from: u64,
    name: Option<String>,
) -> Result<jetstream::consumer::Consumer<jetstream::consumer::pull::OrderedConfig>, ConsumeError> {
    let (filter_subject, filter_subjects) = filters(&subjects);
    handle
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            name,
            filter_subject,
            filter_subjects,
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: from.max(1),
            },
            ..Default::default()
        })
        .await
        .map_err(|e| ordered_err(stream, &e))
}

/// Reads a range of a stream in order through an ephemeral ordered consumer: no durable state, no acks.
/// Used by operators (replay, rebuild) to read history without disturbing the services.
pub struct RangeReader {
    messages: Option<jetstream::consumer::pull::Ordered>,
    end: u64,
}

impl std::fmt::Debug for RangeReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RangeReader")
            .field("end", &self.end)
            .finish_non_exhaustive()
    }
}

impl RangeReader {
    /// Frames of `stream` on `subjects` (all when empty) from `from` up to `to` inclusive, and at most up to
    /// the stream's last sequence when the reader is opened.
    pub async fn open(
        js: &jetstream::Context,
        stream: Stream,
        subjects: Vec<String>,
        from: u64,
        to: Option<u64>,
    ) -> Result<Self, ConsumeError> {
        let mut handle = stream_of(js, stream).await?;
        let last = handle
            .info()
            .await
            .map_err(|e| ordered_err(stream, &e))?
            .state
            .last_sequence;
        let end = to.map_or(last, |t| t.min(last));
        if last == 0 || from > end {
            return Ok(Self {
                messages: None,
                end,
            });
        }
        let consumer = ordered_consumer(&handle, stream, subjects, from, None).await?;
        if consumer.cached_info().num_pending == 0 {
            return Ok(Self {
                messages: None,
                end,
            });
        }
        let messages = consumer
            .messages()
            .await
            .map_err(|e| ordered_err(stream, &e))?;
        Ok(Self {
            messages: Some(messages),
            end,
        })
    }

    /// The last sequence this reader will return (at most).
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Up to `max` frames; an empty vector means the range is exhausted.
    pub async fn next_batch(&mut self, max: usize) -> Result<Vec<ReceivedFrame>, ConsumeError> {
        let mut out = Vec::new();
        while out.len() < max {
            let Some(messages) = self.messages.as_mut() else {
                break;
            };
            let Some(message) = messages.next().await else {
                self.messages = None;
                break;
            };
            let message = message.map_err(|e| ConsumeError::Fetch {
                durable: "(ordered)".into(),
                reason: e.to_string(),
            })?;
            let frame = received_frame(&message)?;
            let (seq, pending) = (frame.stream_sequence, frame.pending);
            if seq > self.end {
                self.messages = None;
                break;
            }
            out.push(frame);
            if seq >= self.end || pending == 0 {
                self.messages = None;
            }
        }
        Ok(out)
    }
}

/// Follows a stream in order from a sequence, without end, through an ephemeral ordered consumer: no durable
/// state, no acks. Services that keep their state in memory (the allocator) rebuild it with one of these per
/// stream and then keep reading live.
pub struct Follower {
    messages: jetstream::consumer::pull::Ordered,
    stream: Stream,
    js: jetstream::Context,
    subjects: Vec<String>,
    name: Option<String>,
    /// Where a recreated consumer starts: right after the last frame handed out.
    next_sequence: u64,
    /// The connection's connect count when the consumer was made: a reconnect may mean a restarted server,
    /// which has lost every ephemeral consumer.
    connects: u64,
}

/// How many times the context's connection has connected (the first time included).
fn connects(js: &jetstream::Context) -> u64 {
    js.client()
        .statistics()
        .connects
        .load(std::sync::atomic::Ordering::Relaxed)
}

/// Returns once the connection has connected again since `seen` connects.
async fn reconnected(js: &jetstream::Context, seen: u64) {
    while connects(js) <= seen {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// How long a [`Follower`] keeps trying to recreate a lost consumer before it reports the failure.
const FOLLOWER_RECOVERY: Duration = Duration::from_secs(60);

impl std::fmt::Debug for Follower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Follower")
            .field("stream", &self.stream)
            .finish_non_exhaustive()
    }
}

impl Follower {
    /// Frames of `stream` on `subjects` (all when empty) from sequence `from` (1 = the beginning).
    pub async fn open(
        js: &jetstream::Context,
        stream: Stream,
        subjects: Vec<String>,
        from: u64,
    ) -> Result<Self, ConsumeError> {
        Self::open_named(js, stream, subjects, from, None).await
    }

    /// [`Follower::open`] with a consumer name chosen by the caller, for users whose permissions name the
    /// consumers they may read (a worker's `verdicts-<worker>`).
    pub async fn open_named(
        js: &jetstream::Context,
        stream: Stream,
        subjects: Vec<String>,
        from: u64,
        name: Option<String>,
    ) -> Result<Self, ConsumeError> {
        let messages = Self::messages(js, stream, subjects.clone(), from, name.clone()).await?;
        Ok(Self {
            messages,
            stream,
            js: js.clone(),
            subjects,
            name,
            next_sequence: from.max(1),
            connects: connects(js),
        })
    }

    async fn messages(
        js: &jetstream::Context,
        stream: Stream,
        subjects: Vec<String>,
        from: u64,
        name: Option<String>,
    ) -> Result<jetstream::consumer::pull::Ordered, ConsumeError> {
        let handle = stream_of(js, stream).await?;
        let consumer = ordered_consumer(&handle, stream, subjects, from, name).await?;
        consumer
            .messages()
            .await
            .map_err(|e| ordered_err(stream, &e))
    }

    /// The next frame; waits for one to be published. `None` when the subscription ended.
    ///
    /// The consumer is ephemeral: a restarting nats-server loses it, and async-nats then reports failed pulls
    /// ("consumer not found") instead of recreating it. So a failure recreates it right after the last frame
    /// handed out, retrying for up to a minute before the error is returned.
    pub async fn next(&mut self) -> Option<Result<ReceivedFrame, ConsumeError>> {
        let mut failing_since: Option<std::time::Instant> = None;
        let mut backoff = Duration::from_millis(50);
        loop {
            let next = tokio::select! {
                next = self.messages.next() => match next? {
                    Ok(message) => Ok(message),
                    Err(e) => Err(e.to_string()),
                },
                // async-nats notices a lost ordered consumer only when a pull fails, up to 15 s after the
                // server came back; meanwhile a service would act on a view that stands still. A reconnect
                // may mean a restarted server, which lost every ephemeral consumer: recreate it now.
                () = reconnected(&self.js, self.connects) => {
                    Err("reconnected to nats-server (ephemeral consumers may be gone)".to_string())
                }
            };
            let error = match next {
                Ok(message) => {
                    let frame = received_frame(&message);
                    if let Ok(frame) = &frame {
                        self.next_sequence = frame.stream_sequence + 1;
                    }
                    return Some(frame);
                }
                Err(e) => e,
            };
            let since = *failing_since.get_or_insert_with(std::time::Instant::now);
            tracing::warn!(stream = self.stream.name(), error = %error, from = self.next_sequence, "ordered consumer failed; recreating it");
            loop {
                if since.elapsed() > FOLLOWER_RECOVERY {
                    return Some(Err(ConsumeError::Fetch {
                        durable: format!("(ordered {})", self.stream.name()),
                        reason: error,
                    }));
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                // A named consumer may still exist (the failure was not its loss); it is made again from here.
                if let Some(name) = &self.name
                    && let Ok(handle) = stream_of(&self.js, self.stream).await
                {
                    let _ = handle.delete_consumer(name).await;
                }
                match Self::messages(
                    &self.js,
                    self.stream,
                    self.subjects.clone(),
                    self.next_sequence,
                    self.name.clone(),
                )
                .await
                {
                    Ok(messages) => {
                        self.messages = messages;
                        self.connects = connects(&self.js);
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(stream = self.stream.name(), error = %e, "recreating the ordered consumer failed; retrying")
                    }
                }
            }
        }
    }
}

/// The last sequence stored in `stream`, or 0 when it holds no message (empty, or every message aged out or
/// purged): a reader waiting to reach it never waits for a message that will not come.
pub async fn last_sequence(js: &jetstream::Context, stream: Stream) -> Result<u64, ConsumeError> {
    let mut handle = stream_of(js, stream).await?;
    let info = handle.info().await.map_err(|e| ordered_err(stream, &e))?;
    Ok(if info.state.messages == 0 {
        0
    } else {
        info.state.last_sequence
    })
}

/// Why [`read_events`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Consume(#[from] ConsumeError),
    #[error("frame {sequence} does not decode: {source}")]
    Decode {
        sequence: u64,
        #[source]
        source: DecodeError,
    },
}

/// Every event of `stream` (on `subjects`; all when empty) up to its head when called, in log order, each
/// with the stream sequence of its frame. For tests and small operator reads: it holds them all in memory.
pub async fn read_events(
    js: &jetstream::Context,
    stream: Stream,
    subjects: Vec<String>,
) -> Result<Vec<(u64, EventRecord)>, ReadError> {
    let codec = CodecConfig::default();
    let mut reader = RangeReader::open(js, stream, subjects, 1, None).await?;
    let mut out = Vec::new();
    loop {
        let frames = reader.next_batch(256).await?;
        if frames.is_empty() {
            return Ok(out);
        }
        for frame in frames {
            let sequence = frame.stream_sequence;
            let records = frame
                .decode(&codec)
                .map_err(|source| ReadError::Decode { sequence, source })?;
            out.extend(records.into_iter().map(|r| (sequence, r)));
        }
    }
}
