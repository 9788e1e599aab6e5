//! Operations: `/metrics` is scraped and its counters move; `/readyz` and `/healthz` answer.
//! (The trace test is the separate `trace` test binary: see `tests/trace.rs`.)

use std::time::Duration;

use bytes::Bytes;
use zhibo_loadtest::client::{Client, Transport};
use zhibo_proto::client::packet::Body;
use zhibo_proto::client::{ReceiverType, SendMessageInput};

use crate::cluster::{eventually, Cluster};

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn send(to: i64, id: &str) -> Body {
    Body::SendMessage(SendMessageInput {
        receiver_type: ReceiverType::User as i32,
        receiver_id: to,
        client_msg_id: id.into(),
        content_type: 1,
        content: Bytes::from_static(b"observed"),
        ..Default::default()
    })
}

/// Scrapes until `name` reads `want` (gauges move asynchronously; the room gauge is exported every 2 s),
/// failing the test after 10 s.
async fn settle(http: &reqwest::Client, ops: std::net::SocketAddr, name: &str, want: f64) {
    eventually(
        &format!("{name} reads {want}"),
        Duration::from_secs(10),
        || {
            let scrape = http.get(format!("http://{ops}/metrics")).send();
            async move {
                let text = scrape.await.expect("scrape").text().await.expect("text");
                (metric(&text, name) == want).then_some(())
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_scraped_and_move() {
    let cluster = Cluster::embedded().await;
    let ops = cluster.ops_addr.expect("ops endpoint");
    let http = reqwest::Client::new();
    let get = |path: &str| http.get(format!("http://{ops}{path}")).send();
    assert_eq!(get("/healthz").await.expect("healthz").status(), 200);
    // Readiness follows a real store probe: wait for the first one.
    eventually(
        "ready once the bus and the store answer",
        Duration::from_secs(10),
        || {
            let probe = get("/readyz");
            async move { (probe.await.expect("readyz").status() == 200).then_some(()) }
        },
    )
    .await;
    let before = get("/metrics")
        .await
        .expect("scrape")
        .text()
        .await
        .expect("text");

    let alice = cluster.user("alice").await;
    let bob = cluster.user("bob").await;
    cluster.befriend(&alice, &bob).await;
    let mut a = cluster.connect(Transport::Ws, 0, &alice).await;
    let mut b = cluster.connect(Transport::Tcp, 0, &bob).await;
    // Two refused sign-ins: a wrong token, and a token of another device.
    for token in ["not-a-token".to_owned(), bob.token.clone()] {
        let wrong = zhibo_loadtest::client::Credentials {
            token,
            ..alice.clone()
        };
        Client::connect(Transport::Tcp, &cluster.gw(0).of(Transport::Tcp), &wrong)
            .await
            .expect_err("refused");
    }
    for i in 0..5 {
        let reply = a
            .request(send(bob.user_id, &format!("m{i}")), Duration::from_secs(5))
            .await
            .expect("ack");
        assert!(matches!(reply.body, Some(Body::SendMessageOutput(_))));
        let _ = b.recv(Duration::from_secs(5)).await.expect("delivered");
    }
    let after = get("/metrics")
        .await
        .expect("scrape")
        .text()
        .await
        .expect("text");
    let moved = |name: &str| metric(&after, name) - metric(&before, name);
    assert_eq!(moved("zhibo_messages_sent_total"), 5.0, "{after}");
    assert!(moved("zhibo_messages_delivered_total") >= 5.0, "{after}");
    assert_eq!(
        moved(r#"zhibo_sign_ins_total{transport="ws"}"#),
        1.0,
        "{after}"
    );
    assert_eq!(
        moved(r#"zhibo_sign_ins_total{transport="tcp"}"#),
        1.0,
        "{after}"
    );
    assert_eq!(
        moved(r#"zhibo_sign_in_failures_total{kind="ERROR_CODE_UNAUTHENTICATED"}"#),
        2.0,
        "{after}"
    );
    assert_eq!(
        metric(&after, r#"zhibo_connections{transport="tcp"}"#),
        1.0,
        "{after}"
    );
    assert!(moved("zhibo_frames_in_total") >= 5.0, "{after}");
    assert!(moved("zhibo_frames_out_total") >= 10.0, "{after}");
    assert_eq!(moved("zhibo_send_ack_seconds_count"), 5.0, "{after}");
    // Each new message times its four stages.
    for stage in ["authorize", "allocate", "store", "deliver"] {
        assert_eq!(
            moved(&format!(
                r#"zhibo_send_stage_seconds_count{{kind="{stage}"}}"#
            )),
            5.0,
            "{stage}: {after}"
        );
    }
    // A room viewer shows in the gauge (exported every 2 s).
    let joined = a
        .request(
            Body::SubscribeRoom(zhibo_proto::client::SubscribeRoomInput { room_id: 42 }),
            Duration::from_secs(5),
        )
        .await
        .expect("join");
    assert!(
        matches!(joined.body, Some(Body::SubscribeRoomOutput(_))),
        "{joined:?}"
    );
    // The room viewer is counted.
    settle(&http, ops, "zhibo_room_viewers", 1.0).await;
    drop(b);
    // Disconnects are counted too.
    // The tcp connection gauge returns to 0.
    settle(&http, ops, r#"zhibo_connections{transport="tcp"}"#, 0.0).await;
    cluster.stop().await;
}
