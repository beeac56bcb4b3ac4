//! `auth init`: the NATS users of a pool (one per service, worker and producer, and an operator) with their
//! subject permissions from `bus::auth`, written as a server config include and one credentials file per user.
//!
//! Both are written readable by their owner only (0600). A credentials file that exists keeps its password,
//! so running it again to add workers does not lock running services out.

use std::fmt::Write as _;
use std::io::Read as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use bus::Credentials;
use bus::auth::{Role, User};
use events::{ClientId, WorkerId};

use crate::cli::AuthInitArgs;

/// The server include inside `dir`.
pub const SERVER_FILE: &str = "auth.conf";

/// What `init` wrote.
#[derive(Debug)]
pub struct Written {
    pub server_config: PathBuf,
    pub credentials: Vec<(Role, PathBuf)>,
}

impl std::fmt::Display for Written {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "server users and permissions: {} (add `include \"{}\"` to the nats-server config; reload it)",
            self.server_config.display(),
            self.server_config.display()
        )?;
        for (role, path) in &self.credentials {
            writeln!(f, "  {:<24} {}", role.user(), path.display())?;
        }
        writeln!(
            f,
            "services take theirs with --nats-credentials FILE (or COCOON_NATS_CREDENTIALS)"
        )
    }
}

/// The credentials file of `role` in `dir`.
pub fn credentials_path(dir: &Path, role: &Role) -> PathBuf {
    dir.join("creds").join(format!("{}.creds", role.user()))
}

fn fresh_password() -> anyhow::Result<String> {
    let mut bytes = [0u8; 24];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("cannot read /dev/urandom for a password")?;
    Ok(bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    }))
}

/// Writes `text` to `path`, readable and writable by its owner only (also when the file existed).
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Writes the users of the services, the operator, `workers` and `producers` into `dir`.
pub fn init(dir: &Path, workers: &[WorkerId], producers: &[ClientId]) -> anyhow::Result<Written> {
    let creds_dir = dir.join("creds");
    std::fs::create_dir_all(&creds_dir)
        .with_context(|| format!("cannot create {}", creds_dir.display()))?;
    let mut roles: Vec<Role> = Role::SERVICES.to_vec();
    roles.extend(workers.iter().cloned().map(Role::Worker));
    roles.extend(producers.iter().cloned().map(Role::Producer));
    // Users of earlier runs that this run does not name are kept too: read them back from their files.
    for entry in std::fs::read_dir(&creds_dir)
        .with_context(|| format!("cannot list {}", creds_dir.display()))?
    {
        let name = entry?.file_name().to_string_lossy().into_owned();
        let Some(user) = name.strip_suffix(".creds") else {
            continue;
        };
        let role = if let Some(w) = user.strip_prefix("worker-") {
            WorkerId::new(w).ok().map(Role::Worker)
        } else if let Some(c) = user.strip_prefix("client-") {
            ClientId::new(c).ok().map(Role::Producer)
        } else {
            None
        };
        if let Some(role) = role
            && !roles.contains(&role)
        {
            roles.push(role);
        }
    }
    let mut users = Vec::with_capacity(roles.len());
    let mut credentials = Vec::with_capacity(roles.len());
    for role in roles {
        let path = credentials_path(dir, &role);
        let existing = if path.exists() {
            Some(Credentials::load(&path)?)
        } else {
            None
        };
        let c = match existing {
            Some(c) if c.user == role.user() => c,
            Some(c) => bail!(
                "{} names user {:?}, expected {:?}",
                path.display(),
                c.user,
                role.user()
            ),
            None => {
                let c = Credentials::new(role.user(), fresh_password()?);
                write_private(&path, &c.to_file_text())?;
                c
            }
        };
        users.push(User {
            role: role.clone(),
            password: c.password().to_owned(),
        });
        credentials.push((role, path));
    }
    let server_config = dir.join(SERVER_FILE);
    write_private(&server_config, &bus::auth::server_config(&users))?;
    Ok(Written {
        server_config,
        credentials,
    })
}

/// `cocoon auth init`: validates the ids, then [`init`].
pub fn init_command(args: &AuthInitArgs) -> anyhow::Result<Written> {
    let workers = args
        .workers
        .iter()
        .map(|w| WorkerId::new(w.as_str()).with_context(|| format!("worker id {w:?}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let producers = args
        .producers
        .iter()
        .map(|c| ClientId::new(c.as_str()).with_context(|| format!("client id {c:?}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    init(&args.dir, &workers, &producers)
}
