//! The NATS backend (async-nats): core publish/subscribe, queue groups for logic workers.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use tracing::warn;

use crate::{Bus, BusMessage, Error, Result, Subject, Subscription};

/// Messages a subscription of this process buffers before the client drops what arrives for it.
pub const SUBSCRIPTION_CAPACITY: usize = 64 * 1024;

/// How long the first connection may take, handshake included, before [`NatsBus::connect_with`]
/// gives up.
pub const CONNECT_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

static SLOW_CONSUMER_DROPS: AtomicU64 = AtomicU64::new(0);

/// Times this process's NATS client dropped a message for a full subscription (a slow consumer), by
/// kind (one: `slow_consumer`), for the process's metrics.
pub fn slow_consumer_drops() -> Vec<(&'static str, u64)> {
    vec![("slow_consumer", SLOW_CONSUMER_DROPS.load(Ordering::Relaxed))]
}

/// How to reach and authenticate to NATS. Use at most one of user/password, token, nkey seed and
/// credentials file (the URL may carry `user:password@` instead). `Debug` never shows a secret.
#[derive(Clone, Default)]
pub struct NatsOptions {
    /// Server URL(s), comma-separated (e.g. `nats://127.0.0.1:4222`, or `tls://…`).
    pub url: String,
    /// User name (with `password`).
    pub user: String,
    /// Password of `user`.
    pub password: String,
    /// Authentication token.
    pub token: String,
    /// NKey seed (`SU…`), signed with the server's nonce.
    pub nkey_seed: String,
    /// A `.creds` file (JWT + nkey seed, NATS decentralised auth).
    pub creds_file: Option<PathBuf>,
    /// PEM CA certificate(s) the server certificate must chain to; implies TLS.
    pub tls_ca: Option<PathBuf>,
    /// Refuse a connection that is not TLS.
    pub tls_required: bool,
    /// PEM client certificate, for servers that verify clients (with `tls_client_key`).
    pub tls_client_cert: Option<PathBuf>,
    /// PEM private key of `tls_client_cert`.
    pub tls_client_key: Option<PathBuf>,
    /// Try the servers of `url` in the listed order (e.g. the NATS node on the same host first)
    /// instead of a random one, on connect and on every reconnect.
    pub servers_in_order: bool,
}

impl std::fmt::Debug for NatsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsOptions")
            .field("url", &redact_url(&self.url))
            .field("user", &self.user)
            .field("auth", &self.auth_method())
            .field("creds_file", &self.creds_file)
            .field("tls_ca", &self.tls_ca)
            .field("tls_required", &self.tls_required)
            .field("tls_client_cert", &self.tls_client_cert)
            .field("servers_in_order", &self.servers_in_order)
            .finish_non_exhaustive()
    }
}

impl NatsOptions {
    /// Options for `url` alone (credentials, if any, in the URL).
    pub fn new(url: impl Into<String>) -> Self {
        NatsOptions {
            url: url.into(),
            ..NatsOptions::default()
        }
    }

    /// The configured authentication method, by name.
    fn auth_method(&self) -> &'static str {
        if !self.user.is_empty() {
            "user/password"
        } else if !self.token.is_empty() {
            "token"
        } else if !self.nkey_seed.is_empty() {
            "nkey"
        } else if self.creds_file.is_some() {
            "creds file"
        } else if url_has_credentials(&self.url) {
            "URL credentials"
        } else {
            "none"
        }
    }

    /// Checks that the options can be used together.
    ///
    /// # Errors
    /// A message naming the conflicting settings; it never contains a secret.
    pub fn validate(&self) -> Result<(), String> {
        if self.user.is_empty() != self.password.is_empty() {
            return Err("set both nats_user and nats_password, or neither".into());
        }
        let methods = [
            !self.user.is_empty(),
            !self.token.is_empty(),
            !self.nkey_seed.is_empty(),
            self.creds_file.is_some(),
        ]
        .into_iter()
        .filter(|m| *m)
        .count();
        if methods > 1 {
            return Err(
                "use one of nats_user/nats_password, nats_token, nats_nkey_seed and nats_creds_file"
                    .into(),
            );
        }
        if methods == 1 && url_has_credentials(&self.url) {
            return Err("credentials are both in nats_url and in the nats_* settings".into());
        }
        if self.tls_client_cert.is_some() != self.tls_client_key.is_some() {
            return Err("set both nats_tls_client_cert and nats_tls_client_key, or neither".into());
        }
        if !self.nkey_seed.is_empty() && !self.nkey_seed.starts_with('S') {
            return Err("nats_nkey_seed is not an nkey seed (it starts with 'S')".into());
        }
        Ok(())
    }

    /// The secrets these options hold (URL credentials included), to scrub from error messages.
    fn secrets(&self) -> Vec<String> {
        let in_url = match split_url_credentials(&self.url) {
            Ok((_, Some(UrlAuth::UserPassword(_, p)))) => Some(p),
            Ok((_, Some(UrlAuth::Token(t)))) => Some(t),
            _ => None,
        };
        [
            self.password.clone(),
            self.token.clone(),
            self.nkey_seed.clone(),
        ]
        .into_iter()
        .chain(in_url)
        .filter(|s| !s.is_empty())
        .collect()
    }
}

/// Whether a URL in `urls` (comma-separated) has `user[:password]@` before its host.
fn url_has_credentials(urls: &str) -> bool {
    urls.split(',').any(|u| userinfo_range(u).is_some())
}

/// The byte range of `user[:password]` in `url`, if it has one.
fn userinfo_range(url: &str) -> Option<std::ops::Range<usize>> {
    let start = url.find("://").map_or(0, |i| i + 3);
    let authority_end = url[start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| start + i);
    let at = url[start..authority_end].rfind('@')?;
    Some(start..start + at)
}

/// Credentials written in a URL: `user:password@` or `token@`.
#[derive(Debug, PartialEq, Eq)]
enum UrlAuth {
    UserPassword(String, String),
    Token(String),
}

/// Splits the `user:password@` / `token@` out of `urls` (comma-separated; async-nats ignores them):
/// the URLs without credentials, and the credentials (which every URL that has some must share).
/// `%XX` escapes in the credentials are decoded.
fn split_url_credentials(urls: &str) -> Result<(String, Option<UrlAuth>), String> {
    let mut auth = None;
    let mut clean = Vec::new();
    for url in urls.split(',') {
        let Some(range) = userinfo_range(url) else {
            clean.push(url.to_owned());
            continue;
        };
        let info = &url[range.clone()];
        let this = match info.split_once(':') {
            Some((user, password)) => {
                UrlAuth::UserPassword(percent_decode(user)?, percent_decode(password)?)
            }
            None => UrlAuth::Token(percent_decode(info)?),
        };
        if auth.as_ref().is_some_and(|a| *a != this) {
            return Err("the URLs in nats_url carry different credentials".into());
        }
        auth = Some(this);
        clean.push(format!("{}{}", &url[..range.start], &url[range.end + 1..]));
    }
    Ok((clean.join(","), auth))
}

/// Decodes `%XX` escapes (a `@`, `:` or `%` in a password is written `%40`, `%3A`, `%25`).
fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or("bad %-escape in the credentials of nats_url")?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the credentials of nats_url are not UTF-8".into())
}

/// `urls` (comma-separated) with every `user:password@` replaced by `***@`, for messages and logs.
pub fn redact_url(urls: &str) -> String {
    urls.split(',')
        .map(|u| match userinfo_range(u) {
            Some(r) => format!("{}***{}", &u[..r.start], &u[r.end..]),
            None => u.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// A [`Bus`] over one NATS connection.
#[derive(Debug, Clone)]
pub struct NatsBus {
    client: async_nats::Client,
}

impl NatsBus {
    /// Connects to `url` (e.g. `nats://127.0.0.1:4222`), naming the connection `name` in the server.
    ///
    /// # Errors
    /// [`Error::Connect`] when the server cannot be reached.
    pub async fn connect(url: &str, name: &str) -> Result<Self> {
        Self::connect_with(&NatsOptions::new(url), name).await
    }

    /// Connects as `options` say (authentication, TLS), naming the connection `name` in the server.
    ///
    /// # Errors
    /// [`Error::Connect`] when the options conflict, a file cannot be read, the server cannot be
    /// reached or refuses the credentials. The message names the server without credentials and
    /// never contains a password, token or seed.
    pub async fn connect_with(options: &NatsOptions, name: &str) -> Result<Self> {
        let target = redact_url(&options.url);
        let secrets = options.secrets();
        let fail = |what: &dyn std::fmt::Display| {
            let mut message = format!("{target}: {what}");
            for secret in &secrets {
                message = message.replace(secret.as_str(), "***");
            }
            Error::Connect(message)
        };
        options.validate().map_err(|e| fail(&e))?;
        let (url, url_auth) = split_url_credentials(&options.url).map_err(|e| fail(&e))?;
        let mut connect = async_nats::ConnectOptions::new()
            .name(name)
            // Each Subscriber buffers at most this many messages; beyond it the client drops what
            // arrives for it (counted, see `slow_consumer_drops`). A gateway has one subscription for
            // all its users' events, so this bounds a burst (a big group's message is one event per
            // member): async-nats' default. Memory grows with what is buffered, not with the bound.
            .subscription_capacity(SUBSCRIPTION_CAPACITY)
            .event_callback(|event| async move {
                if let async_nats::Event::SlowConsumer(sid) = event {
                    let n = SLOW_CONSUMER_DROPS.fetch_add(1, Ordering::Relaxed) + 1;
                    if n.is_power_of_two() {
                        warn!(sid, drops = n, "NATS subscription full: messages dropped");
                    }
                }
            });
        if !options.user.is_empty() {
            connect = connect.user_and_password(options.user.clone(), options.password.clone());
        }
        if !options.token.is_empty() {
            connect = connect.token(options.token.clone());
        }
        match url_auth {
            Some(UrlAuth::UserPassword(user, password)) => {
                connect = connect.user_and_password(user, password);
            }
            Some(UrlAuth::Token(token)) => connect = connect.token(token),
            None => {}
        }
        if !options.nkey_seed.is_empty() {
            connect = connect.nkey(options.nkey_seed.clone());
        }
        if let Some(path) = &options.creds_file {
            connect = connect.credentials_file(path).await.map_err(|e| {
                fail(&format_args!(
                    "cannot read the creds file {}: {e}",
                    path.display()
                ))
            })?;
        }
        if let Some(ca) = &options.tls_ca {
            connect = connect.add_root_certificates(ca.clone()).require_tls(true);
        }
        if options.tls_required {
            connect = connect.require_tls(true);
        }
        if let (Some(cert), Some(key)) = (&options.tls_client_cert, &options.tls_client_key) {
            connect = connect.add_client_certificate(cert.clone(), key.clone());
        }
        if options.servers_in_order {
            connect = connect.retain_servers_order();
        }
        // Every listed server is a seed: the client connects to one of them and, when it is lost,
        // reconnects to another (and to servers the cluster announces), resubscribing.
        let servers = url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::parse::<async_nats::ServerAddr>)
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| fail(&e))?;
        // async-nats bounds the TCP connect and the server's greeting, but not the answer to its
        // CONNECT: an address that accepts and never speaks NATS (a blackhole, the Redis port by
        // mistake) would hold the start for good, with nothing logged.
        let client = tokio::time::timeout(CONNECT_WAIT, connect.connect(servers))
            .await
            .map_err(|_| {
                fail(&format_args!(
                    "no NATS handshake within {CONNECT_WAIT:?} (is a nats-server listening there?)"
                ))
            })?
            .map_err(|e| fail(&e))?;
        Ok(NatsBus { client })
    }

    /// The underlying client.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }
}

fn into_message(m: async_nats::Message) -> BusMessage {
    let headers = m
        .headers
        .as_ref()
        .map(|h| {
            h.iter()
                .flat_map(|(k, vs)| {
                    vs.iter()
                        .map(move |v| (k.to_string(), v.as_str().to_owned()))
                })
                .collect()
        })
        .unwrap_or_default();
    BusMessage {
        subject: m.subject.to_string(),
        payload: m.payload,
        headers,
    }
}

#[async_trait]
impl Bus for NatsBus {
    async fn publish(
        &self,
        subject: &Subject,
        headers: Vec<(String, String)>,
        payload: Bytes,
    ) -> Result<()> {
        let err = |e: &dyn std::fmt::Display| Error::Publish {
            subject: subject.to_string(),
            message: e.to_string(),
        };
        if headers.is_empty() {
            self.client
                .publish(subject.as_str().to_owned(), payload)
                .await
                .map_err(|e| err(&e))
        } else {
            let mut map = async_nats::HeaderMap::new();
            for (k, v) in &headers {
                map.insert(k.as_str(), v.as_str());
            }
            self.client
                .publish_with_headers(subject.as_str().to_owned(), map, payload)
                .await
                .map_err(|e| err(&e))
        }
    }

    async fn subscribe(&self, subject: &Subject) -> Result<Subscription> {
        let sub = self
            .client
            .subscribe(subject.as_str().to_owned())
            .await
            .map_err(|e| Error::Subscribe {
                subject: subject.to_string(),
                message: e.to_string(),
            })?;
        Ok(Subscription::new(sub.map(into_message)))
    }

    async fn queue_subscribe(&self, subject: &Subject, group: &str) -> Result<Subscription> {
        let sub = self
            .client
            .queue_subscribe(subject.as_str().to_owned(), group.to_owned())
            .await
            .map_err(|e| Error::Subscribe {
                subject: subject.to_string(),
                message: e.to_string(),
            })?;
        Ok(Subscription::new(sub.map(into_message)))
    }

    async fn flush(&self) -> Result<()> {
        self.client.flush().await.map_err(|e| Error::Publish {
            subject: String::new(),
            message: e.to_string(),
        })
    }

    fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    fn nats_client(&self) -> Option<async_nats::Client> {
        Some(self.client.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("nats://zhibo:hunter2@nats:4222"),
            "nats://***@nats:4222"
        );
        assert_eq!(
            redact_url("nats://a:b@x:1,tls://tok@y:2/path,nats://z:3"),
            "nats://***@x:1,tls://***@y:2/path,nats://z:3"
        );
        assert_eq!(redact_url("u:p@h:4222"), "***@h:4222");
        assert_eq!(redact_url("nats://h:4222/a@b"), "nats://h:4222/a@b");
    }

    #[test]
    fn url_credentials_are_split_out() {
        assert_eq!(
            split_url_credentials("nats://zhibo:p%40ss@a:1,nats://b:2"),
            Ok((
                "nats://a:1,nats://b:2".into(),
                Some(UrlAuth::UserPassword("zhibo".into(), "p@ss".into()))
            ))
        );
        assert_eq!(
            split_url_credentials("tls://tok@a:1"),
            Ok(("tls://a:1".into(), Some(UrlAuth::Token("tok".into()))))
        );
        assert_eq!(split_url_credentials("a:1"), Ok(("a:1".into(), None)));
        assert!(split_url_credentials("nats://u:p@a:1,nats://u:q@b:2").is_err());
        assert!(split_url_credentials("nats://u:p%zz@a:1").is_err());
    }

    #[test]
    fn conflicting_options_are_refused_without_secrets() {
        let mut o = NatsOptions::new("nats://h:4222");
        o.user = "zhibo".into();
        assert!(o.validate().is_err(), "user without password");
        o.password = "hunter2".into();
        o.validate().expect("user and password");
        o.token = "tok".into();
        let e = o.validate().expect_err("two methods");
        assert!(!e.contains("hunter2") && !e.contains("tok\""), "{e}");
        let mut o = NatsOptions::new("nats://u:hunter2@h:4222");
        o.token = "tok".into();
        assert!(o.validate().is_err(), "URL and token");
        assert!(!format!("{o:?}").contains("hunter2"));
        assert!(!format!("{o:?}").contains("tok\""));
    }
}
