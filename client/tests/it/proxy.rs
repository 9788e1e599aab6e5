//! A TCP proxy in front of a gateway that understands frames, to cut the network under a client: close
//! every connection (a network cut), swallow what the server sends (a reply lost on the way), drop the
//! next pushed messages (a gap in pushed seqs), and log what the client sent.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use futures::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use zhibo_client::proto::client::packet::Body;
use zhibo_client::proto::client::Packet;
use zhibo_client::proto::codec::{PacketCodec, DEFAULT_MAX_FRAME};

#[derive(Default)]
struct State {
    /// Cancels every live connection.
    cut: CancellationToken,
    /// Server → client packets are swallowed.
    mute: bool,
    /// Server → client `Message` pushes to swallow.
    drop_pushes: usize,
    /// Packets clients sent, in order.
    sent: Vec<Packet>,
}

#[derive(Clone)]
pub(crate) struct Proxy {
    pub(crate) addr: SocketAddr,
    state: Arc<Mutex<State>>,
}

impl Proxy {
    /// Listens on a free port and forwards every connection to `upstream`.
    pub(crate) async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(State::default()));
        let proxy = Proxy { addr, state };
        let p = proxy.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let p = p.clone();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(upstream).await {
                        p.pipe(client, server).await;
                    }
                });
            }
        });
        proxy
    }

    async fn pipe(&self, client: TcpStream, server: TcpStream) {
        let cut = self.state.lock().expect("lock").cut.clone();
        let (cr, cw) = client.into_split();
        let (sr, sw) = server.into_split();
        let mut from_client = FramedRead::new(cr, PacketCodec::new(DEFAULT_MAX_FRAME));
        let mut to_server = FramedWrite::new(sw, PacketCodec::new(DEFAULT_MAX_FRAME));
        let mut from_server = FramedRead::new(sr, PacketCodec::new(DEFAULT_MAX_FRAME));
        let mut to_client = FramedWrite::new(cw, PacketCodec::new(DEFAULT_MAX_FRAME));
        let up = async {
            while let Some(Ok(p)) = from_client.next().await {
                self.state.lock().expect("lock").sent.push(p.clone());
                if to_server.send(p).await.is_err() {
                    break;
                }
            }
        };
        let down = async {
            while let Some(Ok(p)) = from_server.next().await {
                let pass = {
                    let mut s = self.state.lock().expect("lock");
                    // A cut connection passes nothing more, even before the select below sees the cut:
                    // `cut` also unmutes, and a packet muted until then must not slip through.
                    if s.mute || cut.is_cancelled() {
                        false
                    } else if s.drop_pushes > 0 && matches!(p.body, Some(Body::Message(_))) {
                        s.drop_pushes -= 1;
                        false
                    } else {
                        true
                    }
                };
                if pass && to_client.send(p).await.is_err() {
                    break;
                }
            }
        };
        tokio::select! {
            _ = up => {}
            _ = down => {}
            _ = cut.cancelled() => {}
        }
    }

    /// Closes every live connection (new ones are accepted again) and unmutes.
    pub(crate) fn cut(&self) {
        let mut s = self.state.lock().expect("lock");
        s.cut.cancel();
        s.cut = CancellationToken::new();
        s.mute = false;
    }

    /// Swallows everything the server sends from now on (until [`Proxy::cut`]).
    pub(crate) fn mute(&self) {
        self.state.lock().expect("lock").mute = true;
    }

    /// Swallows the next `n` pushed messages.
    pub(crate) fn drop_pushes(&self, n: usize) {
        self.state.lock().expect("lock").drop_pushes = n;
    }

    /// The packets clients sent so far matching `f`.
    pub(crate) fn sent(&self, f: impl Fn(&Packet) -> bool) -> Vec<Packet> {
        self.state
            .lock()
            .expect("lock")
            .sent
            .iter()
            .filter(|p| f(p))
            .cloned()
            .collect()
    }
}
