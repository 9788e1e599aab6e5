//! One raw connection to a gateway over TCP, WebSocket or QUIC: framing, sign-in, requests matched by
//! request id. No reconnection: [`crate::Session`] builds the protocol's rules on top of it; the load
//! generator and the end-to-end tests use it directly.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{future, Sink, SinkExt, Stream, StreamExt};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_util::codec::{FramedRead, FramedWrite};
use zhibo_proto::client::packet::Body;
use zhibo_proto::client::{Packet, SignInInput, SignInOutput};
use zhibo_proto::codec::{decode_body, encode_body, CodecError, PacketCodec, DEFAULT_MAX_FRAME};

use crate::error::{code_of, Error};

/// Bytes read from a WebSocket at a time. tungstenite zeroes its read buffer up to this size before
/// every read (128 KiB by default: a third of a 5,000-viewer load generator's CPU went to that
/// `memset`); frames are small, and a larger one is read in several reads.
const WS_READ_BUFFER: usize = 8 * 1024;

fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(WS_READ_BUFFER)
}

type Result<T, E = Error> = std::result::Result<T, E>;

/// Which transport to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(
    feature = "cli",
    derive(clap::ValueEnum, serde::Serialize, serde::Deserialize)
)]
#[cfg_attr(feature = "cli", serde(rename_all = "lowercase"))]
pub enum Transport {
    /// Length-prefixed frames over TCP.
    Tcp,
    /// Binary messages over WebSocket.
    Ws,
    /// Length-prefixed frames on one QUIC stream.
    Quic,
}

/// What a client signs in with.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// User.
    pub user_id: i64,
    /// Device.
    pub device_id: i64,
    /// Token from user-api.
    pub token: String,
}

type Reader = Pin<Box<dyn Stream<Item = Result<Packet, CodecError>> + Send>>;
type Writer = Pin<Box<dyn Sink<Packet, Error = Error> + Send>>;

/// A connection to a gateway.
pub struct Client {
    reader: Reader,
    writer: Writer,
    stash: VecDeque<Packet>,
    next_request: u64,
    // Keeps the QUIC connection and endpoint alive as long as the client.
    _quic: Option<(quinn::Endpoint, quinn::Connection)>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("stashed", &self.stash.len())
            .finish()
    }
}

/// Accepts any server certificate: for loopback dev with the gateway's self-signed certificate only.
#[derive(Debug)]
struct AcceptAnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The QUIC idle timeout a client offers: above any gateway heartbeat timeout, so that the gateway's own
/// (heartbeat timeout + 5 s) is the one in force and an idle QUIC connection lives as long as an idle
/// TCP or WebSocket one. quinn's default of 30 s would be the smaller, and would close a connection that
/// sends its heartbeat every 30 s (the default interval) before the heartbeat goes out.
const QUIC_IDLE_TIMEOUT: Duration = Duration::from_secs(600);

/// How long a QUIC handshake may take (quinn bounds it by the idle timeout alone, now far longer).
const QUIC_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// A QUIC client endpoint trusting any certificate (dev), bound to `bind`.
///
/// # Errors
/// When the UDP socket cannot be bound.
pub fn insecure_quic_endpoint(bind: SocketAddr) -> Result<quinn::Endpoint> {
    let quic_err = |message: String| Error::Quic {
        addr: bind.to_string(),
        message,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| quic_err(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"zhibo/1".to_vec()];
    let mut config = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| quic_err(e.to_string()))?,
    ));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(
        QUIC_IDLE_TIMEOUT
            .try_into()
            .map_err(|e: quinn::VarIntBoundsExceeded| quic_err(e.to_string()))?,
    ));
    config.transport_config(Arc::new(transport));
    let mut endpoint = quinn::Endpoint::client(bind).map_err(|source| Error::Connect {
        addr: bind.to_string(),
        source,
    })?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

/// Opens a QUIC connection to `remote` on `endpoint` (handshake bounded by [`QUIC_HANDSHAKE_TIMEOUT`])
/// and the one bidirectional stream the gateway expects.
async fn quic_connect(endpoint: quinn::Endpoint, remote: SocketAddr, addr: &str) -> Result<Client> {
    let quic_err = |message: String| Error::Quic {
        addr: addr.to_owned(),
        message,
    };
    let connecting = endpoint
        .connect(remote, "localhost")
        .map_err(|e| quic_err(e.to_string()))?;
    let conn = tokio::time::timeout(QUIC_HANDSHAKE_TIMEOUT, connecting)
        .await
        .map_err(|_| Error::Timeout(QUIC_HANDSHAKE_TIMEOUT))?
        .map_err(|e| quic_err(e.to_string()))?;
    let (send, recv) = conn.open_bi().await.map_err(|e| quic_err(e.to_string()))?;
    Ok(Client::framed(recv, send, Some((endpoint, conn))))
}

impl Client {
    /// Connects without signing in (TCP and QUIC); the caller sends the first packet itself.
    /// For WebSocket, `creds` go in the URL, so use [`Client::connect`].
    ///
    /// # Errors
    /// When the connection fails.
    pub async fn connect_raw(transport: Transport, addr: &str) -> Result<Client> {
        match transport {
            Transport::Tcp => {
                let stream = tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(|source| Error::Connect {
                        addr: addr.to_owned(),
                        source,
                    })?;
                stream.set_nodelay(true)?;
                let (r, w) = stream.into_split();
                Ok(Self::framed(r, w, None))
            }
            Transport::Quic => {
                let remote = resolve(addr).await?;
                let bind: SocketAddr = if remote.is_ipv4() {
                    ([0, 0, 0, 0], 0).into()
                } else {
                    (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
                };
                quic_connect(insecure_quic_endpoint(bind)?, remote, addr).await
            }
            Transport::Ws => Err(Error::Unsupported(
                "WebSocket signs in through its URL: use Client::connect or connect_ws_url",
            )),
        }
    }

    fn framed<R, W>(r: R, w: W, quic: Option<(quinn::Endpoint, quinn::Connection)>) -> Client
    where
        R: tokio::io::AsyncRead + Send + 'static,
        W: tokio::io::AsyncWrite + Send + 'static,
    {
        let reader = FramedRead::new(r, PacketCodec::new(DEFAULT_MAX_FRAME));
        let writer = SinkExt::<Packet>::sink_map_err(
            FramedWrite::new(w, PacketCodec::new(DEFAULT_MAX_FRAME)),
            Error::from,
        );
        Client {
            reader: Box::pin(reader),
            writer: Box::pin(writer),
            stash: VecDeque::new(),
            next_request: 1,
            _quic: quic,
        }
    }

    /// Opens a WebSocket to `url` as is (e.g. `ws://127.0.0.1:7002/ws?user_id=1&device_id=2&token=...`).
    ///
    /// # Errors
    /// When the handshake fails.
    pub async fn connect_ws_url(url: &str) -> Result<Client> {
        let (ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(ws_config()), false)
            .await
            .map_err(|e| match e {
                tokio_tungstenite::tungstenite::Error::Io(source) => Error::Connect {
                    addr: without_query(url),
                    source,
                },
                e => Error::from(e),
            })?;
        Ok(Self::from_ws(ws))
    }

    /// Connects and signs in; fails with the server's error if sign-in is refused.
    ///
    /// # Errors
    /// When the connection fails or the server refuses the sign-in.
    pub async fn connect(
        transport: Transport,
        addr: &str,
        creds: &Credentials,
    ) -> Result<(Client, SignInOutput)> {
        let client = match transport {
            Transport::Ws => {
                let url = ws_url(addr, creds);
                Client::connect_ws_url(&url).await?
            }
            _ => Client::connect_raw(transport, addr).await?,
        };
        client
            .sign_in(transport, creds, Duration::from_secs(10))
            .await
    }

    /// Sends a packet with a fresh request id, returned.
    ///
    /// # Errors
    /// When the write fails.
    pub async fn send(&mut self, body: Body) -> Result<u64> {
        let id = self.next_request;
        self.next_request += 1;
        self.send_with_id(id, body).await?;
        Ok(id)
    }

    /// Sends a packet with the given request id.
    ///
    /// # Errors
    /// When the write fails.
    pub async fn send_with_id(&mut self, request_id: u64, body: Body) -> Result<()> {
        self.writer.send(Packet::new(request_id, body)).await
    }

    /// Sends a packet as is (tests of bad input).
    ///
    /// # Errors
    /// When the write fails.
    pub async fn send_packet(&mut self, packet: Packet) -> Result<()> {
        self.writer.send(packet).await
    }

    async fn recv_raw(&mut self, wait: Duration) -> Result<Option<Packet>> {
        match tokio::time::timeout(wait, self.reader.next()).await {
            Err(_) => Err(Error::Timeout(wait)),
            Ok(None) => Ok(None),
            Ok(Some(Ok(p))) => Ok(Some(p)),
            Ok(Some(Err(CodecError::Io(e)))) if is_disconnect(&e) => Ok(None),
            Ok(Some(Err(e))) => Err(e.into()),
        }
    }

    /// The next packet (stashed ones first), `Ok(None)` when the server closed the connection.
    ///
    /// # Errors
    /// When nothing arrives within `wait` or the stream is corrupt.
    pub async fn recv(&mut self, wait: Duration) -> Result<Option<Packet>> {
        if let Some(p) = self.stash.pop_front() {
            return Ok(Some(p));
        }
        self.recv_raw(wait).await
    }

    /// Sends a request and waits for the packet answering it; pushes arriving meanwhile are kept for
    /// [`Client::recv`].
    ///
    /// # Errors
    /// When the write fails, nothing answers within `wait`, or the connection closes.
    pub async fn request(&mut self, body: Body, wait: Duration) -> Result<Packet> {
        let id = self.send(body).await?;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let p = self.recv_raw(left).await?.ok_or(Error::Closed)?;
            if p.request_id == id {
                return Ok(p);
            }
            self.stash.push_back(p);
        }
    }

    /// Closes the write side.
    ///
    /// # Errors
    /// When the close fails.
    pub async fn close(&mut self) -> Result<()> {
        self.writer.close().await
    }
}

/// The sign-in URL of a WebSocket gateway: `addr` is `host:port` (path `/ws`) or a `ws://`/`wss://` URL
/// (a GoAway hint), to which the credentials are appended as query parameters.
pub fn ws_url(addr: &str, creds: &Credentials) -> String {
    let query = format!(
        "user_id={}&device_id={}&token={}",
        creds.user_id, creds.device_id, creds.token
    );
    if addr.starts_with("ws://") || addr.starts_with("wss://") {
        let sep = if addr.contains('?') { '&' } else { '?' };
        format!("{addr}{sep}{query}")
    } else {
        format!("ws://{addr}/ws?{query}")
    }
}

/// The host and port of a WebSocket address given as a URL (`ws://host:port/path`), else `addr` itself.
fn ws_host(addr: &str) -> &str {
    let rest = addr
        .strip_prefix("ws://")
        .or_else(|| addr.strip_prefix("wss://"))
        .unwrap_or(addr);
    rest.split(['/', '?']).next().unwrap_or(rest)
}

/// The first address `addr` resolves to.
async fn resolve(addr: &str) -> Result<SocketAddr> {
    let connect_err = |source| Error::Connect {
        addr: addr.to_owned(),
        source,
    };
    tokio::net::lookup_host(addr)
        .await
        .map_err(connect_err)?
        .next()
        .ok_or_else(|| connect_err(std::io::Error::other("no address")))
}

fn is_disconnect(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof
    ) || e.to_string().contains("closed")
        || e.to_string().contains("reset")
}

/// The sending half of a [`Client`] split with [`Client::into_parts`]: lets a load generator pipeline
/// requests from one task while another reads the answers.
pub struct SendHalf {
    writer: Writer,
    next_request: u64,
    _quic: Option<(quinn::Endpoint, quinn::Connection)>,
}

/// The receiving half of a [`Client`] split with [`Client::into_parts`].
pub struct RecvHalf {
    reader: Reader,
    stash: VecDeque<Packet>,
}

impl std::fmt::Debug for SendHalf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendHalf")
            .field("next_request", &self.next_request)
            .finish()
    }
}

impl std::fmt::Debug for RecvHalf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvHalf")
            .field("stashed", &self.stash.len())
            .finish()
    }
}

impl SendHalf {
    /// Queues a packet with a fresh request id (returned) without flushing: call [`SendHalf::flush`]
    /// after a batch.
    ///
    /// # Errors
    /// When the write fails.
    pub async fn feed(&mut self, body: Body) -> Result<u64> {
        let id = self.next_request;
        self.next_request += 1;
        self.writer.feed(Packet::new(id, body)).await?;
        Ok(id)
    }

    /// Queues a packet with the given request id without flushing.
    ///
    /// # Errors
    /// When the write fails.
    pub async fn feed_with_id(&mut self, request_id: u64, body: Body) -> Result<()> {
        self.writer.feed(Packet::new(request_id, body)).await
    }

    /// Sends a packet with a fresh request id (returned) and flushes.
    ///
    /// # Errors
    /// When the write fails.
    pub async fn send(&mut self, body: Body) -> Result<u64> {
        let id = self.feed(body).await?;
        self.flush().await?;
        Ok(id)
    }

    /// Flushes queued packets.
    ///
    /// # Errors
    /// When the write fails.
    pub async fn flush(&mut self) -> Result<()> {
        self.writer.flush().await
    }

    /// Closes the write side.
    ///
    /// # Errors
    /// When the close fails.
    pub async fn close(&mut self) -> Result<()> {
        self.writer.close().await
    }
}

impl RecvHalf {
    /// The next packet, `Ok(None)` when the server closed the connection; waits without limit.
    ///
    /// # Errors
    /// When the stream is corrupt.
    pub async fn next(&mut self) -> Result<Option<Packet>> {
        if let Some(p) = self.stash.pop_front() {
            return Ok(Some(p));
        }
        match self.reader.next().await {
            None => Ok(None),
            Some(Ok(p)) => Ok(Some(p)),
            Some(Err(CodecError::Io(e))) if is_disconnect(&e) => Ok(None),
            Some(Err(e)) => Err(e.into()),
        }
    }
}

impl Client {
    /// Splits into a sending and a receiving half (packets already stashed stay with the receiving half).
    pub fn into_parts(self) -> (SendHalf, RecvHalf) {
        (
            SendHalf {
                writer: self.writer,
                next_request: self.next_request,
                _quic: self._quic,
            },
            RecvHalf {
                reader: self.reader,
                stash: self.stash,
            },
        )
    }

    /// Connects from a chosen source address and signs in: TCP and WebSocket bind their socket to
    /// `(source, 0)` first (so a load generator can open more connections than one source address has
    /// ports); QUIC uses `quic_endpoint`, shared by many connections, when given (else a new one bound to
    /// `source`).
    ///
    /// # Errors
    /// When binding, the connection or the sign-in fails.
    pub async fn connect_from(
        transport: Transport,
        addr: &str,
        creds: &Credentials,
        source: Option<std::net::IpAddr>,
        quic_endpoint: Option<&quinn::Endpoint>,
    ) -> Result<(Client, SignInOutput)> {
        let remote = resolve(if transport == Transport::Ws {
            ws_host(addr)
        } else {
            addr
        })
        .await?;
        let tcp = |source: Option<std::net::IpAddr>| async move {
            let connect_err = |source| Error::Connect {
                addr: addr.to_owned(),
                source,
            };
            let socket = if remote.is_ipv4() {
                tokio::net::TcpSocket::new_v4()
            } else {
                tokio::net::TcpSocket::new_v6()
            }
            .map_err(connect_err)?;
            if let Some(ip) = source {
                socket.bind((ip, 0).into()).map_err(connect_err)?;
            }
            let stream = socket.connect(remote).await.map_err(connect_err)?;
            stream.set_nodelay(true)?;
            Ok::<_, Error>(stream)
        };
        let client = match transport {
            Transport::Tcp => {
                let (r, w) = tcp(source).await?.into_split();
                Self::framed(r, w, None)
            }
            Transport::Quic => {
                let endpoint = match quic_endpoint {
                    Some(e) => e.clone(),
                    None => {
                        let ip = source.unwrap_or(if remote.is_ipv4() {
                            std::net::Ipv4Addr::UNSPECIFIED.into()
                        } else {
                            std::net::Ipv6Addr::UNSPECIFIED.into()
                        });
                        insecure_quic_endpoint((ip, 0).into())?
                    }
                };
                quic_connect(endpoint, remote, addr).await?
            }
            Transport::Ws => {
                let url = ws_url(addr, creds);
                let stream = tcp(source).await?;
                let (ws, _) = tokio_tungstenite::client_async_with_config(
                    url.as_str(),
                    stream,
                    Some(ws_config()),
                )
                .await?;
                Self::from_ws(ws)
            }
        };
        client
            .sign_in(transport, creds, Duration::from_secs(30))
            .await
    }

    /// Completes the sign-in of a fresh connection: sends SignIn first (TCP, QUIC; WebSocket carried it in
    /// the URL) and waits up to `wait` for SignInOutput, or fails with the server's refusal.
    async fn sign_in(
        mut self,
        transport: Transport,
        creds: &Credentials,
        wait: Duration,
    ) -> Result<(Client, SignInOutput)> {
        if transport != Transport::Ws {
            self.send_with_id(
                0,
                Body::SignIn(SignInInput {
                    user_id: creds.user_id,
                    device_id: creds.device_id,
                    token: creds.token.clone(),
                }),
            )
            .await?;
        }
        let first = self.recv_raw(wait).await?.ok_or(Error::Closed)?;
        match first.body {
            Some(Body::SignInOutput(out)) => Ok((self, out)),
            Some(Body::Error(e)) => Err(Error::Refused {
                code: code_of(&e),
                message: e.message,
            }),
            other => Err(Error::Unexpected(format!("first packet {other:?}"))),
        }
    }

    fn from_ws<S>(ws: tokio_tungstenite::WebSocketStream<S>) -> Client
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (sink, stream) = ws.split();
        let writer = sink
            .sink_map_err(Error::from)
            .with(|p: Packet| future::ready(Ok::<_, Error>(WsMessage::Binary(encode_body(&p)))));
        let reader = stream.filter_map(|m| {
            future::ready(match m {
                Ok(WsMessage::Binary(b)) => Some(decode_body(&b, DEFAULT_MAX_FRAME)),
                Ok(_) => None,
                Err(e) => Some(Err(CodecError::Io(std::io::Error::other(e)))),
            })
        });
        Client {
            reader: Box::pin(reader),
            writer: Box::pin(writer),
            stash: VecDeque::new(),
            next_request: 1,
            _quic: None,
        }
    }
}

/// `url` without its query: what an error may name (the sign-in query holds the token).
fn without_query(url: &str) -> String {
    match url.split_once('?') {
        Some((base, _)) => format!("{base}?…"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A refused WebSocket connection names the address, never the sign-in query (the token).
    #[tokio::test]
    async fn a_connect_error_does_not_show_the_token() {
        // Nothing listens on port 1 of loopback.
        let url = "ws://127.0.0.1:1/ws?user_id=1&device_id=2&token=secret-token";
        let err = match Client::connect_ws_url(url).await {
            Ok(_) => panic!("connected to port 1"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("ws://127.0.0.1:1/ws"), "{err}");
        assert!(!err.contains("secret-token"), "{err}");
    }
}
