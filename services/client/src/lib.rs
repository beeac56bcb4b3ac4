//! `client`: the producer/consumer library of the pool: submit tasks, read their state, follow result streams.
//!
//! - consumes: `results.<client>` on RESULTS ([`ResultStream`], an ephemeral ordered consumer: no acks, nothing
//!   durable) and the Postgres read models ([`ReadModel`], read-only: tasks, workers, and payments through
//!   [`ReadModel::payments`]);
//! - produces: `TaskSubmitted` on TASKS (`tasks.<partition of the task id>`), through [`bus::Publisher`];
//! - owns: nothing; the log and the read models belong to the services;
//! - guarantees: nothing invalid is published ([`TaskRequest::validate`] checks every field first and says which
//!   is wrong); a [`Submitted`] is returned only once the server has stored the event; an undecodable result frame
//!   is reported as an error item, never skipped and never a panic.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use client::{Producer, ReadModel, ResultStream, StartAt, TaskRequest};
//! let producer = Producer::connect("nats://127.0.0.1:4222").await?;
//! let mut request = TaskRequest::new("acme", events::Nanoton(2_000));
//! request.input = b"hello".to_vec();
//! let submitted = producer.submit(&request).await?;
//! let model = ReadModel::connect("postgres://cocoon@127.0.0.1:55432/cocoon").await?;
//! let mut watch = model.watch_task(submitted.task_id);
//! while let Some(view) = watch.next().await {
//!     println!("{}", view?.status);
//! }
//! # Ok(()) }
//! ```

pub mod payments;
pub mod producer;
pub mod read_model;
pub mod request;
pub mod results;

pub use payments::{
    PaymentSums, PaymentTotals, PaymentsQuery, PaymentsStatus, SettlementStatus, SettlementView,
    WorkerPayments,
};
pub use producer::{Producer, ProducerConfig, SubmitError, Submitted};
pub use read_model::{
    AttestationView, GpuView, ReadModel, ReadModelError, ResultView, SubmissionView, TaskFilter,
    TaskStatus, TaskView, TaskWatch, WorkerStatus, WorkerView,
};
pub use request::{
    InvalidRequest, LineError, LineErrorKind, TaskRequest, TaskRequirements, read_jsonl,
};
pub use results::{ResultItem, ResultStream, ResultsError, StartAt};

/// Why a producer could not start.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Nats(#[from] bus::ConnectError),
    #[error("cannot start the publisher: {0}")]
    Publisher(bus::PublishError),
}
