//! The consumer side: [`ResultStream`] follows one client's results (`results.<client>` on RESULTS) through an
//! ephemeral ordered consumer, so reading acks nothing and leaves no durable state behind; a caller that wants to
//! resume keeps the last stream sequence it handled and reopens with [`StartAt::After`].
//!
//! Each frame is decoded with the events codec. A frame that does not decode, or that carries something other
//! than `TaskResult`, is handed to the caller as an error item with its sequence, and the stream goes on.

use std::collections::VecDeque;

use async_nats::jetstream::{
    self,
    consumer::{DeliverPolicy, push::OrderedConfig},
};
use futures_util::StreamExt;

use events::results::TaskResult;
use events::{ClientId, CodecConfig, DecodeError, Event, Stream, Subject, Timestamp};

/// Where a [`ResultStream`] begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// Every result the stream still holds (RESULTS keeps 30 days).
    Beginning,
    /// The frame at this stream sequence and everything after it.
    Sequence(u64),
    /// Everything after this stream sequence: resume after the last frame handled.
    After(u64),
    /// Only results stored from now on.
    New,
}

/// One result with its place in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultItem {
    /// Stream sequence of the frame that carries the result; resume with `StartAt::After(stream_sequence)`
    /// once every result of the frame is handled.
    pub stream_sequence: u64,
    /// Index of the result inside its frame.
    pub index: u32,
    /// When the server stored the frame.
    pub stored_at: Timestamp,
    pub result: TaskResult,
}

/// What went wrong following results. `Undecodable` and `UnexpectedEvent` concern one frame, and the stream goes
/// on after them; `Consume` comes from the server connection.
#[derive(Debug, thiserror::Error)]
pub enum ResultsError {
    #[error("stream RESULTS is missing; provision the streams first")]
    NoStream,
    #[error("cannot read RESULTS: {0}")]
    Consume(String),
    #[error("frame {stream_sequence} does not decode: {source}")]
    Undecodable {
        stream_sequence: u64,
        #[source]
        source: DecodeError,
    },
    #[error("frame {stream_sequence} holds a {kind} event, not a TaskResult")]
    UnexpectedEvent {
        stream_sequence: u64,
        kind: &'static str,
    },
}

/// Follows the results addressed to one client, in stream order, until dropped.
pub struct ResultStream {
    messages: jetstream::consumer::push::Ordered,
    codec: CodecConfig,
    ready: VecDeque<Result<ResultItem, ResultsError>>,
}

impl std::fmt::Debug for ResultStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResultStream")
            .field("ready", &self.ready.len())
            .finish_non_exhaustive()
    }
}

impl ResultStream {
    /// Opens an ordered push consumer on `results.<client>.>` starting at `start`, delivering to this
    /// connection's inbox. It is named (after the client), so the create request's subject carries the filter
    /// and NATS permissions can confine a producer to its own results
    /// (`$JS.API.CONSUMER.CREATE.RESULTS.*.results.<client>.>`); pushed to an inbox, it needs no permission to
    /// pull from consumers by name (which would reach other consumers of RESULTS).
    pub async fn open(
        js: &jetstream::Context,
        client: &ClientId,
        start: StartAt,
    ) -> Result<ResultStream, ResultsError> {
        let stream = js
            .get_stream(Stream::Results.name())
            .await
            .map_err(|_| ResultsError::NoStream)?;
        let deliver_policy = match start {
            StartAt::Beginning => DeliverPolicy::All,
            StartAt::Sequence(seq) => DeliverPolicy::ByStartSequence {
                start_sequence: seq.max(1),
            },
            StartAt::After(seq) => DeliverPolicy::ByStartSequence {
                start_sequence: seq.saturating_add(1),
            },
            StartAt::New => DeliverPolicy::New,
        };
        let consumer = stream
            .create_consumer(OrderedConfig {
                name: Some(format!(
                    "results-{}-{}",
                    client.as_str(),
                    events::EventId::new().0.simple()
                )),
                filter_subject: Subject::results_filter(client),
                deliver_subject: js.client().new_inbox(),
                deliver_policy,
                ..Default::default()
            })
            .await
            .map_err(|e| ResultsError::Consume(e.to_string()))?;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| ResultsError::Consume(e.to_string()))?;
        Ok(ResultStream {
            messages,
            codec: CodecConfig::default(),
            ready: VecDeque::new(),
        })
    }

    /// The next result, waiting for one to be stored; `None` only if the server side of the consumer ends.
    pub async fn next(&mut self) -> Option<Result<ResultItem, ResultsError>> {
        loop {
            if let Some(item) = self.ready.pop_front() {
                return Some(item);
            }
            let message = match self.messages.next().await? {
                Ok(message) => message,
                Err(e) => return Some(Err(ResultsError::Consume(e.to_string()))),
            };
            self.take_frame(&message);
        }
    }

    /// Decodes one frame into the queue of items.
    fn take_frame(&mut self, message: &jetstream::Message) {
        let info = match message.info() {
            Ok(info) => info,
            Err(e) => {
                self.ready.push_back(Err(ResultsError::Consume(format!(
                    "message without JetStream metadata: {e}"
                ))));
                return;
            }
        };
        let stream_sequence = info.stream_sequence;
        let stored_at = Timestamp::from_micros(
            i64::try_from(info.published.unix_timestamp_nanos() / 1000).unwrap_or(i64::MAX),
        );
        let decoded = bus::frame_headers(message.headers.as_ref())
            .and_then(|h| events::decode_frame(&self.codec, &h, &message.payload))
            .and_then(|records| {
                events::check_origin(&message.subject, &records)?;
                Ok(records)
            });
        let records = match decoded {
            Ok(records) => records,
            Err(source) => {
                self.ready.push_back(Err(ResultsError::Undecodable {
                    stream_sequence,
                    source,
                }));
                return;
            }
        };
        for (index, record) in records.into_iter().enumerate() {
            self.ready.push_back(match record.event {
                Event::TaskResult(result) => Ok(ResultItem {
                    stream_sequence,
                    index: u32::try_from(index).unwrap_or(u32::MAX),
                    stored_at,
                    result,
                }),
                other => Err(ResultsError::UnexpectedEvent {
                    stream_sequence,
                    kind: other.kind(),
                }),
            });
        }
    }
}
