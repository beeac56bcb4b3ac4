//! `events dump` and `events tail`: decode frames from the log into JSON lines, one per event.
//!
//! Reads through ephemeral ordered consumers (no ack, nothing durable), so inspecting the log never disturbs
//! the services. A frame that does not decode is printed as an `error` line with its reason, never skipped
//! silently.

use std::fmt;
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use async_nats::jetstream::{
    self,
    consumer::{DeliverPolicy, pull::OrderedConfig},
};
use events::{CodecConfig, Stream, Timestamp};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::Shutdown;
use crate::cli::Filter;
use crate::when::{parse_instant, to_offset};

/// A validated filter.
#[derive(Debug, Clone, Default)]
pub struct Query {
    pub streams: Vec<Stream>,
    pub subjects: Vec<String>,
    pub from_seq: Option<u64>,
    pub to_seq: Option<u64>,
    pub since: Option<Timestamp>,
    pub until: Option<Timestamp>,
    pub types: Vec<String>,
    pub limit: Option<usize>,
    /// Keep reading new frames (tail) instead of stopping at the end of the log (dump).
    pub follow: bool,
}

impl Query {
    /// Checks the operator's filter, naming what is wrong.
    pub fn from_filter(f: &Filter, follow: bool) -> anyhow::Result<Query> {
        let now = Timestamp::now();
        let mut streams = Vec::new();
        for s in &f.streams {
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
        for subject in &f.subjects {
            let stream = Stream::of_subject(subject)
                .with_context(|| format!("subject {subject:?} belongs to no stream"))?;
            if f.streams.is_empty() && !streams.contains(&stream) {
                streams.push(stream);
            }
            if !streams.contains(&stream) {
                bail!("subject {subject:?} is not in the streams asked for");
            }
        }
        if streams.is_empty() {
            streams = Stream::EVENT_STREAMS.to_vec();
        }
        for t in &f.types {
            if !events::EVENT_KINDS.iter().any(|k| k.name == t) {
                bail!("unknown event type {t:?}");
            }
        }
        let since = f
            .since
            .as_deref()
            .map(|s| parse_instant(s, now))
            .transpose()?;
        let until = f
            .until
            .as_deref()
            .map(|s| parse_instant(s, now))
            .transpose()?;
        if let (Some(a), Some(b)) = (f.from_seq, f.to_seq)
            && a > b
        {
            bail!("--from-seq {a} is after --to-seq {b}");
        }
        if let (Some(a), Some(b)) = (since, until)
            && a > b
        {
            bail!("--since is after --until");
        }
        Ok(Query {
            streams,
            subjects: f.subjects.clone(),
            from_seq: f.from_seq,
            to_seq: f.to_seq,
            since,
            until,
            types: f.types.clone(),
            limit: f.limit,
            follow,
        })
    }
}

/// What a dump printed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    pub frames: u64,
    pub events: u64,
    pub undecodable: u64,
    pub elapsed: Duration,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.elapsed.as_secs_f64().max(1e-6);
        write!(
            f,
            "{} events from {} frames ({} undecodable) in {:.2}s ({:.0} events/s)",
            self.events,
            self.frames,
            self.undecodable,
            secs,
            self.events as f64 / secs
        )
    }
}

/// One frame read from a stream.
struct Frame {
    stream: Stream,
    seq: u64,
    subject: String,
    stored_at: Timestamp,
    headers: Option<async_nats::HeaderMap>,
    body: bytes::Bytes,
}

/// Prints the events matching `query` to `out` as JSON lines.
/// A dump stops at the end of the log as it was when the dump started; a tail runs until `shutdown`.
pub async fn dump(
    js: &jetstream::Context,
    query: &Query,
    out: &mut impl Write,
    shutdown: Shutdown,
) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let codec = CodecConfig::default();
    let mut summary = Summary::default();
    let (tx, mut rx) = mpsc::channel::<anyhow::Result<Frame>>(256);
    let mut readers = Vec::new();
    if query.follow {
        // Tail: all streams at once, interleaved as frames arrive.
        for &stream in &query.streams {
            readers.push(tokio::spawn(read_stream(
                js.clone(),
                stream,
                query.clone(),
                tx.clone(),
            )));
        }
    } else {
        // Dump: one stream after the other, so the output is deterministic.
        let (js, query, tx) = (js.clone(), query.clone(), tx.clone());
        readers.push(tokio::spawn(async move {
            for &stream in &query.streams {
                read_stream(js.clone(), stream, query.clone(), tx.clone()).await?;
            }
            Ok(())
        }));
    }
    drop(tx);
    let mut last_progress = Instant::now();
    'frames: loop {
        let frame = tokio::select! {
            frame = rx.recv() => match frame {
                Some(frame) => frame?,
                None => break,
            },
            () = shutdown.wait() => break,
        };
        summary.frames += 1;
        // Position fields first, then the record as its types order it: readable, and no re-sorting.
        let position = format!(
            "{{\"stream\":\"{}\",\"seq\":{},\"subject\":{},\"stored_at\":\"{}\"",
            frame.stream.name(),
            frame.seq,
            Value::String(frame.subject.clone()),
            frame.stored_at,
        );
        let decoded = bus::frame_headers(frame.headers.as_ref())
            .and_then(|h| events::decode_frame(&codec, &h, &frame.body))
            .and_then(|records| {
                events::check_origin(&frame.subject, &records)?;
                Ok(records)
            });
        match decoded {
            Err(e) => {
                summary.undecodable += 1;
                let error = json!({ "kind": e.kind(), "message": e.to_string() });
                writeln!(out, "{position},\"error\":{error}}}")?;
            }
            Ok(records) => {
                for (index, record) in records.iter().enumerate() {
                    if !query.types.is_empty()
                        && !query.types.iter().any(|t| t == record.event.kind())
                    {
                        continue;
                    }
                    let body = serde_json::to_string(record)?;
                    writeln!(out, "{position},\"index\":{index},{}", &body[1..])?;
                    summary.events += 1;
                    if query.limit.is_some_and(|l| summary.events as usize >= l) {
                        break 'frames;
                    }
                }
            }
        }
        if query.follow {
            out.flush()?;
        } else if last_progress.elapsed() > Duration::from_secs(2) {
            last_progress = Instant::now();
            let progress = Summary {
                elapsed: started.elapsed(),
                ..summary
            };
            eprintln!("… {progress}");
        }
    }
    out.flush()?;
    for reader in readers {
        reader.abort();
        if let Ok(Err(e)) = reader.await {
            return Err(e);
        }
    }
    summary.elapsed = started.elapsed();
    Ok(summary)
}

/// Reads one stream's frames in the query's range into `tx`.
async fn read_stream(
    js: jetstream::Context,
    stream: Stream,
    query: Query,
    tx: mpsc::Sender<anyhow::Result<Frame>>,
) -> anyhow::Result<()> {
    let result = read_stream_inner(&js, stream, &query, &tx).await;
    if let Err(e) = result {
        let _ = tx.send(Err(e)).await;
    }
    Ok(())
}

async fn read_stream_inner(
    js: &jetstream::Context,
    stream: Stream,
    query: &Query,
    tx: &mpsc::Sender<anyhow::Result<Frame>>,
) -> anyhow::Result<()> {
    let mut handle = js
        .get_stream(stream.name())
        .await
        .with_context(|| format!("stream {} not found; run `cocoon provision`", stream.name()))?;
    let state = handle.info().await?.state.clone();
    // A dump ends at the log's end as of now (or --to-seq); a tail has no end but --to-seq.
    let end = match (query.follow, query.to_seq) {
        (false, Some(to)) => to.min(state.last_sequence),
        (false, None) => state.last_sequence,
        (true, to) => to.unwrap_or(u64::MAX),
    };
    let deliver_policy = match (query.from_seq, query.since, query.follow) {
        (Some(seq), _, _) => DeliverPolicy::ByStartSequence {
            start_sequence: seq.max(1),
        },
        (None, Some(since), _) => DeliverPolicy::ByStartTime {
            start_time: to_offset(since)?,
        },
        (None, None, true) => DeliverPolicy::New,
        (None, None, false) => DeliverPolicy::All,
    };
    if !query.follow && (state.messages == 0 || query.from_seq.is_some_and(|s| s > end)) {
        return Ok(());
    }
    let subjects: Vec<String> = query
        .subjects
        .iter()
        .filter(|s| Stream::of_subject(s) == Some(stream))
        .cloned()
        .collect();
    let consumer = handle
        .create_consumer(OrderedConfig {
            filter_subjects: subjects,
            deliver_policy,
            ..Default::default()
        })
        .await
        .with_context(|| format!("cannot read {}", stream.name()))?;
    if !query.follow && consumer.cached_info().num_pending == 0 {
        return Ok(());
    }
    let mut messages = consumer.messages().await?;
    while let Some(message) = messages.next().await {
        let message = message.with_context(|| format!("reading {}", stream.name()))?;
        let info = message.info().map_err(|e| anyhow::anyhow!("{e}"))?;
        let seq = info.stream_sequence;
        let pending = info.pending;
        let stored_at = Timestamp::from_micros(
            i64::try_from(info.published.unix_timestamp_nanos() / 1000).unwrap_or(i64::MAX),
        );
        if seq > end || query.until.is_some_and(|u| stored_at > u) {
            break;
        }
        let before_since = query.since.is_some_and(|s| stored_at < s);
        if before_since && !query.follow && (seq >= end || pending == 0) {
            break;
        }
        if before_since {
            continue;
        }
        let frame = Frame {
            stream,
            seq,
            subject: message.subject.to_string(),
            stored_at,
            headers: message.headers.clone(),
            body: message.payload.clone(),
        };
        if tx.send(Ok(frame)).await.is_err() {
            break; // the printer stopped (limit or shutdown)
        }
        if !query.follow && (seq >= end || pending == 0) {
            break;
        }
    }
    Ok(())
}
