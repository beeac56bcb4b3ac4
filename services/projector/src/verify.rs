//! Table fingerprints: row counts and a checksum per table, comparable across schemas (live vs shadow) and
//! runs. Wall-clock bookkeeping (`updated_at`) is left out: it differs between two correct builds.
//!
//! The checksum is the sum of a 64-bit hash of each row's text (`hashtextextended`), so it does not depend on
//! row order and takes one pass without a sort. (It was the md5 of the rows sorted as text: the sort took most
//! of a rebuild's verification, while the live projector waited on the checkpoint lock.)

use std::collections::BTreeMap;

use tokio_postgres::GenericClient;

/// Count and checksum of one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSum {
    pub rows: i64,
    /// The sum of the rows' 64-bit hashes, in decimal; empty for an empty table.
    pub checksum: String,
}

/// Fingerprints `tables` in `schema`.
pub async fn fingerprint(
    client: &impl GenericClient,
    schema: &str,
    tables: &[&str],
) -> Result<BTreeMap<String, TableSum>, tokio_postgres::Error> {
    let mut out = BTreeMap::new();
    for table in tables {
        let columns: Vec<String> = client
            .query(
                "SELECT column_name::text FROM information_schema.columns
                 WHERE table_schema = $1 AND table_name = $2 AND column_name <> 'updated_at'
                 ORDER BY ordinal_position",
                &[&schema, table],
            )
            .await?
            .iter()
            .map(|r| format!("\"{}\"", r.get::<_, String>(0)))
            .collect();
        let sql = format!(
            "SELECT count(*), coalesce(sum(hashtextextended(r::text, 0))::text, '')
             FROM (SELECT {} FROM \"{schema}\".\"{table}\") r",
            columns.join(", ")
        );
        let row = client.query_one(&sql, &[]).await?;
        out.insert(
            table.to_string(),
            TableSum {
                rows: row.get(0),
                checksum: row.get(1),
            },
        );
    }
    Ok(out)
}

/// The tables whose fingerprints differ, with both sides.
pub fn differences(
    a: &BTreeMap<String, TableSum>,
    b: &BTreeMap<String, TableSum>,
) -> Vec<(String, Option<TableSum>, Option<TableSum>)> {
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| (k.clone(), a.get(k).cloned(), b.get(k).cloned()))
        .collect()
}
