//! Field checks shared by the handlers; each error names the field.

use crate::error::ApiError;

/// Longest nickname, group name, remark (characters).
pub(crate) const MAX_NAME: usize = 64;
/// Longest URL (characters).
pub(crate) const MAX_URL: usize = 1024;
/// Longest free-form `extra` or introduction (bytes of UTF-8).
pub(crate) const MAX_EXTRA: usize = 4096;
/// Largest entity id: ids are JSON numbers and must be exact in JavaScript.
pub(crate) const MAX_ID: i64 = (1 << 53) - 1;

/// A username: 3 to 32 of `a-z 0-9 _ . -`.
pub(crate) fn username(name: &str) -> Result<(), ApiError> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-'));
    if !(3..=32).contains(&name.len()) || !ok_chars {
        return Err(ApiError::invalid(
            "username must be 3 to 32 characters of a-z, 0-9, '_', '.', '-'",
        ));
    }
    Ok(())
}

/// A password: 8 to 128 characters.
pub(crate) fn password(pw: &str) -> Result<(), ApiError> {
    if !(8..=128).contains(&pw.chars().count()) {
        return Err(ApiError::invalid("password must be 8 to 128 characters"));
    }
    Ok(())
}

/// A text field of at most `max` characters without control characters.
pub(crate) fn text(field: &str, value: &str, max: usize) -> Result<(), ApiError> {
    if value.chars().count() > max {
        return Err(ApiError::invalid(format!(
            "{field} must be at most {max} characters"
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(ApiError::invalid(format!(
            "{field} must not contain control characters"
        )));
    }
    Ok(())
}

/// A free-form field (may hold JSON, newlines) of at most [`MAX_EXTRA`] bytes.
pub(crate) fn extra(field: &str, value: &str) -> Result<(), ApiError> {
    if value.len() > MAX_EXTRA {
        return Err(ApiError::invalid(format!(
            "{field} must be at most {MAX_EXTRA} bytes"
        )));
    }
    Ok(())
}

/// An entity id: 1 to 2^53 − 1.
pub(crate) fn id(field: &str, id: i64) -> Result<(), ApiError> {
    if !(1..=MAX_ID).contains(&id) {
        return Err(ApiError::invalid(format!(
            "{field} must be between 1 and 2^53-1"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames() {
        for ok in ["ann", "a.b-c_d", "x".repeat(32).as_str(), "123"] {
            assert!(username(ok).is_ok(), "{ok}");
        }
        for bad in [
            "an",
            "Ann",
            "ann!",
            "",
            "x".repeat(33).as_str(),
            "ánn",
            "a b",
        ] {
            assert!(username(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn passwords_count_characters() {
        assert!(password("1234567").is_err());
        assert!(password("12345678").is_ok());
        assert!(password(&"é".repeat(128)).is_ok());
        assert!(password(&"x".repeat(129)).is_err());
    }

    #[test]
    fn texts_and_ids() {
        assert!(text("nickname", "Ann 🌸", MAX_NAME).is_ok());
        assert!(text("nickname", "a\nb", MAX_NAME).is_err());
        assert!(id("user_id", 0).is_err());
        assert!(id("user_id", MAX_ID).is_ok());
        assert!(id("user_id", MAX_ID + 1).is_err());
    }
}
