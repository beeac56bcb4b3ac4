//! NATS users and subject permissions per role, and the credentials files services connect with.
//!
//! Every subject a role may publish or read is spelled here, from `events::subjects`, so permissions cannot drift
//! from the subjects the code uses. The server side is a NATS config include ([`server_config`]: users with
//! their passwords and permissions, written by `cocoon auth init` into a file only the server reads); the client
//! side is one credentials file per user ([`Credentials::load`]), never a literal in code or on a command line.
//!
//! What each role gets (publish allow-lists; everything else is denied by the server):
//! - a worker `W` publishes only subjects whose origin is `worker.W` (its registration, heartbeats, quotes,
//!   task progress, results) and reads only its own allocations (the durable `agent-W` filtered on
//!   `allocations.W`) and the attestor's verdicts about itself (`verdicts-W`);
//! - a producer `C` publishes only `tasks.*.client.C` (submissions) and reads only `results.C.>`, through
//!   consumers pushed to its own inbox;
//! - each service publishes exactly the subjects of the events it produces and reads the streams it consumes;
//! - an operator may do anything (provision streams, replay, import, inspect).
//!
//! Replies (publish acks, fetched messages, pushed results) go to `_INBOX_<user>.>`, the only inbox a user may
//! subscribe to, so no user sees another's replies.

use std::fmt;
use std::path::Path;

use events::{ClientId, Stream, WorkerId};

/// The bucket of the allocator's lease (a KV bucket is the stream `KV_<bucket>`).
pub const ALLOCATOR_LEASE_BUCKET: &str = "cocoon-allocator";

/// Who connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Worker(WorkerId),
    Producer(ClientId),
    Allocator,
    Attestor,
    Settler,
    Projector,
    Api,
    Operator,
}

impl Role {
    /// The NATS user name of the role: `worker-<id>`, `client-<id>`, or the service's name.
    pub fn user(&self) -> String {
        match self {
            Role::Worker(w) => format!("worker-{}", w.as_str()),
            Role::Producer(c) => format!("client-{}", c.as_str()),
            Role::Allocator => "allocator".into(),
            Role::Attestor => "attestor".into(),
            Role::Settler => "settler".into(),
            Role::Projector => "projector".into(),
            Role::Api => "api".into(),
            Role::Operator => "operator".into(),
        }
    }

    /// The services, each one user.
    pub const SERVICES: [Role; 6] = [
        Role::Allocator,
        Role::Attestor,
        Role::Settler,
        Role::Projector,
        Role::Api,
        Role::Operator,
    ];
}

/// Subjects a user may publish to and subscribe to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Permissions {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

/// The inbox prefix of a user: replies to its requests come there and nowhere else.
pub fn inbox_prefix(user: &str) -> String {
    format!("_INBOX_{user}")
}

/// The durable consumer a worker's agent reads its allocations through.
pub fn agent_durable(worker: &WorkerId) -> String {
    format!("agent-{}", worker.as_str())
}

/// The consumer a worker's agent follows the attestor's verdicts about itself through.
pub fn verdicts_consumer(worker: &WorkerId) -> String {
    format!("verdicts-{}", worker.as_str())
}

const API: &str = "$JS.API";

/// Everything needed to read a stream through consumers of any name (services and operators only: a user who
/// may pull from any consumer of a stream may read all of it).
fn read_stream(p: &mut Permissions, stream: &str) {
    p.publish.extend([
        format!("{API}.STREAM.INFO.{stream}"),
        format!("{API}.STREAM.MSG.GET.{stream}"),
        format!("{API}.DIRECT.GET.{stream}"),
        format!("{API}.DIRECT.GET.{stream}.>"),
        format!("{API}.CONSUMER.CREATE.{stream}"),
        format!("{API}.CONSUMER.CREATE.{stream}.>"),
        format!("{API}.CONSUMER.DURABLE.CREATE.{stream}.>"),
        format!("{API}.CONSUMER.INFO.{stream}.>"),
        format!("{API}.CONSUMER.DELETE.{stream}.>"),
        format!("{API}.CONSUMER.MSG.NEXT.{stream}.>"),
        format!("$JS.ACK.{stream}.>"),
        format!("$JS.FC.{stream}.>"),
    ]);
}

/// One named consumer with one filter: create (the filter is in the create subject), look up, pull, ack.
fn read_consumer(p: &mut Permissions, stream: &str, name: &str, filter: &str) {
    p.publish.extend([
        format!("{API}.STREAM.INFO.{stream}"),
        format!("{API}.CONSUMER.CREATE.{stream}.{name}.{filter}"),
        format!("{API}.CONSUMER.INFO.{stream}.{name}"),
        // Its own consumer only: recreated from its ack floor after a failed fetch.
        format!("{API}.CONSUMER.DELETE.{stream}.{name}"),
        format!("{API}.CONSUMER.MSG.NEXT.{stream}.{name}"),
        format!("$JS.ACK.{stream}.{name}.>"),
    ]);
}

fn publish_origin(p: &mut Permissions, streams: &[Stream], origin: &str) {
    for s in streams {
        p.publish.push(format!("{}.*.{origin}", s.prefix()));
    }
}

/// The permissions of `role`.
pub fn permissions(role: &Role) -> Permissions {
    let mut p = Permissions::default();
    let user = role.user();
    let inbox = format!("{}.>", inbox_prefix(&user));
    p.subscribe.push(inbox.clone());
    // Its own inbox too: an agent times a round trip through the server by messaging itself.
    p.publish.extend([format!("{API}.INFO"), inbox]);
    match role {
        Role::Worker(w) => {
            let origin = events::Origin::Worker(w).to_string();
            publish_origin(
                &mut p,
                &[
                    Stream::Tasks,
                    Stream::Workers,
                    Stream::Attestations,
                    Stream::Results,
                ],
                &origin,
            );
            read_consumer(
                &mut p,
                Stream::Allocations.name(),
                &agent_durable(w),
                events::Subject::allocations(w).as_str(),
            );
            let verdicts = events::Origin::Attestor(w).to_string();
            read_consumer(
                &mut p,
                Stream::Attestations.name(),
                &verdicts_consumer(w),
                &format!("{}.*.{verdicts}", Stream::Attestations.prefix()),
            );
        }
        Role::Producer(c) => {
            let origin = events::Origin::Client(c).to_string();
            publish_origin(&mut p, &[Stream::Tasks], &origin);
            let results = Stream::Results.name();
            p.publish.extend([
                format!("{API}.STREAM.INFO.{results}"),
                // Any consumer name, but only with its own results as the filter; pushed to its own inbox.
                format!(
                    "{API}.CONSUMER.CREATE.{results}.*.{}",
                    events::Subject::results_filter(c)
                ),
                format!("$JS.FC.{results}.>"),
            ]);
        }
        Role::Allocator => {
            for s in [
                Stream::Tasks,
                Stream::Workers,
                Stream::Attestations,
                Stream::Allocations,
            ] {
                read_stream(&mut p, s.name());
            }
            publish_origin(&mut p, &[Stream::Tasks, Stream::Workers], "allocator");
            p.publish.push(Stream::Allocations.filter());
            let kv = format!("KV_{ALLOCATOR_LEASE_BUCKET}");
            read_stream(&mut p, &kv);
            p.publish.extend([
                format!("{API}.STREAM.CREATE.{kv}"),
                format!("$KV.{ALLOCATOR_LEASE_BUCKET}.>"),
            ]);
        }
        Role::Attestor => {
            // Quotes from ATTESTATIONS; the registered keys they must bind from WORKERS.
            read_stream(&mut p, Stream::Attestations.name());
            read_stream(&mut p, Stream::Workers.name());
            publish_origin(&mut p, &[Stream::Attestations], "attestor.*");
        }
        Role::Settler => {
            // Completions, checked against their allocations; prices; its own books.
            for s in [
                Stream::Tasks,
                Stream::Allocations,
                Stream::Workers,
                Stream::Payments,
            ] {
                read_stream(&mut p, s.name());
            }
            publish_origin(&mut p, &[Stream::Payments], "settler");
        }
        Role::Projector => {
            for s in Stream::ALL {
                read_stream(&mut p, s.name());
            }
            p.publish.push(Stream::DeadLetters.filter());
        }
        Role::Api => {
            for s in Stream::EVENT_STREAMS {
                read_stream(&mut p, s.name());
            }
            // Submissions on behalf of any client (the API authenticates its own callers).
            publish_origin(&mut p, &[Stream::Tasks], "client.*");
        }
        Role::Operator => {
            p.publish = vec![">".into()];
            p.subscribe = vec![">".into()];
        }
    }
    p
}

/// A user of the server config: name, password and permissions.
#[derive(Clone)]
pub struct User {
    pub role: Role,
    pub password: String,
}

impl fmt::Debug for User {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("User")
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// A double-quoted NATS config string (a quoted `$` is not a variable reference).
fn quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            _ => out.push(c),
        }
    }
    out.push('"');
    out
}

fn list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| quoted(s)).collect();
    format!("[{}]", quoted.join(", "))
}

/// The `authorization { users = [...] }` block of a nats-server config, for `include` from the main config.
pub fn server_config(users: &[User]) -> String {
    let mut out = String::from(
        "# Generated by `cocoon auth init`: users and subject permissions per role (bus::auth).\n\
         # It holds passwords: only the server may read it.\nauthorization {\n  users = [\n",
    );
    for u in users {
        let p = permissions(&u.role);
        out.push_str(&format!(
            "    {{ user: {}, password: {}, permissions: {{ publish: {{ allow: {} }}, subscribe: {{ allow: {} }} }} }}\n",
            quoted(&u.role.user()),
            quoted(&u.password),
            list(&p.publish),
            list(&p.subscribe),
        ));
    }
    out.push_str("  ]\n}\n");
    out
}

/// A user and its password, read from a credentials file.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// Why a credentials file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("cannot read the NATS credentials file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("NATS credentials file {path}, line {line}: expected `user = ...` or `password = ...`")]
    Malformed { path: String, line: usize },
    #[error("NATS credentials file {path} has no `{field}`")]
    Missing { path: String, field: &'static str },
}

impl Credentials {
    pub fn new(user: impl Into<String>, password: impl Into<String>) -> Self {
        Self {
            user: user.into(),
            password: password.into(),
        }
    }

    pub fn password(&self) -> &str {
        &self.password
    }

    /// The file's text: `user = ...` and `password = ...` lines.
    pub fn to_file_text(&self) -> String {
        format!(
            "# NATS credentials of {} (cocoon auth init). Keep it readable by its service only.\nuser = {}\npassword = {}\n",
            self.user, self.user, self.password
        )
    }

    /// Parses the text of a credentials file; `path` is only for the messages.
    pub fn parse(path: &str, text: &str) -> Result<Credentials, CredentialsError> {
        let (mut user, mut password) = (None, None);
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let malformed = || CredentialsError::Malformed {
                path: path.to_owned(),
                line: i + 1,
            };
            let (key, value) = line.split_once('=').ok_or_else(malformed)?;
            let value = value.trim().to_owned();
            match key.trim() {
                "user" if !value.is_empty() => user = Some(value),
                "password" if !value.is_empty() => password = Some(value),
                _ => return Err(malformed()),
            }
        }
        let missing = |field| CredentialsError::Missing {
            path: path.to_owned(),
            field,
        };
        Ok(Credentials {
            user: user.ok_or_else(|| missing("user"))?,
            password: password.ok_or_else(|| missing("password"))?,
        })
    }

    /// Reads a credentials file.
    pub fn load(path: &Path) -> Result<Credentials, CredentialsError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| CredentialsError::Read {
            path: shown.clone(),
            source,
        })?;
        Credentials::parse(&shown, &text)
    }

    /// [`Credentials::load`] of an optional path (a service's `--nats-credentials`).
    pub fn load_optional(path: Option<&Path>) -> Result<Option<Credentials>, CredentialsError> {
        path.map(Credentials::load).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_files_parse_and_say_what_is_wrong() {
        let c = Credentials::new("worker-w1", "s3cret");
        assert_eq!(Credentials::parse("f", &c.to_file_text()).unwrap(), c);
        assert!(
            !format!("{c:?}").contains("s3cret"),
            "Debug hides the password"
        );
        assert!(matches!(
            Credentials::parse("f", "user = a\n"),
            Err(CredentialsError::Missing {
                field: "password",
                ..
            })
        ));
        assert!(matches!(
            Credentials::parse("f", "user a\npassword = b"),
            Err(CredentialsError::Malformed { line: 1, .. })
        ));
        assert!(matches!(
            Credentials::parse("f", "user = a\ntoken = b"),
            Err(CredentialsError::Malformed { line: 2, .. })
        ));
    }

    #[test]
    fn a_worker_publishes_only_as_itself() {
        let w = WorkerId::new("w1").unwrap();
        let p = permissions(&Role::Worker(w));
        assert!(p.publish.contains(&"tasks.*.worker.w1".to_owned()));
        assert!(
            p.publish
                .iter()
                .all(|s| !s.starts_with("allocations") && !s.contains(".client.")),
            "{p:?}"
        );
        assert_eq!(p.subscribe, vec!["_INBOX_worker-w1.>".to_owned()]);
        assert!(
            p.publish.contains(
                &"$JS.API.CONSUMER.CREATE.ALLOCATIONS.agent-w1.allocations.w1".to_owned()
            )
        );
    }

    #[test]
    fn the_server_config_quotes_every_subject() {
        let users = [User {
            role: Role::Producer(ClientId::new("c1").unwrap()),
            password: "p\"w".into(),
        }];
        let text = server_config(&users);
        assert!(
            text.contains(r#"user: "client-c1", password: "p\"w""#),
            "{text}"
        );
        assert!(text.contains(r#""tasks.*.client.c1""#), "{text}");
    }
}
