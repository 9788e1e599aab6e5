//! The TCP/QUIC frame codec: `tokio_util`'s [`LengthDelimitedCodec`] (u32 big-endian length prefix, with a
//! maximum frame length) under prost. No hand-written length parsing.
//!
//! A frame whose length exceeds the maximum yields [`CodecError::FrameTooLarge`] before any of its body is
//! buffered; bytes that are not a valid [`Packet`] yield [`CodecError::Decode`]. Neither panics.
//!
//! A stream reader (tokio-util's `FramedRead`) ends after its decoder's first error. That is right for an
//! oversized length (the stream is out of sync) but not for a complete frame that is not a Packet: its
//! length was valid, so the next frame starts right after it. A server reading a stream uses
//! [`PacketDecoder`], which yields such a frame as an item (`Err(CodecError::Decode)`) and goes on.

use bytes::{Bytes, BytesMut};
use prost::Message;
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};

use crate::client::Packet;

/// Default maximum frame size: 64 KiB is plenty for chat and keeps a hostile length cheap.
pub const DEFAULT_MAX_FRAME: usize = 64 * 1024;

/// Why a frame could not be decoded or encoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The length prefix announced more than the configured maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    FrameTooLarge {
        /// Announced length, when known.
        len: usize,
        /// Configured maximum.
        max: usize,
    },
    /// The transport's own framing was broken (e.g. a WebSocket protocol violation: an unmasked
    /// client frame, reserved bits, invalid UTF-8 in a text frame): the stream cannot go on.
    #[error("broken framing: {0}")]
    Framing(String),
    /// The frame body is not a valid protobuf Packet.
    #[error("frame is not a valid packet: {0}")]
    Decode(#[from] prost::DecodeError),
    /// The underlying transport failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// Length-prefixed prost codec for [`Packet`]s, usable with `FramedRead`/`FramedWrite`.
#[derive(Debug)]
pub struct PacketCodec {
    inner: LengthDelimitedCodec,
    max: usize,
}

impl PacketCodec {
    /// A codec refusing frames larger than `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        let inner = LengthDelimitedCodec::builder()
            .length_field_type::<u32>()
            .max_frame_length(max_frame)
            .new_codec();
        PacketCodec {
            inner,
            max: max_frame,
        }
    }

    /// The configured maximum frame size.
    pub fn max_frame(&self) -> usize {
        self.max
    }
}

impl Default for PacketCodec {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FRAME)
    }
}

/// Decodes one packet from a complete frame body (e.g. a WebSocket binary message).
///
/// # Errors
/// [`CodecError::FrameTooLarge`] when `body` exceeds `max`, [`CodecError::Decode`] when it is not a Packet.
pub fn decode_body(body: &[u8], max: usize) -> Result<Packet, CodecError> {
    if body.len() > max {
        return Err(CodecError::FrameTooLarge {
            len: body.len(),
            max,
        });
    }
    Ok(Packet::decode(body)?)
}

/// Encodes one packet as a frame body without the length prefix (e.g. for a WebSocket binary message).
pub fn encode_body(packet: &Packet) -> Bytes {
    Bytes::from(packet.encode_to_vec())
}

fn too_large(src: &BytesMut, max: usize) -> CodecError {
    let len = src
        .get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .unwrap_or(0);
    CodecError::FrameTooLarge { len, max }
}

impl Decoder for PacketCodec {
    type Item = Packet;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Packet>, CodecError> {
        match self.inner.decode(src) {
            Ok(Some(frame)) => Ok(Some(Packet::decode(frame.freeze())?)),
            Ok(None) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => Err(too_large(src, self.max)),
            Err(e) => Err(CodecError::Io(e)),
        }
    }
}

/// [`PacketCodec`]'s decoding for a server reading a stream: each complete frame is one item, `Ok` with
/// its packet or `Err(CodecError::Decode)` when its body is not a Packet, and the stream goes on after
/// it. Only framing errors ([`CodecError::FrameTooLarge`], [`CodecError::Io`]) are errors of the stream,
/// which ends after them.
#[derive(Debug, Default)]
pub struct PacketDecoder(PacketCodec);

impl PacketDecoder {
    /// A decoder refusing frames larger than `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        PacketDecoder(PacketCodec::new(max_frame))
    }

    /// Flattens one item of a `FramedRead<_, PacketDecoder>` stream: a bad frame and a stream error alike
    /// become `Err` (use as `stream.map(PacketDecoder::flatten)`).
    ///
    /// # Errors
    /// The frame's decode error, or the stream's error.
    pub fn flatten(
        item: Result<Result<Packet, CodecError>, CodecError>,
    ) -> Result<Packet, CodecError> {
        item.and_then(|frame| frame)
    }
}

impl Decoder for PacketDecoder {
    type Item = Result<Packet, CodecError>;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, CodecError> {
        match self.0.inner.decode(src) {
            Ok(Some(frame)) => Ok(Some(
                Packet::decode(frame.freeze()).map_err(CodecError::from),
            )),
            Ok(None) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                Err(too_large(src, self.0.max))
            }
            Err(e) => Err(CodecError::Io(e)),
        }
    }
}

impl Encoder<&Packet> for PacketCodec {
    type Error = CodecError;

    fn encode(&mut self, packet: &Packet, dst: &mut BytesMut) -> Result<(), CodecError> {
        let len = packet.encoded_len();
        if len > self.max {
            return Err(CodecError::FrameTooLarge { len, max: self.max });
        }
        dst.reserve(4 + len);
        dst.extend_from_slice(&(len as u32).to_be_bytes());
        packet
            .encode(dst)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(())
    }
}

impl Encoder<Packet> for PacketCodec {
    type Error = CodecError;

    fn encode(&mut self, packet: Packet, dst: &mut BytesMut) -> Result<(), CodecError> {
        self.encode(&packet, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::packet::Body;
    use crate::client::*;
    use bytes::BufMut;

    /// One packet of every kind, with non-default fields so a wrong decode shows.
    fn every_packet() -> Vec<Packet> {
        let msg = crate::client::Message {
            message_id: 42,
            seq: 7,
            sender_user_id: 1,
            sender_device_id: 2,
            receiver_type: ReceiverType::Group as i32,
            receiver_id: 3,
            client_msg_id: "c-1".into(),
            server_time_ms: 1_700_000_000_000,
            content_type: 1,
            content: Bytes::from_static("你好 zhibo".as_bytes()),
            conv_seq: 0,
        };
        let bodies = vec![
            Body::SignIn(SignInInput {
                user_id: 1,
                device_id: 2,
                token: "t".into(),
            }),
            Body::SignInOutput(SignInOutput {
                user_id: 1,
                device_id: 2,
                heartbeat_interval_ms: 30_000,
            }),
            Body::Sync(SyncInput { seq: 5, limit: 100 }),
            Body::SyncOutput(SyncOutput {
                messages: vec![msg.clone(), msg.clone()],
                has_more: true,
            }),
            Body::Heartbeat(Heartbeat {}),
            Body::Message(msg.clone()),
            Body::MessageAck(MessageAck { seq: 7 }),
            Body::SendMessage(SendMessageInput {
                receiver_type: ReceiverType::User as i32,
                receiver_id: 9,
                client_msg_id: "c-2".into(),
                content_type: 1,
                content: Bytes::from_static(b"hi"),
                ..Default::default()
            }),
            Body::SendMessageOutput(SendMessageOutput {
                message_id: 42,
                seq: 8,
                server_time_ms: 5,
                duplicate: true,
                content_replaced: true,
                content: Bytes::from_static(b"h*"),
                conv_seq: 3,
            }),
            Body::SubscribeRoom(SubscribeRoomInput { room_id: 11 }),
            Body::SubscribeRoomOutput(SubscribeRoomOutput {
                room_id: 11,
                online_count: 3,
                recent: vec![msg.clone()],
                pinned: Some(Box::new(msg.clone())),
            }),
            Body::UnsubscribeRoom(UnsubscribeRoomInput { room_id: 11 }),
            Body::RoomKicked(crate::client::RoomKicked {
                room_id: 11,
                code: crate::client::ErrorCode::RoomBanned as i32,
                text: "banned".into(),
            }),
            Body::RoomMessages(RoomMessages {
                room_id: 11,
                messages: vec![msg],
                online_count: 3,
                likes: 4,
                chat_skipped: 5,
            }),
            Body::Kick(Kick {
                reason: KickReason::SignedInElsewhere as i32,
                text: "elsewhere".into(),
            }),
            Body::GoAway(GoAway {
                reason: "drain".into(),
                reconnect_hint: "127.0.0.1:7001".into(),
                reconnect_after_ms: 100,
            }),
            Body::Error(Error {
                code: ErrorCode::RateLimited as i32,
                message: "slow down".into(),
                hook_code: 0,
            }),
            Body::Error(Error {
                code: ErrorCode::HookRejected as i32,
                message: "no links".into(),
                hook_code: 4001,
            }),
        ];
        bodies
            .into_iter()
            .enumerate()
            .map(|(i, b)| Packet::new(i as u64 + 1, b))
            .collect()
    }

    fn encode_all(packets: &[Packet]) -> BytesMut {
        let mut codec = PacketCodec::default();
        let mut buf = BytesMut::new();
        for p in packets {
            codec.encode(p, &mut buf).expect("encode");
        }
        buf
    }

    #[test]
    fn every_packet_split_at_every_byte_boundary() {
        let mut codec = PacketCodec::default();
        for packet in every_packet() {
            let wire = encode_all(std::slice::from_ref(&packet));
            for split in 0..=wire.len() {
                let mut buf = BytesMut::from(&wire[..split]);
                let first = codec
                    .decode(&mut buf)
                    .expect("partial frame is not an error");
                if split < wire.len() {
                    assert!(
                        first.is_none(),
                        "decoded from {split} of {} bytes",
                        wire.len()
                    );
                    buf.extend_from_slice(&wire[split..]);
                    let got = codec.decode(&mut buf).expect("decode").expect("complete");
                    assert_eq!(got, packet, "split at {split}");
                } else {
                    assert_eq!(first.expect("complete"), packet);
                }
                assert!(buf.is_empty());
            }
        }
    }

    #[test]
    fn glued_packets_in_one_read_and_byte_by_byte() {
        let packets = every_packet();
        let wire = encode_all(&packets);
        // All glued in one read.
        let mut codec = PacketCodec::default();
        let mut buf = wire.clone();
        let mut got = Vec::new();
        while let Some(p) = codec.decode(&mut buf).expect("decode") {
            got.push(p);
        }
        assert_eq!(got, packets);
        // Byte by byte: frames straddle every read boundary.
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in wire.iter() {
            buf.put_u8(*b);
            while let Some(p) = codec.decode(&mut buf).expect("decode") {
                got.push(p);
            }
        }
        assert_eq!(got, packets);
    }

    #[test]
    fn oversized_length_is_refused_before_buffering() {
        let mut codec = PacketCodec::new(1024);
        let mut buf = BytesMut::new();
        buf.put_u32(1025);
        buf.put_slice(&[0; 8]);
        match codec.decode(&mut buf) {
            Err(CodecError::FrameTooLarge { len, max }) => {
                assert_eq!((len, max), (1025, 1024));
            }
            other => panic!("expected FrameTooLarge, got {other:?}"),
        }
        // A hostile 4 GiB announcement is refused the same way.
        let mut buf = BytesMut::new();
        buf.put_u32(u32::MAX);
        assert!(matches!(
            PacketCodec::new(1024).decode(&mut buf),
            Err(CodecError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn oversized_packet_is_refused_on_encode() {
        let mut codec = PacketCodec::new(16);
        let p = Packet::error(1, ErrorCode::Internal, "x".repeat(64));
        assert!(matches!(
            codec.encode(&p, &mut BytesMut::new()),
            Err(CodecError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn garbage_bytes_give_a_decode_error_not_a_panic() {
        let mut codec = PacketCodec::default();
        // A well-formed frame holding bytes that are no protobuf: field 0 / bad wire type.
        let mut buf = BytesMut::new();
        buf.put_u32(4);
        buf.put_slice(&[0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(codec.decode(&mut buf), Err(CodecError::Decode(_))));
        // A truncated nested message.
        let mut buf = BytesMut::new();
        buf.put_u32(3);
        buf.put_slice(&[0x52, 0x10, 0x08]);
        assert!(matches!(codec.decode(&mut buf), Err(CodecError::Decode(_))));
        // Pseudo-random garbage never panics, whatever it decodes to.
        let mut x: u32 = 0x9e37_79b9;
        for _ in 0..2_000 {
            let mut buf = BytesMut::new();
            let len = (x % 64) as usize;
            buf.put_u32(len as u32);
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                buf.put_u8(x as u8);
            }
            let _ = PacketCodec::default().decode(&mut buf);
        }
    }

    /// A stream of frames where one complete frame is garbage: the stream yields it as a bad item and
    /// the packets after it, and ends only on an oversized length.
    #[tokio::test]
    async fn a_bad_frame_does_not_end_the_stream_an_oversized_length_does() {
        use futures::StreamExt;
        let packets = every_packet();
        let mut wire = BytesMut::new();
        let mut codec = PacketCodec::default();
        codec.encode(&packets[0], &mut wire).expect("encode");
        wire.put_u32(4);
        wire.put_slice(&[0xff, 0xff, 0xff, 0xff]);
        codec.encode(&packets[1], &mut wire).expect("encode");
        wire.put_u32(u32::MAX);
        wire.put_slice(&[0; 16]);
        let reader = tokio_util::codec::FramedRead::new(&wire[..], PacketDecoder::default());
        let got: Vec<_> = reader.map(PacketDecoder::flatten).collect().await;
        assert_eq!(got.len(), 4, "{got:?}");
        assert_eq!(got[0].as_ref().expect("first"), &packets[0]);
        assert!(matches!(got[1], Err(CodecError::Decode(_))), "{got:?}");
        assert_eq!(got[2].as_ref().expect("after the bad frame"), &packets[1]);
        assert!(matches!(got[3], Err(CodecError::FrameTooLarge { .. })));
        // The plain codec under FramedRead ends at the bad frame: why the gateway uses PacketDecoder.
        let reader = tokio_util::codec::FramedRead::new(&wire[..], PacketCodec::default());
        let got: Vec<_> = reader.collect().await;
        assert_eq!(got.len(), 2, "{got:?}");
    }

    #[test]
    fn websocket_bodies_share_the_limit() {
        let p = Packet::new(3, Body::Heartbeat(Heartbeat {}));
        let body = encode_body(&p);
        assert_eq!(decode_body(&body, 64).expect("decode"), p);
        assert!(matches!(
            decode_body(&[0u8; 65], 64),
            Err(CodecError::FrameTooLarge { len: 65, max: 64 })
        ));
        assert!(matches!(
            decode_body(&[0xff, 0xff], 64),
            Err(CodecError::Decode(_))
        ));
    }
}
