//! `bus`: the only code in the pool that talks to JetStream.
//!
//! - consumes: nothing by itself; [`FrameConsumer`] hands frames to its caller;
//! - produces: frames of events, through the batching [`Publisher`];
//! - owns: stream and consumer provisioning ([`provision`]);
//! - guarantees: every published frame carries a `Nats-Msg-Id` derived from all its event ids
//!   ([`FrameKey`]): the server drops a repeated frame, and stores a re-batched one (whose retried
//!   events may then be stored twice); every failed publish reaches the caller, through the event's
//!   [`Receipt`] and the next [`Publisher::flush`]; a consumer acks only when its caller says the work is
//!   committed.
//!
//! Services never build subjects or stream configs themselves: subjects come from `events::subjects`, stream
//! settings from [`provision::stream_config`].

pub mod auth;
pub mod consumer;
pub mod logging;
pub mod provision;
pub mod publisher;

use std::time::Duration;

pub use auth::{Credentials, CredentialsError};

pub use consumer::{
    ConsumeError, ConsumerSpec, FetchedBatch, Follower, FrameConsumer, RangeReader, ReadError,
    ReceivedFrame, last_sequence, read_events, remove_durable,
};
pub use provision::{ProvisionError, ProvisionOutcome, ProvisionReport, provision_streams};
pub use publisher::{FrameKey, Position, PublishError, Publisher, PublisherConfig, Receipt};

/// Where and how to reach NATS.
#[derive(Debug, Clone)]
pub struct BusConfig {
    /// `nats://host:port`, comma-separated for a cluster.
    pub url: String,
    /// Connection name shown in server monitoring, e.g. `projector-1`.
    pub name: String,
    /// How long JetStream API calls and publish acks may take.
    pub request_timeout: Duration,
    /// The user to connect as (from a credentials file); `None` connects without authentication (a
    /// development server without accounts).
    pub credentials: Option<Credentials>,
}

impl BusConfig {
    pub fn new(url: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            name: name.into(),
            request_timeout: Duration::from_secs(10),
            credentials: None,
        }
    }

    /// Connects as the user of `credentials` (see [`auth`]).
    #[must_use]
    pub fn with_credentials(mut self, credentials: Option<Credentials>) -> Self {
        self.credentials = credentials;
        self
    }
}

/// Why the bus could not be reached.
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to NATS at {url}: {source}")]
pub struct ConnectError {
    pub url: String,
    #[source]
    pub source: async_nats::ConnectError,
}

/// A connection to NATS with its JetStream context.
#[derive(Debug, Clone)]
pub struct Bus {
    pub client: async_nats::Client,
    pub jetstream: async_nats::jetstream::Context,
}

impl Bus {
    pub async fn connect(config: &BusConfig) -> Result<Bus, ConnectError> {
        let mut options = async_nats::ConnectOptions::new()
            .name(&config.name)
            .request_timeout(Some(config.request_timeout));
        if let Some(c) = &config.credentials {
            // Replies (publish acks, fetched messages) come to an inbox only this user may subscribe to.
            options = options
                .user_and_password(c.user.clone(), c.password().to_owned())
                .custom_inbox_prefix(auth::inbox_prefix(&c.user));
        }
        let client = options
            // async-nats parses a `&str` as one address; a cluster's comma-separated list must be split.
            .connect(server_list(&config.url))
            .await
            .map_err(|source| ConnectError {
                url: config.url.clone(),
                source,
            })?;
        Ok(Bus::from_client(client, config.request_timeout))
    }

    pub fn from_client(client: async_nats::Client, timeout: Duration) -> Bus {
        let jetstream = async_nats::jetstream::ContextBuilder::new()
            .timeout(timeout)
            .build(client.clone());
        Bus { client, jetstream }
    }
}

/// The addresses of a `nats://a:1,nats://b:2` list (blanks around commas ignored).
fn server_list(url: &str) -> Vec<&str> {
    url.split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .collect()
}

/// Converts a NATS header map into the frame headers it carries.
pub fn frame_headers(
    headers: Option<&async_nats::HeaderMap>,
) -> Result<events::FrameHeaders, events::DecodeError> {
    events::FrameHeaders::parse(|name| headers.and_then(|h| h.get(name)).map(|v| v.as_str()))
}

/// Resolves on Ctrl-C or SIGTERM (what a supervisor sends): every service binary stops on either.
pub async fn stop_requested() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut terminate) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
