//! The Postgres read-model schema: SQL migrations embedded at compile time, and the migrator every service runs at start.
//!
//! Migrations live in one ordered directory, `schemas/migrations/NNNN_<name>.sql`, and are
//! listed in [`MIGRATIONS`] (a unit test fails when a file is missing from the list).
//! [`migrate`] applies the missing ones, each in its own transaction, under an advisory lock
//! so that services starting together do not race, and refuses to run against a database
//! whose history disagrees with the binary (an edited migration, or a newer one).
//!
//! The SQL never names a schema: it creates objects in the first schema of `search_path`,
//! so a rebuild can run the same migrations into a shadow schema.

use std::collections::BTreeMap;
use std::time::Instant;

use tokio_postgres::{Client, Transaction};

/// One migration: its version (the file's number), its name and its SQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migration {
    pub version: u32,
    pub name: &'static str,
    pub sql: &'static str,
}

impl Migration {
    /// A stable fingerprint of the SQL, recorded when the migration is applied and compared
    /// on every later start.
    ///
    /// FNV-1a 64 is enough: it detects edits, it does not defend against an adversary, and it
    /// needs no crypto crate. Carriage returns are skipped so that a checkout with CRLF line
    /// endings fingerprints the same as one with LF.
    pub fn checksum(&self) -> String {
        const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
        const PRIME: u64 = 0x0000_0100_0000_01b3;
        let hash = self
            .sql
            .bytes()
            .filter(|&b| b != b'\r')
            .fold(OFFSET, |hash, b| (hash ^ u64::from(b)).wrapping_mul(PRIME));
        format!("{hash:016x}")
    }

    /// The file this migration was read from, relative to `schemas/migrations/`.
    pub fn file_name(&self) -> String {
        format!("{:04}_{}.sql", self.version, self.name)
    }
}

macro_rules! migration {
    ($version:literal, $name:literal, $file:literal) => {
        Migration {
            version: $version,
            name: $name,
            sql: include_str!(concat!("../migrations/", $file)),
        }
    };
}

/// Every migration, in the order it is applied. Versions start at 1 and have no gaps;
/// an applied migration is never edited, only followed by a new one.
pub static MIGRATIONS: &[Migration] = &[
    migration!(
        1,
        "projection_bookkeeping",
        "0001_projection_bookkeeping.sql"
    ),
    migration!(2, "tasks", "0002_tasks.sql"),
    migration!(3, "workers", "0003_workers.sql"),
    migration!(4, "attestations", "0004_attestations.sql"),
    migration!(5, "allocations", "0005_allocations.sql"),
    migration!(6, "results", "0006_results.sql"),
    migration!(7, "payments", "0007_payments.sql"),
    migration!(8, "dashboard", "0008_dashboard.sql"),
    migration!(9, "projection_ordering", "0009_projection_ordering.sql"),
    migration!(
        10,
        "counter_triggers_without_joins",
        "0010_counter_triggers_without_joins.sql"
    ),
    migration!(11, "payment_status", "0011_payment_status.sql"),
    migration!(
        12,
        "settlements_by_preparation",
        "0012_settlements_by_preparation.sql"
    ),
    migration!(13, "reader_role", "0013_reader_role.sql"),
];

/// What a [`migrate`] call did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrationReport {
    /// Versions this call applied, in order.
    pub applied: Vec<u32>,
    /// Migrations that were already there: applied earlier, or by a concurrent call.
    pub already_applied: usize,
}

/// Why the schema could not be brought up to date. Nothing is half-applied: each migration
/// commits together with its bookkeeping row, or not at all.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// Postgres failed (connection, permissions, or a migration's SQL).
    #[error("database error while migrating")]
    Database(#[from] tokio_postgres::Error),
    /// The database applied this migration from different SQL than this binary embeds:
    /// someone edited an applied migration. Add a new migration instead.
    #[error("migration {version} ({name}) was applied with different SQL than this binary embeds")]
    ChecksumMismatch { version: u32, name: &'static str },
    /// The database has a migration this binary does not know, so it was migrated by a newer
    /// binary; running against that schema could misread it.
    #[error(
        "the database has migration {version}, which this binary does not know (it is older than the schema)"
    )]
    UnknownVersion { version: u32 },
}

/// Key of the advisory lock that serialises migrators (advisory locks are per database).
/// Any constant works as long as every migrator uses the same one; this is "cocoonmi" in
/// ASCII. Public so that operators and tests can find the lock in `pg_locks`.
pub const MIGRATION_LOCK_KEY: i64 = 0x636f_636f_6f6e_6d69;

/// Brings the schema in the first schema of `search_path` up to date with [`MIGRATIONS`].
///
/// Each missing migration runs in its own transaction that first takes a transaction-scoped
/// advisory lock, then reads `schema_migrations` afresh: two services starting at once
/// queue on the lock and each migration is applied exactly once. A transaction-scoped lock
/// is released by commit, rollback or a dropped connection, so a cancelled call never
/// leaves the client holding it.
///
/// Before applying anything, every recorded migration is checked against the embedded one:
/// see [`MigrateError`].
pub async fn migrate(client: &mut Client) -> Result<MigrationReport, MigrateError> {
    let mut applied = Vec::new();
    loop {
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY])
            .await?;
        ensure_bookkeeping(&tx).await?;
        let recorded = recorded_checksums(&tx).await?;
        verify(&recorded)?;

        let Some(next) = MIGRATIONS
            .iter()
            .find(|m| !recorded.contains_key(&m.version))
        else {
            tx.commit().await?;
            break;
        };

        let started = Instant::now();
        if let Err(error) = tx.batch_execute(next.sql).await {
            tracing::error!(version = next.version, name = next.name, %error, "migration failed");
            return Err(error.into());
        }
        tx.execute(
            "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
            &[&version_to_sql(next.version), &next.name, &next.checksum()],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(
            version = next.version,
            name = next.name,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "applied migration"
        );
        applied.push(next.version);
    }
    Ok(MigrationReport {
        already_applied: MIGRATIONS.len() - applied.len(),
        applied,
    })
}

/// Creates the bookkeeping table when it is missing. Run under the lock: a concurrent
/// `CREATE TABLE IF NOT EXISTS` can still fail on the catalog's unique index.
async fn ensure_bookkeeping(tx: &Transaction<'_>) -> Result<(), tokio_postgres::Error> {
    // Look in current_schema(), where the unqualified CREATE puts it, and not through the
    // whole search_path: a shadow schema searched before a migrated one must get its own
    // bookkeeping. Checking first also avoids an "already exists" notice on every start.
    let exists: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_tables
                            WHERE schemaname = current_schema()
                              AND tablename = 'schema_migrations')",
            &[],
        )
        .await?
        .get(0);
    if !exists {
        tx.batch_execute(
            "CREATE TABLE schema_migrations (
                 version    integer     PRIMARY KEY CHECK (version > 0),
                 name       text        NOT NULL,
                 checksum   text        NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now()
             )",
        )
        .await?;
    }
    Ok(())
}

/// The recorded migrations: version to checksum.
async fn recorded_checksums(
    tx: &Transaction<'_>,
) -> Result<BTreeMap<u32, String>, tokio_postgres::Error> {
    let rows = tx
        .query("SELECT version, checksum FROM schema_migrations", &[])
        .await?;
    Ok(rows
        .iter()
        .map(|row| {
            // The table's CHECK keeps versions positive, so the conversion cannot fail.
            let version = u32::try_from(row.get::<_, i32>(0)).unwrap_or_default();
            (version, row.get(1))
        })
        .collect())
}

/// Checks the recorded history against [`MIGRATIONS`]. Unknown versions are reported first:
/// a newer schema explains any other difference.
fn verify(recorded: &BTreeMap<u32, String>) -> Result<(), MigrateError> {
    if let Some(&version) = recorded
        .keys()
        .find(|v| !MIGRATIONS.iter().any(|m| m.version == **v))
    {
        return Err(MigrateError::UnknownVersion { version });
    }
    for migration in MIGRATIONS {
        if let Some(checksum) = recorded.get(&migration.version)
            && *checksum != migration.checksum()
        {
            return Err(MigrateError::ChecksumMismatch {
                version: migration.version,
                name: migration.name,
            });
        }
    }
    Ok(())
}

fn version_to_sql(version: u32) -> i32 {
    // Versions are small file numbers (four digits); the unit tests check the list.
    i32::try_from(version).expect("migration versions fit in an integer column")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The list must name every file in `migrations/`, in order, so that a new file cannot
    /// be forgotten (it would never be applied) and a listed one cannot be misnamed.
    #[test]
    fn list_matches_the_migrations_directory() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/migrations");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .expect("migrations directory is readable")
            .map(|entry| {
                entry
                    .expect("directory entry")
                    .file_name()
                    .into_string()
                    .expect("UTF-8 file name")
            })
            .collect();
        files.sort();
        let listed: Vec<String> = MIGRATIONS.iter().map(Migration::file_name).collect();
        assert_eq!(listed, files);
    }

    /// Each entry's version and name match the file it includes, so the checksum recorded
    /// under a version is the checksum of that version's file.
    #[test]
    fn embedded_sql_is_the_file_content() {
        for migration in MIGRATIONS {
            let path = format!(
                "{}/migrations/{}",
                env!("CARGO_MANIFEST_DIR"),
                migration.file_name()
            );
            let on_disk = std::fs::read_to_string(&path).expect("migration file is readable");
            assert_eq!(migration.sql, on_disk, "{path}");
        }
    }

    /// `migrate` wraps each migration in a transaction with its bookkeeping row, and a
    /// rebuild runs the same SQL into a shadow schema: so no migration may control the
    /// transaction itself, need to run outside one, or name a schema.
    #[test]
    fn migrations_are_transactional_and_schema_free() {
        for migration in MIGRATIONS {
            // Line comments may say anything; only the statements are checked.
            let sql: String = migration
                .sql
                .lines()
                .map(|line| {
                    line.split("--")
                        .next()
                        .unwrap_or_default()
                        .to_ascii_lowercase()
                })
                .collect::<Vec<_>>()
                .join("\n");
            for forbidden in [
                "begin;",
                "commit",
                "rollback",
                "concurrently",
                "public.",
                "search_path",
            ] {
                assert!(
                    !sql.contains(forbidden),
                    "{} contains {forbidden:?}",
                    migration.file_name()
                );
            }
        }
    }

    #[test]
    fn versions_start_at_one_without_gaps() {
        for (index, migration) in MIGRATIONS.iter().enumerate() {
            assert_eq!(migration.version as usize, index + 1, "{}", migration.name);
            assert!(migration.version <= 9999, "four-digit file numbers");
        }
    }

    #[test]
    fn checksum_is_stable_and_ignores_carriage_returns() {
        let lf = Migration {
            version: 1,
            name: "x",
            sql: "CREATE TABLE t (a int);\nSELECT 1;\n",
        };
        let crlf = Migration {
            sql: "CREATE TABLE t (a int);\r\nSELECT 1;\r\n",
            ..lf
        };
        let edited = Migration {
            sql: "CREATE TABLE t (a bigint);\nSELECT 1;\n",
            ..lf
        };
        // FNV-1a 64 of the empty input is its offset basis: pins the algorithm, so a change
        // to it (which would break every deployed database) fails here first.
        let empty = Migration { sql: "", ..lf };
        assert_eq!(empty.checksum(), "cbf29ce484222325");
        // And of "a", from the FNV reference test vectors.
        assert_eq!(Migration { sql: "a", ..lf }.checksum(), "af63dc4c8601ec8c");
        assert_eq!(lf.checksum(), crlf.checksum());
        assert_ne!(lf.checksum(), edited.checksum());
        assert_eq!(lf.checksum().len(), 16);
    }

    #[test]
    fn verify_rejects_unknown_versions_and_edited_migrations() {
        let mut recorded: BTreeMap<u32, String> = MIGRATIONS
            .iter()
            .map(|m| (m.version, m.checksum()))
            .collect();
        assert!(verify(&recorded).is_ok());

        recorded.insert(2, "0000000000000000".into());
        assert!(matches!(
            verify(&recorded),
            Err(MigrateError::ChecksumMismatch { version: 2, .. })
        ));

        let newer = MIGRATIONS.len() as u32 + 1;
        recorded.insert(newer, "0000000000000000".into());
        assert!(matches!(
            verify(&recorded),
            Err(MigrateError::UnknownVersion { version }) if version == newer
        ));
    }
}
