//! What every call zhibo makes to the app backend shares (push, event webhooks, the before-send hook):
//! one URL check and one HTTP client setup.

use std::time::Duration;

/// Checks that `url` (the setting `field`) is an absolute `http://` or `https://` URL with a host (the
/// scheme in any case, as URLs allow).
///
/// # Errors
/// A message naming `field`.
pub fn check_url(field: &str, url: &str) -> Result<reqwest::Url, String> {
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| format!("{field} must be an http:// or https:// URL ({url:?}: {e})"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("{field} must be an http:// or https:// URL"));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(format!("{field} {url:?}: no host"));
    }
    Ok(parsed)
}

/// A client builder for calls to the app backend, each bounded by `timeout`. Redirects are not
/// followed: a 3xx is an answer like any other non-2xx (retried, dead-lettered, or the hook's failure
/// policy), so a signed body never goes to another address, and an event is never taken as delivered
/// because the page it was redirected to answered 200.
pub fn client(timeout: Duration) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
}

#[cfg(test)]
mod tests {
    use super::check_url;

    #[test]
    fn urls_need_an_http_scheme_and_a_host() {
        for ok in ["http://a/push", "https://a.example:8443/x", "HTTP://a/hook"] {
            assert!(check_url("push.url", ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://",
            "https://",
            "http://:80/",
            "ftp://a/x",
            "a/push",
            "",
        ] {
            let e = check_url("push.url", bad).expect_err(bad);
            assert!(e.starts_with("push.url"), "{bad}: {e}");
        }
    }
}
