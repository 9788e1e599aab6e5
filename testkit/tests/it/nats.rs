use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use zhibo_testkit::{require_nats, unique_name};

#[tokio::test]
async fn a_published_message_reaches_a_subscriber() {
    let url = require_nats().await;
    let client = async_nats::connect(&url).await.expect("connect to NATS");
    let subject = unique_name("it.nats").replace('_', ".");
    let mut subscriber = client.subscribe(subject.clone()).await.expect("subscribe");
    // The subscription must be registered on the server before the publish.
    client.flush().await.expect("flush SUB");

    let payload = Bytes::from_static(b"\x00hello \xff live room");
    client
        .publish(subject.clone(), payload.clone())
        .await
        .expect("publish");
    client.flush().await.expect("flush PUB");

    let message = tokio::time::timeout(Duration::from_secs(5), subscriber.next())
        .await
        .expect("no message within 5 s")
        .expect("subscription ended");
    assert_eq!(message.subject.as_str(), subject);
    assert_eq!(message.payload, payload);
}
