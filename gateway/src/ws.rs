//! WebSocket transport: `/ws?user_id=&device_id=&token=`, one binary message = one protobuf packet.
//! The sign-in comes from the URL and is fed to the session as its first packet.

use std::sync::Arc;
use std::time::Duration;

use futures::{future, SinkExt, StreamExt};
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::task::TaskTracker;
use tracing::debug;
use zhibo_proto::client::packet::Body;
use zhibo_proto::client::{Packet, SignInInput};
use zhibo_proto::codec::{decode_body, CodecError};

use crate::conn::drive;
use crate::context::GatewayContext;
use crate::direct::{Direct, DirectIo, Framing};
use crate::frame::Frame;
use crate::limits::{until_signed_in, EdgeLimits};
use crate::listen::{accept_loop, Accepted};

/// Small buffers: an idle WebSocket costs a few KB instead of ~135 KB with the defaults. The read
/// buffer is kept as long as the connection: 512 bytes like TCP's. tungstenite reads at most that much
/// per `read` call, so a large client frame (up to `max_frame`) takes many calls; client frames are
/// mostly small, and a 32 KiB message still arrives intact (tested end to end).
fn ws_config(max_frame: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(512)
        .write_buffer_size(0)
        .max_write_buffer_size(max_frame * 4)
        .max_message_size(Some(max_frame))
        .max_frame_size(Some(max_frame))
}

/// The SignIn packet carried by a `/ws?user_id=&device_id=&token=` URL; missing fields stay empty so the
/// session refuses them like any bad token.
pub fn sign_in_from_query(query: &str) -> Packet {
    let mut s = SignInInput::default();
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "user_id" => s.user_id = v.parse().unwrap_or(0),
            "device_id" => s.device_id = v.parse().unwrap_or(0),
            "token" => s.token = v.to_owned(),
            _ => {}
        }
    }
    Packet::new(0, Body::SignIn(s))
}

/// Accepts WebSocket connections until shutdown.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<GatewayContext>,
    limits: Arc<EdgeLimits>,
    max_frame: usize,
    tracker: TaskTracker,
) {
    accept_loop(
        listener,
        ctx,
        limits,
        tracker,
        "ws",
        move |a: Accepted<tokio::net::TcpStream>| async move {
            let Accepted {
                conn: stream,
                ctx,
                unauthenticated,
                conn_id,
            } = a;
            let _ = stream.set_nodelay(true);
            // One socket for tungstenite and the rooms this connection watches (see `direct`).
            let direct = Direct::new(
                stream,
                Framing::WebSocket,
                max_frame,
                ctx.config.room_queue,
                ctx.metrics.frames_out.clone(),
            );
            let mut query = None;
            // The callback's signature (and its large error type) is tungstenite's.
            #[allow(clippy::result_large_err)]
            let callback = |req: &Request, resp: Response| {
                let origin = req
                    .headers()
                    .get(tokio_tungstenite::tungstenite::http::header::ORIGIN)
                    .map(|o| o.to_str().unwrap_or("\u{fffd}"));
                if !unauthenticated.origin_allowed(origin) {
                    let mut forbidden =
                        tokio_tungstenite::tungstenite::handshake::server::ErrorResponse::new(
                            Some("origin not allowed".into()),
                        );
                    *forbidden.status_mut() =
                        tokio_tungstenite::tungstenite::http::StatusCode::FORBIDDEN;
                    return Err(forbidden);
                }
                if req.uri().path() == "/ws" {
                    query = Some(req.uri().query().unwrap_or("").to_owned());
                    Ok(resp)
                } else {
                    let mut not_found =
                        tokio_tungstenite::tungstenite::handshake::server::ErrorResponse::new(
                            Some("use /ws?user_id=&device_id=&token=".into()),
                        );
                    *not_found.status_mut() =
                        tokio_tungstenite::tungstenite::http::StatusCode::NOT_FOUND;
                    Err(not_found)
                }
            };
            // Boxed: the handshake's state would otherwise size the whole connection task.
            let handshake = tokio::time::timeout(
                ctx.session.sign_in_timeout,
                Box::pin(tokio_tungstenite::accept_hdr_async_with_config(
                    DirectIo(direct.clone()),
                    callback,
                    Some(ws_config(max_frame)),
                )),
            )
            .await;
            let ws = match handshake {
                Ok(Ok(ws)) => ws,
                Ok(Err(e)) => {
                    let refusal = refusal(&e);
                    debug!(
                        error = %e,
                        status = refusal.map(|r| r.status),
                        "websocket handshake failed"
                    );
                    // Answered by tungstenite (the callback's 403 and 404) or to be answered here.
                    if refusal.is_some() || matches!(e, WsError::Http(_)) {
                        // Boxed: this rare path would otherwise size every connection's task.
                        Box::pin(close_refused(&direct, refusal)).await;
                    }
                    return;
                }
                Err(_) => {
                    debug!("websocket handshake timed out");
                    return;
                }
            };
            // Taken, so the query (and its token) is not kept for the life of the connection.
            let first = sign_in_from_query(&query.take().unwrap_or_default());
            let (sink, stream) = ws.split();
            let writer = sink.with(|f: Frame| {
                future::ready(Ok::<_, tokio_tungstenite::tungstenite::Error>(
                    Message::Binary(f.into_body()),
                ))
            });
            let reader = stream.filter_map(move |m| {
                future::ready(match m {
                    Ok(Message::Binary(b)) => Some(decode_body(&b, max_frame)),
                    Ok(Message::Text(_)) => Some(Err(CodecError::Decode(prost::DecodeError::new(
                        "text frames are not packets; send binary",
                    )))),
                    Ok(Message::Close(_)) => None,
                    Ok(_) => None,
                    Err(WsError::Capacity(e)) => Some(Err(CodecError::FrameTooLarge {
                        len: too_long(e),
                        max: max_frame,
                    })),
                    // The client broke the WebSocket protocol: said with BAD_FRAME, then closed.
                    Err(e @ (WsError::Protocol(_) | WsError::Utf8(_))) => {
                        Some(Err(CodecError::Framing(e.to_string())))
                    }
                    Err(e) => Some(Err(CodecError::Io(std::io::Error::other(e)))),
                })
            });
            let reader = Box::pin(reader);
            let writer = until_signed_in(Box::pin(writer), unauthenticated);
            drive(ctx, conn_id, "ws", reader, writer, Some(first), direct).await;
        },
    )
    .await;
}

/// How long the answer to a refused upgrade may take to write: a client that does not read must not
/// hold the task.
const LAST_WORDS: Duration = Duration::from_secs(2);

/// How long, and how much of what the client still sends (a POST's body, the rest of the garbage), a
/// refused upgrade reads and drops before the socket closes, so that the close is not a reset (a
/// reset makes the client's kernel drop the answer it has not read yet; see [`Direct::linger`]).
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 64 * 1024;

/// The HTTP answer to an upgrade request tungstenite refused without answering (RFC 6455 §4.2.1:
/// "an appropriate error code (such as 400 Bad Request)"; §4.2.2: a version it does not speak gets
/// 426 and the version it does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Refusal {
    /// Status code and reason phrase.
    status: &'static str,
    /// Header lines after `Content-Type` and `Content-Length`, each ending in CRLF; `Connection`
    /// always says `close`.
    headers: &'static str,
    /// What is wrong, in the plain-text body.
    reason: &'static str,
}

impl Refusal {
    /// A refusal with no header of its own.
    const fn new(status: &'static str, reason: &'static str) -> Refusal {
        Refusal {
            status,
            headers: "Connection: close\r\n",
            reason,
        }
    }

    /// The whole response, body included; the connection closes after it.
    fn to_http(self) -> Vec<u8> {
        format!(
            "HTTP/1.1 {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\
             {}\r\n{}\n",
            self.status,
            self.reason.len() + 1,
            self.headers,
            self.reason,
        )
        .into_bytes()
    }
}

/// What to answer a failed handshake with: `None` when tungstenite answered already (the callback's
/// 403 and 404, returned as [`WsError::Http`] once written), or when nobody is left to answer (the
/// client closed before its request was whole, the socket failed).
///
/// tungstenite checks, in this order: the request parses, the method, the HTTP version, `Connection:
/// Upgrade`, `Upgrade: websocket`, `Sec-WebSocket-Version: 13`, `Sec-WebSocket-Key`, nothing after the
/// request; the first that fails is the error.
fn refusal(e: &WsError) -> Option<Refusal> {
    use tokio_tungstenite::tungstenite::error::{CapacityError, ProtocolError};
    let bad = |reason| Some(Refusal::new("400 Bad Request", reason));
    match e {
        WsError::Protocol(p) => match p {
            ProtocolError::WrongHttpMethod => Some(Refusal {
                status: "405 Method Not Allowed",
                headers: "Allow: GET\r\nConnection: close\r\n",
                reason: "a WebSocket upgrade is a GET request",
            }),
            ProtocolError::WrongHttpVersion => bad("a WebSocket upgrade needs HTTP/1.1"),
            ProtocolError::MissingConnectionUpgradeHeader => {
                bad("not a WebSocket upgrade: no \"Connection: Upgrade\" header")
            }
            ProtocolError::MissingUpgradeWebSocketHeader => {
                bad("not a WebSocket upgrade: no \"Upgrade: websocket\" header")
            }
            // Missing or another version: tungstenite does not say which, and the answer that helps
            // is the same. A 426 names the protocol in `Upgrade` (RFC 9110 §15.5.22), which
            // `Connection` then lists (§7.8).
            ProtocolError::MissingSecWebSocketVersionHeader => Some(Refusal {
                status: "426 Upgrade Required",
                headers: "Sec-WebSocket-Version: 13\r\nUpgrade: websocket\r\n\
                          Connection: Upgrade, close\r\n",
                reason: "Sec-WebSocket-Version must be 13",
            }),
            ProtocolError::MissingSecWebSocketKey => bad("no Sec-WebSocket-Key header"),
            ProtocolError::JunkAfterRequest => {
                bad("data after the upgrade request: wait for its 101 before sending frames")
            }
            ProtocolError::HttparseError(_) => bad("not an HTTP request"),
            // `HandshakeIncomplete`: the client closed before its request was whole, nobody is left
            // to answer. The others are not errors of a server's handshake.
            _ => None,
        },
        WsError::HttpFormat(_) => bad("malformed request line or header"),
        WsError::Capacity(CapacityError::TooManyHeaders) => Some(Refusal::new(
            "431 Request Header Fields Too Large",
            "too many headers",
        )),
        // Over 64 KiB of request head, or a head sent in too many small pieces.
        WsError::AttackAttempt => bad("request head too large or too fragmented"),
        // `Http`: answered already; `Io`: the socket failed.
        _ => None,
    }
}

/// Ends a connection whose handshake was refused: writes `refusal` (`None`: tungstenite wrote its
/// answer already), ends the answer (FIN), then reads and drops what the client still sends (see
/// [`LINGER`]).
async fn close_refused(direct: &Arc<Direct>, refusal: Option<Refusal>) {
    let mut io = DirectIo(direct.clone());
    let answer = async {
        if let Some(r) = refusal {
            io.write_all(&r.to_http()).await?;
        }
        io.shutdown().await
    };
    let _ = tokio::time::timeout(LAST_WORDS, answer).await;
    direct.close();
    direct.linger(LINGER, LINGER_BYTES).await;
}

/// The size of a message over the limit, as tungstenite measured it (0 for a handshake's header
/// count, which never reaches the reader).
fn too_long(e: tokio_tungstenite::tungstenite::error::CapacityError) -> usize {
    use tokio_tungstenite::tungstenite::error::CapacityError;
    match e {
        CapacityError::MessageTooLong { size, .. } => size,
        CapacityError::TooManyHeaders => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parsing() {
        let p = sign_in_from_query("user_id=7&device_id=9&token=abc.def.ghi");
        let Some(Body::SignIn(s)) = p.body else {
            panic!("sign in")
        };
        assert_eq!(
            (s.user_id, s.device_id, s.token.as_str()),
            (7, 9, "abc.def.ghi")
        );
        let p = sign_in_from_query("user_id=x");
        let Some(Body::SignIn(s)) = p.body else {
            panic!("sign in")
        };
        assert_eq!((s.user_id, s.device_id, s.token.as_str()), (0, 0, ""));
    }

    /// Each refusal tungstenite leaves unanswered gets its status; what it answered itself (the
    /// callback's 403/404) or where nobody is left to answer gets nothing more.
    #[test]
    fn refusals() {
        use tokio_tungstenite::tungstenite::error::{CapacityError, ProtocolError};
        let status = |e: WsError| refusal(&e).map(|r| r.status);
        for (p, want) in [
            (ProtocolError::WrongHttpMethod, "405 Method Not Allowed"),
            (ProtocolError::WrongHttpVersion, "400 Bad Request"),
            (
                ProtocolError::MissingConnectionUpgradeHeader,
                "400 Bad Request",
            ),
            (
                ProtocolError::MissingUpgradeWebSocketHeader,
                "400 Bad Request",
            ),
            (
                ProtocolError::MissingSecWebSocketVersionHeader,
                "426 Upgrade Required",
            ),
            (ProtocolError::MissingSecWebSocketKey, "400 Bad Request"),
            (ProtocolError::JunkAfterRequest, "400 Bad Request"),
        ] {
            assert_eq!(status(WsError::Protocol(p.clone())), Some(want), "{p:?}");
        }
        assert_eq!(
            status(WsError::Capacity(CapacityError::TooManyHeaders)),
            Some("431 Request Header Fields Too Large")
        );
        assert_eq!(status(WsError::AttackAttempt), Some("400 Bad Request"));
        let answered = tokio_tungstenite::tungstenite::http::Response::new(None);
        assert_eq!(status(WsError::Http(Box::new(answered))), None);
        assert_eq!(
            status(WsError::Protocol(ProtocolError::HandshakeIncomplete)),
            None
        );
        assert_eq!(
            status(WsError::Io(std::io::ErrorKind::ConnectionReset.into())),
            None
        );
    }

    /// Bytes that are not HTTP (here a TLS ClientHello's start) fail tungstenite's parse: 400.
    #[tokio::test]
    async fn not_http_is_a_bad_request() {
        use tokio_tungstenite::tungstenite::error::ProtocolError;
        let (mut client, server) = tokio::io::duplex(1024);
        client
            .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
            .await
            .expect("write");
        let e = tokio_tungstenite::accept_async(server)
            .await
            .expect_err("refused");
        assert!(
            matches!(e, WsError::Protocol(ProtocolError::HttparseError(_))),
            "{e:?}"
        );
        assert_eq!(refusal(&e).map(|r| r.status), Some("400 Bad Request"));
    }

    /// The 426 names the version the server speaks; the body's length is the body's.
    #[test]
    fn refusal_wire_format() {
        let r = refusal(&WsError::Protocol(
            tokio_tungstenite::tungstenite::error::ProtocolError::MissingSecWebSocketVersionHeader,
        ))
        .expect("answered");
        let http = String::from_utf8(r.to_http()).expect("text");
        let (head, body) = http.split_once("\r\n\r\n").expect("head");
        let lines: Vec<&str> = head.split("\r\n").collect();
        assert_eq!(lines[0], "HTTP/1.1 426 Upgrade Required");
        assert!(lines.contains(&"Sec-WebSocket-Version: 13"), "{lines:?}");
        assert!(lines.contains(&"Connection: Upgrade, close"), "{lines:?}");
        assert!(
            lines.contains(&format!("Content-Length: {}", body.len()).as_str()),
            "{lines:?}"
        );
        assert_eq!(body, "Sec-WebSocket-Version must be 13\n");
    }
}
