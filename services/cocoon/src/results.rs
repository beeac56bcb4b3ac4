//! `results watch`: follows one client's results through `client::ResultStream` (an ephemeral ordered consumer:
//! nothing acked, nothing durable) and prints a line per result; an undecodable frame is printed as an error line,
//! never skipped.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context as _;
use client::{ResultItem, ResultStream, ResultsError, StartAt};
use events::ClientId;
use events::payload::Blob;

use crate::Shutdown;
use crate::cli::{Connection, ResultsCommand, ResultsWatchArgs};

/// Longest output preview, in characters.
const PREVIEW_CHARS: usize = 60;

pub async fn run(
    conn: &Connection,
    command: ResultsCommand,
    out: &mut dyn Write,
    shutdown: Shutdown,
) -> anyhow::Result<ExitCode> {
    match command {
        ResultsCommand::Watch(args) => watch(conn, &args, out, shutdown).await,
    }
}

async fn watch(
    conn: &Connection,
    args: &ResultsWatchArgs,
    out: &mut dyn Write,
    shutdown: Shutdown,
) -> anyhow::Result<ExitCode> {
    let client_id = ClientId::new(args.client_id.as_str()).context("--client")?;
    let start = match (args.from_seq, args.new) {
        (Some(seq), _) => StartAt::Sequence(seq),
        (None, true) => StartAt::New,
        (None, false) => StartAt::Beginning,
    };
    if args.limit == Some(0) {
        return Ok(ExitCode::SUCCESS);
    }
    let bus = crate::connect(conn).await?;
    let mut stream = ResultStream::open(&bus.jetstream, &client_id, start).await?;
    let mut printed = 0usize;
    loop {
        let item = tokio::select! {
            item = stream.next() => item,
            () = shutdown.wait() => break,
        };
        match item {
            None => break,
            Some(Ok(item)) => {
                writeln!(out, "{}", result_line(&item))?;
                printed += 1;
            }
            Some(Err(ResultsError::Consume(reason))) => {
                anyhow::bail!("reading results of {client_id}: {reason}")
            }
            Some(Err(e)) => writeln!(out, "error: {e}")?,
        }
        out.flush()?;
        if args.limit.is_some_and(|l| printed >= l) {
            break;
        }
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// `seq=… task=… attempt=… worker=… checksum=… size=… output="…"`.
pub fn result_line(item: &ResultItem) -> String {
    let r = &item.result;
    let mut line = format!(
        "seq={} task={} attempt={} worker={} checksum={} size={}",
        item.stream_sequence,
        r.task_id,
        r.attempt,
        r.worker_id,
        r.checksum,
        r.output.len()
    );
    if r.truncated {
        line.push_str(" truncated");
    }
    match &r.output {
        Blob::Inline(bytes) => {
            if let Some(preview) = preview(bytes) {
                line.push_str(&format!(" output={preview:?}"));
            } else if !bytes.is_empty() {
                line.push_str(" output=<binary>");
            }
        }
        Blob::Reference { uri, .. } => line.push_str(&format!(" output_uri={uri}")),
    }
    line
}

/// The start of the output when it is text (UTF-8 without control characters other than whitespace).
fn preview(bytes: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(bytes).ok()?;
    if text.is_empty()
        || text
            .chars()
            .any(|c| c.is_control() && !c.is_ascii_whitespace())
    {
        return None;
    }
    let mut preview: String = text.chars().take(PREVIEW_CHARS).collect();
    if text.chars().count() > PREVIEW_CHARS {
        preview.push('…');
    }
    Some(preview)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn previews_only_text() {
        assert_eq!(preview(b"hello\nworld").as_deref(), Some("hello\nworld"));
        assert_eq!(preview(&[0, 159, 146, 150]), None);
        assert_eq!(preview(b"\x1b[31m"), None);
        assert_eq!(preview(b""), None);
        let long = "x".repeat(100);
        assert_eq!(
            preview(long.as_bytes()).unwrap().chars().count(),
            PREVIEW_CHARS + 1
        );
    }
}
