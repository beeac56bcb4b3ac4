//! Streams, subjects and partitions: the only place where a subject string is spelled.
//!
//! Keyed streams (TASKS, WORKERS, ATTESTATIONS, PAYMENTS) are split into `<prefix>.<partition>` by a stable
//! hash of the key, so every event of one task or worker lands on one subject and stays in order there, and
//! consumers can take partitions in parallel. Addressed streams put the recipient's id as the last token
//! instead: `allocations.<worker>`, `results.<client>`, so a worker or client subscribes to exactly its own.

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
    /// `<prefix>.<partition>`, partition = hash(key) mod partitions.
    Partitioned,
    /// `<prefix>.<worker id>`.
    PerWorker,
    /// `<prefix>.<client id>`.
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

    /// The wildcard that captures every subject of the stream.
    pub fn filter(self) -> String {
        format!("{}.*", self.prefix())
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

    /// `<prefix>.<partition>` of a keyed stream.
    pub fn partition(stream: Stream, partition: Partition) -> Subject {
        debug_assert_eq!(stream.addressing(), Addressing::Partitioned);
        Subject(format!("{}.{}", stream.prefix(), partition.0))
    }

    /// `<prefix>.<partition of key>` of a keyed stream.
    pub fn keyed(stream: Stream, key: &[u8], partitions: Partitions) -> Subject {
        Subject::partition(stream, partition_of(key, partitions))
    }

    /// `allocations.<worker>`: the only allocation subject a worker reads.
    pub fn allocations(worker: &WorkerId) -> Subject {
        Subject(format!(
            "{}.{}",
            Stream::Allocations.prefix(),
            worker.as_str()
        ))
    }

    /// `results.<client>`: the only result subject a client reads.
    pub fn results(client: &ClientId) -> Subject {
        Subject(format!("{}.{}", Stream::Results.prefix(), client.as_str()))
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

    /// The partition number of a keyed-stream subject.
    pub fn partition_number(subject: &str) -> Option<Partition> {
        let (prefix, last) = subject.split_once('.')?;
        let stream = Stream::of_subject(prefix)?;
        if stream.addressing() != Addressing::Partitioned {
            return None;
        }
        last.parse().ok().map(Partition)
    }
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
        assert_eq!(
            Subject::partition(Stream::Tasks, Partition(3)).as_str(),
            "tasks.3"
        );
        assert_eq!(
            Subject::dead_letters(Stream::Tasks).as_str(),
            "deadletters.tasks"
        );
        assert_eq!(Subject::partition_number("tasks.3"), Some(Partition(3)));
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
