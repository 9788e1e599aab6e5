//! Checks of the token secret against the role and the listen addresses, made before anything binds.
//!
//! Anyone who knows the token secret can mint a token for any user, so a distributed role refuses a
//! secret shorter than [`MIN_TOKEN_SECRET_BYTES`], and `zhibo dev` refuses its public development secret
//! (or any short one) as soon as one of its listeners is reachable from another host.

use std::net::SocketAddr;

use crate::{Config, DEV_TOKEN_SECRET};

/// The shortest token secret accepted outside `zhibo dev` on loopback (e.g. `openssl rand -hex 32`).
pub const MIN_TOKEN_SECRET_BYTES: usize = 32;

/// Checks `config.token_secret` for a distributed role (`dev == false`) or for `zhibo dev`, whose
/// secret must already be defaulted.
///
/// # Errors
/// A message saying what is wrong and how to fix it; it never contains the secret.
pub fn check_token_secret(config: &Config, dev: bool) -> Result<(), String> {
    let secret = &config.token_secret;
    if !dev {
        if secret.is_empty() {
            return Err("token_secret (ZHIBO_TOKEN_SECRET) is required".into());
        }
        if secret.len() < MIN_TOKEN_SECRET_BYTES {
            return Err(format!(
                "token_secret (ZHIBO_TOKEN_SECRET) is {} bytes; use at least {MIN_TOKEN_SECRET_BYTES} \
                 random bytes (e.g. `openssl rand -hex 32`)",
                secret.len()
            ));
        }
        return Ok(());
    }
    let weak = if secret == DEV_TOKEN_SECRET {
        "the public development token secret"
    } else if secret.len() < MIN_TOKEN_SECRET_BYTES {
        "a token secret shorter than 32 bytes"
    } else {
        return Ok(());
    };
    match dev_listeners(config).into_iter().find(|a| !a.ip().is_loopback()) {
        None => Ok(()),
        Some(addr) => Err(format!(
            "zhibo dev would listen on {addr}, beyond loopback, with {weak}: anyone who can reach it \
             could forge a token for any user. Set ZHIBO_TOKEN_SECRET to at least \
             {MIN_TOKEN_SECRET_BYTES} random bytes (e.g. `openssl rand -hex 32`), or bind loopback \
             addresses only"
        )),
    }
}

/// Every address `zhibo dev` listens on.
fn dev_listeners(config: &Config) -> Vec<SocketAddr> {
    let mut addrs = vec![
        config.api_addr,
        config.gateway.tcp_addr,
        config.gateway.ws_addr,
        config.gateway.quic_addr,
    ];
    // Validated as host:port by `Config::load`.
    addrs.extend(config.metrics_addr.parse::<SocketAddr>().ok());
    addrs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(secret: &str) -> Config {
        Config {
            token_secret: secret.into(),
            ..Config::default()
        }
    }

    fn load(v: &[(&str, &str)]) -> Result<Config, String> {
        Config::load_from(
            None,
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect::<Vec<_>>()
                .into_iter(),
        )
    }

    #[test]
    fn nats_settings_load_and_conflicts_are_refused_without_the_secret() {
        // A numeric password reads as a TOML integer: it is taken as the string it was.
        let c = load(&[
            ("ZHIBO_BUS__NATS_USER", "zhibo"),
            ("ZHIBO_BUS__NATS_PASSWORD", "123456"),
            ("ZHIBO_BUS__NATS_TLS_CA", "/etc/nats/ca.pem"),
        ])
        .expect("valid");
        assert_eq!(c.bus.nats_password, "123456");
        assert!(!format!("{c:?}").contains("123456"), "Debug hides it");
        let e = load(&[
            ("ZHIBO_BUS__NATS_USER", "zhibo"),
            ("ZHIBO_BUS__NATS_PASSWORD", "987654"),
            ("ZHIBO_BUS__NATS_TOKEN", "tok"),
        ])
        .expect_err("two methods");
        assert!(e.starts_with("bus:") && !e.contains("987654"), "{e}");
        let e = load(&[("ZHIBO_BUS__NATS_PASSWORD", "alone")]).expect_err("no user");
        assert!(e.contains("nats_user"), "{e}");
    }

    #[test]
    fn distributed_roles_need_a_long_secret() {
        assert!(check_token_secret(&config(""), false)
            .expect_err("empty")
            .contains("required"));
        let e = check_token_secret(&config("change-me"), false).expect_err("short");
        assert!(e.contains("at least 32"), "{e}");
        assert!(!e.contains("change-me"), "the secret is not printed: {e}");
        check_token_secret(&config(&"k".repeat(32)), false).expect("32 bytes");
    }

    #[test]
    fn dev_refuses_weak_secrets_beyond_loopback_only() {
        let mut c = config(DEV_TOKEN_SECRET);
        check_token_secret(&c, true).expect("loopback defaults");
        c.metrics_addr = "0.0.0.0:9100".into();
        let e = check_token_secret(&c, true).expect_err("metrics on every interface");
        assert!(
            e.contains("0.0.0.0:9100") && e.contains("public development"),
            "{e}"
        );
        c.metrics_addr = "[::1]:9100".into();
        c.gateway.ws_addr = "192.0.2.1:7002".parse().expect("addr");
        let e = check_token_secret(&c, true).expect_err("ws on a public address");
        assert!(e.contains("192.0.2.1:7002"), "{e}");
        c.token_secret = "short".into();
        let e = check_token_secret(&c, true).expect_err("short secret");
        assert!(e.contains("shorter than 32"), "{e}");
        c.token_secret = "k".repeat(32);
        check_token_secret(&c, true).expect("a real secret may listen anywhere");
    }
}
