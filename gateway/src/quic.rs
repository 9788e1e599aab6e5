//! QUIC transport (quinn): the client opens one bidirectional stream carrying the same length-prefixed
//! frames as TCP. A self-signed certificate is generated for dev; a real one is loaded from config.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use quinn::crypto::rustls::QuicServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_util::codec::FramedRead;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};
use zhibo_proto::codec::PacketDecoder;

use crate::conn::drive;
use crate::context::GatewayContext;
use crate::direct::{Direct, DirectIo};
use crate::limits::{until_signed_in, EdgeLimits};
use crate::listen::{accept_loop, Accepted};

/// ALPN protocol id clients must offer.
pub const ALPN: &[u8] = b"zhibo/1";

/// A certificate chain and its key.
#[derive(Debug)]
pub struct TlsIdentity {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's key.
    pub key: PrivateKeyDer<'static>,
}

impl TlsIdentity {
    /// A self-signed certificate for `localhost`, `127.0.0.1` and `::1` (dev and tests).
    ///
    /// # Errors
    /// When certificate generation fails.
    pub fn self_signed() -> anyhow::Result<Self> {
        let cert = rcgen::generate_simple_self_signed(vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ])?;
        Ok(TlsIdentity {
            chain: vec![cert.cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_pair.serialize_der())),
        })
    }

    /// Loads a PEM certificate chain and PEM private key.
    ///
    /// # Errors
    /// When a file cannot be read or holds no certificate/key.
    pub fn from_pem_files(cert: &std::path::Path, key: &std::path::Path) -> anyhow::Result<Self> {
        use rustls::pki_types::pem::PemObject;
        let chain = CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_file(key)?;
        anyhow::ensure!(!chain.is_empty(), "no certificate in {}", cert.display());
        Ok(TlsIdentity { chain, key })
    }
}

/// A QUIC endpoint bound to `addr` serving `identity`, with windows sized for chat (small memory per
/// connection) rather than bulk transfer.
///
/// # Errors
/// When the TLS setup or the UDP bind fails.
pub fn endpoint(
    addr: SocketAddr,
    identity: TlsIdentity,
    idle_timeout: Duration,
) -> anyhow::Result<quinn::Endpoint> {
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_no_client_auth()
    .with_single_cert(identity.chain, identity.key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(1u32.into())
        .max_concurrent_uni_streams(0u32.into())
        .stream_receive_window(quinn::VarInt::from_u32(64 * 1024))
        .receive_window(quinn::VarInt::from_u32(128 * 1024))
        .send_window(128 * 1024)
        .max_idle_timeout(Some(idle_timeout.try_into()?))
        // Out-of-order handshake data from a client (its ClientHello) is small; zhibo sends no
        // unreliable datagrams. Together with the windows above: ~1.5 KB less per connection.
        .crypto_buffer_size(8 * 1024)
        .datagram_receive_buffer_size(None)
        .datagram_send_buffer_size(0)
        .ack_frequency_config(Some(ack_frequency()));
    server.transport_config(Arc::new(transport));
    let socket = udp_socket(addr, SOCKET_BUFFER)?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| anyhow::anyhow!("QUIC needs to run inside a tokio runtime"))?;
    Ok(quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server),
        socket,
        runtime,
    )?)
}

/// Asks clients to acknowledge less often (the QUIC ACK frequency extension; clients that do not
/// support it, by not sending `min_ack_delay`, keep acknowledging every other packet).
///
/// Room fan-out is almost all server → client: every room frame written to a viewer is one or more
/// packets encrypted for that viewer alone, and by default the viewer answers every second packet with
/// an ACK packet the server must receive, decrypt and process, which is a large part of a QUIC
/// delivery's server CPU. Acknowledging after 10 ack-eliciting packets (or the peer's max ACK delay,
/// 25 ms by default, whichever comes first) cuts those inbound packets by up to 5×. The price: loss is
/// detected and congestion windows grow from coarser feedback, which a chat stream (small, bursty, far
/// below the path's capacity) barely notices; out-of-order packets are still acknowledged at once
/// (reordering threshold 2, quinn's recommendation for its default packet threshold of 3).
fn ack_frequency() -> quinn::AckFrequencyConfig {
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.ack_eliciting_threshold(quinn::VarInt::from_u32(10))
        .reordering_threshold(quinn::VarInt::from_u32(2));
    ack
}

/// Receive and send buffer asked for the endpoint's one UDP socket. Every client's packets queue in it:
/// at the kernel's default (~208 KiB) a burst of handshakes (1,200-byte Initial packets) overflows it,
/// and a dropped handshake waits for the client's retransmission timer (1 s, then 3 s, 7 s …). The
/// kernel caps the value at `net.core.rmem_max` / `wmem_max`; raise those on hosts with many clients.
const SOCKET_BUFFER: usize = 4 * 1024 * 1024;

/// A UDP socket bound to `addr` with `buffer`-byte receive and send buffers (as large as the kernel
/// allows).
fn udp_socket(addr: SocketAddr, buffer: usize) -> anyhow::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if let Err(e) = socket.set_recv_buffer_size(buffer) {
        warn!(error = %e, "cannot enlarge the QUIC receive buffer");
    }
    if let Err(e) = socket.set_send_buffer_size(buffer) {
        warn!(error = %e, "cannot enlarge the QUIC send buffer");
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Accepts QUIC connections until shutdown.
pub async fn serve(
    endpoint: quinn::Endpoint,
    ctx: Arc<GatewayContext>,
    limits: Arc<EdgeLimits>,
    max_frame: usize,
    tracker: TaskTracker,
) {
    accept_loop(
        endpoint,
        ctx,
        limits,
        tracker,
        "quic",
        move |a: Accepted<quinn::Incoming>| async move {
            let Accepted {
                conn: incoming,
                ctx,
                unauthenticated,
                conn_id,
            } = a;
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    debug!(error = %e, "quic handshake failed");
                    return;
                }
            };
            let stream = tokio::time::timeout(ctx.session.sign_in_timeout, conn.accept_bi()).await;
            let (send, recv) = match stream {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    debug!(error = %e, "no stream");
                    return;
                }
                Err(_) => {
                    conn.close(1u32.into(), b"no stream opened in time");
                    return;
                }
            };
            let reader = FramedRead::with_capacity(recv, PacketDecoder::new(max_frame), 512)
                .map(PacketDecoder::flatten);
            // One send stream for the codec and the rooms this connection watches (see `direct`).
            let direct = Direct::quic(
                send,
                max_frame,
                ctx.config.room_queue,
                ctx.metrics.frames_out.clone(),
            );
            let writer = until_signed_in(
                crate::frame::lean_writer(DirectIo(direct.clone()), max_frame),
                unauthenticated,
            );
            drive(ctx, conn_id, "quic", reader, writer, None, direct).await;
            // Give the peer a moment to read what was written last (an Error, a Kick) before the
            // connection close discards unacknowledged stream data.
            let _ = tokio::time::timeout(Duration::from_secs(1), conn.closed()).await;
            conn.close(0u32.into(), b"bye");
        },
    )
    .await;
    // The endpoint stays open: connections drain (GoAway, pending replies) before `close` ends them.
}

/// Closes the endpoint once connections have drained, and waits briefly for it to go idle.
pub async fn close(endpoint: quinn::Endpoint) {
    endpoint.close(0u32.into(), b"gateway stopping");
    if let Err(e) = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await {
        warn!(error = %e, "quic endpoint did not go idle in time");
    }
}

/// Both ends of a QUIC connection on loopback, for tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// A connection between a server [`endpoint`] (this module's settings) and a client, with the one
    /// bidirectional stream a zhibo client opens (server → client). The endpoints and the stream's
    /// other direction live as long as this.
    pub(crate) struct Pair {
        pub server: quinn::Connection,
        pub server_send: quinn::SendStream,
        pub client: quinn::Connection,
        pub client_recv: quinn::RecvStream,
        _open: (quinn::RecvStream, quinn::SendStream),
        _endpoints: (quinn::Endpoint, quinn::Endpoint),
    }

    /// Connects a client with `client_transport` settings and opens the stream.
    pub(crate) async fn pair(client_transport: quinn::TransportConfig) -> Pair {
        let identity = TlsIdentity::self_signed().expect("identity");
        let cert = identity.chain[0].clone();
        let server = endpoint(
            "127.0.0.1:0".parse().expect("addr"),
            identity,
            Duration::from_secs(10),
        )
        .expect("endpoint");
        let addr = server.local_addr().expect("addr");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).expect("root");
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_root_certificates(roots)
        .with_no_client_auth();
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let mut config = quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic tls"),
        ));
        config.transport_config(Arc::new(client_transport));
        let mut client_end =
            quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client");
        client_end.set_default_client_config(config);
        let (accepted, client) = tokio::join!(
            async {
                server
                    .accept()
                    .await
                    .expect("incoming")
                    .await
                    .expect("handshake")
            },
            async {
                client_end
                    .connect(addr, "localhost")
                    .expect("connect")
                    .await
                    .expect("handshake")
            }
        );
        let (mut client_send, client_recv) = client.open_bi().await.expect("stream");
        // The server sees the stream with its first byte.
        client_send.write_all(b"h").await.expect("open the stream");
        let (server_send, mut server_recv) = accepted.accept_bi().await.expect("stream");
        let mut first = [0u8; 1];
        server_recv
            .read_exact(&mut first)
            .await
            .expect("first byte");
        Pair {
            server: accepted,
            server_send,
            client,
            client_recv,
            _open: (server_recv, client_send),
            _endpoints: (server, client_end),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The endpoint asks a client that supports it (quinn advertises `min_ack_delay`) to acknowledge
    /// less often: the client receives an ACK_FREQUENCY frame once the handshake is done, and then
    /// sends fewer ACKs than one per two packets while the server streams to it.
    #[tokio::test]
    async fn clients_are_asked_to_acknowledge_less_often() {
        let testing::Pair {
            server,
            mut server_send,
            client,
            mut client_recv,
            ..
        } = testing::pair(quinn::TransportConfig::default()).await;
        let serving = tokio::spawn(async move {
            // A room's worth of frames: 300 writes of ~1 KB, each likely its own packet.
            for _ in 0..300 {
                server_send.write_all(&[7u8; 1000]).await.expect("write");
                tokio::task::yield_now().await;
            }
            server_send.finish().expect("finish");
            let _ = tokio::time::timeout(Duration::from_secs(5), server.closed()).await;
        });
        let got = tokio::time::timeout(Duration::from_secs(10), client_recv.read_to_end(1 << 20))
            .await
            .expect("in time")
            .expect("read");
        assert_eq!(got.len(), 300 * 1000);
        let stats = client.stats();
        assert!(
            stats.frame_rx.ack_frequency >= 1,
            "the server sent no ACK_FREQUENCY: {stats:?}"
        );
        assert!(
            stats.frame_tx.acks * 3 < stats.udp_rx.datagrams,
            "the client still acknowledges about every other packet: {} ACKs for {} datagrams",
            stats.frame_tx.acks,
            stats.udp_rx.datagrams
        );
        client.close(0u32.into(), b"done");
        serving.await.expect("server task");
    }

    /// The QUIC socket asks for more than the kernel's default receive buffer, so handshake bursts
    /// are not dropped. Checked on every host: the kernel grants `min(asked, rmem_max)`, and Linux
    /// reports twice what it grants (its bookkeeping overhead), so even at the default
    /// `rmem_max == rmem_default` the buffer reads above the default. Only without `/proc` (not Linux)
    /// is "never below the default" all that can be said.
    #[test]
    fn the_udp_socket_gets_a_larger_receive_buffer() {
        let default = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)
            .expect("socket")
            .recv_buffer_size()
            .expect("default size");
        let socket = udp_socket("127.0.0.1:0".parse().expect("addr"), SOCKET_BUFFER).expect("bind");
        let size = socket2::SockRef::from(&socket)
            .recv_buffer_size()
            .expect("size");
        assert!(
            size >= default,
            "receive buffer {size} below the default {default}"
        );
        let cap = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok());
        if let Some(cap) = cap {
            let granted = SOCKET_BUFFER.min(cap);
            assert!(
                size >= granted && size > default,
                "receive buffer {size}: asked {SOCKET_BUFFER}, rmem_max {cap}, default {default}"
            );
        }
        assert!(socket.local_addr().expect("addr").port() != 0);
    }
}
