//! Streams, subjects and partitions: the only place where a subject string is spelled.
//!
//! Keyed streams (TASKS, WORKERS, ATTESTATIONS, PAYMENTS) are split into `<prefix>.<partition>.<origin>` by a
//! stable hash of the key, so every event of one task or worker lands in one partition and stays in order there,
//! and consumers can take partitions in parallel (filter `<prefix>.<partition>.>`). Addressed streams put the
//! recipient's id after the prefix instead: `allocations.<worker>`, `results.<client>.<origin>`, so a worker or
//! client reads exactly its own.
//!
//! The origin tokens name who may publish the event ([`Origin`]): `worker.<id>`, `client.<id>`, `allocator`,
//! `attestor.<worker>`, `settler`, `operator`. NATS permissions match on them (a worker's credentials may publish
//! only `*.*.worker.<its id>`), and consumers check that every event in a frame has the origin its subject
//! names ([`check_origin`]), so an event cannot claim another worker's or client's identity.

use std::fmt;
use std::time::Duration;

use crate::ids::{ClientId, WorkerId};

/// The JetStream streams of the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stream {
    Tasks,
    Allocations,
    Workers,
    Attestations,
    Payments,
    Results,
    /// Frames that could not be decoded or applied, with the reason in headers.
    DeadLetters,
}

/// How a stream's subjects are formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Addressing {
    /// `<prefix>.<partition>.<origin>`, partition = hash(key) mod partitions.
    Partitioned,
    /// `<prefix>.<worker id>` (only the allocator publishes there).
    PerWorker,
    /// `<prefix>.<client id>.<origin>`.
    PerClient,
    /// `<prefix>.<source stream prefix>`.
    PerSourceStream,
}

impl Stream {
    /// The streams that carry events (everything but dead letters).
    pub const EVENT_STREAMS: [Stream; 6] = [
        Stream::Tasks,
        Stream::Allocations,
        Stream::Workers,
        Stream::Attestations,
        Stream::Payments,
        Stream::Results,
    ];

    /// Every stream, dead letters included.
    pub const ALL: [Stream; 7] = [
        Stream::Tasks,
        Stream::Allocations,
        Stream::Workers,
        Stream::Attestations,
        Stream::Payments,
        Stream::Results,
        Stream::DeadLetters,
    ];

    /// The JetStream stream name.
    pub const fn name(self) -> &'static str {
        match self {
            Stream::Tasks => "TASKS",
            Stream::Allocations => "ALLOCATIONS",
            Stream::Workers => "WORKERS",
            Stream::Attestations => "ATTESTATIONS",
            Stream::Payments => "PAYMENTS",
            Stream::Results => "RESULTS",
            Stream::DeadLetters => "DEAD_LETTERS",
        }
    }

    /// The first subject token.
    pub const fn prefix(self) -> &'static str {
        match self {
            Stream::Tasks => "tasks",
            Stream::Allocations => "allocations",
            Stream::Workers => "workers",
            Stream::Attestations => "attestations",
            Stream::Payments => "payments",
            Stream::Results => "results",
            Stream::DeadLetters => "deadletters",
        }
    }

    pub const fn addressing(self) -> Addressing {
        match self {
            Stream::Tasks | Stream::Workers | Stream::Attestations | Stream::Payments => {
                Addressing::Partitioned
            }
            Stream::Allocations => Addressing::PerWorker,
            Stream::Results => Addressing::PerClient,
            Stream::DeadLetters => Addressing::PerSourceStream,
        }
    }

    /// The wildcard that captures every subject of the stream (and nothing shorter: a message without its
    /// partition and origin tokens has no stream, so its publish fails).
    pub fn filter(self) -> String {
        if self.has_origin() {
            format!("{}.*.>", self.prefix())
        } else {
            format!("{}.*", self.prefix())
        }
    }

    /// Whether the stream's subjects carry origin tokens (see [`Origin`]).
    pub const fn has_origin(self) -> bool {
        matches!(
            self.addressing(),
            Addressing::Partitioned | Addressing::PerClient
        )
    }

    /// Parses a stream name (`TASKS`) or prefix (`tasks`), case-insensitively.
    pub fn parse(s: &str) -> Option<Stream> {
        Stream::ALL
            .into_iter()
            .find(|st| st.name().eq_ignore_ascii_case(s) || st.prefix().eq_ignore_ascii_case(s))
    }

    /// The stream a subject belongs to, from its first token.
    pub fn of_subject(subject: &str) -> Option<Stream> {
        let prefix = subject.split('.').next()?;
        Stream::ALL.into_iter().find(|st| st.prefix() == prefix)
    }

    /// Storage and retention of the stream. Replicas are a deployment choice, made by the bus config.
    pub fn definition(self) -> StreamDef {
        let day = Duration::from_secs(86_400);
        let (max_age, description) = match self {
            // The log is the source of truth for rebuilds: keep it.
            Stream::Tasks => (Duration::ZERO, "task lifecycle, partitioned by task id"),
            Stream::Allocations => (Duration::ZERO, "placements, addressed to a worker"),
            // Heartbeats dominate this stream; a week is enough to rebuild worker state.
            Stream::Workers => (
                7 * day,
                "worker membership and telemetry, partitioned by worker id",
            ),
            Stream::Attestations => (
                Duration::ZERO,
                "TDX quotes and verdicts, partitioned by worker id",
            ),
            Stream::Payments => (Duration::ZERO, "accruals and settlements, partitioned"),
            Stream::Results => (30 * day, "task outputs, addressed to a client"),
            Stream::DeadLetters => (30 * day, "frames that could not be decoded or applied"),
        };
        StreamDef {
            stream: self,
            subjects: vec![self.filter()],
            description,
            max_age,
            duplicate_window: Duration::from_secs(120),
        }
    }
}

impl fmt::Display for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a stream looks like in JetStream, as data; the bus turns it into a stream config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamDef {
    pub stream: Stream,
    pub subjects: Vec<String>,
    pub description: &'static str,
    /// Zero keeps messages forever (limits retention).
    pub max_age: Duration,
    /// Window in which a repeated `Nats-Msg-Id` is dropped as a duplicate.
    pub duplicate_window: Duration,
}

/// How many partitions keyed streams have. Changing it re-routes keys, so it is fixed per deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Partitions(u16);

/// A partition count outside 1..=1024.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("partition count {0} is outside 1..=1024")]
pub struct PartitionsError(pub u32);

impl Partitions {
    pub const DEFAULT: Partitions = Partitions(8);

    pub fn new(count: u32) -> Result<Self, PartitionsError> {
        if (1..=1024).contains(&count) {
            Ok(Self(count as u16))
        } else {
            Err(PartitionsError(count))
        }
    }

    pub fn count(self) -> u16 {
        self.0
    }

    /// Every partition, in order.
    pub fn iter(self) -> impl Iterator<Item = Partition> {
        (0..self.0).map(Partition)
    }
}

impl Default for Partitions {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// One partition of a keyed stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Partition(pub u16);

impl fmt::Display for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The partition of `key`: FNV-1a 64 modulo the count. FNV is fixed forever (unlike `std`'s hasher), so every
/// producer, in every version and language, routes a key to the same partition.
pub fn partition_of(key: &[u8], partitions: Partitions) -> Partition {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    Partition((hash % u64::from(partitions.0)) as u16)
}

/// A concrete (non-wildcard) subject that events are published on.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Subject(String);

impl Subject {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `<prefix>.<partition>.<origin>` of a keyed stream.
    pub fn partitioned(stream: Stream, partition: Partition, origin: Origin<'_>) -> Subject {
        debug_assert_eq!(stream.addressing(), Addressing::Partitioned);
        Subject(format!("{}.{}.{origin}", stream.prefix(), partition.0))
    }

    /// `<prefix>.<partition of key>.<origin>` of a keyed stream.
    pub fn keyed(
        stream: Stream,
        key: &[u8],
        partitions: Partitions,
        origin: Origin<'_>,
    ) -> Subject {
        Subject::partitioned(stream, partition_of(key, partitions), origin)
    }

    /// `<prefix>.<partition>.>`: the filter of one partition of a keyed stream, whatever the origin.
    pub fn partition_filter(stream: Stream, partition: Partition) -> String {
        debug_assert_eq!(stream.addressing(), Addressing::Partitioned);
        format!("{}.{}.>", stream.prefix(), partition.0)
    }

    /// `allocations.<worker>`: the only allocation subject a worker reads.
    pub fn allocations(worker: &WorkerId) -> Subject {
        Subject(format!(
            "{}.{}",
            Stream::Allocations.prefix(),
            worker.as_str()
        ))
    }

    /// `results.<client>.worker.<worker>`: a result for `client`, published by `worker`.
    pub fn results(client: &ClientId, worker: &WorkerId) -> Subject {
        Subject(format!(
            "{}.{}.{}",
            Stream::Results.prefix(),
            client.as_str(),
            Origin::Worker(worker)
        ))
    }

    /// `results.<client>.>`: every result of one client, the only result filter a client may use.
    pub fn results_filter(client: &ClientId) -> String {
        format!("{}.{}.>", Stream::Results.prefix(), client.as_str())
    }

    /// `deadletters.<source stream prefix>`.
    pub fn dead_letters(source: Stream) -> Subject {
        Subject(format!(
            "{}.{}",
            Stream::DeadLetters.prefix(),
            source.prefix()
        ))
    }

    /// The stream this subject belongs to.
    pub fn stream(&self) -> Option<Stream> {
        Stream::of_subject(&self.0)
    }

    /// The partition number of a keyed-stream subject (or partition filter).
    pub fn partition_number(subject: &str) -> Option<Partition> {
        let mut tokens = subject.split('.');
        let stream = Stream::of_subject(tokens.next()?)?;
        if stream.addressing() != Addressing::Partitioned {
            return None;
        }
        tokens.next()?.parse().ok().map(Partition)
    }

    /// The origin tokens of a subject (what follows the partition or the client id), if its stream has them.
    pub fn origin_tokens(subject: &str) -> Option<&str> {
        let stream = Stream::of_subject(subject)?;
        if !stream.has_origin() {
            return None;
        }
        let mut parts = subject.splitn(3, '.');
        parts.next()?;
        parts.next()?;
        parts.next()
    }
}

/// Who may publish an event: the subject tokens after the partition (or the client id of RESULTS).
///
/// Fixed per event type (see `Event::origin`): NATS permissions are granted on these tokens, and
/// consumers reject an event whose subject names another origin ([`check_origin`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin<'a> {
    /// A worker's node agent: its registration, telemetry, attestation quotes, task progress and results.
    Worker(&'a WorkerId),
    /// A producer submitting tasks for its client id.
    Client(&'a ClientId),
    /// The allocator: requeues, expiries, rejections, lost workers, placements.
    Allocator,
    /// The attestor's verdict about a worker (the worker's id, so an agent can follow its own verdicts).
    Attestor(&'a WorkerId),
    /// The settler: accruals and settlements.
    Settler,
    /// An operator (cancellations, and events without a worker to attribute them to).
    Operator,
}

impl fmt::Display for Origin<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Worker(w) => write!(f, "worker.{}", w.as_str()),
            Origin::Client(c) => write!(f, "client.{}", c.as_str()),
            Origin::Allocator => f.write_str("allocator"),
            Origin::Attestor(w) => write!(f, "attestor.{}", w.as_str()),
            Origin::Settler => f.write_str("settler"),
            Origin::Operator => f.write_str("operator"),
        }
    }
}

/// An event on a subject that names another origin than the event's own.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "event {index} of the frame ({kind}) belongs to origin {expected:?} but came on {subject:?}"
)]
pub struct OriginError {
    pub index: u32,
    pub kind: &'static str,
    pub subject: String,
    pub expected: String,
}

/// Checks that every event of a frame received on `subject` has the origin the subject names. Subjects of
/// streams without origin tokens (ALLOCATIONS: only the allocator may publish there; DEAD_LETTERS) pass.
pub fn check_origin(subject: &str, records: &[crate::EventRecord]) -> Result<(), OriginError> {
    let Some(stream) = Stream::of_subject(subject) else {
        return Ok(());
    };
    if !stream.has_origin() {
        return Ok(());
    }
    let actual = Subject::origin_tokens(subject).unwrap_or("");
    for (index, record) in records.iter().enumerate() {
        let expected = record.event.origin().to_string();
        if expected != actual {
            return Err(OriginError {
                index: u32::try_from(index).unwrap_or(u32::MAX),
                kind: record.event.kind(),
                subject: subject.to_owned(),
                expected,
            });
        }
    }
    Ok(())
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Subject {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl From<Subject> for String {
    fn from(s: Subject) -> String {
        s.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitioning_is_stable_and_spread() {
        let p = Partitions::new(8).unwrap();
        // Fixed values: changing the hash would silently re-route every key of a running pool.
        assert_eq!(
            partition_of(b"", p),
            Partition((0xcbf2_9ce4_8422_2325u64 % 8) as u16)
        );
        assert_eq!(partition_of(b"worker-1", p), partition_of(b"worker-1", p));
        let mut seen = [0u32; 8];
        for i in 0..8000u32 {
            seen[partition_of(&i.to_be_bytes(), p).0 as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 800), "uneven spread {seen:?}");
    }

    #[test]
    fn subjects_are_spelled_here() {
        let w = WorkerId::new("w1").unwrap();
        assert_eq!(Subject::allocations(&w).as_str(), "allocations.w1");
        let c = ClientId::new("c1").unwrap();
        assert_eq!(
            Subject::partitioned(Stream::Tasks, Partition(3), Origin::Worker(&w)).as_str(),
            "tasks.3.worker.w1"
        );
        assert_eq!(
            Subject::partitioned(Stream::Tasks, Partition(3), Origin::Client(&c)).as_str(),
            "tasks.3.client.c1"
        );
        assert_eq!(
            Subject::partitioned(Stream::Payments, Partition(0), Origin::Settler).as_str(),
            "payments.0.settler"
        );
        assert_eq!(
            Subject::partitioned(Stream::Attestations, Partition(1), Origin::Attestor(&w)).as_str(),
            "attestations.1.attestor.w1"
        );
        assert_eq!(
            Subject::partition_filter(Stream::Tasks, Partition(3)),
            "tasks.3.>"
        );
        assert_eq!(Subject::results(&c, &w).as_str(), "results.c1.worker.w1");
        assert_eq!(Subject::results_filter(&c), "results.c1.>");
        assert_eq!(Stream::Tasks.filter(), "tasks.*.>");
        assert_eq!(Stream::Allocations.filter(), "allocations.*");
        assert_eq!(
            Subject::origin_tokens("tasks.3.worker.w1"),
            Some("worker.w1")
        );
        assert_eq!(
            Subject::origin_tokens("results.c1.worker.w1"),
            Some("worker.w1")
        );
        assert_eq!(Subject::origin_tokens("allocations.w1"), None);
        assert_eq!(
            Subject::partition_number("tasks.3.allocator"),
            Some(Partition(3))
        );
        assert_eq!(
            Subject::dead_letters(Stream::Tasks).as_str(),
            "deadletters.tasks"
        );
        assert_eq!(Subject::partition_number("tasks.3.>"), Some(Partition(3)));
        assert_eq!(Subject::partition_number("allocations.3"), None);
        assert_eq!(Stream::parse("tasks"), Some(Stream::Tasks));
        assert_eq!(Stream::parse("PAYMENTS"), Some(Stream::Payments));
        assert_eq!(Stream::of_subject("results.c1"), Some(Stream::Results));
    }

    #[test]
    fn partition_count_is_bounded() {
        assert!(Partitions::new(0).is_err());
        assert!(Partitions::new(1025).is_err());
        assert_eq!(Partitions::new(4).unwrap().iter().count(), 4);
    }
}
