//! `dev up|down|status`: the embedded stack, driven through `infra/stack.sh`, plus streams and migrations.

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::{Context as _, bail};

use crate::cli::Connection;

/// Finds `infra/stack.sh`: `$COCOON_ROOT`, then the current directory and its parents, then the source tree
/// this binary was built from.
pub fn stack_script() -> anyhow::Result<PathBuf> {
    let rel = "infra/stack.sh";
    if let Some(root) = std::env::var_os("COCOON_ROOT") {
        return Ok(PathBuf::from(root).join(rel));
    }
    if let Ok(mut dir) = std::env::current_dir() {
        loop {
            if dir.join(rel).is_file() {
                return Ok(dir.join(rel));
            }
            if !dir.pop() {
                break;
            }
        }
    }
    let built_from = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel);
    if built_from.is_file() {
        return Ok(built_from);
    }
    bail!("cannot find {rel}; run from the repository or set COCOON_ROOT")
}

fn stack(arg: &str) -> anyhow::Result<std::process::ExitStatus> {
    let script = stack_script()?;
    Command::new("bash")
        .arg(&script)
        .arg(arg)
        .status()
        .with_context(|| format!("cannot run {}", script.display()))
}

/// Starts the stack (installing what is missing), provisions the streams and migrates the database.
pub async fn up(conn: &Connection) -> anyhow::Result<()> {
    let status = stack("up")?;
    if !status.success() {
        bail!("infra/stack.sh up failed ({status})");
    }
    let bus = crate::connect(conn).await?;
    let report = bus::provision_streams(&bus.jetstream, 1).await?;
    println!(
        "streams: {} created, {} updated, {} unchanged",
        report.count(bus::ProvisionOutcome::Created),
        report.count(bus::ProvisionOutcome::Updated),
        report.count(bus::ProvisionOutcome::Unchanged)
    );
    let migrations = migrate(&conn.database_url).await?;
    println!(
        "migrations: {} applied, {} already applied",
        migrations.applied.len(),
        migrations.already_applied
    );
    println!(
        "ready: NATS {}  Postgres {}",
        conn.nats_url,
        redact(&conn.database_url)
    );
    Ok(())
}

pub fn down() -> anyhow::Result<()> {
    let status = stack("down")?;
    if !status.success() {
        bail!("infra/stack.sh down failed ({status})");
    }
    Ok(())
}

/// Prints the stack's health and each stream's size; exit code 3 when the stack is not up.
pub async fn status(conn: &Connection) -> anyhow::Result<ExitCode> {
    let status = stack("status")?;
    if !status.success() {
        return Ok(ExitCode::from(3));
    }
    let bus = crate::connect(conn).await?;
    println!(
        "{:<14} {:>10} {:>12} {:>10} {:>10}",
        "stream", "frames", "bytes", "first", "last"
    );
    for stream in events::Stream::ALL {
        match bus.jetstream.get_stream(stream.name()).await {
            Ok(mut s) => {
                let st = &s.info().await?.state;
                println!(
                    "{:<14} {:>10} {:>12} {:>10} {:>10}",
                    stream.name(),
                    st.messages,
                    st.bytes,
                    st.first_sequence,
                    st.last_sequence
                );
            }
            Err(_) => println!("{:<14} missing (run `cocoon provision`)", stream.name()),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Applies the read-model migrations.
pub async fn migrate(database_url: &str) -> anyhow::Result<schemas::MigrationReport> {
    let (mut client, connection) = tokio_postgres::connect(database_url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("cannot connect to Postgres at {}", redact(database_url)))?;
    let conn_task = tokio::spawn(connection);
    let report = schemas::migrate(&mut client).await?;
    drop(client);
    let _ = conn_task.await;
    Ok(report)
}

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_are_not_printed() {
        assert_eq!(
            super::redact("postgres://u:secret@h:1/db"),
            "postgres://u:***@h:1/db"
        );
        assert_eq!(super::redact("postgres://u@h/db"), "postgres://u@h/db");
    }
}
