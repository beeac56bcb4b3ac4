//! The wire contract of Cocoon GPU Pool: event types, the envelope, the frame codec, subjects and partitions.
//!
//! Invariants (stated as absences):
//! - this crate does no IO: no sockets, no files, no tokio, no NATS; it turns values into bytes and back;
//! - decoding never panics and never trusts a length it has not bounded;
//! - no floats hold money (see [`money`]).

pub mod allocations;
pub mod attestations;
pub mod envelope;
pub mod event;
pub mod frame;
pub mod ids;
pub mod money;
pub mod payload;
pub mod payments;
pub mod results;
pub mod sample;
pub mod subjects;
pub mod tasks;
pub mod time;
pub mod workers;

pub use envelope::Envelope;
pub use event::{EVENT_KINDS, Event, EventKind, EventPayload, EventRecord, PayloadError};
pub use frame::{
    CodecConfig, DecodeError, EncodeError, EncodedFrame, Encoding, FrameBuilder, FrameHeaders,
    FrameSealer, RawFrame, decode_frame, encode_frame,
};
pub use ids::{
    ClientId, CorrelationId, EventId, IdError, ProducerId, SettlementId, TaskId, WorkerId,
};
pub use money::{GpuMillis, Nanoton};
pub use subjects::{
    Origin, OriginError, Partition, Partitions, Stream, StreamDef, Subject, check_origin,
};
pub use time::Timestamp;
