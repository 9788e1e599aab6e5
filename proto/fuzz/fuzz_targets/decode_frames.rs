//! Feeds arbitrary bytes to the frame decoder, in arbitrary chunks: it must never panic, and every packet
//! it returns must re-encode and decode to itself.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::{Decoder, Encoder};
use zhibo_proto::codec::PacketCodec;

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, rest)) = data.split_first() else { return };
    let chunk = usize::from(chunk.max(1));
    let mut codec = PacketCodec::new(4096);
    let mut buf = BytesMut::new();
    for piece in rest.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(packet)) => {
                    let mut out = BytesMut::new();
                    codec.encode(&packet, &mut out).expect("a decoded packet re-encodes");
                    let again = codec.decode(&mut out).expect("re-decode").expect("complete");
                    assert_eq!(again, packet);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
