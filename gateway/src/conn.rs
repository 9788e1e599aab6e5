//! The connection driver: runs one [`Session`] over any transport given as a packet stream and sink.
//! TCP, QUIC and WebSocket differ only in how they build that stream and sink (see `tcp`, `quic`, `ws`).

use std::fmt::Display;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::{Sink, SinkExt, Stream, StreamExt};
use prost::Message as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use zhibo_auth::TokenKey;
use zhibo_bus::Subject;
use zhibo_proto::bus::{Command, Origin};
use zhibo_proto::client::packet::Body;
use zhibo_proto::client::{ErrorCode, GoAway, Packet};
use zhibo_proto::codec::CodecError;
use zhibo_store::DeviceStore;

use crate::hub::{ConnHandle, Hub, Outbound};
use crate::session::{Action, Phase, Session, SessionConfig};

/// Everything a connection needs, shared by all connections of a gateway.
pub struct Shared {
    /// Registry and bus.
    pub hub: Arc<Hub>,
    /// Session limits.
    pub session: Arc<SessionConfig>,
    /// Token key.
    pub key: Arc<TokenKey>,
    /// Device records, for token revocation.
    pub devices: Arc<dyn DeviceStore>,
    /// Outbound queue length per connection.
    pub outbound_queue: usize,
    /// Cancelled when the gateway drains.
    pub shutdown: CancellationToken,
    /// Where clients should reconnect when this gateway drains (may be empty).
    pub reconnect_hint: String,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("hub", &self.hub).finish()
    }
}

/// Most packets written before one flush.
const WRITE_BATCH: usize = 64;

/// Runs a connection until it closes. `first` is a packet the transport already has (the WebSocket
/// sign-in built from the URL).
pub async fn drive<R, W>(shared: Arc<Shared>, mut reader: R, mut writer: W, first: Option<Packet>)
where
    R: Stream<Item = Result<Packet, CodecError>> + Unpin + Send,
    W: Sink<Packet> + Unpin + Send,
    W::Error: Display,
{
    let conn_id = shared.hub.next_conn_id();
    let (tx, mut rx) = mpsc::channel(shared.outbound_queue);
    let overflow = CancellationToken::new();
    let mut session = Session::new(shared.session.clone(), shared.key.clone(), Instant::now());
    let mut registered = false;
    let mut pending = first.map(|p| session.on_packet(p, Instant::now()));
    'conn: loop {
        let actions = match pending.take() {
            Some(a) => a,
            None => tokio::select! {
                biased;
                _ = shared.shutdown.cancelled() => {
                    let bye = Packet::new(0, Body::GoAway(GoAway {
                        reason: "gateway draining".into(),
                        reconnect_hint: shared.reconnect_hint.clone(),
                        reconnect_after_ms: 100,
                    }));
                    let _ = writer.send(bye).await;
                    break 'conn;
                }
                _ = overflow.cancelled() => {
                    let _ = writer.send(Packet::error(0, ErrorCode::Unavailable,
                        "connection too slow: outbound queue full; reconnect and sync")).await;
                    break 'conn;
                }
                out = rx.recv() => {
                    let mut out = out;
                    let mut n = 0;
                    while let Some(o) = out.take() {
                        match o {
                            Outbound::Packet(p) => {
                                if let Err(e) = writer.feed(p).await {
                                    debug!(error = %e, "write failed");
                                    break 'conn;
                                }
                            }
                            Outbound::Close(p) => {
                                let _ = writer.send(p).await;
                                break 'conn;
                            }
                        }
                        n += 1;
                        if n < WRITE_BATCH {
                            out = rx.try_recv().ok();
                        }
                    }
                    if let Err(e) = writer.flush().await {
                        debug!(error = %e, "flush failed");
                        break 'conn;
                    }
                    continue 'conn;
                }
                frame = reader.next() => match frame {
                    None => break 'conn,
                    Some(Ok(p)) => session.on_packet(p, Instant::now()),
                    Some(Err(CodecError::Io(e))) => {
                        debug!(error = %e, "read failed");
                        break 'conn;
                    }
                    Some(Err(e)) => {
                        warn!(error = %e, "bad frame");
                        session.on_bad_frame(&e)
                    }
                },
                _ = tokio::time::sleep_until(session.deadline().into()) => session.on_tick(Instant::now()),
            },
        };
        for action in actions {
            match action {
                Action::Send(p) => {
                    if writer.send(p).await.is_err() {
                        break 'conn;
                    }
                }
                Action::Close(reason) => {
                    info!(?reason, "closing connection");
                    break 'conn;
                }
                Action::Authenticate { request_id, claims } => {
                    let result = authenticate(&shared, conn_id, &claims, &tx, &overflow).await;
                    registered = result.is_ok();
                    if let Ok((user_id, device_id)) = result {
                        tracing::Span::current().record("user_id", user_id);
                        tracing::Span::current().record("device_id", device_id);
                    }
                    pending = Some(session.on_signed_in(request_id, result, Instant::now()));
                    continue 'conn;
                }
                Action::Forward(packet) => {
                    let Phase::Active { user_id, device_id } = session.phase() else {
                        continue;
                    };
                    let rid = packet.request_id;
                    let cmd = Command {
                        origin: Some(Origin {
                            user_id,
                            device_id,
                            gateway_id: shared.hub.gateway_id().to_owned(),
                            conn_id,
                        }),
                        packet: Some(packet),
                    };
                    let published = shared
                        .hub
                        .bus()
                        .publish(
                            &Subject::commands(),
                            Vec::new(),
                            Bytes::from(cmd.encode_to_vec()),
                        )
                        .await;
                    if let Err(e) = published {
                        warn!(error = %e, "cannot publish command");
                        let err = Packet::error(rid, ErrorCode::Unavailable, "try again later");
                        if writer.send(err).await.is_err() {
                            break 'conn;
                        }
                    }
                }
                Action::JoinRoom { request_id, .. } => {
                    let err = Packet::error(
                        request_id,
                        ErrorCode::Unavailable,
                        "live rooms are not available in this version",
                    );
                    if writer.send(err).await.is_err() {
                        break 'conn;
                    }
                }
                Action::LeaveRoom { .. } => {}
            }
        }
    }
    if registered {
        shared.hub.unregister(conn_id);
    }
    let _ = writer.close().await;
}

async fn authenticate(
    shared: &Arc<Shared>,
    conn_id: u64,
    claims: &zhibo_auth::Claims,
    tx: &mpsc::Sender<Outbound>,
    overflow: &CancellationToken,
) -> Result<(i64, i64), (ErrorCode, String)> {
    let device = shared
        .devices
        .get_device(claims.device_id)
        .await
        .map_err(|e| {
            warn!(error = %e, "device lookup failed");
            (ErrorCode::Unavailable, "try again later".to_owned())
        })?
        .ok_or((ErrorCode::Unauthenticated, "unknown device".to_owned()))?;
    if claims.issued_at_ms() < device.tokens_valid_after_ms {
        return Err((
            ErrorCode::Unauthenticated,
            "token revoked; sign in again".to_owned(),
        ));
    }
    let handle = ConnHandle {
        user_id: claims.user_id,
        device_id: claims.device_id,
        tx: tx.clone(),
        overflow: overflow.clone(),
    };
    shared.hub.register(conn_id, handle).await.map_err(|e| {
        warn!(error = %e, "cannot register connection on the bus");
        (ErrorCode::Unavailable, "try again later".to_owned())
    })?;
    Ok((claims.user_id, claims.device_id))
}
