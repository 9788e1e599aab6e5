//! Bad input at the gateway: each gets an Error packet with a code, the process stays up and other
//! clients are unaffected.

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use zhibo_loadtest::client::{Client, Credentials, Transport};
use zhibo_proto::client::packet::Body;
use zhibo_proto::client::{ErrorCode, Heartbeat, Packet, SendMessageInput, SignInInput};
use zhibo_proto::codec::{PacketCodec, DEFAULT_MAX_FRAME};
use zhibo_proto::ProstMessage as _;

use crate::cluster::Cluster;

/// Generous: only a failing test waits this long, and a cold Cassandra on a fresh CI machine is slow at first.
const WAIT: Duration = Duration::from_secs(15);

fn code(p: &Packet) -> Option<ErrorCode> {
    match &p.body {
        Some(Body::Error(e)) => ErrorCode::try_from(e.code).ok(),
        _ => None,
    }
}

/// Reads every frame the server sends on a raw TCP socket until it closes.
async fn read_until_close(stream: &mut tokio::net::TcpStream) -> Vec<Packet> {
    use tokio_util::codec::Decoder;
    let mut codec = PacketCodec::new(DEFAULT_MAX_FRAME);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    loop {
        let n = tokio::time::timeout(WAIT, stream.read_buf(&mut buf))
            .await
            .expect("server answers or closes in time")
            .unwrap_or(0);
        while let Ok(Some(p)) = codec.decode(&mut buf) {
            out.push(p);
        }
        if n == 0 {
            return out;
        }
    }
}

/// A healthy client keeps working next to the bad ones.
async fn still_serving(cluster: &Cluster, creds: &Credentials) {
    let mut c = cluster.connect(Transport::Tcp, 0, creds).await;
    let p = c
        .request(Body::Heartbeat(Heartbeat {}), WAIT)
        .await
        .expect("heartbeat answered");
    assert!(matches!(p.body, Some(Body::Heartbeat(_))));
}

pub(crate) async fn bad_frames_and_sign_ins(cluster: &Cluster) {
    let good = cluster.user("good").await;
    let tcp = cluster.gw(0).tcp;

    // Garbage bytes first: a huge "length" → FRAME_TOO_LARGE and close.
    let mut s = tokio::net::TcpStream::connect(tcp).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let got = read_until_close(&mut s).await;
    assert_eq!(
        got.first().and_then(code),
        Some(ErrorCode::FrameTooLarge),
        "{got:?}"
    );

    // An oversized length prefix after sign-in.
    let mut s = tokio::net::TcpStream::connect(tcp).await.expect("connect");
    let mut buf = BytesMut::new();
    buf.put_u32((DEFAULT_MAX_FRAME + 1) as u32);
    buf.put_bytes(0, 16);
    s.write_all(&buf).await.expect("write");
    let got = read_until_close(&mut s).await;
    assert_eq!(got.first().and_then(code), Some(ErrorCode::FrameTooLarge));

    // An oversized WebSocket message after sign-in: FRAME_TOO_LARGE naming its size, then the close.
    let mut ws = cluster.connect(Transport::Ws, 0, &good).await;
    let big = Packet::new(
        9,
        Body::SendMessage(SendMessageInput {
            content: vec![0; DEFAULT_MAX_FRAME].into(),
            ..Default::default()
        }),
    );
    let len = big.encoded_len();
    ws.send_packet(big).await.expect("sent");
    let mut got = Vec::new();
    while let Some(p) = ws.recv(WAIT).await.expect("answered, then closed") {
        got.push(p);
    }
    let error = got
        .iter()
        .find_map(|p| match &p.body {
            Some(Body::Error(e)) => Some(e),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no error before the close: {got:?}"));
    assert_eq!(error.code(), ErrorCode::FrameTooLarge, "{error:?}");
    assert!(
        error.message.contains(&format!("frame of {len} bytes")),
        "the error names the message's size ({len}): {error:?}"
    );

    // A well-framed body that is not a packet, before sign-in: BAD_FRAME and close.
    let mut s = tokio::net::TcpStream::connect(tcp).await.expect("connect");
    s.write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff])
        .await
        .expect("write");
    let got = read_until_close(&mut s).await;
    assert_eq!(got.first().and_then(code), Some(ErrorCode::BadFrame));

    // A packet of the wrong type first.
    for t in [Transport::Tcp, Transport::Quic] {
        let mut c = Client::connect_raw(t, &cluster.gw(0).of(t))
            .await
            .expect("connect");
        c.send(Body::Heartbeat(Heartbeat {})).await.expect("send");
        let p = c
            .recv(WAIT)
            .await
            .expect("answer")
            .expect("error before close");
        assert_eq!(code(&p), Some(ErrorCode::NotSignedIn), "{t:?}");
        assert!(
            c.recv(WAIT).await.expect("closed").is_none(),
            "{t:?}: closed after the error"
        );
    }

    // Bad, forged and mismatched tokens, on every transport.
    for t in [Transport::Tcp, Transport::Ws, Transport::Quic] {
        for (user_id, token) in [
            (good.user_id, "not.a.token".to_owned()),
            (good.user_id + 1, good.token.clone()),
            (
                good.user_id,
                zhibo_auth::TokenKey::new("wrong secret").mint(&zhibo_auth::Claims {
                    user_id: good.user_id,
                    device_id: good.device_id,
                    exp: i64::MAX / 2,
                    iat: 0,
                    iat_ms: None,
                }),
            ),
        ] {
            let creds = Credentials {
                user_id,
                device_id: good.device_id,
                token,
            };
            let err = Client::connect(t, &cluster.gw(0).of(t), &creds)
                .await
                .expect_err("refused");
            assert!(err.to_string().contains("Unauthenticated"), "{t:?}: {err}");
        }
    }
    // An expired token.
    let expired = zhibo_auth::TokenKey::new(crate::cluster::SECRET).mint(&zhibo_auth::Claims {
        user_id: good.user_id,
        device_id: good.device_id,
        exp: 1,
        iat: 0,
        iat_ms: None,
    });
    let creds = Credentials {
        user_id: good.user_id,
        device_id: good.device_id,
        token: expired,
    };
    let err = Client::connect(Transport::Tcp, &tcp.to_string(), &creds)
        .await
        .expect_err("expired");
    assert!(err.to_string().contains("TokenExpired"), "{err}");
    // A valid token for an unregistered device.
    let key = zhibo_auth::TokenKey::new(crate::cluster::SECRET);
    let creds = Credentials {
        user_id: good.user_id,
        device_id: 12345,
        token: key.mint(&zhibo_auth::Claims {
            user_id: good.user_id,
            device_id: 12345,
            exp: i64::MAX / 2,
            iat: 0,
            iat_ms: None,
        }),
    };
    let err = Client::connect(Transport::Ws, &cluster.gw(0).of(Transport::Ws), &creds)
        .await
        .expect_err("unknown device");
    assert!(err.to_string().contains("unknown device"), "{err}");
    // A token "issued" in the future (it would outlive any sign-out) is refused.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    let creds = Credentials {
        token: key.mint(&zhibo_auth::Claims {
            user_id: good.user_id,
            device_id: good.device_id,
            exp: now + 7200,
            iat: now + 3600,
            iat_ms: None,
        }),
        ..good.clone()
    };
    let err = Client::connect(Transport::Tcp, &tcp.to_string(), &creds)
        .await
        .expect_err("future iat");
    assert!(err.to_string().contains("not valid yet"), "{err}");
    // A device belongs to its first user (a token minted through the API binds it): another user's
    // token for it is refused by the gateway too.
    cluster
        .api
        .post_admin(
            "/v1/admin/tokens",
            crate::cluster::ADMIN,
            serde_json::json!({"user_id": good.user_id, "device_id": good.device_id}),
        )
        .await
        .expect("mint binds the device");
    let other = cluster.user("other").await;
    let creds = Credentials {
        user_id: other.user_id,
        device_id: good.device_id,
        token: key.mint(&zhibo_auth::Claims {
            user_id: other.user_id,
            device_id: good.device_id,
            exp: now + 600,
            iat: now,
            iat_ms: None,
        }),
    };
    let err = Client::connect(Transport::Tcp, &tcp.to_string(), &creds)
        .await
        .expect_err("another user's device");
    assert!(err.to_string().contains("another user"), "{err}");

    // Signed in: a garbage body gets BAD_FRAME and the session goes on; a server-only packet gets
    // UNEXPECTED_PACKET; a second SignIn too.
    let mut c = Client::connect_raw(Transport::Tcp, &tcp.to_string())
        .await
        .expect("connect");
    c.send_with_id(
        1,
        Body::SignIn(SignInInput {
            user_id: good.user_id,
            device_id: good.device_id,
            token: good.token.clone(),
        }),
    )
    .await
    .expect("sign in");
    assert!(matches!(
        c.recv(WAIT).await.expect("answer").expect("open").body,
        Some(Body::SignInOutput(_))
    ));
    let p = c
        .request(Body::Error(zhibo_proto::client::Error::default()), WAIT)
        .await
        .expect("answer");
    assert_eq!(code(&p), Some(ErrorCode::UnexpectedPacket));
    let p = c
        .request(Body::SignIn(SignInInput::default()), WAIT)
        .await
        .expect("answer");
    assert_eq!(code(&p), Some(ErrorCode::UnexpectedPacket));
    let p = c
        .request(Body::Heartbeat(Heartbeat {}), WAIT)
        .await
        .expect("still open");
    assert!(matches!(p.body, Some(Body::Heartbeat(_))));

    still_serving(cluster, &good).await;
}

pub(crate) async fn flood_is_rate_limited(cluster: &Cluster) {
    let flooder = cluster.user("flooder").await;
    let mut c = cluster.connect(Transport::Tcp, 0, &flooder).await;
    // The test cluster allows a burst of 400: 600 syncs at once must meet RATE_LIMITED.
    for _ in 0..600 {
        c.send(Body::Sync(zhibo_proto::client::SyncInput {
            seq: 0,
            limit: 1,
        }))
        .await
        .expect("send");
    }
    let mut limited = 0;
    let mut answered = 0;
    while let Ok(Some(p)) = c.recv(Duration::from_secs(2)).await {
        match code(&p) {
            Some(ErrorCode::RateLimited) => limited += 1,
            _ => answered += 1,
        }
        if limited + answered == 600 {
            break;
        }
    }
    assert!(limited > 0, "some requests were rate limited");
    assert!(answered >= 400, "the burst was served: {answered}");
    let good = cluster.user("good").await;
    still_serving(cluster, &good).await;
}

/// A connection closed for flooding loses none of its replies: the replies to requests forwarded
/// before the close still come, then the closing error, and the close is a FIN, not a reset (the
/// server reads what it was sent before it closes; a reset would make the client's kernel drop what
/// the client had not read yet).
pub(crate) async fn a_flood_close_delivers_every_reply(cluster: &Cluster) {
    use tokio_util::codec::{Decoder, Encoder};
    let creds = cluster.user("flood-close").await;
    let mut s = tokio::net::TcpStream::connect(cluster.gw(0).tcp)
        .await
        .expect("connect");
    let mut codec = PacketCodec::new(DEFAULT_MAX_FRAME);
    let mut out = BytesMut::new();
    let sign_in = Packet::new(
        1,
        Body::SignIn(SignInInput {
            user_id: creds.user_id,
            device_id: creds.device_id,
            token: creds.token.clone(),
        }),
    );
    codec.encode(&sign_in, &mut out).expect("encode");
    // 300 syncs (within the test cluster's burst of 400: all forwarded), then garbage: a connection
    // is closed after 200 bad frames in a row, so 300 bad frames are still unread when it closes.
    let syncs = 100..400_u64;
    for id in syncs.clone() {
        let sync = Packet::new(
            id,
            Body::Sync(zhibo_proto::client::SyncInput { seq: 0, limit: 1 }),
        );
        codec.encode(&sync, &mut out).expect("encode");
    }
    for _ in 0..500 {
        out.put_u32(4);
        out.put_slice(&[0xff; 4]);
    }
    s.write_all(&out).await.expect("write the flood");
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    loop {
        let n = tokio::time::timeout(WAIT, s.read_buf(&mut buf))
            .await
            .expect("the server answers and closes in time")
            .unwrap_or_else(|e| {
                panic!(
                    "the close was a reset ({e}) after {} packets: replies were lost",
                    got.len()
                )
            });
        while let Some(p) = codec.decode(&mut buf).expect("a valid frame") {
            got.push(p);
        }
        if n == 0 {
            break;
        }
    }
    assert!(
        matches!(
            got.first().map(|p| &p.body),
            Some(Some(Body::SignInOutput(_)))
        ),
        "{:?}",
        got.first()
    );
    let closing = got.iter().any(|p| {
        matches!(&p.body, Some(Body::Error(e))
            if e.code() == ErrorCode::BadFrame && e.message.contains("closing"))
    });
    assert!(closing, "the closing error came");
    // Every sync got its answer, once.
    let mut answered: Vec<u64> = got
        .iter()
        .filter(|p| matches!(p.body, Some(Body::SyncOutput(_))))
        .map(|p| p.request_id)
        .collect();
    answered.sort_unstable();
    assert_eq!(
        answered,
        syncs.collect::<Vec<u64>>(),
        "one answer per sync, none lost"
    );
}

/// A signed-in WebSocket opened by hand (the upgrade written on a raw socket), its 101 read.
async fn raw_ws(cluster: &Cluster, creds: &Credentials) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(cluster.gw(0).ws)
        .await
        .expect("connect");
    let request = format!(
        "GET /ws?user_id={}&device_id={}&token={} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n",
        creds.user_id, creds.device_id, creds.token
    );
    s.write_all(request.as_bytes()).await.expect("upgrade");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let b = tokio::time::timeout(WAIT, s.read_u8())
            .await
            .expect("upgrade answered in time")
            .expect("upgrade answer");
        head.push(b);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s
}

/// The server's next WebSocket frame (opcode, payload), or `None` once it closes the socket.
async fn ws_frame(s: &mut tokio::net::TcpStream) -> Option<(u8, Vec<u8>)> {
    let b0 = tokio::time::timeout(WAIT, s.read_u8())
        .await
        .expect("in time")
        .ok()?;
    let b1 = s.read_u8().await.expect("frame length");
    let len = match b1 & 0x7f {
        126 => u64::from(s.read_u16().await.expect("length")),
        127 => s.read_u64().await.expect("length"),
        n => u64::from(n),
    };
    let mut payload = vec![0; usize::try_from(len).expect("length")];
    s.read_exact(&mut payload).await.expect("payload");
    Some((b0 & 0x0f, payload))
}

/// The server's WebSocket frames (opcode, payload) until it closes the socket.
async fn ws_frames_until_close(s: &mut tokio::net::TcpStream) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while let Some(frame) = ws_frame(s).await {
        out.push(frame);
    }
    out
}

/// Writes `request` on a new connection to the WebSocket port and reads the answer until the server
/// closes: (status line, header lines, body). A reset instead of a close fails: it can drop the answer.
async fn http_answer(cluster: &Cluster, request: &[u8]) -> (String, Vec<String>, String) {
    let mut s = tokio::net::TcpStream::connect(cluster.gw(0).ws)
        .await
        .expect("connect");
    s.write_all(request).await.expect("request");
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut answer))
        .await
        .expect("answered and closed in time")
        .expect("closed, not reset");
    let answer = String::from_utf8(answer).expect("a text answer");
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head: {answer:?}"));
    let mut lines = head.split("\r\n").map(str::to_owned);
    let status = lines.next().unwrap_or_default();
    (status, lines.collect(), body.to_owned())
}

/// A malformed WebSocket upgrade gets an HTTP error saying what is wrong, then the close (RFC 6455
/// §4.2.1, §4.2.2); a valid upgrade next to them still gets its 101 and signs in.
pub(crate) async fn malformed_websocket_upgrades_get_an_http_error(cluster: &Cluster) {
    let good = cluster.user("wsupgrade").await;
    let upgrade = |method: &str, version: &str, drop: &str, extra: &str| {
        let headers = [
            "Host: x",
            "Upgrade: websocket",
            "Connection: Upgrade",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version: 13",
        ];
        let mut r = format!(
            "{method} /ws?user_id={}&device_id={}&token={} {version}\r\n",
            good.user_id, good.device_id, good.token
        );
        for h in headers
            .iter()
            .filter(|h| drop.is_empty() || !h.starts_with(drop))
        {
            r.push_str(h);
            r.push_str("\r\n");
        }
        r.push_str(extra);
        r.push_str("\r\n");
        r.into_bytes()
    };
    let http11 = "HTTP/1.1";
    // (case, request, status line, a word the body holds)
    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        (
            "no Sec-WebSocket-Key",
            upgrade("GET", http11, "Sec-WebSocket-Key", ""),
            "HTTP/1.1 400 Bad Request",
            "Sec-WebSocket-Key",
        ),
        (
            "Sec-WebSocket-Version 8",
            upgrade(
                "GET",
                http11,
                "Sec-WebSocket-Version",
                "Sec-WebSocket-Version: 8\r\n",
            ),
            "HTTP/1.1 426 Upgrade Required",
            "13",
        ),
        (
            "no Sec-WebSocket-Version",
            upgrade("GET", http11, "Sec-WebSocket-Version", ""),
            "HTTP/1.1 426 Upgrade Required",
            "13",
        ),
        (
            // With a body the server never reads: it still closes with a FIN, not a reset.
            "POST",
            [
                upgrade("POST", http11, "", "Content-Length: 4096\r\n"),
                vec![b'x'; 4096],
            ]
            .concat(),
            "HTTP/1.1 405 Method Not Allowed",
            "GET",
        ),
        (
            "a plain GET",
            b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n".to_vec(),
            "HTTP/1.1 400 Bad Request",
            "Connection: Upgrade",
        ),
        (
            "Upgrade: h2c",
            upgrade("GET", http11, "Upgrade", "Upgrade: h2c\r\n"),
            "HTTP/1.1 400 Bad Request",
            "Upgrade: websocket",
        ),
        (
            "HTTP/1.0",
            upgrade("GET", "HTTP/1.0", "", ""),
            "HTTP/1.1 400 Bad Request",
            "HTTP/1.1",
        ),
        (
            "a TLS ClientHello (wss:// on the ws port)",
            vec![
                0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
            ],
            "HTTP/1.1 400 Bad Request",
            "HTTP",
        ),
        (
            "text that is not HTTP",
            b"hello there\r\n\r\n".to_vec(),
            "HTTP/1.1 400 Bad Request",
            "HTTP",
        ),
    ];
    for (case, request, want, word) in cases {
        let (status, headers, body) = http_answer(cluster, &request).await;
        assert_eq!(status, want, "{case}: {headers:?} {body:?}");
        assert!(
            body.contains(word),
            "{case}: the body says what is wrong: {body:?}"
        );
        assert!(
            headers
                .iter()
                .any(|h| h == "Content-Type: text/plain; charset=utf-8")
                && headers
                    .iter()
                    .any(|h| h.starts_with("Connection: ") && h.ends_with("close")),
            "{case}: {headers:?}"
        );
        if want.contains("426") {
            assert!(
                headers.iter().any(|h| h == "Sec-WebSocket-Version: 13"),
                "{case}: the version the server speaks: {headers:?}"
            );
        }
        if want.contains("405") {
            assert!(
                headers.iter().any(|h| h == "Allow: GET"),
                "{case}: {headers:?}"
            );
        }
    }

    // The refusals the handshake's callback already made still come as they did.
    let elsewhere = String::from_utf8(upgrade("GET", http11, "", ""))
        .expect("text")
        .replacen("GET /ws?", "GET /other?", 1);
    let (status, _, _) = http_answer(cluster, elsewhere.as_bytes()).await;
    assert_eq!(status, "HTTP/1.1 404 Not Found");

    // A valid upgrade still gets its 101, then the sign-in's answer in a binary frame.
    let mut s = raw_ws(cluster, &good).await;
    let (op, payload) = ws_frame(&mut s).await.expect("a frame after the 101");
    assert_eq!(op, 2, "binary");
    let p = Packet::decode(&payload[..]).expect("a packet");
    assert!(matches!(p.body, Some(Body::SignInOutput(_))), "{p:?}");
    still_serving(cluster, &good).await;
}

/// WebSocket protocol violations after sign-in: each is said (`Error{BAD_FRAME}` in a binary frame)
/// before the server closes, as every close is.
pub(crate) async fn websocket_protocol_errors_are_said_before_the_close(cluster: &Cluster) {
    let good = cluster.user("wsbad").await;
    // Masked client frames as a client must send them, except where the case breaks the protocol.
    let masked = |b0: u8, payload: &[u8]| {
        let mut f = vec![b0, 0x80 | u8::try_from(payload.len()).expect("short")];
        f.extend_from_slice(&[1, 2, 3, 4]);
        f.extend(
            payload
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ [1, 2, 3, 4][i % 4]),
        );
        f
    };
    let cases: [(&str, Vec<u8>); 4] = [
        ("unmasked binary frame", vec![0x82, 0x02, 0x08, 0x01]),
        ("reserved bit", masked(0xc2, &[0x08, 0x01])),
        ("text frame of invalid UTF-8", masked(0x81, &[0xff, 0xfe])),
        ("reserved opcode", masked(0x83, &[0x00])),
    ];
    for (case, bytes) in cases {
        let mut s = raw_ws(cluster, &good).await;
        s.write_all(&bytes).await.expect("write");
        let frames = ws_frames_until_close(&mut s).await;
        let said = frames.iter().find_map(|(op, payload)| {
            (*op == 2)
                .then(|| Packet::decode(&payload[..]).ok())
                .flatten()
                .filter(|p| code(p) == Some(ErrorCode::BadFrame))
        });
        assert!(
            said.is_some(),
            "{case}: no BAD_FRAME before the close: {frames:?}"
        );
    }
    still_serving(cluster, &good).await;
}

mod embedded {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn malformed_websocket_upgrades_get_an_http_error() {
        let cluster = crate::cluster::Cluster::embedded().await;
        super::malformed_websocket_upgrades_get_an_http_error(&cluster).await;
        cluster.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn websocket_protocol_errors_are_said_before_the_close() {
        let cluster = crate::cluster::Cluster::embedded().await;
        super::websocket_protocol_errors_are_said_before_the_close(&cluster).await;
        cluster.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_frames_and_sign_ins() {
        let cluster = crate::cluster::Cluster::embedded().await;
        super::bad_frames_and_sign_ins(&cluster).await;
        cluster.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn flood_is_rate_limited() {
        let cluster = crate::cluster::Cluster::embedded().await;
        super::flood_is_rate_limited(&cluster).await;
        cluster.stop().await;
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flood_close_delivers_every_reply() {
        let cluster = crate::cluster::Cluster::embedded().await;
        super::a_flood_close_delivers_every_reply(&cluster).await;
        cluster.stop().await;
    }
}

mod distributed {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_frames_and_sign_ins() {
        let cluster = crate::cluster::Cluster::distributed().await;
        super::bad_frames_and_sign_ins(&cluster).await;
        cluster.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flood_close_delivers_every_reply() {
        let cluster = crate::cluster::Cluster::distributed().await;
        super::a_flood_close_delivers_every_reply(&cluster).await;
        cluster.stop().await;
    }
}
