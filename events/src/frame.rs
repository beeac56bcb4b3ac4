//! The frame codec: many events in one NATS message, MessagePack with named fields, zstd above a threshold.
//!
//! Body: a MessagePack array of `{type, envelope, data}` maps, where `data` is the payload as MessagePack
//! bytes, compressed whole with zstd level 1 when the encoded array exceeds the threshold. Headers say the
//! encoding, the event count and the frame schema version; the count is checked against the body.
//!
//! Guarantees: decoding never panics and never allocates past the configured limits, whatever the bytes;
//! every failure is a [`DecodeError`] that says what was wrong.

use std::io::Read;

use serde::{Deserialize, Serialize};

use crate::envelope::Envelope;
use crate::event::{Event, EventRecord, PayloadError};

/// Header: `msgpack` or `msgpack+zstd`.
pub const HEADER_ENCODING: &str = "Cocoon-Encoding";
/// Header: number of events in the frame.
pub const HEADER_EVENT_COUNT: &str = "Cocoon-Event-Count";
/// Header: version of the frame layout (not of the payloads, which each carry their own).
pub const HEADER_SCHEMA: &str = "Cocoon-Schema";

/// The frame layout version this build writes and reads.
pub const FRAME_SCHEMA_VERSION: u16 = 1;

/// How a frame body is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    MsgPack,
    MsgPackZstd,
}

impl Encoding {
    pub const fn as_str(self) -> &'static str {
        match self {
            Encoding::MsgPack => "msgpack",
            Encoding::MsgPackZstd => "msgpack+zstd",
        }
    }

    pub fn parse(s: &str) -> Option<Encoding> {
        match s {
            "msgpack" => Some(Encoding::MsgPack),
            "msgpack+zstd" => Some(Encoding::MsgPackZstd),
            _ => None,
        }
    }
}

/// The frame's headers, independent of any transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeaders {
    pub encoding: Encoding,
    pub event_count: u32,
    pub schema_version: u16,
}

impl FrameHeaders {
    /// `(name, value)` pairs to put on the transport message.
    pub fn pairs(&self) -> [(&'static str, String); 3] {
        [
            (HEADER_ENCODING, self.encoding.as_str().to_owned()),
            (HEADER_EVENT_COUNT, self.event_count.to_string()),
            (HEADER_SCHEMA, self.schema_version.to_string()),
        ]
    }

    /// Reads and validates the headers through `get`, which looks a header up by name.
    pub fn parse<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Result<FrameHeaders, DecodeError> {
        let encoding = get(HEADER_ENCODING).ok_or(DecodeError::MissingHeader(HEADER_ENCODING))?;
        let encoding = Encoding::parse(encoding)
            .ok_or_else(|| DecodeError::UnknownEncoding(encoding.to_owned()))?;
        let count =
            get(HEADER_EVENT_COUNT).ok_or(DecodeError::MissingHeader(HEADER_EVENT_COUNT))?;
        let event_count = count.parse().map_err(|_| DecodeError::InvalidHeader {
            name: HEADER_EVENT_COUNT,
            value: count.to_owned(),
        })?;
        let schema = get(HEADER_SCHEMA).ok_or(DecodeError::MissingHeader(HEADER_SCHEMA))?;
        let schema_version: u16 = schema.parse().map_err(|_| DecodeError::InvalidHeader {
            name: HEADER_SCHEMA,
            value: schema.to_owned(),
        })?;
        if schema_version != FRAME_SCHEMA_VERSION {
            return Err(DecodeError::UnsupportedFrameSchema(schema_version));
        }
        Ok(FrameHeaders {
            encoding,
            event_count,
            schema_version,
        })
    }
}

/// Limits and compression settings, shared by encoder and decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodecConfig {
    /// Compress when the encoded frame is larger than this many bytes.
    pub compress_threshold: usize,
    pub zstd_level: i32,
    /// Largest frame body on the wire (after compression). Must not exceed the server's max_payload.
    pub max_frame_bytes: usize,
    /// Largest frame once decompressed; guards against decompression bombs.
    pub max_decoded_bytes: usize,
    /// Most events in one frame.
    pub max_events: u32,
}

impl Default for CodecConfig {
    fn default() -> Self {
        Self {
            compress_threshold: 1024,
            zstd_level: 1,
            max_frame_bytes: 1024 * 1024,
            max_decoded_bytes: 8 * 1024 * 1024,
            max_events: 10_000,
        }
    }
}

/// Why a frame could not be decoded. Every variant is permanent: the same bytes will never decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    #[error("header {name} has invalid value {value:?}")]
    InvalidHeader { name: &'static str, value: String },
    #[error("unknown frame encoding {0:?}")]
    UnknownEncoding(String),
    #[error("frame schema version {0} is not supported (this build reads {FRAME_SCHEMA_VERSION})")]
    UnsupportedFrameSchema(u16),
    #[error("frame of {size} bytes exceeds the maximum of {max}")]
    FrameTooLarge { size: usize, max: usize },
    #[error("bad zstd compression: {0}")]
    BadCompression(String),
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("frame holds {actual} events but its header says {declared}")]
    CountMismatch { declared: u32, actual: u32 },
    #[error("event {index} of the frame: {source}")]
    Payload {
        index: u32,
        #[source]
        source: PayloadError,
    },
    /// An event claims another origin than its subject names (a publisher speaking for someone else).
    #[error(transparent)]
    WrongOrigin(#[from] crate::subjects::OriginError),
}

impl DecodeError {
    /// A short stable label, for dead-letter records and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::MissingHeader(_) => "missing_header",
            DecodeError::InvalidHeader { .. } => "invalid_header",
            DecodeError::UnknownEncoding(_) => "unknown_encoding",
            DecodeError::UnsupportedFrameSchema(_) => "unsupported_frame_schema",
            DecodeError::FrameTooLarge { .. } => "frame_too_large",
            DecodeError::BadCompression(_) => "bad_compression",
            DecodeError::Malformed(_) => "malformed",
            DecodeError::CountMismatch { .. } => "count_mismatch",
            DecodeError::WrongOrigin(_) => "wrong_origin",
            DecodeError::Payload {
                source: PayloadError::UnknownType { .. },
                ..
            } => "unknown_event_type",
            DecodeError::Payload {
                source: PayloadError::UnsupportedVersion { .. },
                ..
            } => "unsupported_version",
            DecodeError::Payload {
                source: PayloadError::Invalid { .. },
                ..
            } => "invalid_payload",
        }
    }
}

/// Why events could not be encoded into a frame.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("could not encode {kind}: {reason}")]
    Serialize { kind: &'static str, reason: String },
    #[error("frame of {size} bytes exceeds the maximum of {max}")]
    FrameTooLarge { size: usize, max: usize },
    #[error("frame would hold more than {max} events")]
    TooManyEvents { max: u32 },
    #[error("zstd compression failed: {0}")]
    Compression(#[from] std::io::Error),
}

/// An encoded frame, ready to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedFrame {
    pub headers: FrameHeaders,
    pub body: Vec<u8>,
    /// Size before compression (equal to `body.len()` when not compressed).
    pub raw_len: usize,
}

#[derive(Serialize)]
struct WireEventOut<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    envelope: &'a Envelope,
    #[serde(with = "serde_bytes")]
    data: &'a [u8],
}

#[derive(Deserialize)]
struct WireEventIn<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    envelope: Envelope,
    #[serde(with = "serde_bytes", borrow)]
    data: std::borrow::Cow<'a, [u8]>,
}

/// Encodes one event as a frame element.
pub fn encode_event(record: &EventRecord) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::with_capacity(512);
    encode_event_into(record, &mut out)?;
    Ok(out)
}

thread_local! {
    /// Scratch space for payloads, so encoding an event allocates nothing once warm.
    static PAYLOAD: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Appends one event, encoded as a frame element, to `out`.
pub fn encode_event_into(record: &EventRecord, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let kind = record.event.kind();
    let serialize_err = |e: rmp_serde::encode::Error| EncodeError::Serialize {
        kind,
        reason: e.to_string(),
    };
    PAYLOAD.with(|scratch| {
        let mut data = scratch.borrow_mut();
        data.clear();
        record
            .event
            .encode_payload_into(&mut data)
            .map_err(serialize_err)?;
        rmp_serde::encode::write_named(
            out,
            &WireEventOut {
                kind,
                envelope: &record.envelope,
                data: &data,
            },
        )
        .map_err(serialize_err)
    })
}

/// Accumulates encoded events for one frame. Reusable: `finish` empties it.
///
/// Events are encoded as they are pushed, so the caller knows the frame's size at every step and can flush
/// on bytes; finishing only writes the array header. Compression is a separate step ([`FrameSealer`]), so that
/// many open frames (one per subject) do not each hold a compression context.
#[derive(Debug)]
pub struct FrameBuilder {
    config: CodecConfig,
    body: Vec<u8>,
    count: u32,
}

/// A finished, uncompressed frame body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    pub body: Vec<u8>,
    pub event_count: u32,
}

/// Size of the array32 header that opens every frame body.
const ARRAY_HEADER_LEN: usize = 5;

impl FrameBuilder {
    pub fn new(config: CodecConfig) -> Self {
        Self {
            config,
            body: Self::empty_body(),
            count: 0,
        }
    }

    fn empty_body() -> Vec<u8> {
        // Reserved for the array32 header, filled in by `finish`.
        vec![0u8; ARRAY_HEADER_LEN]
    }

    pub fn config(&self) -> &CodecConfig {
        &self.config
    }

    /// Events pushed since the last `finish`.
    pub fn len(&self) -> u32 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Encoded (uncompressed) bytes so far.
    pub fn encoded_len(&self) -> usize {
        self.body.len()
    }

    /// Appends an event; returns its encoded size.
    pub fn push(&mut self, record: &EventRecord) -> Result<usize, EncodeError> {
        let element = encode_event(record)?;
        self.push_encoded(&element)?;
        Ok(element.len())
    }

    /// Appends an event already encoded by [`encode_event`].
    pub fn push_encoded(&mut self, element: &[u8]) -> Result<(), EncodeError> {
        if self.count >= self.config.max_events {
            return Err(EncodeError::TooManyEvents {
                max: self.config.max_events,
            });
        }
        let size = self.body.len() + element.len();
        if size > self.config.max_decoded_bytes {
            return Err(EncodeError::FrameTooLarge {
                size,
                max: self.config.max_decoded_bytes,
            });
        }
        self.body.extend_from_slice(element);
        self.count += 1;
        Ok(())
    }

    /// Closes the frame and leaves the builder empty.
    pub fn finish(&mut self) -> RawFrame {
        let mut body = std::mem::replace(&mut self.body, Self::empty_body());
        let count = std::mem::take(&mut self.count);
        body[0] = 0xdd; // MessagePack array32
        body[1..ARRAY_HEADER_LEN].copy_from_slice(&count.to_be_bytes());
        RawFrame {
            body,
            event_count: count,
        }
    }
}

/// Compresses finished frames above the threshold and checks the wire limit. Holds one zstd context.
pub struct FrameSealer {
    config: CodecConfig,
    compressor: zstd::bulk::Compressor<'static>,
}

impl std::fmt::Debug for FrameSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameSealer")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl FrameSealer {
    pub fn new(config: CodecConfig) -> Result<Self, EncodeError> {
        Ok(Self {
            config,
            compressor: zstd::bulk::Compressor::new(config.zstd_level)?,
        })
    }

    pub fn config(&self) -> &CodecConfig {
        &self.config
    }

    pub fn seal(&mut self, raw: RawFrame) -> Result<EncodedFrame, EncodeError> {
        let raw_len = raw.body.len();
        let (encoding, body) = if raw_len > self.config.compress_threshold {
            (Encoding::MsgPackZstd, self.compressor.compress(&raw.body)?)
        } else {
            (Encoding::MsgPack, raw.body)
        };
        if body.len() > self.config.max_frame_bytes {
            return Err(EncodeError::FrameTooLarge {
                size: body.len(),
                max: self.config.max_frame_bytes,
            });
        }
        Ok(EncodedFrame {
            headers: FrameHeaders {
                encoding,
                event_count: raw.event_count,
                schema_version: FRAME_SCHEMA_VERSION,
            },
            body,
            raw_len,
        })
    }
}

/// Encodes `records` into one frame with a one-off builder and sealer.
pub fn encode_frame(
    config: CodecConfig,
    records: &[EventRecord],
) -> Result<EncodedFrame, EncodeError> {
    let mut builder = FrameBuilder::new(config);
    for record in records {
        builder.push(record)?;
    }
    FrameSealer::new(config)?.seal(builder.finish())
}

/// Decodes a frame body with its headers into its events, in order.
pub fn decode_frame(
    config: &CodecConfig,
    headers: &FrameHeaders,
    body: &[u8],
) -> Result<Vec<EventRecord>, DecodeError> {
    if body.len() > config.max_frame_bytes {
        return Err(DecodeError::FrameTooLarge {
            size: body.len(),
            max: config.max_frame_bytes,
        });
    }
    if headers.event_count > config.max_events {
        return Err(DecodeError::InvalidHeader {
            name: HEADER_EVENT_COUNT,
            value: headers.event_count.to_string(),
        });
    }
    match headers.encoding {
        Encoding::MsgPack => decode_elements(headers, body),
        Encoding::MsgPackZstd => {
            let raw = decompress(body, config.max_decoded_bytes)?;
            decode_elements(headers, &raw)
        }
    }
}

/// Decompresses at most `max` bytes; a larger output is refused, not allocated.
fn decompress(body: &[u8], max: usize) -> Result<Vec<u8>, DecodeError> {
    let too_large = |size| DecodeError::FrameTooLarge { size, max };
    match zstd::zstd_safe::get_frame_content_size(body) {
        Ok(Some(size)) => {
            let size = usize::try_from(size).unwrap_or(usize::MAX);
            if size > max {
                return Err(too_large(size));
            }
            thread_local! {
                /// One decompression context per thread, reused: creating one per frame was a third of the
                /// time spent in zstd when projecting.
                static CONTEXT: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
                    const { std::cell::RefCell::new(None) };
            }
            CONTEXT
                .with(|context| {
                    let mut context = context.borrow_mut();
                    let context = match &mut *context {
                        Some(context) => context,
                        None => context.insert(zstd::bulk::Decompressor::new()?),
                    };
                    context.decompress(body, size)
                })
                .map_err(|e| DecodeError::BadCompression(e.to_string()))
        }
        // Size not recorded in the frame header: stream it, stopping one byte past the limit.
        Ok(None) => {
            let decoder = zstd::stream::read::Decoder::new(body)
                .map_err(|e| DecodeError::BadCompression(e.to_string()))?;
            let mut out = Vec::new();
            decoder
                .take(max as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|e| DecodeError::BadCompression(e.to_string()))?;
            if out.len() > max {
                return Err(too_large(out.len()));
            }
            Ok(out)
        }
        Err(_) => Err(DecodeError::BadCompression("not a zstd frame".to_owned())),
    }
}

fn decode_elements(headers: &FrameHeaders, raw: &[u8]) -> Result<Vec<EventRecord>, DecodeError> {
    let elements: Vec<WireEventIn<'_>> =
        rmp_serde::from_slice(raw).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    let actual = u32::try_from(elements.len()).unwrap_or(u32::MAX);
    if actual != headers.event_count {
        return Err(DecodeError::CountMismatch {
            declared: headers.event_count,
            actual,
        });
    }
    elements
        .into_iter()
        .enumerate()
        .map(|(index, element)| {
            let event = Event::decode_payload(
                &element.kind,
                element.envelope.schema_version,
                &element.data,
            )
            .map_err(|source| DecodeError::Payload {
                index: index as u32,
                source,
            })?;
            Ok(EventRecord {
                envelope: element.envelope,
                event,
            })
        })
        .collect()
}

/// Decodes one frame element (as written by [`encode_event`]); used by the golden fixtures.
pub fn decode_event(bytes: &[u8]) -> Result<EventRecord, DecodeError> {
    let element: WireEventIn<'_> =
        rmp_serde::from_slice(bytes).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    let event = Event::decode_payload(
        &element.kind,
        element.envelope.schema_version,
        &element.data,
    )
    .map_err(|source| DecodeError::Payload { index: 0, source })?;
    Ok(EventRecord {
        envelope: element.envelope,
        event,
    })
}
