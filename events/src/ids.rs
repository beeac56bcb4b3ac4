//! Id newtypes: every id that crosses the wire has its own type, so a worker id can never be passed where a client id is meant.
//!
//! Uuid-backed ids are UUIDv7 (time-ordered, so they index well). String ids that end up as a subject token
//! (`allocations.<worker>`, `results.<client>`) are validated at construction and at decoding: they cannot carry
//! `.`, `*`, `>` or whitespace, and are at most [`MAX_TOKEN_LEN`] bytes.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Longest string id accepted; keeps subjects and index keys small.
pub const MAX_TOKEN_LEN: usize = 64;

/// Why a string is not a valid id token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} must not be empty")]
    Empty { kind: &'static str },
    #[error("{kind} is {len} bytes, longer than the maximum of {MAX_TOKEN_LEN}")]
    TooLong { kind: &'static str, len: usize },
    #[error(
        "{kind} {value:?} contains {ch:?}; only ASCII letters, digits, '-' and '_' are allowed"
    )]
    InvalidChar {
        kind: &'static str,
        value: String,
        ch: char,
    },
    #[error("{kind} {value:?} is not a UUID")]
    NotUuid { kind: &'static str, value: String },
}

/// Checks that `value` is usable as one NATS subject token and as a database key.
pub fn validate_token(kind: &'static str, value: &str) -> Result<(), IdError> {
    if value.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if value.len() > MAX_TOKEN_LEN {
        return Err(IdError::TooLong {
            kind,
            len: value.len(),
        });
    }
    if let Some(ch) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return Err(IdError::InvalidChar {
            kind,
            value: value.to_owned(),
            ch,
        });
    }
    Ok(())
}

macro_rules! uuid_id {
    ($(#[$meta:meta])* $name:ident, $kind:literal) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A new time-ordered (v7) id.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }

            /// A fixed id, for fixtures and tests.
            pub const fn from_u128(v: u128) -> Self {
                Self(Uuid::from_u128(v))
            }

            pub fn as_uuid(&self) -> Uuid {
                self.0
            }

            /// When a UUIDv7 id was minted (its millisecond timestamp); `None` for an id of any other version.
            pub fn minted_at(&self) -> Option<crate::time::Timestamp> {
                if self.0.get_version_num() != 7 {
                    return None;
                }
                let millis = i64::try_from(self.0.as_u128() >> 80).ok()?;
                Some(crate::time::Timestamp(millis * 1_000))
            }

            /// The lowest possible id minted at or after `at`: every UUIDv7 id minted earlier sorts below it, and
            /// every one minted then or later sorts at or above it (a bound for ranges, not an id to hand out).
            pub fn lowest_minted_at(at: crate::time::Timestamp) -> Self {
                let millis = u128::try_from(at.0.max(0)).unwrap_or(0).div_ceil(1_000);
                Self(Uuid::from_u128(millis.min((1 << 48) - 1) << 80))
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self).map_err(|_| IdError::NotUuid {
                    kind: $kind,
                    value: s.to_owned(),
                })
            }
        }

        impl From<Uuid> for $name {
            fn from(u: Uuid) -> Self {
                Self(u)
            }
        }
    };
}

macro_rules! token_id {
    ($(#[$meta:meta])* $name:ident, $kind:literal) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Validates `value` as a subject token.
            pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                validate_token($kind, &value)?;
                Ok(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(value: String) -> Result<Self, Self::Error> {
                Self::new(value)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

uuid_id!(
    /// The id of one event (UUIDv7). The JetStream de-duplication key of a frame is built from its events' ids.
    EventId,
    "event id"
);
uuid_id!(
    /// A task, from submission to its terminal state, across attempts.
    TaskId,
    "task id"
);
uuid_id!(
    /// Ties together every event that one request caused.
    CorrelationId,
    "correlation id"
);
uuid_id!(
    /// One settlement batch: one TON transaction of up to 255 payouts.
    SettlementId,
    "settlement id"
);

token_id!(
    /// A GPU worker node. Appears as the last token of `allocations.<worker>`.
    WorkerId,
    "worker id"
);
token_id!(
    /// A client (consumer of results). Appears as the last token of `results.<client>`.
    ClientId,
    "client id"
);
token_id!(
    /// The service instance that produced an event, e.g. `allocator-1`.
    ProducerId,
    "producer id"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_reject_subject_metacharacters() {
        for bad in ["a.b", "a*", ">", "a b", "", "é"] {
            assert!(WorkerId::new(bad).is_err(), "{bad:?} accepted");
        }
        assert!(WorkerId::new("x".repeat(MAX_TOKEN_LEN + 1)).is_err());
        assert_eq!(WorkerId::new("gpu-node_7").unwrap().as_str(), "gpu-node_7");
    }

    #[test]
    fn token_ids_are_validated_when_decoded() {
        let bytes = rmp_serde::to_vec("bad.worker").unwrap();
        assert!(rmp_serde::from_slice::<WorkerId>(&bytes).is_err());
    }

    #[test]
    fn uuid_ids_parse_and_display() {
        let id = TaskId::new();
        assert_eq!(id.to_string().parse::<TaskId>().unwrap(), id);
        let minted = id.minted_at().expect("a new id is v7");
        let now = crate::time::Timestamp::now();
        assert!(
            (now.0 - minted.0).abs() < 60_000_000,
            "{minted:?} vs {now:?}"
        );
        assert_eq!(TaskId::from_u128(1).minted_at(), None, "not v7: no age");
        assert!("nope".parse::<TaskId>().is_err());
    }

    #[test]
    fn the_lowest_id_minted_at_a_time_bounds_ids_by_mint_time() {
        use crate::time::Timestamp;
        // Two v7 ids minted at 1,000 ms and 1,001 ms, with every random bit set (the highest ids of their ms).
        let at = |millis: u128| TaskId::from_u128(millis << 80 | 0x7fff_bfff_ffff_ffff_ffff);
        let (early, late) = (at(1_000), at(1_001));
        assert_eq!(early.minted_at(), Some(Timestamp(1_000_000)));
        assert_eq!(late.minted_at(), Some(Timestamp(1_001_000)));
        for bound in [Timestamp(1_000_001), Timestamp(1_001_000)] {
            let low = TaskId::lowest_minted_at(bound);
            assert!(early < low && low <= late, "{bound:?}");
        }
        assert!(TaskId::lowest_minted_at(Timestamp(1_000_000)) <= early);
        assert_eq!(
            TaskId::lowest_minted_at(Timestamp(-5)),
            TaskId::from_u128(0)
        );
    }
}
