//! [`ClientIp`]: the address a request comes from, for the per-address limits (sign-in, sign-up,
//! device registration). The TCP peer, unless the peer is a configured trusted proxy
//! ([`ApiConfig::trusted_proxies`](crate::ApiConfig::trusted_proxies)) and the request carries the
//! configured header ([`ApiConfig::client_ip_header`](crate::ApiConfig::client_ip_header)): then the
//! nearest address in that header that is not itself a trusted proxy. A client can put anything in the
//! header, so it is believed only from a proxy the operator named, and only as far back as the chain
//! of trusted proxies goes.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRef, FromRequestParts};
use axum::http::request::Parts;

/// The client's address; `None` when the server was started without connect info (see
/// [`crate::run`]), where only per-username limits apply.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientIp(pub(crate) Option<IpAddr>);

/// Needs only the [`ClientIpConfig`], which the app state hands out through `FromRef`.
impl<S> FromRequestParts<S> for ClientIp
where
    Arc<ClientIpConfig>: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let config = Arc::<ClientIpConfig>::from_ref(state);
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| addr.ip());
        let Some(peer) = peer else {
            return Ok(ClientIp(None));
        };
        let header = &config.header;
        if header.is_empty() || !config.proxies.contains(peer) {
            return Ok(ClientIp(Some(per_host(peer))));
        }
        // Every value of the header, in order, as one list (a proxy may append a second header line).
        let chain: Vec<Option<IpAddr>> = parts
            .headers
            .get_all(header.as_str())
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|a| parse_addr(a.trim()))
            .collect();
        Ok(ClientIp(Some(per_host(client_in_chain(
            &chain,
            peer,
            &config.proxies,
        )))))
    }
}

/// Right to left: each trusted proxy vouches for the address before it, so the client is the nearest
/// address that is not a trusted proxy. An entry that is not an address (a client's garbage, a proxy's
/// `unknown`) ends the walk: nothing before it can be believed, and the nearest trusted hop that wrote
/// it stands for the client (never the whole chain thrown away for the first proxy's address).
fn client_in_chain(chain: &[Option<IpAddr>], peer: IpAddr, proxies: &Networks) -> IpAddr {
    let mut nearest = peer;
    for entry in chain.iter().rev() {
        match entry {
            Some(ip) if proxies.contains(*ip) => nearest = *ip,
            Some(ip) => return *ip,
            None => return nearest,
        }
    }
    nearest
}

/// The key the per-address limits use: an IPv4 address, or an IPv6 address's /64 (one host usually
/// holds a whole /64, so per-address limits on full IPv6 addresses would be no limits at all; the
/// gateway's connection cap counts the same way).
fn per_host(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(std::net::Ipv6Addr::from(bits))
        }
        other => other,
    }
}

/// An address as proxies write it: `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1` or `[2001:db8::1]:5678`.
fn parse_addr(s: &str) -> Option<IpAddr> {
    s.parse::<IpAddr>()
        .ok()
        .or_else(|| s.parse::<SocketAddr>().ok().map(|a| a.ip()))
        .map(|ip| ip.to_canonical())
}

/// How to find the client address: the trusted proxies and the header they set.
#[derive(Debug, Clone, Default)]
pub(crate) struct ClientIpConfig {
    /// Lowercase header name; empty = always the TCP peer.
    pub(crate) header: String,
    pub(crate) proxies: Networks,
}

/// A list of networks (`10.0.0.0/8`, `2001:db8::/32`, single addresses).
#[derive(Debug, Clone, Default)]
pub(crate) struct Networks(Vec<(IpAddr, u8)>);

impl Networks {
    /// Parses a comma-separated list of addresses and CIDR networks.
    ///
    /// # Errors
    /// The entry that is neither.
    pub(crate) fn parse(list: &str) -> Result<Self, String> {
        list.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|entry| {
                let (addr, prefix) = entry.split_once('/').unwrap_or((entry, ""));
                let addr: IpAddr = addr
                    .parse()
                    .map_err(|_| format!("{entry:?} is not an IP address or CIDR network"))?;
                let max = if addr.is_ipv4() { 32 } else { 128 };
                let prefix = if prefix.is_empty() {
                    max
                } else {
                    prefix
                        .parse::<u8>()
                        .ok()
                        .filter(|p| *p <= max)
                        .ok_or_else(|| format!("{entry:?}: bad prefix length"))?
                };
                Ok((addr, prefix))
            })
            .collect::<Result<_, _>>()
            .map(Networks)
    }

    fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|&(net, prefix)| match (net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                masked(u32::from(n).into(), prefix, 32) == masked(u32::from(a).into(), prefix, 32)
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                masked(u128::from(n), prefix, 128) == masked(u128::from(a), prefix, 128)
            }
            _ => false,
        })
    }
}

fn masked(bits: u128, prefix: u8, width: u32) -> u128 {
    let host_bits = width - u32::from(prefix);
    if host_bits >= 128 {
        0
    } else {
        bits >> host_bits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks() {
        let n = Networks::parse("10.0.0.0/8, 192.168.1.7 ,2001:db8::/32").expect("parse");
        for ok in ["10.1.2.3", "192.168.1.7", "2001:db8::1", "::ffff:10.9.9.9"] {
            assert!(n.contains(ok.parse().expect("ip")), "{ok}");
        }
        for no in ["11.0.0.1", "192.168.1.8", "2001:db9::1"] {
            assert!(!n.contains(no.parse().expect("ip")), "{no}");
        }
        assert!(Networks::parse("0.0.0.0/0")
            .expect("all")
            .contains("8.8.8.8".parse().expect("ip")));
        assert!(Networks::parse("").expect("empty").0.is_empty());
        for bad in ["10.0.0.0/33", "example.com", "10.0.0.0/x"] {
            assert!(Networks::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_addr("[2001:db8::1]:443"),
            Some("2001:db8::1".parse().expect("ip"))
        );
        assert_eq!(
            parse_addr("1.2.3.4:80"),
            Some("1.2.3.4".parse().expect("ip"))
        );
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn the_client_is_the_nearest_untrusted_hop_and_garbage_ends_the_walk() {
        let proxies = Networks::parse("10.0.0.0/8").expect("parse");
        let peer = ip("10.0.0.1");
        let chain = |s: &str| -> Vec<Option<IpAddr>> {
            s.split(',').map(|a| parse_addr(a.trim())).collect()
        };
        // A client may prepend anything: the walk stops at the first untrusted address from the right.
        assert_eq!(
            client_in_chain(&chain("6.6.6.6, 1.2.3.4, 10.0.0.2"), peer, &proxies),
            ip("1.2.3.4")
        );
        // Garbage the client put before its real address does not throw the chain away.
        assert_eq!(
            client_in_chain(&chain("x, 1.2.3.4"), peer, &proxies),
            ip("1.2.3.4")
        );
        // Garbage right behind a trusted hop: that hop stands for the client, not the first proxy.
        assert_eq!(
            client_in_chain(&chain("unknown, 10.0.0.7"), peer, &proxies),
            ip("10.0.0.7")
        );
        assert_eq!(client_in_chain(&[], peer, &proxies), peer);
    }

    #[test]
    fn ipv6_clients_are_counted_per_64() {
        assert_eq!(per_host(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(
            per_host(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")),
            ip("2001:db8:1:2::")
        );
        assert_eq!(per_host(ip("1.2.3.4")), ip("1.2.3.4"));
        assert_eq!(per_host(ip("::ffff:1.2.3.4")), ip("::ffff:1.2.3.4"));
    }
}
