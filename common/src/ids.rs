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
    #[error("{what} is longer than {MAX_PRINCIPAL_LEN} bytes")]
    PrincipalTooLong { what: &'static str },
    #[error("{what} must not contain control characters")]
    Control { what: &'static str },
    #[error("{what} must not contain invisible or direction-changing characters (U+{code:04X})")]
    Invisible { what: &'static str, code: u32 },
}

/// Longest accepted principal (login name), in bytes.
pub const MAX_PRINCIPAL_LEN: usize = 256;

/// Characters that change how text reads without being seen: Unicode format
/// characters (category Cf: bidirectional overrides and isolates such as
/// U+202E, zero-width spaces and joiners, the byte-order mark, tags) and the
/// line and paragraph separators. A principal holding one would make a
/// report or a log line show another name than the one rotated.
pub fn is_invisible(c: char) -> bool {
    matches!(
        c as u32,
        0x00AD
            | 0x0600..=0x0605
            | 0x061C
            | 0x06DD
            | 0x070F
            | 0x0890..=0x0891
            | 0x08E2
            | 0x180E
            | 0x200B..=0x200F
            | 0x2028..=0x202E
            | 0x2060..=0x2064
            | 0x2066..=0x206F
            | 0xFEFF
            | 0xFFF9..=0xFFFB
            | 0x110BD
            | 0x110CD
            | 0x13430..=0x1343F
            | 0x1BCA0..=0x1BCA3
            | 0x1D173..=0x1D17A
            | 0xE0001
            | 0xE0020..=0xE007F
    )
}

/// Checks free text that names something (a principal, an owner, a tag):
/// at most `max` bytes, no control characters, nothing invisible.
pub fn validate_text(what: &'static str, value: &str, max: usize) -> Result<(), IdError> {
    if value.len() > max {
        return Err(IdError::PrincipalTooLong { what });
    }
    if value.chars().any(char::is_control) {
        return Err(IdError::Control { what });
    }
    if let Some(c) = value.chars().find(|&c| is_invisible(c)) {
        return Err(IdError::Invisible {
            what,
            code: c as u32,
        });
    }
    Ok(())
}

/// Checks a principal (the login a credential rotates), with the same rules
/// at every entry point (inventory import, enrolment, tasks): 1 to
/// [`MAX_PRINCIPAL_LEN`] bytes, no control characters, nothing invisible
/// ([`is_invisible`]).
pub fn validate_principal(value: &str) -> Result<(), IdError> {
    if value.is_empty() {
        return Err(IdError::Empty { what: "principal" });
    }
    validate_text("principal", value, MAX_PRINCIPAL_LEN)
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
    fn principals_refuse_control_and_invisible_characters() {
        assert!(validate_principal("app_user").is_ok());
        assert!(validate_principal("équipe-paie").is_ok());
        assert!(validate_principal("svc@example.com").is_ok());
        assert_eq!(
            validate_principal(""),
            Err(IdError::Empty { what: "principal" })
        );
        assert_eq!(
            validate_principal("a\tb"),
            Err(IdError::Control { what: "principal" })
        );
        for bad in [
            "admin\u{202E}nimda",
            "a\u{200B}b",
            "\u{FEFF}x",
            "x\u{2066}y",
            "a\u{2028}",
        ] {
            assert!(
                matches!(validate_principal(bad), Err(IdError::Invisible { .. })),
                "{bad:?} must be refused"
            );
        }
        let e = validate_principal("x\u{202E}").unwrap_err().to_string();
        assert!(e.contains("U+202E"), "{e}");
        assert!(validate_principal(&"a".repeat(MAX_PRINCIPAL_LEN)).is_ok());
        assert!(validate_principal(&"a".repeat(MAX_PRINCIPAL_LEN + 1)).is_err());
    }

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
