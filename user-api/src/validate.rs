//! Field checks shared by the handlers; each error names the field.

use crate::error::ApiError;

/// Longest nickname, group name, remark (characters).
pub(crate) const MAX_NAME: usize = 64;
/// Longest URL (characters).
pub(crate) const MAX_URL: usize = 1024;
/// Longest free-form `extra` or introduction (bytes of UTF-8).
pub(crate) const MAX_EXTRA: usize = 4096;
/// Largest entity id: ids are JSON numbers and must be exact in JavaScript.
pub(crate) use zhibo_store::ids::MAX_ID;

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

/// A text field shown to other users (nickname, group name, remark…): at most `max` characters, no
/// control characters, and no invisible formatting that could disguise it ([`is_deceptive`]).
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
    if value.chars().any(is_deceptive) {
        return Err(ApiError::invalid(format!(
            "{field} must not contain bidirectional overrides or invisible characters"
        )));
    }
    Ok(())
}

/// Bidirectional controls (they reorder what follows: `U+202E` makes `gnp.exe` read `exe.png`) and
/// zero-width or invisible characters (they make two names look alike). The zero-width joiner and
/// non-joiner stay allowed: emoji sequences and several scripts (Persian, Indic) need them.
fn is_deceptive(c: char) -> bool {
    matches!(c,
        '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
        | '\u{00AD}' | '\u{180E}' | '\u{200B}' | '\u{2060}'..='\u{2064}' | '\u{FEFF}')
}

/// A URL a client will load (avatar): empty, or an `http://` / `https://` URL of at most `max`
/// characters without spaces. Anything else (`javascript:`, `data:`) could run in a page that shows it.
pub(crate) fn url(field: &str, value: &str, max: usize) -> Result<(), ApiError> {
    text(field, value, max)?;
    if value.is_empty() {
        return Ok(());
    }
    let (scheme, rest) = value.split_once("://").unwrap_or_default();
    let scheme_ok = scheme.eq_ignore_ascii_case("https") || scheme.eq_ignore_ascii_case("http");
    let has_host = rest
        .split(['/', '?', '#'])
        .next()
        .is_some_and(|h| !h.is_empty());
    if !scheme_ok || !has_host || value.chars().any(char::is_whitespace) {
        return Err(ApiError::invalid(format!(
            "{field} must be empty or an http:// or https:// URL"
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
        for bad in ["ad\u{202E}nim", "a\u{200B}dmin", "\u{2066}x", "\u{FEFF}ann"] {
            assert!(text("nickname", bad, MAX_NAME).is_err(), "{bad:?}");
        }
        assert!(
            text("nickname", "👨\u{200D}👩\u{200D}👧", MAX_NAME).is_ok(),
            "emoji ZWJ"
        );
    }

    #[test]
    fn urls() {
        for ok in ["", "https://x/a.png", "HTTP://example.com/a"] {
            assert!(url("avatar_url", ok, MAX_URL).is_ok(), "{ok}");
        }
        for bad in [
            "javascript:alert(1)",
            "data:text/html,x",
            "https://",
            "//x/a.png",
            "https://x/a b",
            " https://x",
        ] {
            assert!(url("avatar_url", bad, MAX_URL).is_err(), "{bad}");
        }
    }
}
