//! `events export` and `events import`: the log to and from a compressed file, so that an operator can move
//! or inspect history offline.
//!
//! # The file format (version 1)
//!
//! A file is one zstd stream (level 3, with zstd's content checksum) of records. Each record is a 4-byte
//! big-endian length followed by that many bytes of MessagePack (named fields), holding one externally tagged
//! [`Record`]: `{"Header": {…}}`, `{"Frame": {…}}` or `{"Trailer": {…}}`.
//!
//! 1. One `Header` ([`FileHeader`]): `format` = `"cocoon-export"`, `version` = 1, `created_at` (µs since the
//!    epoch), `producer`, the operator's `filter` in words, and per stream the log's last sequence when the
//!    export started and how many frames (at most) the export expected to read from it.
//! 2. One `Frame` ([`FrameRecord`]) per JetStream message, in stream order: `stream` (`TASKS`), `subject`,
//!    `seq` (the sequence in the source stream), `stored_at` (µs), `headers` (every NATS header as
//!    `[name, value]` pairs sorted by name, `Nats-Msg-Id` included) and `body` (the frame's bytes, untouched:
//!    still MessagePack, still zstd level 1 where the publisher compressed it). Streams follow one another in
//!    the order of the header.
//! 3. One `Trailer` ([`Trailer`]): per stream the frames, the events (from each frame's `Cocoon-Event-Count`
//!    header) and the frames that carry no such count (dead letters, foreign messages), plus the totals.
//!
//! A reader checks the header (magic and version) before anything else, checks that every frame belongs to a
//! stream of the header, on a subject of that stream, with rising sequences, and that the trailer's counts
//! match what it read; then it requires the end of the file, which makes zstd verify its checksum. A file cut
//! short has no trailer, so truncation is always detected. Every failure is an [`ImportError`] that says what
//! was wrong and how many frames were read before it.
//!
//! The reader and writer are pure functions over [`Read`] and [`Write`]; the NATS side (reading streams
//! through ephemeral ordered consumers, publishing with many acks in flight) is [`export`] and [`import`].
//!
//! # Import
//!
//! Import reads the whole file once to validate it (nothing is published from a damaged file), then
//! publishes every frame raw to its subject with its original headers, in file order, with up to
//! [`ImportOptions::window`] acks in flight, awaited in order. Because the headers keep `Nats-Msg-Id`, importing
//! the same file again within the streams' duplicate window (2 minutes) stores nothing twice; the server's
//! duplicate acks are counted. The target streams keep their own sequences: frames land at 1, 2, … of an
//! empty stream whatever their sequence in the source.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::str::FromStr as _;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use async_nats::jetstream::{
    self,
    consumer::{DeliverPolicy, pull::OrderedConfig},
    context::PublishAckFuture,
    message::PublishMessage,
};
use events::{Stream, Timestamp};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::Shutdown;
use crate::cli::{ExportArgs, ImportArgs};
use crate::dump::Query;
use crate::when::to_offset;

/// The `format` field of every export header: the file's magic.
pub const FORMAT: &str = "cocoon-export";
/// The format version this build writes and reads.
pub const VERSION: u32 = 1;
/// zstd level of the file. Frame bodies above 1 KiB are already zstd-1, so a higher level gains little.
pub const ZSTD_LEVEL: i32 = 3;
/// Largest record a reader accepts: a frame of the largest payload NATS allows (64 MiB) plus its headers.
/// Guards against allocating what a corrupted length prefix claims.
pub const MAX_RECORD_BYTES: usize = 64 * 1024 * 1024 + 64 * 1024;
/// The 4 bytes every zstd frame starts with.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];
/// Headers that are preconditions on the source stream's state at publish time (optimistic concurrency,
/// atomic batches): replaying them against another stream would fail or mean something else, so import
/// leaves them out. Everything else, `Nats-Msg-Id` first of all, is published as it was stored.
const NOT_REPLAYED_HEADER_PREFIXES: [&str; 2] = ["Nats-Expected-", "Nats-Batch-"];
/// How often long runs print progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// Failed publishes listed one by one; the rest are counted.
const FAILURES_LISTED: usize = 20;

// ---------------------------------------------------------------------------------------------------------
// The format.

/// The first record of a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileHeader {
    /// Always [`FORMAT`].
    pub format: String,
    /// [`VERSION`] when this build wrote it.
    pub version: u32,
    /// When the export started.
    pub created_at: Timestamp,
    /// What wrote the file, e.g. `cocoon 0.1.0`.
    pub producer: String,
    /// The operator's filter, in words (`streams TASKS, PAYMENTS; seq 10..=20`).
    pub filter: String,
    /// The streams the file holds, in the order their frames follow.
    pub streams: Vec<StreamPlan>,
}

impl FileHeader {
    /// A version-1 header created now.
    pub fn new(filter: impl Into<String>, streams: Vec<StreamPlan>) -> FileHeader {
        FileHeader {
            format: FORMAT.to_owned(),
            version: VERSION,
            created_at: Timestamp::now(),
            producer: format!("cocoon {}", env!("CARGO_PKG_VERSION")),
            filter: filter.into(),
            streams,
        }
    }

    /// The frames the export expected, summed over streams (an upper bound; for progress).
    pub fn expected_frames(&self) -> u64 {
        self.streams.iter().map(|s| s.expected_frames).sum()
    }
}

/// One stream of a file, as the export planned it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamPlan {
    /// The JetStream name, e.g. `TASKS`.
    pub stream: String,
    /// The stream's last sequence when the export started (0: empty); the export reads no further.
    pub last_seq: u64,
    /// Frames the export expected to read: the consumer's pending count, an upper bound when `--until` or
    /// `--to-seq` cut the range.
    pub expected_frames: u64,
}

/// One JetStream message, as it was stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrameRecord {
    /// The stream it was read from, e.g. `TASKS`.
    pub stream: String,
    pub subject: String,
    /// Its sequence in the source stream.
    pub seq: u64,
    /// When the source stream stored it.
    pub stored_at: Timestamp,
    /// Every NATS header, `(name, value)`, sorted by name (a repeated name keeps its values' order).
    pub headers: Vec<(String, String)>,
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
}

impl FrameRecord {
    /// The events the frame says it holds (`Cocoon-Event-Count`), or `None` when its headers are not a
    /// valid frame's.
    pub fn event_count(&self) -> Option<u64> {
        events::FrameHeaders::parse(|name| self.header(name))
            .ok()
            .map(|h| u64::from(h.event_count))
    }

    /// The first value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The last record of a file: what it holds, so that a reader knows it got everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trailer {
    /// One entry per stream of the header, in the same order.
    pub streams: Vec<StreamCount>,
    pub frames: u64,
    pub events: u64,
}

impl Trailer {
    /// The counts of one stream.
    pub fn stream(&self, name: &str) -> Option<&StreamCount> {
        self.streams.iter().find(|s| s.stream == name)
    }
}

/// What a file holds of one stream.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamCount {
    pub stream: String,
    pub frames: u64,
    /// Events of the frames that carry a `Cocoon-Event-Count`.
    pub events: u64,
    /// Frames without a valid event count (dead letters, messages not published by a Cocoon publisher).
    pub opaque_frames: u64,
    /// Source sequences of the first and last frame (0 when there is none).
    pub first_seq: u64,
    pub last_seq: u64,
}

impl StreamCount {
    fn new(stream: &str) -> StreamCount {
        StreamCount {
            stream: stream.to_owned(),
            ..StreamCount::default()
        }
    }

    fn add(&mut self, frame: &FrameRecord) {
        self.frames += 1;
        match frame.event_count() {
            Some(n) => self.events += n,
            None => self.opaque_frames += 1,
        }
        if self.first_seq == 0 {
            self.first_seq = frame.seq;
        }
        self.last_seq = frame.seq;
    }
}

/// A record as written (borrowed, so that frames are not copied to be encoded).
#[derive(Serialize)]
enum RecordOut<'a> {
    Header(&'a FileHeader),
    Frame(&'a FrameRecord),
    Trailer(&'a Trailer),
}

/// A record as read.
#[derive(Deserialize)]
enum Record {
    Header(FileHeader),
    Frame(FrameRecord),
    Trailer(Trailer),
}

/// Only what every version's header keeps, so that a newer file is refused by its version, not by a field
/// this build does not know.
#[derive(Deserialize)]
enum Probe {
    Header(HeaderProbe),
    Frame(serde::de::IgnoredAny),
    Trailer(serde::de::IgnoredAny),
}

#[derive(Deserialize)]
struct HeaderProbe {
    format: String,
    version: u32,
}

/// Why an export file could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("cannot write the export: {0}")]
    Io(#[from] io::Error),
    #[error("cannot encode a record: {0}")]
    Encode(String),
    #[error(
        "frame {stream} seq {seq} is {bytes} bytes encoded, more than a file may hold ({MAX_RECORD_BYTES})"
    )]
    RecordTooLarge {
        stream: String,
        seq: u64,
        bytes: usize,
    },
    #[error("frame of stream {stream} (seq {seq}) is not in the file's header")]
    NotInHeader { stream: String, seq: u64 },
    #[error("frame {stream} seq {seq} comes after seq {after}: frames must be in stream order")]
    OutOfOrder {
        stream: String,
        seq: u64,
        after: u64,
    },
}

/// Why an export file could not be read. Every variant says how far the reader got.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("not a cocoon export: {found}")]
    BadMagic { found: String },
    #[error("export format version {found} is not supported (this build reads version {VERSION})")]
    UnsupportedVersion { found: u32 },
    #[error(
        "the file is truncated: it ends after {after_frames} frames, before its trailer (an interrupted export or copy?)"
    )]
    Truncated { after_frames: u64 },
    #[error("the file is corrupt after {after_frames} frames: {reason}")]
    Corrupt { after_frames: u64, reason: String },
    #[error("cannot read the file after {after_frames} frames: {source}")]
    Io {
        after_frames: u64,
        #[source]
        source: io::Error,
    },
}

/// An error of the underlying file, marked so that it is not mistaken for zstd's complaint about the bytes.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct SourceError(io::Error);

/// The input with its errors marked as [`SourceError`].
struct Source<R>(R);

impl<R: Read> Read for Source<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0
            .read(buf)
            .map_err(|e| io::Error::new(e.kind(), SourceError(e)))
    }
}

/// Writes an export: [`ExportWriter::new`] writes the header, [`ExportWriter::write_frame`] each frame,
/// [`ExportWriter::finish`] the trailer and the end of the zstd stream.
pub struct ExportWriter<W: Write> {
    out: zstd::stream::write::Encoder<'static, W>,
    counts: Vec<StreamCount>,
    buf: Vec<u8>,
}

impl<W: Write> fmt::Debug for ExportWriter<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExportWriter")
            .field("counts", &self.counts)
            .finish_non_exhaustive()
    }
}

impl<W: Write> ExportWriter<W> {
    pub fn new(out: W, header: &FileHeader) -> Result<Self, ExportError> {
        let mut out = zstd::stream::write::Encoder::new(out, ZSTD_LEVEL)?;
        out.include_checksum(true)?;
        let mut writer = ExportWriter {
            out,
            counts: header
                .streams
                .iter()
                .map(|s| StreamCount::new(&s.stream))
                .collect(),
            buf: Vec::new(),
        };
        writer.write_record(&RecordOut::Header(header))?;
        Ok(writer)
    }

    /// Appends one frame; frames of a stream must come in rising sequence.
    pub fn write_frame(&mut self, frame: &FrameRecord) -> Result<(), ExportError> {
        let Some(index) = self.counts.iter().position(|c| c.stream == frame.stream) else {
            return Err(ExportError::NotInHeader {
                stream: frame.stream.clone(),
                seq: frame.seq,
            });
        };
        let last = self.counts[index].last_seq;
        if self.counts[index].frames > 0 && frame.seq <= last {
            return Err(ExportError::OutOfOrder {
                stream: frame.stream.clone(),
                seq: frame.seq,
                after: last,
            });
        }
        self.write_record(&RecordOut::Frame(frame))
            .map_err(|e| match e {
                ExportError::RecordTooLarge { bytes, .. } => ExportError::RecordTooLarge {
                    stream: frame.stream.clone(),
                    seq: frame.seq,
                    bytes,
                },
                e => e,
            })?;
        self.counts[index].add(frame);
        Ok(())
    }

    /// What was written so far.
    pub fn counts(&self) -> &[StreamCount] {
        &self.counts
    }

    /// Writes the trailer, ends the zstd stream and hands back the output (not flushed beyond zstd).
    pub fn finish(mut self) -> Result<(W, Trailer), ExportError> {
        let trailer = Trailer {
            frames: self.counts.iter().map(|c| c.frames).sum(),
            events: self.counts.iter().map(|c| c.events).sum(),
            streams: std::mem::take(&mut self.counts),
        };
        self.write_record(&RecordOut::Trailer(&trailer))?;
        let out = self.out.finish()?;
        Ok((out, trailer))
    }

    fn write_record(&mut self, record: &RecordOut<'_>) -> Result<(), ExportError> {
        self.buf.clear();
        rmp_serde::encode::write_named(&mut self.buf, record)
            .map_err(|e| ExportError::Encode(e.to_string()))?;
        if self.buf.len() > MAX_RECORD_BYTES {
            return Err(ExportError::RecordTooLarge {
                stream: String::new(),
                seq: 0,
                bytes: self.buf.len(),
            });
        }
        let len = u32::try_from(self.buf.len())
            .map_err(|_| ExportError::Encode("record too large".into()))?;
        self.out.write_all(&len.to_be_bytes())?;
        self.out.write_all(&self.buf)?;
        Ok(())
    }
}

/// The decompressed file: zstd over the 4 magic bytes already read, then the rest of the input.
type Decompressed<R> =
    zstd::stream::read::Decoder<'static, BufReader<io::Chain<io::Cursor<[u8; 4]>, Source<R>>>>;

/// Reads an export, checking it as it goes: [`ExportReader::open`] reads and checks the header,
/// [`ExportReader::next_frame`] returns frames until the trailer, which it checks against what it read.
pub struct ExportReader<R: Read> {
    input: Decompressed<R>,
    header: FileHeader,
    counts: Vec<StreamCount>,
    frames: u64,
    trailer: Option<Trailer>,
    buf: Vec<u8>,
}

impl<R: Read> fmt::Debug for ExportReader<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExportReader")
            .field("header", &self.header)
            .field("frames", &self.frames)
            .finish_non_exhaustive()
    }
}

impl<R: Read> ExportReader<R> {
    /// Reads and checks the header.
    pub fn open(input: R) -> Result<Self, ImportError> {
        let mut input = Source(input);
        let mut magic = [0u8; 4];
        let n = read_full(&mut input, &mut magic).map_err(|e| classify(e, 0))?;
        if magic[..n] != ZSTD_MAGIC[..n] {
            return Err(ImportError::BadMagic {
                found: format!(
                    "the file starts with {:02x?}, not a zstd stream",
                    &magic[..n]
                ),
            });
        }
        if n < magic.len() {
            return Err(ImportError::Truncated { after_frames: 0 });
        }
        let input = zstd::stream::read::Decoder::new(io::Cursor::new(magic).chain(input))
            .map_err(|e| classify(e, 0))?;
        let mut reader = ExportReader {
            input,
            header: FileHeader::new("", Vec::new()),
            counts: Vec::new(),
            frames: 0,
            trailer: None,
            buf: Vec::new(),
        };
        let bad_magic = |found: String| ImportError::BadMagic { found };
        let Some(len) = reader.read_len()? else {
            return Err(ImportError::Truncated { after_frames: 0 });
        };
        if len > MAX_RECORD_BYTES {
            // Not even a plausible record where the header should be: some other zstd file.
            return Err(bad_magic(format!(
                "a zstd file whose first record would be {len} bytes"
            )));
        }
        reader.read_body(len)?;
        match rmp_serde::from_slice::<Probe>(&reader.buf) {
            Ok(Probe::Header(probe)) if probe.format == FORMAT => {
                if probe.version != VERSION {
                    return Err(ImportError::UnsupportedVersion {
                        found: probe.version,
                    });
                }
            }
            Ok(Probe::Header(probe)) => {
                return Err(bad_magic(format!(
                    "the header's format is {:?}",
                    probe.format
                )));
            }
            Ok(Probe::Frame(_) | Probe::Trailer(_)) => {
                return Err(bad_magic("the first record is not a header".into()));
            }
            Err(e) => return Err(bad_magic(format!("the first record is not a header ({e})"))),
        }
        match rmp_serde::from_slice::<Record>(&reader.buf) {
            Ok(Record::Header(header)) => {
                reader.counts = header
                    .streams
                    .iter()
                    .map(|s| StreamCount::new(&s.stream))
                    .collect();
                reader.header = header;
            }
            Ok(_) => return Err(bad_magic("the first record is not a header".into())),
            Err(e) => return Err(reader.corrupt(format!("the header does not decode: {e}"))),
        }
        for plan in &reader.header.streams {
            if Stream::parse(&plan.stream).is_none_or(|s| s.name() != plan.stream) {
                return Err(reader.corrupt(format!(
                    "the header names an unknown stream {:?}",
                    plan.stream
                )));
            }
        }
        Ok(reader)
    }

    pub fn header(&self) -> &FileHeader {
        &self.header
    }

    /// Frames read so far.
    pub fn frames_read(&self) -> u64 {
        self.frames
    }

    /// The trailer, once [`ExportReader::next_frame`] has returned `None`.
    pub fn trailer(&self) -> Option<&Trailer> {
        self.trailer.as_ref()
    }

    /// The next frame, or `None` once the trailer has been read, checked, and the file has ended.
    pub fn next_frame(&mut self) -> Result<Option<FrameRecord>, ImportError> {
        if self.trailer.is_some() {
            return Ok(None);
        }
        if !self.read_record_bytes()? {
            return Err(ImportError::Truncated {
                after_frames: self.frames,
            });
        }
        let record = rmp_serde::from_slice::<Record>(&self.buf).map_err(|e| {
            self.corrupt(format!("record {} does not decode: {e}", self.frames + 2))
        })?;
        match record {
            Record::Header(_) => Err(self.corrupt("a second header".into())),
            Record::Frame(frame) => {
                self.check_frame(&frame)?;
                self.frames += 1;
                Ok(Some(frame))
            }
            Record::Trailer(trailer) => {
                self.check_trailer(&trailer)?;
                // The end of the file must follow; reading it makes zstd verify the content checksum.
                let mut probe = [0u8; 1];
                let extra =
                    read_full(&mut self.input, &mut probe).map_err(|e| classify(e, self.frames))?;
                if extra > 0 {
                    return Err(self.corrupt("data after the trailer".into()));
                }
                self.trailer = Some(trailer);
                Ok(None)
            }
        }
    }

    fn check_frame(&mut self, frame: &FrameRecord) -> Result<(), ImportError> {
        let Some(index) = self.counts.iter().position(|c| c.stream == frame.stream) else {
            return Err(self.corrupt(format!(
                "a frame of stream {:?}, which the header does not list",
                frame.stream
            )));
        };
        if Stream::of_subject(&frame.subject).is_none_or(|s| s.name() != frame.stream) {
            return Err(self.corrupt(format!(
                "subject {:?} is not a subject of stream {}",
                frame.subject, frame.stream
            )));
        }
        let count = &self.counts[index];
        if count.frames > 0 && frame.seq <= count.last_seq {
            return Err(self.corrupt(format!(
                "{} seq {} follows seq {}",
                frame.stream, frame.seq, count.last_seq
            )));
        }
        for (name, value) in &frame.headers {
            if !valid_header_name(name) || value.contains(['\r', '\n']) {
                return Err(self.corrupt(format!(
                    "{} seq {} has an invalid header {name:?}",
                    frame.stream, frame.seq
                )));
            }
        }
        self.counts[index].add(frame);
        Ok(())
    }

    fn check_trailer(&self, trailer: &Trailer) -> Result<(), ImportError> {
        if trailer.streams.len() != self.counts.len() {
            return Err(self.corrupt(format!(
                "the trailer lists {} streams, the header {}",
                trailer.streams.len(),
                self.counts.len()
            )));
        }
        for (said, read) in trailer.streams.iter().zip(&self.counts) {
            if said != read {
                return Err(self.corrupt(format!(
                    "the trailer says {} has {} frames (seq {}..={}), the file holds {} (seq {}..={})",
                    said.stream, said.frames, said.first_seq, said.last_seq, read.frames, read.first_seq, read.last_seq
                )));
            }
        }
        let (frames, events) = self
            .counts
            .iter()
            .fold((0, 0), |(f, e), c| (f + c.frames, e + c.events));
        if trailer.frames != frames || trailer.events != events {
            return Err(self.corrupt(format!(
                "the trailer's totals ({} frames, {} events) disagree with its streams ({frames}, {events})",
                trailer.frames, trailer.events
            )));
        }
        Ok(())
    }

    /// Reads one record into `buf`; `false` at a clean end of the file.
    fn read_record_bytes(&mut self) -> Result<bool, ImportError> {
        let Some(len) = self.read_len()? else {
            return Ok(false);
        };
        if len > MAX_RECORD_BYTES {
            return Err(self.corrupt(format!(
                "a record claims {len} bytes, more than any record may hold ({MAX_RECORD_BYTES})"
            )));
        }
        self.read_body(len)?;
        Ok(true)
    }

    /// A record's length prefix; `None` at a clean end of the file.
    fn read_len(&mut self) -> Result<Option<usize>, ImportError> {
        let mut len = [0u8; 4];
        let n = read_full(&mut self.input, &mut len).map_err(|e| classify(e, self.frames))?;
        match n {
            0 => Ok(None),
            4 => Ok(Some(u32::from_be_bytes(len) as usize)),
            _ => Err(ImportError::Truncated {
                after_frames: self.frames,
            }),
        }
    }

    /// A record's `len` bytes into `buf`.
    fn read_body(&mut self, len: usize) -> Result<(), ImportError> {
        self.buf.clear();
        (&mut self.input)
            .take(len as u64)
            .read_to_end(&mut self.buf)
            .map_err(|e| classify(e, self.frames))?;
        if self.buf.len() < len {
            return Err(ImportError::Truncated {
                after_frames: self.frames,
            });
        }
        Ok(())
    }

    fn corrupt(&self, reason: String) -> ImportError {
        ImportError::Corrupt {
            after_frames: self.frames,
            reason,
        }
    }
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
fn read_full(input: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Sorts an IO error out: the file's own (Io), zstd's "the stream ends mid-frame" (Truncated), or zstd's
/// complaint about the bytes (Corrupt).
fn classify(e: io::Error, after_frames: u64) -> ImportError {
    if e.get_ref().is_some_and(|inner| inner.is::<SourceError>()) {
        ImportError::Io {
            after_frames,
            source: e,
        }
    } else if e.kind() == io::ErrorKind::UnexpectedEof {
        ImportError::Truncated { after_frames }
    } else {
        ImportError::Corrupt {
            after_frames,
            reason: format!("zstd: {e}"),
        }
    }
}

/// NATS header names: printable ASCII without `:` or spaces.
fn valid_header_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
}

/// Reads a whole file, checking everything; returns its header and trailer.
pub fn verify(input: impl Read) -> Result<(FileHeader, Trailer), ImportError> {
    verify_with(input, |_| {})
}

/// [`verify`], calling `progress` with the frames read so far after each frame.
fn verify_with(
    input: impl Read,
    mut progress: impl FnMut(u64),
) -> Result<(FileHeader, Trailer), ImportError> {
    let mut reader = ExportReader::open(input)?;
    while reader.next_frame()?.is_some() {
        progress(reader.frames_read());
    }
    let trailer = reader.trailer.take().unwrap_or_default();
    Ok((reader.header, trailer))
}

// ---------------------------------------------------------------------------------------------------------
// Progress.

/// Prints a progress line to stderr at most every second.
#[derive(Debug)]
struct Progress {
    label: &'static str,
    total_frames: Option<u64>,
    started: Instant,
    last: Instant,
}

impl Progress {
    fn new(label: &'static str, total_frames: Option<u64>) -> Progress {
        let now = Instant::now();
        Progress {
            label,
            total_frames,
            started: now,
            last: now,
        }
    }

    fn tick(&mut self, frames: u64, events: u64) {
        if self.last.elapsed() >= PROGRESS_EVERY {
            self.last = Instant::now();
            eprintln!(
                "{}",
                progress_line(
                    self.label,
                    frames,
                    self.total_frames,
                    events,
                    self.started.elapsed()
                )
            );
        }
    }
}

/// `export: 12000/50000 frames (24%), 600000 events, 512000 events/s, ETA 7s`.
fn progress_line(
    label: &str,
    frames: u64,
    total_frames: Option<u64>,
    events: u64,
    elapsed: Duration,
) -> String {
    let secs = elapsed.as_secs_f64().max(1e-3);
    let rate = events as f64 / secs;
    match total_frames {
        Some(total) if total > 0 => {
            let total = total.max(frames);
            let left = (total - frames) as f64 / (frames as f64 / secs).max(1e-9);
            format!(
                "{label}: {frames}/{total} frames ({}%), {events} events, {rate:.0} events/s, ETA {}",
                frames * 100 / total,
                short_duration(Duration::from_secs_f64(left.min(1e9)))
            )
        }
        _ => format!("{label}: {frames} frames, {events} events, {rate:.0} events/s"),
    }
}

/// `7s`, `3m05s`, `2h03m`.
fn short_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

fn rate(events: u64, elapsed: Duration) -> f64 {
    events as f64 / elapsed.as_secs_f64().max(1e-6)
}

// ---------------------------------------------------------------------------------------------------------
// Export: streams to a file.

/// What an export wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSummary {
    pub header: FileHeader,
    pub trailer: Trailer,
    /// Compressed bytes written.
    pub bytes: u64,
    pub elapsed: Duration,
}

impl fmt::Display for ExportSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let streams: Vec<String> = self
            .trailer
            .streams
            .iter()
            .filter(|s| s.frames > 0)
            .map(|s| format!("{} {}", s.stream, s.frames))
            .collect();
        write!(
            f,
            "exported {} frames ({} events) [{}] in {} bytes, {:.2}s ({:.0} events/s)",
            self.trailer.frames,
            self.trailer.events,
            streams.join(", "),
            self.bytes,
            self.elapsed.as_secs_f64(),
            rate(self.trailer.events, self.elapsed)
        )
    }
}

/// Counts the bytes that pass.
struct Counting<W> {
    inner: W,
    bytes: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Checks that an export's filter makes sense for whole frames.
pub fn export_query(args: &ExportArgs) -> anyhow::Result<Query> {
    if !args.filter.types.is_empty() {
        bail!(
            "--type is not supported by export, which moves whole frames (a frame holds events of many types); \
             use `cocoon events dump --type` to inspect events"
        );
    }
    if args.filter.limit.is_some() {
        bail!(
            "--limit is not supported by export, which moves whole frames; narrow it with --to-seq or --until"
        );
    }
    Query::from_filter(&args.filter, false)
}

/// The filter in words, for the header.
fn describe(query: &Query) -> String {
    let mut parts = vec![format!(
        "streams {}",
        query
            .streams
            .iter()
            .map(|s| s.name())
            .collect::<Vec<_>>()
            .join(", ")
    )];
    if !query.subjects.is_empty() {
        parts.push(format!("subjects {}", query.subjects.join(", ")));
    }
    if query.from_seq.is_some() || query.to_seq.is_some() {
        parts.push(format!(
            "seq {}..={}",
            query.from_seq.map_or(String::new(), |s| s.to_string()),
            query.to_seq.map_or(String::new(), |s| s.to_string())
        ));
    }
    if let Some(since) = query.since {
        parts.push(format!("since {since}"));
    }
    if let Some(until) = query.until {
        parts.push(format!("until {until}"));
    }
    parts.join("; ")
}

/// Writes the frames matching `query` to `out` as an export file; hands `out` back with what was written.
/// Streams are read one after the other, each up to its last sequence when the export started.
/// Interrupted by `shutdown`, it fails and leaves a file without a trailer, which import refuses.
pub async fn export<W: Write + Send + 'static>(
    js: &jetstream::Context,
    query: &Query,
    out: W,
    shutdown: Shutdown,
) -> anyhow::Result<(W, ExportSummary)> {
    let started = Instant::now();
    let mut plans = Vec::new();
    for &stream in &query.streams {
        plans.push(plan_stream(js, stream, query).await?);
    }
    let header = FileHeader::new(
        describe(query),
        plans.iter().map(|(plan, _)| plan.clone()).collect(),
    );

    // zstd runs on a blocking thread, fed through a bounded channel (backpressure on the readers). It writes
    // the trailer only on `Finish`: if the readers fail, the channel just closes and the file stays without one.
    let (tx, mut rx) = mpsc::channel::<ToWriter>(256);
    let writer_header = header.clone();
    let writer =
        tokio::task::spawn_blocking(move || -> Result<(Counting<W>, Trailer), ExportError> {
            let mut progress = Progress::new("export", Some(writer_header.expected_frames()));
            let mut writer = ExportWriter::new(
                Counting {
                    inner: out,
                    bytes: 0,
                },
                &writer_header,
            )?;
            let (mut frames, mut events) = (0, 0);
            loop {
                match rx.blocking_recv() {
                    Some(ToWriter::Frame(frame)) => {
                        writer.write_frame(&frame)?;
                        frames += 1;
                        events += frame.event_count().unwrap_or(0);
                        progress.tick(frames, events);
                    }
                    Some(ToWriter::Finish) => break,
                    None => return Err(ExportError::Io(io::Error::other("export abandoned"))),
                }
            }
            let (mut out, trailer) = writer.finish()?;
            out.flush()?;
            Ok((out, trailer))
        });

    let mut read = Ok(());
    for (plan, range) in &plans {
        if plan.expected_frames == 0 {
            continue;
        }
        read = read_stream(js, range, query, &tx, &shutdown).await;
        if read.is_err() {
            break;
        }
    }
    if read.is_ok() {
        // A send fails only when the writer already stopped on its own error, reported below.
        let _ = tx.send(ToWriter::Finish).await;
    }
    drop(tx);
    let written = writer.await.context("the export writer stopped")?;
    // A read error is the cause; the writer's "abandoned" is its consequence.
    read?;
    let (out, trailer) = written?;
    Ok((
        out.inner,
        ExportSummary {
            header,
            trailer,
            bytes: out.bytes,
            elapsed: started.elapsed(),
        },
    ))
}

/// What the export's readers send its writer.
#[derive(Debug)]
enum ToWriter {
    Frame(FrameRecord),
    /// Every stream was read: write the trailer.
    Finish,
}

/// Where one stream's export starts and ends.
#[derive(Debug, Clone)]
struct Range {
    stream: Stream,
    end: u64,
    deliver_policy: DeliverPolicy,
    filter_subjects: Vec<String>,
}

/// Looks at a stream before the export: its last sequence, and how many frames the range holds (the
/// pending count of a throwaway ordered consumer).
async fn plan_stream(
    js: &jetstream::Context,
    stream: Stream,
    query: &Query,
) -> anyhow::Result<(StreamPlan, Range)> {
    let mut handle = js
        .get_stream(stream.name())
        .await
        .with_context(|| format!("stream {} not found; run `cocoon provision`", stream.name()))?;
    let state = handle.info().await?.state.clone();
    let end = query
        .to_seq
        .map_or(state.last_sequence, |to| to.min(state.last_sequence));
    let deliver_policy = match (query.from_seq, query.since) {
        (Some(seq), _) => DeliverPolicy::ByStartSequence {
            start_sequence: seq.max(1),
        },
        (None, Some(since)) => DeliverPolicy::ByStartTime {
            start_time: to_offset(since)?,
        },
        (None, None) => DeliverPolicy::All,
    };
    let range = Range {
        stream,
        end,
        deliver_policy,
        filter_subjects: query
            .subjects
            .iter()
            .filter(|s| Stream::of_subject(s) == Some(stream))
            .cloned()
            .collect(),
    };
    let mut plan = StreamPlan {
        stream: stream.name().to_owned(),
        last_seq: state.last_sequence,
        expected_frames: 0,
    };
    let start = query.from_seq.unwrap_or(0).max(state.first_sequence);
    if state.messages == 0 || start > end {
        return Ok((plan, range));
    }
    let consumer = handle
        .create_consumer(OrderedConfig {
            filter_subjects: range.filter_subjects.clone(),
            deliver_policy: range.deliver_policy,
            ..Default::default()
        })
        .await
        .with_context(|| format!("cannot read {}", stream.name()))?;
    let pending = consumer.cached_info().num_pending;
    // Tidy up now rather than when the server notices the consumer is idle; failing to is harmless.
    let _ = handle.delete_consumer(&consumer.cached_info().name).await;
    plan.expected_frames = pending.min(end - start + 1);
    Ok((plan, range))
}

/// Sends one stream's frames in the range to the writer.
async fn read_stream(
    js: &jetstream::Context,
    range: &Range,
    query: &Query,
    tx: &mpsc::Sender<ToWriter>,
    shutdown: &Shutdown,
) -> anyhow::Result<()> {
    let name = range.stream.name();
    let handle = js
        .get_stream(name)
        .await
        .with_context(|| format!("stream {name} not found; run `cocoon provision`"))?;
    let consumer = handle
        .create_consumer(OrderedConfig {
            filter_subjects: range.filter_subjects.clone(),
            deliver_policy: range.deliver_policy,
            ..Default::default()
        })
        .await
        .with_context(|| format!("cannot read {name}"))?;
    if consumer.cached_info().num_pending == 0 {
        return Ok(());
    }
    let mut messages = consumer.messages().await?;
    loop {
        let message = tokio::select! {
            message = messages.next() => message,
            () = shutdown.wait() => bail!("export interrupted"),
        };
        let Some(message) = message else { break };
        let message = message.with_context(|| format!("reading {name}"))?;
        let info = message.info().map_err(|e| anyhow::anyhow!("{e}"))?;
        let seq = info.stream_sequence;
        let pending = info.pending;
        let stored_at = Timestamp::from_micros(
            i64::try_from(info.published.unix_timestamp_nanos() / 1000).unwrap_or(i64::MAX),
        );
        if seq > range.end || query.until.is_some_and(|u| stored_at > u) {
            break;
        }
        let last = seq >= range.end || pending == 0;
        if query.since.is_some_and(|s| stored_at < s) {
            if last {
                break;
            }
            continue;
        }
        let mut headers = Vec::new();
        if let Some(map) = &message.headers {
            for (header, values) in map.iter() {
                for value in values {
                    headers.push((header.to_string(), value.as_str().to_owned()));
                }
            }
        }
        // Stable: a repeated header keeps its values' order.
        headers.sort_by(|a, b| a.0.cmp(&b.0));
        let frame = FrameRecord {
            stream: name.to_owned(),
            subject: message.subject.to_string(),
            seq,
            stored_at,
            headers,
            body: message.payload.to_vec(),
        };
        if tx.send(ToWriter::Frame(frame)).await.is_err() {
            // The writer stopped on an error, which the caller reports.
            break;
        }
        if last {
            break;
        }
    }
    Ok(())
}

/// `cocoon events export`: checks the filter, connects, writes the file (or stdout for `-`).
pub async fn export_command(
    conn: &crate::cli::Connection,
    args: &ExportArgs,
    shutdown: Shutdown,
) -> anyhow::Result<ExitCode> {
    let query = export_query(args)?;
    let bus = crate::connect(conn).await?;
    let summary = if args.output == Path::new("-") {
        let out = io::BufWriter::new(io::stdout());
        let (mut out, summary) = export(&bus.jetstream, &query, out, shutdown)
            .await
            .context("the output is incomplete (no trailer), and import will refuse it")?;
        out.flush().context("writing to stdout")?;
        summary
    } else {
        // Written beside the target and renamed once complete: FILE is either the whole export or untouched.
        let path = &args.output;
        let mut partial = path.clone().into_os_string();
        partial.push(".partial");
        let partial = PathBuf::from(partial);
        let file = std::fs::File::create(&partial)
            .with_context(|| format!("cannot create {}", partial.display()))?;
        let written = async {
            let (out, summary) =
                export(&bus.jetstream, &query, io::BufWriter::new(file), shutdown).await?;
            let file = out.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            std::fs::rename(&partial, path)?;
            anyhow::Ok(summary)
        };
        match written.await {
            Ok(summary) => summary,
            Err(e) => {
                let _ = std::fs::remove_file(&partial);
                return Err(e.context(format!(
                    "export to {} failed; nothing was written there",
                    path.display()
                )));
            }
        }
    };
    eprintln!("{summary}");
    Ok(ExitCode::SUCCESS)
}

// ---------------------------------------------------------------------------------------------------------
// Import: a file into the streams.

/// How to import.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// Only the frames of these streams; empty: every stream of the file.
    pub streams: Vec<Stream>,
    /// Import into streams that already hold messages.
    pub allow_non_empty: bool,
    /// Publish acks awaited at most at once.
    pub window: usize,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            streams: Vec::new(),
            allow_non_empty: false,
            window: 256,
        }
    }
}

/// What an import did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportSummary {
    /// Frames published (stored + duplicates + failed).
    pub frames: u64,
    /// Events of the stored frames.
    pub events: u64,
    /// Events of every frame published, stored or not (for the rate).
    pub published_events: u64,
    /// Frames the server stored.
    pub stored: u64,
    /// Frames the server already had (same `Nats-Msg-Id` within the duplicate window).
    pub duplicates: u64,
    /// Frames that were not stored.
    pub failed: u64,
    /// The first failures, one line each (`TASKS seq 12 (tasks.3): reason`).
    pub failures: Vec<String>,
    /// Per stream name: (frames stored, duplicates).
    pub streams: BTreeMap<String, (u64, u64)>,
    pub elapsed: Duration,
}

impl fmt::Display for ImportSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let streams: Vec<String> = self
            .streams
            .iter()
            .map(|(s, (stored, dup))| format!("{s} {stored}+{dup}"))
            .collect();
        write!(
            f,
            "imported {} frames: {} stored ({} events), {} duplicates, {} failed [{}] in {:.2}s ({:.0} events/s)",
            self.frames,
            self.stored,
            self.events,
            self.duplicates,
            self.failed,
            streams.join(", "),
            self.elapsed.as_secs_f64(),
            rate(self.published_events, self.elapsed)
        )
    }
}

/// A frame whose ack is awaited.
struct InFlight {
    stream: String,
    subject: String,
    seq: u64,
    events: u64,
    ack: PublishAckFuture,
}

/// Imports the export at `path`: validates the whole file first, checks the target streams, then publishes
/// each frame raw with its original headers, in order, with `options.window` acks in flight.
/// A file that fails validation fails with an [`ImportError`] (reachable through `downcast_ref`) and
/// nothing is published. Failed publishes are counted in the summary, not returned as an error.
pub async fn import(
    js: &jetstream::Context,
    path: &Path,
    options: &ImportOptions,
    shutdown: Shutdown,
) -> anyhow::Result<ImportSummary> {
    let started = Instant::now();
    // Pass 1: the whole file, so that a damaged one publishes nothing.
    let file_path = path.to_path_buf();
    let (header, trailer) = tokio::task::spawn_blocking(move || {
        let file = open(&file_path)?;
        let mut progress = Progress::new("check", None);
        verify_with(BufReader::new(file), |frames| progress.tick(frames, 0))
            .with_context(|| format!("{} cannot be imported", file_path.display()))
    })
    .await
    .context("the file check stopped")??;

    let selected: Vec<&StreamCount> = trailer
        .streams
        .iter()
        .filter(|s| {
            options.streams.is_empty() || options.streams.iter().any(|o| o.name() == s.stream)
        })
        .collect();
    for wanted in &options.streams {
        if trailer.stream(wanted.name()).is_none() {
            bail!(
                "the file holds no stream {}; it holds {}",
                wanted.name(),
                header
                    .streams
                    .iter()
                    .map(|s| s.stream.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    for count in selected.iter().filter(|c| c.frames > 0) {
        let mut stream = js.get_stream(&count.stream).await.with_context(|| {
            format!(
                "stream {} does not exist on this server; create the streams with `cocoon provision` first",
                count.stream
            )
        })?;
        let info = stream.info().await?;
        let messages = info.state.messages;
        if messages > 0 && !options.allow_non_empty {
            bail!(
                "stream {} is not empty ({messages} messages, seq {}..={}); import into empty streams, or pass \
                 --allow-non-empty to add the file's frames after them (frames the stream already holds are \
                 dropped as duplicates only within its {}s duplicate window)",
                count.stream,
                info.state.first_sequence,
                info.state.last_sequence,
                info.config.duplicate_window.as_secs()
            );
        }
    }
    let total: u64 = selected.iter().map(|c| c.frames).sum();
    let keep: Vec<String> = selected.iter().map(|c| c.stream.clone()).collect();

    // Pass 2: read on a blocking thread, publish here.
    let (tx, mut rx) = mpsc::channel::<Result<FrameRecord, ImportError>>(options.window.max(1));
    let file_path = path.to_path_buf();
    let reader = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let file = open(&file_path)?;
        let mut reader = ExportReader::open(BufReader::new(file))?;
        loop {
            let next = reader.next_frame();
            let done = matches!(next, Ok(None) | Err(_));
            let item = match next {
                Ok(Some(frame)) if !keep.contains(&frame.stream) => continue,
                Ok(Some(frame)) => Ok(frame),
                Ok(None) => return Ok(()),
                Err(e) => Err(e),
            };
            if tx.blocking_send(item).is_err() || done {
                return Ok(());
            }
        }
    });

    let mut summary = ImportSummary::default();
    let mut progress = Progress::new("import", Some(total));
    let mut in_flight: VecDeque<InFlight> = VecDeque::new();
    let mut interrupted = false;
    loop {
        let next = tokio::select! {
            next = rx.recv() => next,
            () = shutdown.wait() => { interrupted = true; None }
        };
        let Some(frame) = next else { break };
        // The file changed between the passes: stop, after settling what is in flight.
        let frame = match frame {
            Ok(frame) => frame,
            Err(e) => {
                settle_all(&mut in_flight, &mut summary).await;
                return Err(anyhow::Error::new(e).context(format!(
                    "{} changed while it was being imported",
                    path.display()
                )));
            }
        };
        summary.frames += 1;
        let events = frame.event_count().unwrap_or(0);
        summary.published_events += events;
        match publish_frame(js, &frame).await {
            Ok(ack) => in_flight.push_back(InFlight {
                stream: frame.stream,
                subject: frame.subject,
                seq: frame.seq,
                events,
                ack,
            }),
            Err(reason) => fail(
                &mut summary,
                &frame.stream,
                frame.seq,
                &frame.subject,
                reason,
            ),
        }
        while in_flight.len() >= options.window.max(1) {
            if let Some(next) = in_flight.pop_front() {
                settle(next, &mut summary).await;
            }
        }
        progress.tick(summary.frames, summary.published_events);
    }
    settle_all(&mut in_flight, &mut summary).await;
    drop(rx);
    reader.await.context("the file reader stopped")??;
    summary.elapsed = started.elapsed();
    if interrupted {
        bail!(
            "import interrupted after {} of {total} frames ({summary}); run it again with --allow-non-empty \
             within the duplicate window to finish (frames already stored are dropped as duplicates)",
            summary.frames
        );
    }
    Ok(summary)
}

fn open(path: &Path) -> anyhow::Result<std::fs::File> {
    std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))
}

/// Publishes one frame as it was stored; the error is the reason, for the failure list.
async fn publish_frame(
    js: &jetstream::Context,
    frame: &FrameRecord,
) -> Result<PublishAckFuture, String> {
    let mut headers = async_nats::HeaderMap::new();
    for (name, value) in &frame.headers {
        if NOT_REPLAYED_HEADER_PREFIXES
            .iter()
            .any(|p| name.starts_with(p))
        {
            continue;
        }
        let name = async_nats::header::HeaderName::from_str(name)
            .map_err(|e| format!("header {name:?}: {e}"))?;
        let value = async_nats::HeaderValue::from_str(value)
            .map_err(|e| format!("header value {value:?}: {e}"))?;
        headers.append(name, value);
    }
    let message = PublishMessage::build()
        .payload(bytes::Bytes::copy_from_slice(&frame.body))
        .headers(headers);
    js.send_publish(frame.subject.clone(), message)
        .await
        .map_err(|e| e.to_string())
}

async fn settle(frame: InFlight, summary: &mut ImportSummary) {
    match frame.ack.await {
        Ok(ack) if ack.stream != frame.stream => {
            let reason = format!("stored in stream {} instead", ack.stream);
            fail(summary, &frame.stream, frame.seq, &frame.subject, reason);
        }
        Ok(ack) => {
            let entry = summary.streams.entry(frame.stream).or_default();
            if ack.duplicate {
                summary.duplicates += 1;
                entry.1 += 1;
            } else {
                summary.stored += 1;
                summary.events += frame.events;
                entry.0 += 1;
            }
        }
        Err(e) => fail(
            summary,
            &frame.stream,
            frame.seq,
            &frame.subject,
            e.to_string(),
        ),
    }
}

async fn settle_all(in_flight: &mut VecDeque<InFlight>, summary: &mut ImportSummary) {
    while let Some(frame) = in_flight.pop_front() {
        settle(frame, summary).await;
    }
}

fn fail(summary: &mut ImportSummary, stream: &str, seq: u64, subject: &str, reason: String) {
    summary.failed += 1;
    if summary.failures.len() < FAILURES_LISTED {
        let line = format!("{stream} seq {seq} ({subject}): {reason}");
        eprintln!("import: not stored: {line}");
        summary.failures.push(line);
    }
}

/// `cocoon events import`: checks the arguments, connects, imports, and fails when any frame was not stored.
pub async fn import_command(
    conn: &crate::cli::Connection,
    args: &ImportArgs,
    shutdown: Shutdown,
) -> anyhow::Result<ExitCode> {
    if args.input == Path::new("-") {
        bail!(
            "import reads a file, not stdin: it checks the whole file before publishing anything, then reads it again"
        );
    }
    let mut streams = Vec::new();
    for s in &args.streams {
        let stream = Stream::parse(s).with_context(|| {
            format!(
                "unknown stream {s:?}; streams are {}",
                Stream::ALL.map(|s| s.prefix()).join(", ")
            )
        })?;
        if !streams.contains(&stream) {
            streams.push(stream);
        }
    }
    let options = ImportOptions {
        streams,
        allow_non_empty: args.allow_non_empty,
        ..ImportOptions::default()
    };
    let bus = crate::connect(conn).await?;
    let summary = import(&bus.jetstream, &args.input, &options, shutdown).await?;
    eprintln!("{summary}");
    if summary.failed > 0 {
        bail!(
            "{} of {} frames were not stored (the first are listed above); run the import again with \
             --allow-non-empty within the duplicate window: frames already stored are dropped as duplicates",
            summary.failed,
            summary.frames
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(stream: &str, subject: &str, seq: u64, body: &[u8]) -> FrameRecord {
        FrameRecord {
            stream: stream.into(),
            subject: subject.into(),
            seq,
            stored_at: Timestamp::from_micros(1_795_383_637_000_000 + seq as i64),
            headers: vec![
                ("Cocoon-Encoding".into(), "msgpack".into()),
                ("Cocoon-Event-Count".into(), "3".into()),
                ("Cocoon-Schema".into(), "1".into()),
                ("Nats-Msg-Id".into(), format!("id-{seq}")),
            ],
            body: body.to_vec(),
        }
    }

    fn sample() -> (Vec<FrameRecord>, Vec<u8>) {
        let header = FileHeader::new(
            "streams TASKS, RESULTS",
            vec![
                StreamPlan {
                    stream: "TASKS".into(),
                    last_seq: 40,
                    expected_frames: 40,
                },
                StreamPlan {
                    stream: "RESULTS".into(),
                    last_seq: 2,
                    expected_frames: 2,
                },
            ],
        );
        let mut frames: Vec<FrameRecord> = (1..=40)
            .map(|seq| {
                let body: Vec<u8> = (0..200u32).map(|i| (i * seq as u32 % 251) as u8).collect();
                frame("TASKS", &format!("tasks.{}", seq % 8), seq, &body)
            })
            .collect();
        let mut opaque = frame("RESULTS", "results.client-1", 7, b"not a frame");
        opaque.headers.clear();
        frames.push(opaque);
        let mut writer = ExportWriter::new(Vec::new(), &header).unwrap();
        for f in &frames {
            writer.write_frame(f).unwrap();
        }
        let (bytes, trailer) = writer.finish().unwrap();
        assert_eq!(trailer.frames, 41);
        assert_eq!(trailer.events, 120);
        assert_eq!(trailer.stream("RESULTS").unwrap().opaque_frames, 1);
        (frames, bytes)
    }

    fn read_all(bytes: &[u8]) -> Result<Vec<FrameRecord>, ImportError> {
        let mut reader = ExportReader::open(bytes)?;
        let mut frames = Vec::new();
        while let Some(f) = reader.next_frame()? {
            frames.push(f);
        }
        Ok(frames)
    }

    #[test]
    fn a_file_reads_back_what_was_written() {
        let (frames, bytes) = sample();
        assert_eq!(read_all(&bytes).unwrap(), frames);
        let (header, trailer) = verify(&bytes[..]).unwrap();
        assert_eq!(header.format, FORMAT);
        assert_eq!(header.version, VERSION);
        assert_eq!(header.expected_frames(), 42);
        assert_eq!(trailer.stream("TASKS").unwrap().first_seq, 1);
        assert_eq!(trailer.stream("TASKS").unwrap().last_seq, 40);
    }

    #[test]
    fn every_truncation_is_detected() {
        let (_, bytes) = sample();
        for len in 0..bytes.len() {
            match verify(&bytes[..len]) {
                Err(ImportError::Truncated { .. }) => {}
                other => panic!("cut at {len} of {}: {other:?}", bytes.len()),
            }
        }
    }

    #[test]
    fn a_flipped_bit_is_an_error_or_changes_nothing() {
        let (frames, bytes) = sample();
        let mut detected = 0;
        let bits: Vec<usize> = (0..bytes.len() * 8).step_by(17).collect();
        for &bit in &bits {
            let mut damaged = bytes.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            match read_all(&damaged) {
                Err(_) => detected += 1,
                // zstd's frame header has bits that change nothing (e.g. a larger window).
                Ok(read) => assert_eq!(read, frames, "bit {bit} changed the content undetected"),
            }
        }
        assert!(
            detected > bits.len() * 9 / 10,
            "{detected} of {}",
            bits.len()
        );
    }

    #[test]
    fn foreign_files_and_versions_are_refused() {
        assert!(matches!(
            verify(&b"{\"not\": \"zstd\"}"[..]),
            Err(ImportError::BadMagic { .. })
        ));
        assert!(matches!(
            verify(&b""[..]),
            Err(ImportError::Truncated { after_frames: 0 })
        ));
        let other_zstd =
            zstd::encode_all(&b"hello, a zstd file that is not an export"[..], 3).unwrap();
        assert!(
            matches!(verify(&other_zstd[..]), Err(ImportError::BadMagic { .. })),
            "{:?}",
            verify(&other_zstd[..])
        );

        let mut future = FileHeader::new("", vec![]);
        future.version = 2;
        let (bytes, _) = ExportWriter::new(Vec::new(), &future)
            .unwrap()
            .finish()
            .unwrap();
        let err = verify(&bytes[..]).unwrap_err();
        assert!(
            matches!(err, ImportError::UnsupportedVersion { found: 2 }),
            "{err:?}"
        );
        assert!(err.to_string().contains("version 2 is not supported"));

        let mut other = FileHeader::new("", vec![]);
        other.format = "something-else".into();
        let (bytes, _) = ExportWriter::new(Vec::new(), &other)
            .unwrap()
            .finish()
            .unwrap();
        assert!(matches!(
            verify(&bytes[..]),
            Err(ImportError::BadMagic { .. })
        ));
    }

    #[test]
    fn trailing_data_and_inconsistent_records_are_corrupt() {
        let (_, mut bytes) = sample();
        bytes.extend_from_slice(&zstd::encode_all(&[0u8, 0, 0, 1, 0xc0][..], 3).unwrap());
        let err = verify(&bytes[..]).unwrap_err();
        assert!(
            matches!(
                err,
                ImportError::Corrupt {
                    after_frames: 41,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("after the trailer"));

        // The writer refuses what the reader would refuse.
        let header = FileHeader::new(
            "",
            vec![StreamPlan {
                stream: "TASKS".into(),
                last_seq: 9,
                expected_frames: 9,
            }],
        );
        let mut writer = ExportWriter::new(Vec::new(), &header).unwrap();
        writer
            .write_frame(&frame("TASKS", "tasks.1", 5, b"x"))
            .unwrap();
        assert!(matches!(
            writer.write_frame(&frame("TASKS", "tasks.1", 5, b"x")),
            Err(ExportError::OutOfOrder {
                seq: 5,
                after: 5,
                ..
            })
        ));
        assert!(matches!(
            writer.write_frame(&frame("PAYMENTS", "payments.1", 6, b"x")),
            Err(ExportError::NotInHeader { .. })
        ));
    }

    #[test]
    fn progress_lines_show_rate_and_eta() {
        let line = progress_line("export", 250, Some(1000), 5000, Duration::from_secs(2));
        assert_eq!(
            line,
            "export: 250/1000 frames (25%), 5000 events, 2500 events/s, ETA 6s"
        );
        let line = progress_line("import", 10, None, 100, Duration::from_secs(1));
        assert_eq!(line, "import: 10 frames, 100 events, 100 events/s");
        assert_eq!(short_duration(Duration::from_secs(185)), "3m05s");
        assert_eq!(short_duration(Duration::from_secs(7380)), "2h03m");
    }
}
