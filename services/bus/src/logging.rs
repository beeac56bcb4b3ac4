//! The tracing subscriber every service binary installs: which lines from `RUST_LOG`, in which format
//! from `COCOON_LOG_FORMAT`.
//!
//! - `text` (the default): tracing's human-readable lines, for a terminal;
//! - `json`: one JSON object per line on stdout, for a log collector: `timestamp`, `level`, `target`,
//!   `message` and every field of the event at the top level (so `event_id` and `correlation_id` can be
//!   searched on directly), and the fields of the span the event happened in under `span`.
//!
//! Logging must never stop a service: a bad `RUST_LOG` or `COCOON_LOG_FORMAT` is reported on stderr and
//! replaced by the default, and a subscriber installed already is left in place.

use tracing::Subscriber;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines (tracing's default format).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// A `COCOON_LOG_FORMAT` that names no format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("COCOON_LOG_FORMAT={0:?} is neither `text` nor `json`")]
pub struct UnknownLogFormat(pub String);

impl std::str::FromStr for LogFormat {
    type Err = UnknownLogFormat;

    /// `text` or `json`, in any case, blanks around ignored; an empty value means the default.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(UnknownLogFormat(s.to_owned())),
        }
    }
}

/// Installs the subscriber for this process, as `RUST_LOG` (default `info`) and `COCOON_LOG_FORMAT`
/// (default `text`) say. Call it once, first thing in `main`.
pub fn init() {
    let format = match std::env::var("COCOON_LOG_FORMAT") {
        Ok(value) => value.parse().unwrap_or_else(|e: UnknownLogFormat| {
            eprintln!("{e}: logging as text");
            LogFormat::Text
        }),
        Err(std::env::VarError::NotPresent) => LogFormat::Text,
        Err(std::env::VarError::NotUnicode(_)) => {
            eprintln!("COCOON_LOG_FORMAT is not valid UTF-8: logging as text");
            LogFormat::Text
        }
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|e| {
        // An unset RUST_LOG is the ordinary case; a set one that does not parse is worth saying.
        if std::env::var_os("RUST_LOG").is_some() {
            eprintln!("RUST_LOG is not a valid filter ({e}): logging at info");
        }
        EnvFilter::new("info")
    });
    let registry = tracing_subscriber::registry().with(filter);
    let installed = match format {
        LogFormat::Text => registry.with(tracing_subscriber::fmt::layer()).try_init(),
        LogFormat::Json => registry.with(json_layer(std::io::stdout)).try_init(),
    };
    if let Err(e) = installed {
        eprintln!("logging is already set up, keeping it: {e}");
    }
}

/// The `json` format writing to `writer`: the event's fields beside `timestamp`, `level`, `target` and
/// `message`, the current span's under `span`, and no list of the enclosing spans (it repeats them).
fn json_layer<S, W>(writer: W) -> impl Layer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt::layer()
        .json()
        .flatten_event(true)
        .with_current_span(true)
        .with_span_list(false)
        .with_writer(writer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn formats_parse_and_anything_else_is_refused() {
        assert_eq!("text".parse(), Ok(LogFormat::Text));
        assert_eq!("json".parse(), Ok(LogFormat::Json));
        assert_eq!(" JSON\n".parse(), Ok(LogFormat::Json));
        assert_eq!("".parse(), Ok(LogFormat::Text));
        let refused = "logfmt".parse::<LogFormat>().unwrap_err();
        assert_eq!(refused, UnknownLogFormat("logfmt".to_owned()));
        assert_eq!(
            refused.to_string(),
            r#"COCOON_LOG_FORMAT="logfmt" is neither `text` nor `json`"#
        );
        assert!("jsonl".parse::<LogFormat>().is_err());
    }

    /// A shared buffer the layer writes into.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_lines_are_json_objects_with_every_field() {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::registry().with(json_layer(move || writer.clone()));
        let event_id = events::EventId::new();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("task", correlation_id = "c-1");
            let _entered = span.enter();
            tracing::warn!(event_id = %event_id, attempt = 2, "task failed");
            tracing::info!("second line");
        });

        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "one line per event: {text}");
        let line: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(line["level"], "WARN");
        assert_eq!(line["target"], module_path!());
        assert_eq!(line["message"], "task failed");
        assert_eq!(line["event_id"], event_id.to_string());
        assert_eq!(line["attempt"], 2);
        assert_eq!(line["span"]["name"], "task");
        assert_eq!(line["span"]["correlation_id"], "c-1");
        let timestamp = line["timestamp"].as_str().unwrap();
        assert!(
            timestamp.len() > 20 && timestamp.ends_with('Z'),
            "an RFC 3339 UTC time: {timestamp}"
        );
        let second: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(second["message"], "second line");
    }
}
