//! Consistency tokens: read-your-writes over the asynchronous read models.
//!
//! A submit answers with the log position of its event, `TASKS:<stream sequence>`. A read that carries the
//! token waits until the projection that owns the read has applied the log up to that position on the
//! partitions the read covers: the task's partition for one task, every partition of the stream for a list.
//!
//! A checkpoint says every frame of its partition up to it is applied. The projector moves a quiet partition's
//! checkpoint with its consumer's position only after the fact (at most once a second, or once caught up), and
//! a projector that stopped leaves it where it was, so it can stay below N. A partition therefore counts as
//! reached when its checkpoint is ≥ N, or
//! when nothing was stored on its subject between its checkpoint and N (asked of JetStream with a
//! `next_by_subj` message get). What was stored at or below N on a partition is known once asked, so the wait
//! polls only `projection_checkpoints` (every 20 ms) until the checkpoint passes it, and asks JetStream again
//! only then.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use async_nats::jetstream::stream::RawMessageErrorKind;
use events::subjects::Addressing;
use events::{Partition, Partitions, Stream, Subject};
use tokio::time::Instant;

use crate::AppState;
use crate::error::{ApiError, Reached};

/// A log position a read must reflect: `<STREAM>:<sequence>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token {
    pub stream: Stream,
    pub sequence: u64,
}

/// Why a token does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}; expected <STREAM>:<sequence>, e.g. TASKS:17")]
pub struct TokenError(String);

impl FromStr for Token {
    type Err = TokenError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, seq) = s
            .trim()
            .split_once(':')
            .ok_or_else(|| TokenError(format!("{s:?} has no ':'")))?;
        let stream = Stream::EVENT_STREAMS
            .into_iter()
            .find(|st| st.name().eq_ignore_ascii_case(name))
            .ok_or_else(|| TokenError(format!("{name:?} is not an event stream")))?;
        let sequence = seq
            .parse()
            .map_err(|_| TokenError(format!("{seq:?} is not a stream sequence")))?;
        Ok(Token { stream, sequence })
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.stream.name(), self.sequence)
    }
}

/// The projections of the read models, as `projection_checkpoints` names them, and the streams each reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Projection {
    Tasks,
    Workers,
    Payments,
}

impl Projection {
    pub const ALL: [Projection; 3] = [Projection::Tasks, Projection::Workers, Projection::Payments];

    pub const fn name(self) -> &'static str {
        match self {
            Projection::Tasks => "tasks",
            Projection::Workers => "workers",
            Projection::Payments => "payments",
        }
    }

    /// Same layout as the projector's (`services/projector/src/projection.rs`).
    pub const fn streams(self) -> &'static [Stream] {
        match self {
            Projection::Tasks => &[Stream::Tasks, Stream::Allocations, Stream::Results],
            Projection::Workers => &[Stream::Workers, Stream::Attestations],
            Projection::Payments => &[Stream::Payments],
        }
    }

    /// The projection that applies `stream`.
    pub fn of(stream: Stream) -> Option<Projection> {
        Projection::ALL
            .into_iter()
            .find(|p| p.streams().contains(&stream))
    }
}

/// The checkpoint rows of a stream, with the subjects each one covers: `<prefix>.<p>.>` for a partitioned
/// stream, the whole stream (`<prefix>.>`, checkpoint partition 0) otherwise.
pub fn checkpoint_subjects(stream: Stream, partitions: Partitions) -> Vec<(u16, String)> {
    match stream.addressing() {
        Addressing::Partitioned => partitions
            .iter()
            .map(|p| (p.0, Subject::partition_filter(stream, p)))
            .collect(),
        _ => vec![(0, stream.filter())],
    }
}

/// Which checkpoint rows a read depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// One task: its partition of TASKS (ALLOCATIONS and RESULTS are read whole).
    Task(events::TaskId),
    /// A list: every partition.
    All,
}

/// Waits until `projection` reflects `token` on `scope`, or answers 504 after `wait`. A token of a stream
/// the projection does not read is refused (400, `consistent_with`).
pub async fn wait_for(
    state: &AppState,
    token: Token,
    projection: Projection,
    scope: Scope,
    wait: Duration,
) -> Result<(), ApiError> {
    if Projection::of(token.stream) != Some(projection) {
        return Err(ApiError::invalid_query(
            "consistent_with",
            format!(
                "{} is not projected into the {} read model this endpoint serves",
                token.stream.name(),
                projection.name()
            ),
        ));
    }
    let partitions = state.config().partitions;
    let mut subjects = checkpoint_subjects(token.stream, partitions);
    if let (Scope::Task(task), Addressing::Partitioned) = (scope, token.stream.addressing()) {
        let Partition(p) = events::subjects::partition_of(task.0.as_bytes(), partitions);
        subjects.retain(|(partition, _)| *partition == p);
    }
    // Per partition not yet reached: a stored sequence ≤ N known not to be applied yet.
    let mut pending: BTreeMap<u16, (String, Option<u64>)> = subjects
        .into_iter()
        .map(|(p, subject)| (p, (subject, None)))
        .collect();
    let deadline = Instant::now() + wait;
    let stream = state
        .bus()
        .jetstream
        .get_stream_no_info(token.stream.name())
        .await
        .map_err(|e| ApiError::Unavailable(format!("NATS is unavailable: {e}")))?;
    let poll = state.config().consistency_poll;
    loop {
        let checkpoints = read_checkpoints(state, projection, token.stream).await?;
        let mut reached = Vec::new();
        for (&partition, (subject, unapplied)) in pending.iter_mut() {
            let checkpoint = checkpoints.get(&partition).copied().unwrap_or(0);
            if checkpoint >= token.sequence {
                reached.push(partition);
                continue;
            }
            if unapplied.is_some_and(|seq| checkpoint < seq) {
                continue;
            }
            // What is stored on the partition after its checkpoint, if anything, and is it at or below N?
            match stream
                .raw_message_builder()
                .sequence(checkpoint + 1)
                .next_by_subject(subject.clone())
                .send()
                .await
            {
                Ok(message) if message.sequence > token.sequence => reached.push(partition),
                Ok(message) => *unapplied = Some(message.sequence),
                Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => {
                    reached.push(partition)
                }
                Err(e) => return Err(ApiError::Unavailable(format!("NATS is unavailable: {e}"))),
            }
        }
        for p in reached {
            pending.remove(&p);
        }
        let Some((&partition, _)) = pending.iter().next() else {
            return Ok(());
        };
        let now = Instant::now();
        if now >= deadline {
            let checkpoint = checkpoints.get(&partition).copied().unwrap_or(0);
            return Err(ApiError::NotYetConsistent {
                message: format!(
                    "the {} read model had not reached {token} within {} ms: partition {partition} of {} is at {checkpoint}",
                    projection.name(),
                    wait.as_millis(),
                    token.stream.name()
                ),
                reached: Reached {
                    stream: token.stream.name(),
                    partition,
                    checkpoint,
                },
            });
        }
        tokio::time::sleep(poll.min(deadline - now)).await;
    }
}

/// The checkpoints of one (projection, stream), by partition; a missing row is 0.
///
/// Waiters share reads: a snapshot younger than half the poll interval is reused (checkpoints only move
/// forward, so an older snapshot can only make a waiter wait longer, never answer early), and one read at a time
/// runs, so a thousand waiters cost a query per interval, not a thousand.
pub async fn read_checkpoints(
    state: &AppState,
    projection: Projection,
    stream: Stream,
) -> Result<BTreeMap<u16, u64>, ApiError> {
    let fresh_for = state.config().consistency_poll / 2;
    let mut shared = state.checkpoints().lock().await;
    if let Some((at, snapshot)) = shared.get(&(projection.name(), stream.name()))
        && at.elapsed() < fresh_for
    {
        return Ok(snapshot.clone());
    }
    let snapshot = query_checkpoints(state, projection, stream).await?;
    metrics::counter!("cocoon_api_checkpoint_reads_total").increment(1);
    shared.insert(
        (projection.name(), stream.name()),
        (Instant::now(), snapshot.clone()),
    );
    Ok(snapshot)
}

/// Checkpoints shared between waiters: by (projection, stream), when read and what.
pub type SharedCheckpoints = tokio::sync::Mutex<
    std::collections::HashMap<(&'static str, &'static str), (Instant, BTreeMap<u16, u64>)>,
>;

async fn query_checkpoints(
    state: &AppState,
    projection: Projection,
    stream: Stream,
) -> Result<BTreeMap<u16, u64>, ApiError> {
    let client = state.pg().await?;
    let statement = client
        .prepare_cached(
            "SELECT partition, last_sequence FROM projection_checkpoints
             WHERE projection = $1 AND stream = $2",
        )
        .await?;
    let rows = client
        .query(&statement, &[&projection.name(), &stream.name()])
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                u16::try_from(r.get::<_, i32>(0)).unwrap_or(u16::MAX),
                u64::try_from(r.get::<_, i64>(1)).unwrap_or(0),
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_and_print() {
        let t: Token = "TASKS:17".parse().unwrap();
        assert_eq!(
            t,
            Token {
                stream: Stream::Tasks,
                sequence: 17
            }
        );
        assert_eq!(t.to_string(), "TASKS:17");
        assert_eq!(
            "payments:3".parse::<Token>().unwrap().stream,
            Stream::Payments
        );
        for bad in [
            "TASKS",
            "TASKS:x",
            "NOPE:1",
            "DEAD_LETTERS:1",
            ":1",
            "TASKS:-1",
        ] {
            assert!(bad.parse::<Token>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn every_event_stream_has_one_projection_and_subjects() {
        for s in Stream::EVENT_STREAMS {
            assert!(Projection::of(s).is_some(), "{s}");
        }
        assert_eq!(Projection::of(Stream::Results), Some(Projection::Tasks));
        assert_eq!(
            checkpoint_subjects(Stream::Tasks, Partitions::DEFAULT).len(),
            8
        );
        assert_eq!(
            checkpoint_subjects(Stream::Allocations, Partitions::DEFAULT),
            vec![(0, "allocations.*".to_owned())]
        );
    }
}
