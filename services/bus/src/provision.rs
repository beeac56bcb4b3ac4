//! Idempotent provisioning of the pool's streams: create what is missing, update what drifted, touch nothing else.

use std::time::Duration;

use async_nats::jetstream::{
    self,
    stream::{Config, DiscardPolicy, RetentionPolicy, StorageType},
};
use events::{Stream, StreamDef};

/// What provisioning did to one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProvisionOutcome {
    Created,
    Updated,
    Unchanged,
}

/// What provisioning did, stream by stream.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProvisionReport {
    pub streams: Vec<(Stream, ProvisionOutcome)>,
}

impl ProvisionReport {
    pub fn count(&self, outcome: ProvisionOutcome) -> usize {
        self.streams.iter().filter(|(_, o)| *o == outcome).count()
    }
}

/// Why provisioning failed.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("stream {stream}: {action} failed: {reason}")]
    Api {
        stream: &'static str,
        action: &'static str,
        reason: String,
    },
    #[error(
        "stream {stream} exists with {field} = {actual}, which cannot be changed to {wanted} in place"
    )]
    Incompatible {
        stream: &'static str,
        field: &'static str,
        actual: String,
        wanted: String,
    },
    #[error("replicas must be 1 or 3, not {0}")]
    InvalidReplicas(usize),
}

/// Largest message a stream accepts; frames are limited well below it by the codec.
pub const MAX_MESSAGE_BYTES: i32 = 4 * 1024 * 1024;

/// The JetStream config of a stream: file storage, limits retention, the duplicate window, `replicas` copies.
pub fn stream_config(def: &StreamDef, replicas: usize) -> Config {
    Config {
        name: def.stream.name().to_owned(),
        description: Some(def.description.to_owned()),
        subjects: def.subjects.clone(),
        storage: StorageType::File,
        retention: RetentionPolicy::Limits,
        discard: DiscardPolicy::Old,
        max_age: def.max_age,
        duplicate_window: def.duplicate_window,
        num_replicas: replicas,
        max_message_size: MAX_MESSAGE_BYTES,
        // Direct gets let operators read a sequence range without a consumer.
        allow_direct: true,
        ..Default::default()
    }
}

/// Fields that we own; anything else on the server (e.g. placement set by an operator) is left alone.
fn drift(actual: &Config, wanted: &Config) -> Vec<&'static str> {
    let mut fields = Vec::new();
    if actual.subjects != wanted.subjects {
        fields.push("subjects");
    }
    if actual.description != wanted.description {
        fields.push("description");
    }
    if actual.max_age != wanted.max_age {
        fields.push("max_age");
    }
    if actual.duplicate_window != wanted.duplicate_window {
        fields.push("duplicate_window");
    }
    if actual.num_replicas.max(1) != wanted.num_replicas.max(1) {
        fields.push("num_replicas");
    }
    if actual.max_message_size != wanted.max_message_size {
        fields.push("max_message_size");
    }
    if actual.allow_direct != wanted.allow_direct {
        fields.push("allow_direct");
    }
    if actual.discard != wanted.discard {
        fields.push("discard");
    }
    fields
}

/// Ensures every stream of the pool exists with our settings. Running it again changes nothing.
pub async fn provision_streams(
    js: &jetstream::Context,
    replicas: usize,
) -> Result<ProvisionReport, ProvisionError> {
    if replicas != 1 && replicas != 3 {
        return Err(ProvisionError::InvalidReplicas(replicas));
    }
    let mut report = ProvisionReport::default();
    for stream in Stream::ALL {
        let outcome = provision_stream(js, &stream_config(&stream.definition(), replicas)).await?;
        tracing::info!(stream = stream.name(), ?outcome, "provisioned stream");
        report.streams.push((stream, outcome));
    }
    Ok(report)
}

async fn provision_stream(
    js: &jetstream::Context,
    wanted: &Config,
) -> Result<ProvisionOutcome, ProvisionError> {
    let name: &'static str = Stream::parse(&wanted.name).map_or("?", Stream::name);
    let api = |action: &'static str| {
        move |e: &dyn std::fmt::Display| ProvisionError::Api {
            stream: name,
            action,
            reason: e.to_string(),
        }
    };
    match js.get_stream(&wanted.name).await {
        Ok(existing) => {
            let actual = &existing.cached_info().config;
            if actual.storage != wanted.storage {
                return Err(ProvisionError::Incompatible {
                    stream: name,
                    field: "storage",
                    actual: format!("{:?}", actual.storage),
                    wanted: format!("{:?}", wanted.storage),
                });
            }
            if actual.retention != wanted.retention {
                return Err(ProvisionError::Incompatible {
                    stream: name,
                    field: "retention",
                    actual: format!("{:?}", actual.retention),
                    wanted: format!("{:?}", wanted.retention),
                });
            }
            let drifted = drift(actual, wanted);
            if drifted.is_empty() {
                return Ok(ProvisionOutcome::Unchanged);
            }
            tracing::warn!(stream = name, fields = ?drifted, "stream settings drifted; updating");
            js.update_stream(wanted.clone())
                .await
                .map_err(|e| api("update")(&e))?;
            Ok(ProvisionOutcome::Updated)
        }
        Err(e) if is_not_found(&e) => {
            js.create_stream(wanted.clone())
                .await
                .map_err(|e| api("create")(&e))?;
            Ok(ProvisionOutcome::Created)
        }
        Err(e) => Err(api("lookup")(&e)),
    }
}

fn is_not_found(e: &jetstream::context::GetStreamError) -> bool {
    matches!(
        e.kind(),
        jetstream::context::GetStreamErrorKind::JetStream(ref js)
            if js.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}

/// How long the server waits for an ack before redelivering, used by consumers created here.
pub const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);
