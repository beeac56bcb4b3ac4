//! The envelope every event carries: who, when, why, and which version of the payload follows.

use serde::{Deserialize, Serialize};

use crate::ids::{CorrelationId, EventId, ProducerId};
use crate::time::Timestamp;

/// Metadata common to every event. The payload's type and version travel beside it in the frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// UUIDv7, unique per event.
    pub event_id: EventId,
    /// When the fact happened at the producer, not when it was published.
    pub occurred_at: Timestamp,
    /// The service instance that emitted the event.
    pub producer: ProducerId,
    /// The request this event belongs to; copied from the event that caused it.
    pub correlation_id: CorrelationId,
    /// The event that directly caused this one; `None` for an event caused from outside (a client request).
    pub causation_id: Option<EventId>,
    /// Version of the payload's schema (see [`crate::EventPayload::VERSION`]).
    pub schema_version: u16,
}

impl Envelope {
    /// An envelope for a new event that starts a new chain of causes (e.g. a client request).
    pub fn new(producer: ProducerId, schema_version: u16) -> Self {
        Self {
            event_id: EventId::new(),
            occurred_at: Timestamp::now(),
            producer,
            correlation_id: CorrelationId::new(),
            causation_id: None,
            schema_version,
        }
    }

    /// An envelope for an event caused by `cause`: same correlation, causation set to it.
    pub fn caused_by(cause: &Envelope, producer: ProducerId, schema_version: u16) -> Self {
        Self {
            event_id: EventId::new(),
            occurred_at: Timestamp::now(),
            producer,
            correlation_id: cause.correlation_id,
            causation_id: Some(cause.event_id),
            schema_version,
        }
    }
}
