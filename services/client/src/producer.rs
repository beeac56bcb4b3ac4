//! The producer: validates requests and publishes `TaskSubmitted` through the batching [`bus::Publisher`], then
//! waits for each event's receipt, so a returned task id is one the log has stored.

use events::tasks::TaskSubmitted;
use events::{EventRecord, ProducerId, Subject, TaskId};

use crate::request::{InvalidRequest, TaskRequest};

/// A stored submission: the new task's id and where its `TaskSubmitted` sits in the TASKS stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submitted {
    pub task_id: TaskId,
    /// `tasks.<partition>`, from the task id.
    pub subject: Subject,
    /// Stream sequence of the frame that carries the event.
    pub stream_sequence: u64,
}

/// Why a task was not submitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// Nothing was published; fix the request.
    #[error("invalid request: {0}")]
    Invalid(#[from] InvalidRequest),
    /// The frame was refused or its ack did not come; on a time-out it may still be stored.
    #[error("publishing failed: {0}")]
    Publish(#[from] bus::PublishError),
}

/// Settings of a [`Producer`].
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    /// Goes into every envelope as the producer of the event.
    pub producer: ProducerId,
    pub publisher: bus::PublisherConfig,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        Self {
            producer: ProducerId::new("cocoon-client").expect("a valid constant id"),
            publisher: bus::PublisherConfig::default(),
        }
    }
}

/// Submits tasks. Cheap to clone; clones share one publisher, so concurrent submissions share frames.
#[derive(Debug, Clone)]
pub struct Producer {
    publisher: bus::Publisher,
    producer: ProducerId,
}

impl Producer {
    /// Connects to NATS at `url` (comma-separated for a cluster).
    pub async fn connect(url: &str) -> Result<Producer, crate::ConnectError> {
        let bus = bus::Bus::connect(&bus::BusConfig::new(url, "cocoon-client")).await?;
        Producer::from_bus(&bus, ProducerConfig::default())
    }

    /// A producer on an existing connection (its publisher's tasks run on the current runtime).
    pub fn from_bus(
        bus: &bus::Bus,
        config: ProducerConfig,
    ) -> Result<Producer, crate::ConnectError> {
        let publisher = bus::Publisher::new(bus.jetstream.clone(), config.publisher)
            .map_err(crate::ConnectError::Publisher)?;
        Ok(Producer {
            publisher,
            producer: config.producer,
        })
    }

    /// Validates `request`, publishes it as a new task (a fresh UUIDv7 id) and waits until it is stored.
    pub async fn submit(&self, request: &TaskRequest) -> Result<Submitted, SubmitError> {
        let (pending, receipt) = self.publish(request).await?;
        let position = receipt.await?;
        Ok(pending.stored(position.sequence))
    }

    /// Submits many requests pipelined: every valid one is published first (frames fill and many are in flight),
    /// then the receipts are awaited. The results are in the order of `requests`; an invalid request is not
    /// published and does not stop the others.
    pub async fn submit_many<'a>(
        &self,
        requests: impl IntoIterator<Item = &'a TaskRequest>,
    ) -> Vec<Result<Submitted, SubmitError>> {
        let mut published = Vec::new();
        for request in requests {
            published.push(self.publish(request).await);
        }
        let mut out = Vec::with_capacity(published.len());
        for p in published {
            out.push(match p {
                Ok((pending, receipt)) => receipt
                    .await
                    .map(|position| pending.stored(position.sequence))
                    .map_err(SubmitError::from),
                Err(e) => Err(e),
            });
        }
        out
    }

    /// Sends any frame still lingering and waits for every outstanding ack.
    pub async fn flush(&self) -> Result<(), bus::PublishError> {
        self.publisher.flush().await
    }

    async fn publish(
        &self,
        request: &TaskRequest,
    ) -> Result<(PendingTask, bus::Receipt), SubmitError> {
        let (client_id, spec) = request.validate()?;
        let task_id = TaskId::new();
        let record = EventRecord::new(
            self.producer.clone(),
            TaskSubmitted {
                task_id,
                client_id,
                spec,
            },
        );
        let subject = record.subject(self.publisher.config().partitions);
        let receipt = self.publisher.publish(&record).await?;
        Ok((PendingTask { task_id, subject }, receipt))
    }
}

struct PendingTask {
    task_id: TaskId,
    subject: Subject,
}

impl PendingTask {
    fn stored(self, stream_sequence: u64) -> Submitted {
        Submitted {
            task_id: self.task_id,
            subject: self.subject,
            stream_sequence,
        }
    }
}
