//! Room frames written straight to a viewer's socket by the room that made them.
//!
//! # Why
//! A room frame is encoded once and shared by every viewer. Through a queue, each viewer's copy then
//! costs a wake-up of the viewer's connection task, a turn of its `select!`, and the write layers of its
//! sink: about half of a room frame's server CPU per viewer (docs/BENCHMARKS.md §4). With [`Direct`],
//! the room writes the frame into each viewer's socket itself, one non-blocking `writev` (length
//! prefix or WebSocket header, then the shared bytes) per viewer, and the connection task is not woken.
//!
//! # How
//! A room's flush (under the room's lock, no I/O) *owes* each viewer its frame ([`Direct::try_send`]);
//! once the lock is let go, [`write_owed`] writes the owed bytes, [`WRITE_CHUNK`] viewers per task.
//! Every byte written to the socket passes one lock per connection, so frames never interleave:
//! - the connection's codecs read and write the socket through [`DirectIo`]; a codec write marks the
//!   socket *mid-frame* (`dirty`), a codec flush marks a frame boundary again (a codec flushes its inner
//!   writer only with its own buffer empty: `FramedWrite`, and tungstenite's `flush`, which its
//!   control replies use too);
//! - owed bytes are written only at a boundary, and before any later codec byte (a codec write at a
//!   boundary writes them first). What the socket does not take (a full send buffer), or what is owed
//!   mid-frame, is left owed and the connection is told ([`Direct::poll_owed`]): it flushes its sink,
//!   which writes them, waiting for the socket like any write (bounded like any write).
//!
//! A viewer holds at most `cap` room frames owed, like the room queue it replaces: one more is refused
//! (the room counts it dropped, and sheds chat before that, see `RoomState::flush`).
//!
//! A QUIC connection's [`Direct`] holds its send stream instead of a socket ([`Direct::quic`]): owed
//! bytes are handed to quinn's stream buffer (the shared body without a copy), which quinn's
//! connection driver encrypts and sends; a stream that takes no more (flow control) leaves them
//! owed, as a full socket does. Its codecs read the receive stream apart.

use std::collections::VecDeque;
use std::future::Future as _;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll, Waker};

use bytes::{Buf as _, Bytes};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// How a room frame is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// TCP: a u32 big-endian length, then the body (`FrameEncoder`).
    Length,
    /// WebSocket: one unmasked binary message (server to client).
    WebSocket,
}

impl Framing {
    /// The header of a frame of `len` body bytes, written into `buf`; returns its length.
    fn header(self, len: usize, buf: &mut [u8; 10]) -> usize {
        match self {
            Framing::Length => {
                let len = u32::try_from(len).unwrap_or(u32::MAX);
                buf[..4].copy_from_slice(&len.to_be_bytes());
                4
            }
            Framing::WebSocket => {
                buf[0] = 0x82; // FIN, binary
                if len < 126 {
                    buf[1] = len as u8;
                    2
                } else if let Ok(short) = u16::try_from(len) {
                    buf[1] = 126;
                    buf[2..4].copy_from_slice(&short.to_be_bytes());
                    4
                } else {
                    buf[1] = 127;
                    buf[2..10].copy_from_slice(&(len as u64).to_be_bytes());
                    10
                }
            }
        }
    }
}

/// What a [`Direct`] writes to.
enum Socket {
    /// A TCP connection (the TCP and WebSocket transports); its codecs read it through [`DirectIo`].
    Tcp(TcpStream),
    /// A QUIC connection's send stream. Written only under the [`Direct`]'s state lock, so its own
    /// lock (quinn's writes take `&mut`) is never contended.
    Quic(Mutex<quinn::SendStream>),
}

/// A connection's socket, shared by its codecs ([`DirectIo`]) and the rooms it watches.
pub struct Direct {
    io: Socket,
    framing: Framing,
    max_frame: usize,
    cap: usize,
    state: Mutex<State>,
    frames_out: Counter,
}

/// A piece of owed bytes: a frame header (inline: no allocation per viewer) or a shared body.
enum Piece {
    Head { buf: [u8; 10], at: u8, end: u8 },
    Body(Bytes),
}

impl Piece {
    fn bytes(&self) -> &[u8] {
        match self {
            Piece::Head { buf, at, end } => &buf[usize::from(*at)..usize::from(*end)],
            Piece::Body(b) => b,
        }
    }

    /// Drops the first `n` bytes (fewer than it has).
    fn advance(&mut self, n: usize) {
        match self {
            Piece::Head { at, .. } => *at += n as u8,
            Piece::Body(b) => b.advance(n),
        }
    }
}

#[derive(Default)]
struct State {
    /// Room bytes owed to the socket before any other byte, in order; `true` ends a frame.
    pending: VecDeque<(Piece, bool)>,
    /// Room frames in `pending` (whole or in part).
    frames: usize,
    /// The codec side wrote since its last flush: the socket may be in the middle of its frame.
    dirty: bool,
    /// The connection ended: rooms write nothing more.
    closed: bool,
    /// Bytes were owed since the connection last looked ([`Direct::poll_owed`]), and its task's waker.
    /// A flag and a waker rather than a `Notify`: the wait is part of every idle connection's future,
    /// which this keeps to one pointer.
    told: bool,
    waker: Option<Waker>,
    /// The connection task's waker, from its last write or wait (kept, unlike `waker`). A room's
    /// write to a QUIC stream registers it with quinn: a refused write replaces the waker quinn
    /// wakes when the stream takes more, which may be the connection's own, blocked in a write.
    task: Option<Waker>,
}

impl std::fmt::Debug for Direct {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Direct")
            .field("framing", &self.framing)
            .field("cap", &self.cap)
            .finish_non_exhaustive()
    }
}

/// Owed pieces a drained connection keeps room for (two per frame).
const KEEP_PIECES: usize = 8;

/// At most this many owed pieces per `writev`.
const WRITEV_MAX: usize = 64;

/// Viewers written by one task after a room's flush (see [`write_owed`]).
pub const WRITE_CHUNK: usize = 256;

/// `mutex` locked. A thread that panicked holding it left nothing half-done worth refusing: the owed
/// pieces and the stream are consistent between calls, so a poisoned lock is taken as it is.
fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Direct {
    /// Takes `io`; at most `cap` room frames owed; room frames over `max_frame` bytes are refused;
    /// every room frame taken counts in `frames_out`.
    pub fn new(
        io: TcpStream,
        framing: Framing,
        max_frame: usize,
        cap: usize,
        frames_out: Counter,
    ) -> Arc<Direct> {
        Self::build(Socket::Tcp(io), framing, max_frame, cap, frames_out)
    }

    /// Like [`Direct::new`], for a QUIC connection's send stream (length-prefixed frames, as TCP).
    pub fn quic(
        send: quinn::SendStream,
        max_frame: usize,
        cap: usize,
        frames_out: Counter,
    ) -> Arc<Direct> {
        Self::build(
            Socket::Quic(Mutex::new(send)),
            Framing::Length,
            max_frame,
            cap,
            frames_out,
        )
    }

    fn build(
        io: Socket,
        framing: Framing,
        max_frame: usize,
        cap: usize,
        frames_out: Counter,
    ) -> Arc<Direct> {
        Arc::new(Direct {
            io,
            framing,
            max_frame,
            cap: cap.max(1),
            state: Mutex::new(State::default()),
            frames_out,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        locked(&self.state)
    }

    /// Owes room frame `body` to the socket (no I/O: a room's flush calls this for every viewer while
    /// it holds the room; [`write_owed`] writes afterwards). Refused (given back) when `cap` frames are
    /// owed already, the frame is over `max_frame`, or the connection ended.
    pub fn try_send(&self, body: Bytes) -> Result<(), Bytes> {
        if body.len() > self.max_frame {
            return Err(body);
        }
        let mut buf = [0u8; 10];
        let end = self.framing.header(body.len(), &mut buf) as u8;
        let mut st = self.lock();
        if st.closed || st.frames >= self.cap {
            return Err(body);
        }
        st.pending
            .push_back((Piece::Head { buf, at: 0, end }, false));
        st.pending.push_back((Piece::Body(body), true));
        st.frames += 1;
        drop(st);
        self.frames_out.inc();
        Ok(())
    }

    /// Writes what is owed now, without waiting, if the socket is at a frame boundary. What the
    /// socket does not take (or all of it, mid-frame) is left to the connection, which is told.
    pub fn write_now(&self) {
        let mut st = self.lock();
        if st.pending.is_empty() {
            return;
        }
        if !st.dirty {
            // Else it would block, or failed (which the connection's next write finds too). The
            // connection, told, waits for the socket; a QUIC stream wakes it (see `State::task`).
            let task = st.task.take();
            let mut cx = Context::from_waker(task.as_ref().unwrap_or(Waker::noop()));
            let written = self.write_some(&mut st, &mut cx);
            st.task = task;
            if let Ok(true) = written {
                return;
            }
        }
        st.told = true;
        let waker = st.waker.take();
        drop(st);
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Room frames that can still be owed before one is refused.
    pub fn capacity(&self) -> usize {
        self.cap.saturating_sub(self.lock().frames)
    }

    /// The most room frames ever owed.
    pub fn max_capacity(&self) -> usize {
        self.cap
    }

    /// Ready when room bytes were left owed since the last time it was (the connection then flushes
    /// its sink, which writes them).
    pub fn poll_owed(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut st = self.lock();
        if std::mem::take(&mut st.told) {
            return Poll::Ready(());
        }
        if !st.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            st.waker = Some(cx.waker().clone());
        }
        st.remember(cx);
        Poll::Pending
    }

    /// The connection ended: nothing more is written or owed.
    pub fn close(&self) {
        let mut st = self.lock();
        st.closed = true;
        st.pending = VecDeque::new();
        st.frames = 0;
        st.waker = None;
    }

    /// Reads and drops what the client still sends until it closes its side, for at most `time` and
    /// `max` bytes. Closing a TCP socket with unread input makes the kernel answer with a reset, and
    /// a reset makes the client's side drop what it has not read yet: the last replies and the
    /// error that says why the connection closed. QUIC has no such reset: nothing to do.
    pub async fn linger(&self, time: std::time::Duration, max: usize) {
        let Socket::Tcp(tcp) = &self.io else { return };
        let drain = async {
            let mut buf = vec![0; 4096];
            let mut read = 0;
            while read < max {
                if tcp.readable().await.is_err() {
                    return;
                }
                match tcp.try_read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => read += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(_) => return,
                }
            }
        };
        let _ = tokio::time::timeout(time, drain).await;
    }

    /// Writes owed bytes until none are left (`true`) or the socket takes no more (`false`; for QUIC,
    /// `cx` is woken when the stream takes more).
    fn write_some(&self, st: &mut State, cx: &mut Context<'_>) -> io::Result<bool> {
        while !st.pending.is_empty() {
            let n = match &self.io {
                Socket::Tcp(tcp) => {
                    let bufs: Vec<IoSlice<'_>> = st
                        .pending
                        .iter()
                        .take(WRITEV_MAX)
                        .map(|(p, _)| IoSlice::new(p.bytes()))
                        .collect();
                    match tcp.try_write_vectored(&bufs) {
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                        Err(e) => return Err(e),
                    }
                }
                Socket::Quic(send) => {
                    // Shared bodies go in without a copy; a header is copied (a few bytes).
                    let mut chunks: Vec<Bytes> = st
                        .pending
                        .iter()
                        .take(WRITEV_MAX)
                        .map(|(p, _)| match p {
                            Piece::Body(b) => b.clone(),
                            Piece::Head { .. } => Bytes::copy_from_slice(p.bytes()),
                        })
                        .collect();
                    let mut send = locked(send);
                    let polled = std::pin::pin!(send.write_chunks(&mut chunks)).poll(cx);
                    match polled {
                        Poll::Ready(Ok(written)) => written.bytes,
                        Poll::Ready(Err(e)) => return Err(e.into()),
                        Poll::Pending => return Ok(false),
                    }
                }
            };
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            st.consume(n);
        }
        // A burst (a slow reader catching up) does not keep its memory: thousands of viewers each
        // holding room for `cap` frames would add up.
        if st.pending.capacity() > KEEP_PIECES {
            st.pending.shrink_to(KEEP_PIECES);
        }
        Ok(true)
    }

    /// Writes what is owed, in order, waiting for the socket; ready once nothing is.
    fn drain(&self, st: &mut State, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if self.write_some(st, cx)? {
                return Poll::Ready(Ok(()));
            }
            match &self.io {
                Socket::Tcp(tcp) => ready!(tcp.poll_write_ready(cx))?,
                // quinn registered `cx` when the stream refused more.
                Socket::Quic(_) => return Poll::Pending,
            }
        }
    }

    /// A codec's write of `buf`, after what is owed (see [`DirectIo`]); `_held`: the state lock.
    fn poll_write_codec(
        &self,
        _held: &mut State,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &self.io {
            Socket::Tcp(tcp) => loop {
                ready!(tcp.poll_write_ready(cx))?;
                match tcp.try_write(buf) {
                    Ok(n) => return Poll::Ready(Ok(n)),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Poll::Ready(Err(e)),
                }
            },
            Socket::Quic(send) => {
                let mut send = locked(send);
                Pin::new(&mut *send)
                    .poll_write(cx, buf)
                    .map_err(io::Error::from)
            }
        }
    }
}

impl State {
    /// Keeps the connection task's waker (see `task`).
    fn remember(&mut self, cx: &Context<'_>) {
        if !self.task.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            self.task = Some(cx.waker().clone());
        }
    }

    /// Drops the first `n` owed bytes (written), counting the frames they end.
    fn consume(&mut self, mut n: usize) {
        while n > 0 {
            let Some((piece, _)) = self.pending.front_mut() else {
                break;
            };
            let len = piece.bytes().len();
            if n < len {
                piece.advance(n);
                break;
            }
            n -= len;
            if let Some((_, true)) = self.pending.pop_front() {
                self.frames -= 1;
            }
        }
    }
}

/// The viewers a room's flush owed frames to, to write once the room is let go ([`write_owed`]).
#[derive(Debug, Default, Clone)]
pub struct Owed(pub Vec<Arc<Direct>>);

impl PartialEq for Owed {
    fn eq(&self, other: &Self) -> bool {
        self.0.len() == other.0.len() && self.0.iter().zip(&other.0).all(|(a, b)| Arc::ptr_eq(a, b))
    }
}

impl Eq for Owed {}

/// Writes what `viewers` are owed after a room's flush, [`WRITE_CHUNK`] viewers per task: the room
/// (and its lock) is not held while thousands of sockets are written, and the runtime's threads share
/// the work. The last chunk (the only one, up to `WRITE_CHUNK` viewers) is written by the caller.
pub fn write_owed(mut viewers: Vec<Arc<Direct>>) {
    let write = |chunk: &[Arc<Direct>]| chunk.iter().for_each(|d| d.write_now());
    while viewers.len() > WRITE_CHUNK {
        let chunk = viewers.split_off(viewers.len() - WRITE_CHUNK);
        tokio::spawn(async move { write(&chunk) });
    }
    write(&viewers);
}

/// The socket of a [`Direct`] as the connection's codecs read and write it.
#[derive(Debug, Clone)]
pub struct DirectIo(pub Arc<Direct>);

impl AsyncRead for DirectIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let Socket::Tcp(io) = &self.0.io else {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a QUIC connection reads its receive stream",
            )));
        };
        loop {
            ready!(io.poll_read_ready(cx))?;
            match io.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for DirectIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let d = &self.0;
        let mut st = d.lock();
        st.remember(cx);
        if !st.dirty {
            // At a frame boundary: what rooms are owed goes first.
            ready!(d.drain(&mut st, cx))?;
        }
        let n = ready!(d.poll_write_codec(&mut st, cx, buf))?;
        st.dirty |= n > 0;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let d = &self.0;
        let mut st = d.lock();
        st.remember(cx);
        // A codec flushes its writer only with its own buffer empty: a frame boundary.
        st.dirty = false;
        d.drain(&mut st, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // What is owed goes out before the end, like a flush.
        ready!(self.as_mut().poll_flush(cx))?;
        let d = &self.0;
        d.lock().closed = true;
        match &d.io {
            Socket::Tcp(tcp) => {
                Poll::Ready(socket2::SockRef::from(tcp).shutdown(std::net::Shutdown::Write))
            }
            Socket::Quic(send) => {
                let mut send = locked(send);
                // Finished already (a second shutdown) is not an error.
                let _ = send.finish();
                Poll::Ready(Ok(()))
            }
        }
    }
}

/// Where a room sends a viewer its frames: its connection's [`Direct`], or (unit tests of the I/O-free
/// room code) a queue the test reads.
#[derive(Debug, Clone)]
pub enum RoomSink {
    /// Written to the socket by the room (TCP, WebSocket, QUIC).
    Direct(Arc<Direct>),
    /// Frames a test reads.
    #[cfg(test)]
    Queue(tokio::sync::mpsc::Sender<Bytes>),
}

impl RoomSink {
    /// Sends a frame; given back when the viewer cannot take it (full, or gone).
    pub fn try_send(&self, frame: Bytes) -> Result<(), Bytes> {
        match self {
            RoomSink::Direct(d) => d.try_send(frame),
            #[cfg(test)]
            RoomSink::Queue(tx) => tx.try_send(frame).map_err(|e| match e {
                tokio::sync::mpsc::error::TrySendError::Full(f)
                | tokio::sync::mpsc::error::TrySendError::Closed(f) => f,
            }),
        }
    }

    /// Frames it can still take.
    pub fn capacity(&self) -> usize {
        match self {
            RoomSink::Direct(d) => d.capacity(),
            #[cfg(test)]
            RoomSink::Queue(tx) => tx.capacity(),
        }
    }

    /// The socket it writes to, if it writes directly.
    pub fn direct(&self) -> Option<&Arc<Direct>> {
        match self {
            RoomSink::Direct(d) => Some(d),
            #[cfg(test)]
            RoomSink::Queue(_) => None,
        }
    }

    /// Frames it can take when empty.
    pub fn max_capacity(&self) -> usize {
        match self {
            RoomSink::Direct(d) => d.max_capacity(),
            #[cfg(test)]
            RoomSink::Queue(tx) => tx.max_capacity(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{SinkExt as _, StreamExt as _};
    use tokio::io::AsyncReadExt as _;
    use zhibo_proto::codec::PacketDecoder;

    async fn pair(framing: Framing, cap: usize) -> (Arc<Direct>, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        (
            Direct::new(server, framing, 1 << 20, cap, Counter::default()),
            client,
        )
    }

    fn body(i: u32, len: usize) -> Bytes {
        let mut b = vec![(i % 251) as u8; len];
        b[..4].copy_from_slice(&i.to_be_bytes());
        Bytes::from(b)
    }

    /// Writes `b` as the connection's codec does (`by_codec`) or as a room does.
    async fn write_one<W>(d: &Direct, codec: &mut W, b: Bytes, by_codec: bool)
    where
        W: futures::Sink<crate::frame::Frame> + Unpin,
        W::Error: std::fmt::Debug,
    {
        if by_codec {
            codec
                .send(crate::frame::Frame::Encoded(b))
                .await
                .expect("codec write");
        } else {
            d.try_send(b).expect("taken");
            d.write_now();
        }
    }

    /// Length-framed bodies as the client reads them.
    async fn read_frames(client: &mut TcpStream, n: usize) -> Vec<Bytes> {
        let mut out = Vec::new();
        for _ in 0..n {
            let len = client.read_u32().await.expect("len") as usize;
            let mut b = vec![0u8; len];
            client.read_exact(&mut b).await.expect("body");
            out.push(Bytes::from(b));
        }
        out
    }

    /// Room frames and codec frames interleave whole and in order, also when the socket fills up
    /// (frames owed, written later by the codec side or a flush) and codec writes come in between.
    #[tokio::test]
    async fn frames_stay_whole_and_ordered_through_a_full_socket() {
        let (d, mut client) = pair(Framing::Length, 1_000).await;
        let mut codec = crate::frame::lean_writer(DirectIo(d.clone()), 1 << 20);
        let (go, start) = tokio::sync::oneshot::channel::<()>();
        let reader = tokio::spawn(async move {
            start.await.expect("go");
            read_frames(&mut client, 40).await
        });
        // 256 KiB room frames and nobody reading: the loopback socket fills, later frames are owed.
        let mut want = Vec::new();
        let mut i = 0u32;
        while d.capacity() == d.max_capacity() {
            assert!(i < 200, "the socket never filled");
            let b = body(i, 256 * 1024);
            d.try_send(b.clone()).expect("taken");
            d.write_now();
            want.push(b);
            i += 1;
        }
        let filled = i;
        go.send(()).expect("reader");
        // Then codec frames (every fifth) between room frames while the reader drains.
        for i in filled..40 {
            let b = body(i, 256 * 1024);
            write_one(&d, &mut codec, b.clone(), i % 5 == 4).await;
            want.push(b);
        }
        // What is still owed goes out with the connection's flush (what `poll_owed` asks it to do).
        codec.flush().await.expect("flush");
        let got = reader.await.expect("reader");
        assert_eq!(got.len(), want.len());
        assert!(got == want, "every frame whole, in order");
        assert_eq!(d.capacity(), d.max_capacity(), "nothing owed");
    }

    /// QUIC: room frames handed to the send stream and codec frames interleave whole and in order,
    /// also while the stream is blocked (the client's small receive window, nobody reading): room
    /// frames stay owed, and a room's write refused while the connection is itself blocked in a
    /// write does not leave that write without a wake-up.
    #[tokio::test]
    async fn quic_frames_stay_whole_and_ordered_through_a_blocked_stream() {
        let mut transport = quinn::TransportConfig::default();
        transport
            .stream_receive_window(quinn::VarInt::from_u32(16 * 1024))
            .receive_window(quinn::VarInt::from_u32(32 * 1024));
        let crate::quic::testing::Pair {
            server_send,
            mut client_recv,
            ..
        } = crate::quic::testing::pair(transport).await;
        let d = Direct::quic(server_send, 1 << 20, 64, Counter::default());
        let wait = std::time::Duration::from_secs(10);
        // 4 KiB room frames: after 16 KiB the stream takes no more and frames stay owed.
        let mut want = Vec::new();
        let mut i = 0u32;
        while d.capacity() == d.max_capacity() {
            assert!(i < 20, "the stream never blocked");
            let b = body(i, 4096);
            d.try_send(b.clone()).expect("taken");
            d.write_now();
            want.push(b);
            i += 1;
        }
        // The connection writes a frame: it waits behind the owed ones (its waker with quinn) …
        let codec_frame = body(50, 3000);
        let mut codec = crate::frame::lean_writer(DirectIo(d.clone()), 1 << 20);
        let sent = codec_frame.clone();
        let blocked = tokio::spawn(async move {
            codec
                .send(crate::frame::Frame::Encoded(sent))
                .await
                .expect("codec write");
            codec
        });
        tokio::time::timeout(wait, async {
            while d.lock().task.is_none() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the codec write started");
        // … then a room's write is refused by the same blocked stream (owed before the codec frame).
        let room_frame = body(51, 4096);
        d.try_send(room_frame.clone()).expect("taken");
        d.write_now();
        want.push(room_frame);
        want.push(codec_frame);
        let n = want.len() + 10;
        let reader = tokio::spawn(async move {
            let mut out = Vec::new();
            for _ in 0..n {
                let mut len = [0u8; 4];
                client_recv.read_exact(&mut len).await.expect("len");
                let mut b = vec![0u8; u32::from_be_bytes(len) as usize];
                client_recv.read_exact(&mut b).await.expect("body");
                out.push(Bytes::from(b));
            }
            out
        });
        // The reader opens the window: quinn wakes the blocked codec write.
        let mut codec = tokio::time::timeout(wait, blocked)
            .await
            .expect("the blocked codec write is woken")
            .expect("codec task");
        // Then room and codec frames alternate while the reader reads.
        let writes = async {
            for i in 100..110u32 {
                let b = body(i, 3000);
                write_one(&d, &mut codec, b.clone(), i % 2 == 0).await;
                want.push(b);
            }
            codec.flush().await.expect("flush");
        };
        tokio::time::timeout(wait, writes)
            .await
            .expect("the writes end");
        let got = tokio::time::timeout(wait, reader)
            .await
            .expect("in time")
            .expect("reader");
        assert_eq!(got.len(), want.len());
        assert!(got == want, "every frame whole, in order");
        assert_eq!(d.capacity(), d.max_capacity(), "nothing owed");
    }

    /// After a flush, every viewer owed a frame gets it, also past one task's chunk.
    #[tokio::test]
    async fn write_owed_reaches_every_viewer() {
        let mut viewers = Vec::new();
        let mut clients = Vec::new();
        for _ in 0..WRITE_CHUNK + 44 {
            let (d, c) = pair(Framing::Length, 4).await;
            viewers.push(d);
            clients.push(c);
        }
        let frame = body(7, 100);
        for d in &viewers {
            d.try_send(frame.clone()).expect("taken");
        }
        write_owed(viewers.clone());
        for c in &mut clients {
            assert_eq!(read_frames(c, 1).await, vec![frame.clone()]);
        }
        for d in &viewers {
            assert_eq!(d.capacity(), d.max_capacity(), "nothing left owed");
        }
    }

    /// A full viewer refuses frames (the room counts them dropped); draining makes room again.
    #[tokio::test]
    async fn refuses_past_cap_and_after_close() {
        let (d, mut client) = pair(Framing::Length, 32).await;
        let mut taken = 0;
        let mut refused = 0;
        for i in 0..200u32 {
            match d.try_send(body(i, 64 * 1024)) {
                Ok(()) => taken += 1,
                Err(_) => refused += 1,
            }
            d.write_now();
        }
        assert!(
            refused > 0,
            "a stalled reader fills the socket, then the cap"
        );
        assert_eq!(d.capacity(), 0);
        let mut codec = crate::frame::lean_writer(DirectIo(d.clone()), 1 << 20);
        let reader = tokio::spawn(async move { read_frames(&mut client, taken).await });
        codec.flush().await.expect("flush");
        let got = reader.await.expect("reader");
        assert_eq!(got.len(), taken);
        for (i, b) in got.iter().enumerate() {
            assert_eq!(&b[..4], &(i as u32).to_be_bytes(), "in order, none lost");
        }
        assert_eq!(d.capacity(), 32);
        assert!(
            d.lock().pending.capacity() <= KEEP_PIECES,
            "the burst's memory is given back"
        );
        d.close();
        assert!(d.try_send(body(0, 10)).is_err(), "closed");
    }

    /// WebSocket framing: a client reads the room frames as binary messages of every header size,
    /// mixed with messages tungstenite writes on the same socket.
    #[tokio::test]
    async fn websocket_frames_read_as_binary_messages() {
        use tokio_tungstenite::tungstenite::protocol::Role;
        use tokio_tungstenite::tungstenite::Message;
        let (d, client) = pair(Framing::WebSocket, 1_000).await;
        let mut server = tokio_tungstenite::WebSocketStream::from_raw_socket(
            DirectIo(d.clone()),
            Role::Server,
            None,
        )
        .await;
        let mut client =
            tokio_tungstenite::WebSocketStream::from_raw_socket(client, Role::Client, None).await;
        let sizes = [5usize, 125, 126, 1000, 65_535, 65_536, 200_000];
        let mut want = Vec::new();
        for (i, len) in sizes.into_iter().enumerate() {
            let b = body(i as u32, len);
            d.try_send(b.clone()).expect("taken");
            if i % 2 == 0 {
                d.write_now();
            }
            want.push(b);
            let m = body(100 + i as u32, 10);
            server.send(Message::Binary(m.clone())).await.expect("send");
            want.push(m);
        }
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            while got.len() < 14 {
                match client.next().await.expect("open").expect("message") {
                    Message::Binary(b) => got.push(b),
                    other => panic!("unexpected {other:?}"),
                }
            }
            got
        });
        server.flush().await.expect("flush");
        assert_eq!(reader.await.expect("reader"), want);
    }

    /// The owed frames of a TCP viewer decode with the gateway's own packet decoder.
    #[tokio::test]
    async fn length_framing_matches_the_packet_decoder() {
        use zhibo_proto::client::packet::Body;
        use zhibo_proto::client::{Packet, RoomMessages};
        let (d, client) = pair(Framing::Length, 16).await;
        let p = Packet::new(
            0,
            Body::RoomMessages(RoomMessages {
                room_id: 7,
                online_count: 3,
                ..RoomMessages::default()
            }),
        );
        d.try_send(zhibo_proto::codec::encode_body(&p))
            .expect("taken");
        d.write_now();
        let mut reader = tokio_util::codec::FramedRead::new(client, PacketDecoder::new(1024))
            .map(PacketDecoder::flatten);
        let got = reader.next().await.expect("frame").expect("packet");
        assert_eq!(got, p);
    }
}
