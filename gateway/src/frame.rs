//! What a connection writes: a [`Packet`], or a packet already encoded once and shared by many
//! connections (a room's batch of messages, see `hub`). The TCP/QUIC encoder frames both with the same
//! `LengthDelimitedCodec` settings as [`PacketCodec`]; WebSocket sends either as one binary message.

use bytes::{Bytes, BytesMut};
use tokio_util::codec::{Encoder, LengthDelimitedCodec};
use zhibo_proto::client::Packet;
use zhibo_proto::codec::{CodecError, PacketCodec};

/// One outbound frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// A packet, encoded by the transport.
    Packet(Packet),
    /// The prost encoding of a packet (no length prefix), shared: cloning it copies no bytes.
    Encoded(Bytes),
}

/// A frame writer whose buffer starts empty: tokio-util preallocates 8 KiB per writer, which an idle
/// connection would pay for nothing; the buffer grows on the first write instead.
pub(crate) fn lean_writer<W: tokio::io::AsyncWrite>(
    io: W,
    max_frame: usize,
) -> tokio_util::codec::FramedWrite<W, FrameEncoder> {
    let mut writer = tokio_util::codec::FramedWrite::new(io, FrameEncoder::new(max_frame));
    *writer.write_buffer_mut() = bytes::BytesMut::new();
    writer
}

impl From<Packet> for Frame {
    fn from(p: Packet) -> Self {
        Frame::Packet(p)
    }
}

impl From<Bytes> for Frame {
    fn from(b: Bytes) -> Self {
        Frame::Encoded(b)
    }
}

impl Frame {
    /// The frame's body as WebSocket carries it (one binary message).
    pub fn into_body(self) -> Bytes {
        match self {
            Frame::Packet(p) => zhibo_proto::codec::encode_body(&p),
            Frame::Encoded(b) => b,
        }
    }
}

/// Encodes [`Frame`]s for TCP and QUIC: u32 big-endian length, then the body.
#[derive(Debug)]
pub struct FrameEncoder {
    packets: PacketCodec,
    encoded: LengthDelimitedCodec,
    max: usize,
}

impl FrameEncoder {
    /// An encoder refusing frames over `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        FrameEncoder {
            packets: PacketCodec::new(max_frame),
            encoded: LengthDelimitedCodec::builder()
                .length_field_type::<u32>()
                .max_frame_length(max_frame)
                .new_codec(),
            max: max_frame,
        }
    }
}

impl Encoder<Frame> for FrameEncoder {
    type Error = CodecError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        match frame {
            Frame::Packet(p) => self.packets.encode(p, dst),
            Frame::Encoded(b) if b.len() > self.max => Err(CodecError::FrameTooLarge {
                len: b.len(),
                max: self.max,
            }),
            Frame::Encoded(b) => self.encoded.encode(b, dst).map_err(CodecError::Io),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_util::codec::Decoder;
    use zhibo_proto::client::packet::Body;
    use zhibo_proto::client::RoomMessages;

    #[test]
    fn encoded_and_packet_frames_decode_alike() {
        let p = Packet::new(
            0,
            Body::RoomMessages(RoomMessages {
                room_id: 3,
                messages: vec![],
                online_count: 9,
                ..RoomMessages::default()
            }),
        );
        let mut enc = FrameEncoder::new(1024);
        let mut buf = BytesMut::new();
        enc.encode(Frame::Packet(p.clone()), &mut buf)
            .expect("packet");
        enc.encode(Frame::Packet(p.clone()).into_body().into(), &mut buf)
            .expect("encoded");
        let mut dec = PacketCodec::new(1024);
        assert_eq!(dec.decode(&mut buf).expect("1"), Some(p.clone()));
        assert_eq!(dec.decode(&mut buf).expect("2"), Some(p));
        assert!(buf.is_empty());
        let big = Frame::Encoded(Bytes::from(vec![0u8; 2048]));
        assert!(matches!(
            enc.encode(big, &mut buf),
            Err(CodecError::FrameTooLarge { .. })
        ));
    }
}
