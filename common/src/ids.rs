//! Names that travel in NATS subjects and KV keys (regions, campaign ids,
//! credential ids, endpoint names). They are validated once, at the edge, so a
//! name can never inject a subject token (`.`, `*`, `>`) or a bad KV key.

use thiserror::Error;

/// Longest accepted identifier, in bytes.
pub const MAX_ID_LEN: usize = 128;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum IdError {
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error("{what} is longer than {MAX_ID_LEN} bytes")]
    TooLong { what: &'static str },
    #[error("{what} {value:?} may contain only ASCII letters, digits, '-' and '_', and must start with a letter or digit")]
    BadChar { what: &'static str, value: String },
}

/// Checks that `value` is a safe token: `[A-Za-z0-9][A-Za-z0-9_-]{0,127}`.
pub fn validate(what: &'static str, value: &str) -> Result<(), IdError> {
    if value.is_empty() {
        return Err(IdError::Empty { what });
    }
    if value.len() > MAX_ID_LEN {
        return Err(IdError::TooLong { what });
    }
    let first_ok = value.as_bytes()[0].is_ascii_alphanumeric();
    let rest_ok = value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !first_ok || !rest_ok {
        return Err(IdError::BadChar {
            what,
            value: value.chars().take(MAX_ID_LEN).collect(),
        });
    }
    Ok(())
}

/// A fresh random identifier (campaign ids, worker ids): a prefix and 12 hex chars.
pub fn random_id(prefix: &str) -> String {
    use rand::RngCore;
    let mut b = [0u8; 6];
    rand::rngs::OsRng.fill_bytes(&mut b);
    format!("{prefix}-{}", hex::encode(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_tokens() {
        assert!(validate("region", "eu").is_ok());
        assert!(validate("credential id", "db-app_01").is_ok());
    }

    #[test]
    fn rejects_subject_metacharacters() {
        for bad in ["a.b", "a*", ">", "a b", "-lead", "", "é"] {
            assert!(validate("x", bad).is_err(), "{bad:?} must be rejected");
        }
        assert!(matches!(
            validate("x", &"a".repeat(129)),
            Err(IdError::TooLong { .. })
        ));
    }
}
