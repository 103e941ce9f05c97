//! Durations as operators write them (`500ms`, `30s`, `2m`, `1h`, `1m30s`)
//! and as keywave prints them, shared by every flag, configuration file and
//! report so that what one component prints another accepts.

use std::time::Duration;
use thiserror::Error;

/// Why a duration does not parse.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DurationError {
    #[error("empty duration (expected e.g. 500ms, 30s, 2m, 1h)")]
    Empty,
    #[error("bad duration {0:?} (expected e.g. 500ms, 30s, 2m, 1h)")]
    Malformed(String),
    #[error("duration {0:?} is too large")]
    TooLarge(String),
    #[error("duration {0:?} needs a unit: ms, s, m or h (e.g. 30s)")]
    MissingUnit(String),
    #[error("unknown duration unit {unit:?} in {input:?} (use ms, s, m or h)")]
    UnknownUnit { unit: String, input: String },
}

/// Parses a duration such as `500ms`, `30s`, `2m`, `1h` or `1m30s`; a bare
/// `0` is zero.
pub fn parse(s: &str) -> Result<Duration, DurationError> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err(DurationError::Empty);
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(DurationError::Malformed(s.to_string()));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| DurationError::TooLarge(s.to_string()))?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(|b| b.is_ascii_alphabetic()).count();
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let part = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "" => return Err(DurationError::MissingUnit(s.to_string())),
            u => {
                return Err(DurationError::UnknownUnit {
                    unit: u.to_string(),
                    input: s.to_string(),
                })
            }
        };
        total = total.saturating_add(part);
    }
    Ok(total)
}

/// Formats milliseconds compactly: `30s`, `2m`, `1h`, `1500ms`.
pub fn format_ms(ms: u64) -> String {
    match ms {
        0 => "0s".into(),
        ms if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        ms if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        ms if ms % 1_000 == 0 => format!("{}s", ms / 1_000),
        ms => format!("{ms}ms"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse(" 0 "), Ok(Duration::ZERO));
        assert_eq!(parse("0s"), Ok(Duration::ZERO));
        for bad in ["", "30", "s", "1.5s", "10d", "-1s", "1s2"] {
            assert!(parse(bad).is_err(), "{bad:?} must be rejected");
        }
        assert_eq!(parse("30"), Err(DurationError::MissingUnit("30".into())));
        assert!(matches!(
            parse("10d"),
            Err(DurationError::UnknownUnit { .. })
        ));
    }

    #[test]
    fn formatted_durations_parse_back() {
        for ms in [
            0, 1, 999, 1_000, 1_500, 60_000, 90_000, 3_600_000, 5_400_000,
        ] {
            assert_eq!(parse(&format_ms(ms)), Ok(Duration::from_millis(ms)), "{ms}");
        }
    }
}
