//! Query parameters of the reads: each one parsed into its type or refused naming it, unknown ones refused
//! (a typo would otherwise silently return everything), plus `fields` selection and opaque keyset cursors.

use std::collections::BTreeSet;
use std::time::Duration;

use axum::http::HeaderMap;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::consistency::Token;
use crate::error::ApiError;

/// Smallest and largest `limit`, and the default.
pub const MIN_LIMIT: u32 = 1;
pub const MAX_LIMIT: u32 = 500;
pub const DEFAULT_LIMIT: u32 = 50;

/// The header that carries a consistency token, as an alternative to `consistent_with`.
pub const CONSISTENT_WITH_HEADER: &str = "cocoon-consistent-with";

/// The query string as name/value pairs, consumed parameter by parameter.
#[derive(Debug, Default)]
pub struct Params {
    pairs: Vec<(String, String)>,
    taken: BTreeSet<String>,
}

impl Params {
    pub fn new(pairs: Vec<(String, String)>) -> Self {
        Self {
            pairs,
            taken: BTreeSet::new(),
        }
    }

    /// The parameter's value; given twice with different values, refused.
    pub fn take(&mut self, name: &str) -> Result<Option<String>, ApiError> {
        self.taken.insert(name.to_owned());
        let mut values = self.pairs.iter().filter(|(n, _)| n == name).map(|(_, v)| v);
        let first = values.next().cloned();
        if values.any(|v| Some(v) != first.as_ref()) {
            return Err(ApiError::invalid_query(name, "given more than once"));
        }
        Ok(first)
    }

    /// A non-negative integer parameter within `range`.
    pub fn take_u64(
        &mut self,
        name: &str,
        range: std::ops::RangeInclusive<u64>,
    ) -> Result<Option<u64>, ApiError> {
        let Some(text) = self.take(name)? else {
            return Ok(None);
        };
        let value: u64 = text.trim().parse().map_err(|_| {
            ApiError::invalid_query(name, format!("{text:?} is not a non-negative integer"))
        })?;
        if !range.contains(&value) {
            return Err(ApiError::invalid_query(
                name,
                format!("{value} is outside {}..={}", range.start(), range.end()),
            ));
        }
        Ok(Some(value))
    }

    /// Refuses any parameter no one asked for.
    pub fn finish(self) -> Result<(), ApiError> {
        match self.pairs.iter().find(|(n, _)| !self.taken.contains(n)) {
            Some((name, _)) => Err(ApiError::invalid_query(
                name.as_str(),
                "unknown query parameter",
            )),
            None => Ok(()),
        }
    }
}

/// How long a read may wait for its consistency token.
#[derive(Debug, Clone, Copy)]
pub struct WaitLimits {
    pub default: Duration,
    pub max: Duration,
}

/// The consistency part of a read: the token (query `consistent_with` or the header) and the wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Consistency {
    pub token: Option<Token>,
    pub wait: Duration,
}

impl Consistency {
    pub fn parse(
        params: &mut Params,
        headers: &HeaderMap,
        limits: WaitLimits,
    ) -> Result<Consistency, ApiError> {
        let from_query = params.take("consistent_with")?;
        let from_header = headers
            .get(CONSISTENT_WITH_HEADER)
            .map(|v| {
                v.to_str().map(str::to_owned).map_err(|_| {
                    ApiError::invalid_query("consistent_with", "the header is not ASCII")
                })
            })
            .transpose()?;
        let token = from_query
            .or(from_header)
            .map(|text| {
                text.parse::<Token>()
                    .map_err(|e| ApiError::invalid_query("consistent_with", e.to_string()))
            })
            .transpose()?;
        let max_ms = u64::try_from(limits.max.as_millis()).unwrap_or(u64::MAX);
        let wait = params
            .take_u64("wait_ms", 0..=max_ms)?
            .map_or(limits.default, Duration::from_millis);
        Ok(Consistency { token, wait })
    }
}

/// `fields=a,b`: the top-level fields to keep, each one checked against what the resource has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fields(Option<Vec<String>>);

impl Fields {
    pub fn parse(params: &mut Params, known: &[&str]) -> Result<Fields, ApiError> {
        let Some(text) = params.take("fields")? else {
            return Ok(Fields(None));
        };
        let mut names = Vec::new();
        for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if !known.contains(&name) {
                return Err(ApiError::invalid_query(
                    "fields",
                    format!("unknown field {name:?}; known: {}", known.join(", ")),
                ));
            }
            names.push(name.to_owned());
        }
        if names.is_empty() {
            return Err(ApiError::invalid_query("fields", "names no field"));
        }
        Ok(Fields(Some(names)))
    }

    /// Keeps only the selected fields of a JSON object.
    pub fn apply(&self, item: Value) -> Value {
        match (&self.0, item) {
            (Some(names), Value::Object(mut map)) => {
                map.retain(|k, _| names.iter().any(|n| n == k));
                Value::Object(map)
            }
            (_, item) => item,
        }
    }
}

/// `limit`, 1 to 500, 50 by default.
pub fn limit(params: &mut Params) -> Result<u32, ApiError> {
    Ok(params
        .take_u64("limit", u64::from(MIN_LIMIT)..=u64::from(MAX_LIMIT))?
        .map_or(DEFAULT_LIMIT, |l| l as u32))
}

/// A list's sort key, the position after which the next page starts. Opaque to clients: base64url of JSON
/// that names its list, so a cursor of one list is refused by another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "list", rename_all = "snake_case", deny_unknown_fields)]
pub enum Cursor {
    /// `submitted_at` in microseconds (None: not projected yet; such rows come first) and the task id.
    Tasks {
        at: Option<i64>,
        id: uuid::Uuid,
    },
    Workers {
        id: String,
    },
    Settlements {
        at: i64,
        id: uuid::Uuid,
    },
    Payouts {
        settlement: uuid::Uuid,
        worker: String,
    },
}

impl Cursor {
    pub fn encode(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
    }

    pub fn decode(text: &str) -> Result<Cursor, ApiError> {
        let bad = || ApiError::InvalidCursor(format!("cursor {text:?} was not made by this API"));
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text.trim())
            .map_err(|_| bad())?;
        let cursor: Cursor = serde_json::from_slice(&bytes).map_err(|_| bad())?;
        // Times within years 1970–9999 and ids as the lists hand them out, so a crafted cursor is a 400, never a
        // query Postgres refuses.
        const MAX_MICROS: i64 = 253_402_300_799_000_000;
        let time_ok = |at: i64| (0..=MAX_MICROS).contains(&at);
        let id_ok = |id: &str| events::WorkerId::new(id).is_ok();
        let valid = match &cursor {
            Cursor::Tasks { at, .. } => at.is_none_or(time_ok),
            Cursor::Settlements { at, .. } => time_ok(*at),
            Cursor::Workers { id } => id_ok(id),
            Cursor::Payouts { worker, .. } => id_ok(worker),
        };
        if valid { Ok(cursor) } else { Err(bad()) }
    }

    /// The `cursor` parameter, if given.
    pub fn parse(params: &mut Params) -> Result<Option<Cursor>, ApiError> {
        params
            .take("cursor")?
            .map(|c| Cursor::decode(&c))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn crafted_cursors_are_refused_before_any_query() {
        for cursor in [
            Cursor::Tasks {
                at: Some(i64::MAX),
                id: uuid::Uuid::nil(),
            },
            Cursor::Settlements {
                at: -9_000_000_000_000_000_000,
                id: uuid::Uuid::nil(),
            },
            Cursor::Workers {
                id: "a\u{0}b".into(),
            },
            Cursor::Payouts {
                settlement: uuid::Uuid::nil(),
                worker: "x y".into(),
            },
        ] {
            assert!(
                matches!(
                    Cursor::decode(&cursor.encode()),
                    Err(ApiError::InvalidCursor(_))
                ),
                "{cursor:?}"
            );
        }
        let fine = Cursor::Workers { id: "w-1".into() };
        assert_eq!(Cursor::decode(&fine.encode()).unwrap(), fine);
    }

    fn params(pairs: &[(&str, &str)]) -> Params {
        Params::new(
            pairs
                .iter()
                .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
                .collect(),
        )
    }

    #[test]
    fn limits_and_unknown_parameters_are_named() {
        let mut p = params(&[("limit", "0")]);
        assert_eq!(
            limit(&mut p).unwrap_err(),
            ApiError::invalid_query("limit", "0 is outside 1..=500")
        );
        let mut p = params(&[("limit", "x")]);
        assert!(
            matches!(limit(&mut p), Err(ApiError::InvalidQuery { field, .. }) if field == "limit")
        );
        let mut p = params(&[]);
        assert_eq!(limit(&mut p).unwrap(), DEFAULT_LIMIT);
        let mut p = params(&[("limit", "7"), ("statuss", "x")]);
        assert_eq!(limit(&mut p).unwrap(), 7);
        assert!(
            matches!(p.finish(), Err(ApiError::InvalidQuery { field, .. }) if field == "statuss")
        );
    }

    #[test]
    fn fields_select_known_names_only() {
        let mut p = params(&[("fields", "task_id,status")]);
        let f = Fields::parse(&mut p, &["task_id", "status", "priority"]).unwrap();
        assert_eq!(
            f.apply(json!({"task_id": 1, "status": "x", "priority": 3})),
            json!({"task_id": 1, "status": "x"})
        );
        let mut p = params(&[("fields", "task_id,nope")]);
        let e = Fields::parse(&mut p, &["task_id"]).unwrap_err();
        assert!(
            matches!(&e, ApiError::InvalidQuery { field, message } if field == "fields" && message.contains("nope"))
        );
    }

    #[test]
    fn cursors_round_trip_and_refuse_garbage() {
        for c in [
            Cursor::Tasks {
                at: None,
                id: uuid::Uuid::now_v7(),
            },
            Cursor::Tasks {
                at: Some(1_795_383_637_000_000),
                id: uuid::Uuid::now_v7(),
            },
            Cursor::Workers { id: "w-1".into() },
        ] {
            assert_eq!(Cursor::decode(&c.encode()).unwrap(), c);
        }
        assert!(matches!(
            Cursor::decode("not a cursor"),
            Err(ApiError::InvalidCursor(_))
        ));
        assert!(matches!(
            Cursor::decode("e30"),
            Err(ApiError::InvalidCursor(_))
        ));
    }
}
