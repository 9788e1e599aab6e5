//! Edge limits applied before a connection has signed in: the WebSocket `Origin` allow-list, and the
//! cap on connections per client address that have not signed in yet (TCP, WebSocket and QUIC
//! together), so one host cannot hold the gateway's file descriptors with idle sockets.
//!
//! A connection counts as unauthenticated from accept until the gateway writes its `SignInOutput`
//! ([`until_signed_in`] watches the outbound frames), or until it closes. IPv6 clients are counted
//! per /64, the block one host usually has.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures::Sink;
use zhibo_proto::client::packet::Body;

use crate::frame::Frame;

/// The limits of one gateway.
#[derive(Debug)]
pub struct EdgeLimits {
    /// Allowed `Origin` values, normalised; empty = any.
    origins: Vec<String>,
    /// Unauthenticated connections per address; 0 = no cap.
    max_unauthenticated: usize,
    unauthenticated: Mutex<HashMap<IpAddr, usize>>,
}

/// `scheme://host[:port]`, lower-cased, without a trailing `/`.
fn normalise_origin(origin: &str) -> String {
    origin.trim().trim_end_matches('/').to_ascii_lowercase()
}

/// Checks one configured origin.
///
/// # Errors
/// A message naming the origin when it is not `scheme://host[:port]`.
pub(crate) fn check_origin(origin: &str) -> Result<(), String> {
    let Some((scheme, host)) = origin.split_once("://") else {
        return Err(format!(
            "ws_allowed_origins: {origin:?} is not scheme://host[:port]"
        ));
    };
    let host = host.trim_end_matches('/');
    if scheme.is_empty() || host.is_empty() || host.contains(['/', '?', '#', '*']) {
        return Err(format!(
            "ws_allowed_origins: {origin:?} is not scheme://host[:port] (no path, no wildcard)"
        ));
    }
    Ok(())
}

/// The key an address is counted under: IPv4 (also when mapped into IPv6) as is, IPv6 by its /64.
fn key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

impl EdgeLimits {
    /// Limits allowing `origins` (empty = any) and at most `max_unauthenticated` connections per
    /// address that have not signed in (0 = no cap).
    pub fn new(origins: &[String], max_unauthenticated: usize) -> Arc<Self> {
        Arc::new(EdgeLimits {
            origins: origins.iter().map(|o| normalise_origin(o)).collect(),
            max_unauthenticated,
            unauthenticated: Mutex::new(HashMap::new()),
        })
    }

    /// Whether a WebSocket handshake with this `Origin` header may proceed. A request without one
    /// comes from a non-browser client, which an `Origin` check cannot constrain anyway.
    pub fn origin_allowed(&self, origin: Option<&str>) -> bool {
        match origin {
            _ if self.origins.is_empty() => true,
            None => true,
            Some(o) => self.origins.contains(&normalise_origin(o)),
        }
    }

    /// Counts a new connection from `ip` as unauthenticated, or `None` when that address already has
    /// the most allowed (the caller closes the connection at once).
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Unauthenticated> {
        let ip = key(ip);
        let mut counts = self
            .unauthenticated
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let n = counts.entry(ip).or_insert(0);
        if self.max_unauthenticated > 0 && *n >= self.max_unauthenticated {
            return None;
        }
        *n += 1;
        Some(Unauthenticated {
            limits: self.clone(),
            ip,
        })
    }

    /// Connections from `ip` that have not signed in yet.
    pub fn unauthenticated(&self, ip: IpAddr) -> usize {
        self.unauthenticated
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key(ip))
            .copied()
            .unwrap_or(0)
    }
}

/// One connection counted as unauthenticated; dropping it (sign-in, close) uncounts it.
#[derive(Debug)]
pub struct Unauthenticated {
    limits: Arc<EdgeLimits>,
    ip: IpAddr,
}

impl Unauthenticated {
    /// [`EdgeLimits::origin_allowed`] of the gateway this connection came to.
    pub fn origin_allowed(&self, origin: Option<&str>) -> bool {
        self.limits.origin_allowed(origin)
    }
}

impl Drop for Unauthenticated {
    fn drop(&mut self) {
        let mut counts = self
            .limits
            .unauthenticated
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// `writer`, holding `guard` until the gateway writes the connection's `SignInOutput`.
pub(crate) fn until_signed_in<W>(writer: W, guard: Unauthenticated) -> UntilSignedIn<W>
where
    W: Sink<Frame> + Unpin,
{
    UntilSignedIn {
        inner: writer,
        guard: Some(Box::new(guard)),
    }
}

/// A frame sink that uncounts its connection when the `SignInOutput` goes through. Written by hand
/// rather than with `SinkExt::with`, which would keep room for a whole frame in every idle
/// connection; the guard is boxed so a signed-in connection keeps only an empty pointer.
#[derive(Debug)]
pub(crate) struct UntilSignedIn<W> {
    inner: W,
    guard: Option<Box<Unauthenticated>>,
}

impl<W: Sink<Frame> + Unpin> Sink<Frame> for UntilSignedIn<W> {
    type Error = W::Error;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), W::Error>> {
        Pin::new(&mut self.inner).poll_ready(cx)
    }

    fn start_send(mut self: Pin<&mut Self>, frame: Frame) -> Result<(), W::Error> {
        if self.guard.is_some()
            && matches!(&frame, Frame::Packet(p) if matches!(p.body, Some(Body::SignInOutput(_))))
        {
            self.guard = None;
        }
        Pin::new(&mut self.inner).start_send(frame)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), W::Error>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), W::Error>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_match_exactly_after_normalising() {
        let open = EdgeLimits::new(&[], 0);
        assert!(open.origin_allowed(Some("https://evil.example")));
        let l = EdgeLimits::new(&["https://Chat.example.com/".into()], 0);
        assert!(l.origin_allowed(Some("https://chat.example.com")));
        assert!(l.origin_allowed(None), "non-browser clients send none");
        assert!(!l.origin_allowed(Some("https://chat.example.com.evil.example")));
        assert!(!l.origin_allowed(Some("http://chat.example.com")));
        assert!(!l.origin_allowed(Some("null")));
        assert!(check_origin("https://a.example:8443").is_ok());
        assert!(check_origin("a.example").is_err());
        assert!(check_origin("https://*.example").is_err());
        assert!(check_origin("https://a.example/path").is_err());
    }

    #[test]
    fn the_cap_is_per_address_and_released_on_drop() {
        let l = EdgeLimits::new(&[], 2);
        let a: IpAddr = "192.0.2.1".parse().expect("ip");
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().expect("ip");
        let g1 = l.admit(a).expect("first");
        let _g2 = l.admit(mapped).expect("second, same host");
        assert!(l.admit(a).is_none(), "third refused");
        assert!(l.admit("192.0.2.2".parse().expect("ip")).is_some());
        drop(g1);
        assert_eq!(l.unauthenticated(a), 1);
        let _g3 = l.admit(a).expect("room again");
        let v6 = EdgeLimits::new(&[], 1);
        let _g = v6.admit("2001:db8::1".parse().expect("ip")).expect("first");
        assert!(
            v6.admit("2001:db8::2".parse().expect("ip")).is_none(),
            "same /64"
        );
        assert!(v6.admit("2001:db8:0:1::1".parse().expect("ip")).is_some());
        let unlimited = EdgeLimits::new(&[], 0);
        let _all: Vec<_> = (0..100)
            .map(|_| unlimited.admit(a).expect("no cap"))
            .collect();
    }
}
