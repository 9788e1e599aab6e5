//! The NATS backend (async-nats): core publish/subscribe, queue groups for logic workers.

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;

use crate::{Bus, BusMessage, Error, Result, Subject, Subscription};

/// A [`Bus`] over one NATS connection.
#[derive(Debug, Clone)]
pub struct NatsBus {
    client: async_nats::Client,
}

impl NatsBus {
    /// Connects to `url` (e.g. `nats://127.0.0.1:4222`), naming the connection `name` in the server.
    ///
    /// # Errors
    /// [`Error::Connect`] when the server cannot be reached.
    pub async fn connect(url: &str, name: &str) -> Result<Self> {
        let client = async_nats::ConnectOptions::new()
            .name(name)
            // Each Subscriber buffers at most this many messages before the server marks it slow.
            .subscription_capacity(4096)
            .connect(url)
            .await
            .map_err(|e| Error::Connect(format!("{url}: {e}")))?;
        Ok(NatsBus { client })
    }

    /// The underlying client.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }
}

fn into_message(m: async_nats::Message) -> BusMessage {
    let headers = m
        .headers
        .as_ref()
        .map(|h| {
            h.iter()
                .flat_map(|(k, vs)| {
                    vs.iter()
                        .map(move |v| (k.to_string(), v.as_str().to_owned()))
                })
                .collect()
        })
        .unwrap_or_default();
    BusMessage {
        subject: m.subject.to_string(),
        payload: m.payload,
        headers,
    }
}

#[async_trait]
impl Bus for NatsBus {
    async fn publish(
        &self,
        subject: &Subject,
        headers: Vec<(String, String)>,
        payload: Bytes,
    ) -> Result<()> {
        let err = |e: &dyn std::fmt::Display| Error::Publish {
            subject: subject.to_string(),
            message: e.to_string(),
        };
        if headers.is_empty() {
            self.client
                .publish(subject.as_str().to_owned(), payload)
                .await
                .map_err(|e| err(&e))
        } else {
            let mut map = async_nats::HeaderMap::new();
            for (k, v) in &headers {
                map.insert(k.as_str(), v.as_str());
            }
            self.client
                .publish_with_headers(subject.as_str().to_owned(), map, payload)
                .await
                .map_err(|e| err(&e))
        }
    }

    async fn subscribe(&self, subject: &Subject) -> Result<Subscription> {
        let sub = self
            .client
            .subscribe(subject.as_str().to_owned())
            .await
            .map_err(|e| Error::Subscribe {
                subject: subject.to_string(),
                message: e.to_string(),
            })?;
        Ok(Subscription::new(sub.map(into_message)))
    }

    async fn queue_subscribe(&self, subject: &Subject, group: &str) -> Result<Subscription> {
        let sub = self
            .client
            .queue_subscribe(subject.as_str().to_owned(), group.to_owned())
            .await
            .map_err(|e| Error::Subscribe {
                subject: subject.to_string(),
                message: e.to_string(),
            })?;
        Ok(Subscription::new(sub.map(into_message)))
    }

    async fn flush(&self) -> Result<()> {
        self.client.flush().await.map_err(|e| Error::Publish {
            subject: String::new(),
            message: e.to_string(),
        })
    }

    fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }
}
