//! One trace follows a message from gateway receive through NATS, the logic worker, seq allocation, the
//! store write and the delivery publish, to the gateway that delivers it.
//!
//! A test binary of its own, unlike the rest (tests/it): it installs a tracing subscriber, and tracing's
//! process-wide callsite interest cache lets tests running in parallel threads of the same process
//! disable callsites before this subscriber sees them.

#[path = "it/cluster.rs"]
#[allow(dead_code)]
mod cluster;

use std::time::Duration;

use bytes::Bytes;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tracing_subscriber::layer::SubscriberExt;
use zhibo_loadtest::client::Transport;
use zhibo_proto::client::packet::Body;
use zhibo_proto::client::{ReceiverType, SendMessageInput};

use crate::cluster::Cluster;

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

fn find<'a>(spans: &'a [SpanData], name: &str) -> &'a SpanData {
    spans.iter().find(|s| s.name == name).unwrap_or_else(|| {
        panic!(
            "span {name} in {:?}",
            spans.iter().map(|s| &s.name).collect::<Vec<_>>()
        )
    })
}

fn assert_child(spans: &[SpanData], child: &str, parent: &str) {
    let (c, p) = (find(spans, child), find(spans, parent));
    assert_eq!(
        c.span_context.trace_id(),
        p.span_context.trace_id(),
        "{child} in {parent}'s trace"
    );
    assert_eq!(
        c.parent_span_id,
        p.span_context.span_id(),
        "{child} is a child of {parent}"
    );
}

/// Runs on one thread so the test's subscriber (thread-local) sees every task of every node.
#[tokio::test(flavor = "current_thread")]
async fn one_trace_follows_a_message_across_processes_over_nats() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("e2e")));
    let _guard = tracing::subscriber::set_default(subscriber);

    let cluster = Cluster::distributed().await;
    let alice = cluster.user("alice").await;
    let bob = cluster.user("bob").await;
    cluster.befriend(&alice, &bob).await;
    let mut a = cluster.connect(Transport::Tcp, 0, &alice).await;
    let mut b = cluster.connect(Transport::Quic, 1, &bob).await;
    exporter.reset();
    let reply = a
        .request(send(bob.user_id, "traced"), Duration::from_secs(10))
        .await
        .expect("ack");
    assert!(matches!(reply.body, Some(Body::SendMessageOutput(_))));
    let p = b
        .recv(Duration::from_secs(10))
        .await
        .expect("delivered")
        .expect("open");
    assert!(matches!(p.body, Some(Body::Message(_))));
    // Spans end asynchronously on the receiving side: wait until the delivering gateway's span, child of
    // the delivery publish, has ended.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let spans = loop {
        let _ = provider.force_flush();
        let spans = exporter.get_finished_spans().expect("spans");
        let delivered = spans
            .iter()
            .find(|s| s.name == "delivery.publish")
            .map(|publish| publish.span_context.span_id())
            .is_some_and(|publish| {
                spans
                    .iter()
                    .any(|s| s.name == "gateway.deliver" && s.parent_span_id == publish)
            });
        let ended = [
            "gateway.command",
            "logic.command",
            "seq.allocate",
            "store.write",
        ]
        .iter()
        .all(|name| spans.iter().any(|s| s.name == *name));
        if delivered && ended {
            break spans;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a gateway.deliver span is a child of delivery.publish, and every span of the path ended: {:?}",
            spans.iter().map(|s| &s.name).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // gateway receive → (NATS headers) → logic worker → seq, store, delivery publish → (NATS) → gateway.
    assert_child(&spans, "logic.command", "gateway.command");
    assert_child(&spans, "seq.allocate", "logic.command");
    assert_child(&spans, "store.write", "logic.command");
    assert_child(&spans, "delivery.publish", "logic.command");
    drop(_guard);
    cluster.stop().await;
}
