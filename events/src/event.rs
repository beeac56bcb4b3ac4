//! The event registry: the one enum of every event type, its name and version on the wire, its stream and
//! the subject it is published on.
//!
//! On the wire an event is `{type, envelope, data}` where `data` is the payload encoded on its own. Decoding
//! dispatches on `(type, envelope.schema_version)`, so an unknown type or a version this build does not know
//! is a typed error, and a payload can evolve: bump its version here, keep the old struct in a `legacy`
//! module, and add a `(kind, old version)` arm to [`Event::decode_payload`] that converts it (an upcaster).
//! The golden fixtures in `tests/fixtures` hold one encoded sample of every type and version ever released.

use serde::{Serialize, de::DeserializeOwned};

use crate::allocations::*;
use crate::attestations::*;
use crate::envelope::Envelope;
use crate::ids::ProducerId;
use crate::payments::*;
use crate::results::*;
use crate::subjects::{Origin, Partitions, Stream, Subject};
use crate::tasks::*;
use crate::workers::*;

/// What can go wrong turning payload bytes into an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("unknown event type {kind:?}")]
    UnknownType { kind: String },
    #[error("event type {kind} has no version {version} (this build knows version {known})")]
    UnsupportedVersion {
        kind: String,
        version: u16,
        known: u16,
    },
    #[error("invalid {kind} v{version} payload: {reason}")]
    Invalid {
        kind: String,
        version: u16,
        reason: String,
    },
}

/// A payload type: its name and current version on the wire, and its stream.
pub trait EventPayload: Serialize + DeserializeOwned + Into<Event> {
    const KIND: &'static str;
    const VERSION: u16;
    const STREAM: Stream;
}

/// One entry of the registry of event types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventKind {
    pub name: &'static str,
    pub version: u16,
    pub stream: Stream,
}

macro_rules! registry {
    ($( $stream:ident => [ $( $kind:ident = $version:literal ),+ $(,)? ] ),+ $(,)?) => {
        /// Every event of the pool. Past tense: each is a fact that happened.
        #[derive(Debug, Clone, PartialEq, Serialize)]
        #[serde(tag = "type", content = "data")]
        pub enum Event {
            $($( $kind($kind), )+)+
        }

        $($(
            impl EventPayload for $kind {
                const KIND: &'static str = stringify!($kind);
                const VERSION: u16 = $version;
                const STREAM: Stream = Stream::$stream;
            }

            impl From<$kind> for Event {
                fn from(payload: $kind) -> Event {
                    Event::$kind(payload)
                }
            }
        )+)+

        /// Every event type with its current version.
        pub const EVENT_KINDS: &[EventKind] = &[
            $($( EventKind { name: stringify!($kind), version: $version, stream: Stream::$stream }, )+)+
        ];

        impl Event {
            /// The type's name on the wire.
            pub fn kind(&self) -> &'static str {
                match self { $($( Event::$kind(_) => $kind::KIND, )+)+ }
            }

            /// The payload version this build writes.
            pub fn version(&self) -> u16 {
                match self { $($( Event::$kind(_) => $kind::VERSION, )+)+ }
            }

            pub fn stream(&self) -> Stream {
                match self { $($( Event::$kind(_) => $kind::STREAM, )+)+ }
            }

            /// The payload alone, MessagePack with named fields, appended to `out`.
            pub(crate) fn encode_payload_into(&self, out: &mut Vec<u8>) -> Result<(), rmp_serde::encode::Error> {
                match self { $($( Event::$kind(p) => rmp_serde::encode::write_named(out, p), )+)+ }
            }

            /// Decodes a payload written as `kind` at `version`; the place where upcasters go.
            pub fn decode_payload(kind: &str, version: u16, bytes: &[u8]) -> Result<Event, PayloadError> {
                match (kind, version) {
                    ("WorkerRegistered", 1) => decode_legacy::<crate::workers::legacy::WorkerRegisteredV1, WorkerRegistered>(kind, version, bytes),
                    $($( (stringify!($kind), _) => decode_current::<$kind>(version, bytes), )+)+
                    _ => Err(PayloadError::UnknownType { kind: kind.to_owned() }),
                }
            }
        }
    };
}

/// Decodes an old version `L` of a payload and upcasts it to the current type `T`.
fn decode_legacy<L, T>(kind: &str, version: u16, bytes: &[u8]) -> Result<Event, PayloadError>
where
    L: DeserializeOwned + Into<T>,
    T: EventPayload,
{
    rmp_serde::from_slice::<L>(bytes)
        .map(|old| Into::<T>::into(old).into())
        .map_err(|e| PayloadError::Invalid {
            kind: kind.to_owned(),
            version,
            reason: e.to_string(),
        })
}

fn decode_current<T: EventPayload>(version: u16, bytes: &[u8]) -> Result<Event, PayloadError> {
    if version != T::VERSION {
        return Err(PayloadError::UnsupportedVersion {
            kind: T::KIND.to_owned(),
            version,
            known: T::VERSION,
        });
    }
    rmp_serde::from_slice::<T>(bytes)
        .map(Into::into)
        .map_err(|e| PayloadError::Invalid {
            kind: T::KIND.to_owned(),
            version,
            reason: e.to_string(),
        })
}

registry! {
    Tasks => [
        TaskSubmitted = 1,
        TaskStarted = 1,
        TaskProgress = 1,
        TaskCompleted = 1,
        TaskFailed = 1,
        TaskCancelled = 1,
        TaskRequeued = 1,
        TaskExpired = 1,
        TaskRejected = 1,
    ],
    Allocations => [
        TaskAllocated = 1,
        AllocationRevoked = 1,
    ],
    Workers => [
        WorkerRegistered = 2,
        WorkerHeartbeat = 1,
        WorkerDraining = 1,
        WorkerDeregistered = 1,
        WorkerLost = 1,
    ],
    Attestations => [
        AttestationSubmitted = 1,
        AttestationVerified = 1,
        AttestationRejected = 1,
    ],
    Payments => [
        PaymentAccrued = 1,
        SettlementPrepared = 1,
        SettlementSubmitted = 1,
        SettlementConfirmed = 1,
        SettlementExpired = 1,
        SettlementFailed = 1,
        PayoutParked = 1,
    ],
    Results => [
        TaskResult = 1,
    ],
}

impl Event {
    /// Who may publish this event: fixed per event type (the subject's origin tokens).
    pub fn origin(&self) -> Origin<'_> {
        use Event as E;
        match self {
            E::TaskSubmitted(e) => Origin::Client(&e.client_id),
            E::TaskStarted(e) => Origin::Worker(&e.worker_id),
            E::TaskProgress(e) => Origin::Worker(&e.worker_id),
            E::TaskCompleted(e) => Origin::Worker(&e.worker_id),
            E::TaskFailed(e) => e
                .worker_id
                .as_ref()
                .map_or(Origin::Operator, Origin::Worker),
            E::TaskCancelled(_) => Origin::Operator,
            E::TaskRequeued(_)
            | E::TaskExpired(_)
            | E::TaskRejected(_)
            | E::TaskAllocated(_)
            | E::AllocationRevoked(_)
            | E::WorkerLost(_) => Origin::Allocator,
            E::WorkerRegistered(e) => Origin::Worker(&e.worker_id),
            E::WorkerHeartbeat(e) => Origin::Worker(&e.worker_id),
            E::WorkerDraining(e) => Origin::Worker(&e.worker_id),
            E::WorkerDeregistered(e) => Origin::Worker(&e.worker_id),
            E::AttestationSubmitted(e) => Origin::Worker(&e.worker_id),
            E::AttestationVerified(e) => Origin::Attestor(&e.worker_id),
            E::AttestationRejected(e) => Origin::Attestor(&e.worker_id),
            E::PaymentAccrued(_)
            | E::SettlementPrepared(_)
            | E::SettlementSubmitted(_)
            | E::SettlementConfirmed(_)
            | E::SettlementExpired(_)
            | E::SettlementFailed(_)
            | E::PayoutParked(_) => Origin::Settler,
            E::TaskResult(e) => Origin::Worker(&e.worker_id),
        }
    }

    /// The subject this event is published on: its key's partition and its origin, or its recipient.
    pub fn subject(&self, partitions: Partitions) -> Subject {
        use Event as E;
        let origin = self.origin();
        let task = |id: &crate::ids::TaskId| {
            Subject::keyed(Stream::Tasks, id.0.as_bytes(), partitions, origin)
        };
        let worker = |stream: Stream, id: &crate::ids::WorkerId| {
            Subject::keyed(stream, id.as_str().as_bytes(), partitions, origin)
        };
        let settlement = |id: &crate::ids::SettlementId| {
            Subject::keyed(Stream::Payments, id.0.as_bytes(), partitions, origin)
        };
        match self {
            E::TaskSubmitted(e) => task(&e.task_id),
            E::TaskStarted(e) => task(&e.task_id),
            E::TaskProgress(e) => task(&e.task_id),
            E::TaskCompleted(e) => task(&e.task_id),
            E::TaskFailed(e) => task(&e.task_id),
            E::TaskCancelled(e) => task(&e.task_id),
            E::TaskRequeued(e) => task(&e.task_id),
            E::TaskExpired(e) => task(&e.task_id),
            E::TaskRejected(e) => task(&e.task_id),
            E::TaskAllocated(e) => Subject::allocations(&e.worker_id),
            E::AllocationRevoked(e) => Subject::allocations(&e.worker_id),
            E::WorkerRegistered(e) => worker(Stream::Workers, &e.worker_id),
            E::WorkerHeartbeat(e) => worker(Stream::Workers, &e.worker_id),
            E::WorkerDraining(e) => worker(Stream::Workers, &e.worker_id),
            E::WorkerDeregistered(e) => worker(Stream::Workers, &e.worker_id),
            E::WorkerLost(e) => worker(Stream::Workers, &e.worker_id),
            E::AttestationSubmitted(e) => worker(Stream::Attestations, &e.worker_id),
            E::AttestationVerified(e) => worker(Stream::Attestations, &e.worker_id),
            E::AttestationRejected(e) => worker(Stream::Attestations, &e.worker_id),
            // Accruals follow their worker so one worker's accruals are in order for the settler.
            E::PaymentAccrued(e) => worker(Stream::Payments, &e.worker_id),
            E::SettlementPrepared(e) => settlement(&e.settlement_id),
            E::SettlementSubmitted(e) => settlement(&e.settlement_id),
            E::SettlementConfirmed(e) => settlement(&e.settlement_id),
            E::SettlementExpired(e) => settlement(&e.settlement_id),
            E::SettlementFailed(e) => settlement(&e.settlement_id),
            E::PayoutParked(e) => worker(Stream::Payments, &e.worker_id),
            E::TaskResult(e) => Subject::results(&e.client_id, &e.worker_id),
        }
    }
}

/// An event with its envelope: the unit that frames carry.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventRecord {
    pub envelope: Envelope,
    #[serde(flatten)]
    pub event: Event,
}

impl EventRecord {
    /// A new event that starts a chain of causes.
    pub fn new(producer: ProducerId, event: impl Into<Event>) -> Self {
        let event = event.into();
        Self {
            envelope: Envelope::new(producer, event.version()),
            event,
        }
    }

    /// A new event caused by `cause` (same correlation id, causation = the cause's event id).
    pub fn caused_by(cause: &Envelope, producer: ProducerId, event: impl Into<Event>) -> Self {
        let event = event.into();
        Self {
            envelope: Envelope::caused_by(cause, producer, event.version()),
            event,
        }
    }

    pub fn subject(&self, partitions: Partitions) -> Subject {
        self.event.subject(partitions)
    }
}
