//! Parsing the times operators type: RFC 3339 instants, or ages such as `15m` counted back from now.

use std::time::Duration;

use anyhow::{Context as _, bail};
use events::Timestamp;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// `2026-11-22T21:00:00Z` or an age (`90s`, `15m`, `2h`, `1d`) before `now`.
pub fn parse_instant(s: &str, now: Timestamp) -> anyhow::Result<Timestamp> {
    if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
        let micros = t.unix_timestamp_nanos() / 1000;
        return Ok(Timestamp::from_micros(
            i64::try_from(micros).context("time out of range")?,
        ));
    }
    let age = parse_age(s).with_context(|| {
        format!(
            "{s:?} is neither an RFC 3339 time (2026-11-22T21:00:00Z) nor an age (90s, 15m, 2h, 1d)"
        )
    })?;
    let micros = i64::try_from(age.as_micros()).context("age too large")?;
    Ok(Timestamp::from_micros(
        now.as_micros().saturating_sub(micros),
    ))
}

fn parse_age(s: &str) -> anyhow::Result<Duration> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits.parse().context("missing number")?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => bail!("unknown unit {unit:?}"),
    };
    Ok(Duration::from_secs(n.saturating_mul(secs)))
}

/// A timestamp as the `time` crate's instant, for JetStream's deliver-by-time.
pub fn to_offset(t: Timestamp) -> anyhow::Result<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(t.as_micros()) * 1000)
        .context("time out of range")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_instants_and_ages() {
        let now = Timestamp::from_micros(1_795_383_637_000_000);
        assert_eq!(
            parse_instant("2026-11-22T21:40:37Z", now).unwrap(),
            Timestamp::from_micros(1_795_383_637_000_000)
        );
        assert_eq!(
            parse_instant("15m", now).unwrap(),
            Timestamp::from_micros(1_795_383_637_000_000 - 900_000_000)
        );
        assert!(parse_instant("yesterday", now).is_err());
        assert!(parse_instant("5y", now).is_err());
    }
}
