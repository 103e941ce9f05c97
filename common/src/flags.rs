//! Validation of operator input shared by every binary: a flag or setting
//! that does not validate becomes a [`UsageError`] naming it, so the process
//! exits with a usage error that says which flag to fix.

use crate::ids;
use crate::wire::Selector;
use std::time::Duration;
use thiserror::Error;

/// A flag that does not validate.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{flag}: {message}")]
pub struct UsageError {
    pub flag: String,
    pub message: String,
}

/// The [`UsageError`] of `flag`.
pub fn usage(flag: &str, message: impl std::fmt::Display) -> UsageError {
    UsageError {
        flag: flag.to_string(),
        message: message.to_string(),
    }
}

/// `s` as a duration (see [`crate::duration`]), or a usage error naming `flag`.
pub fn duration(flag: &str, s: &str) -> Result<Duration, UsageError> {
    crate::duration::parse(s).map_err(|e| usage(flag, e))
}

/// A `--selector` expression, with every region name validated.
pub fn selector(s: &str) -> Result<Selector, UsageError> {
    let sel = Selector::parse(s).map_err(|e| usage("--selector", e))?;
    for r in &sel.regions {
        ids::validate("region", r).map_err(|e| usage("--selector", e))?;
    }
    Ok(sel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_input_names_the_flag() {
        assert_eq!(duration("--bake", "30").unwrap_err().flag, "--bake");
        assert_eq!(duration("--bake", "30s"), Ok(Duration::from_secs(30)));
        assert_eq!(selector("region=e u").unwrap_err().flag, "--selector");
        assert_eq!(selector("region=eu,us").unwrap().regions, vec!["eu", "us"]);
    }
}
