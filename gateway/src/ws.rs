//! WebSocket transport: `/ws?user_id=&device_id=&token=`, one binary message = one protobuf packet.
//! The sign-in comes from the URL and is fed to the session as its first packet.

use std::sync::Arc;

use futures::{future, SinkExt, StreamExt};
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
                    debug!(error = %e, "websocket handshake failed");
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
}
