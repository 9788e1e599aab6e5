//! Routing by gateway: how an event for a user's devices (`UserEvent`: a delivery, a kick, a room ban)
//! reaches the gateways holding the user's connections.
//!
//! The sender asks presence which gateways hold each user (one read for all the users of a message) and
//! publishes the event, naming its user, on each of those gateways' [`Subject::gateway_users`]. A user
//! with no live gateway gets nothing live (the event is stored, or moot). When presence cannot be read
//! the event goes to [`Subject::all_gateways_users`], which every gateway reads and keeps only the
//! events of its own users: more traffic while presence is down, never a lost delivery.
//!
//! A gateway holds no subscription per user: one per gateway, whatever its number of connections.

use bytes::Bytes;
use prost::Message as _;
use zhibo_proto::bus::UserEvent;

use crate::{Bus, Result, Subject};

/// Where an event for one user goes.
#[derive(Debug, Clone, Copy)]
pub enum Route<'a> {
    /// The gateways presence names for the user (possibly none: nobody online).
    Gateways(&'a [String]),
    /// Every gateway: presence could not be read.
    Everywhere,
}

impl<'a> Route<'a> {
    /// The route for what presence knows of a user: the gateways it names, or every gateway when it
    /// does not know (`None`: unreadable, or just after a loss).
    pub fn of(gateways: Option<&'a [String]>) -> Self {
        match gateways {
            Some(g) => Route::Gateways(g),
            None => Route::Everywhere,
        }
    }
}

/// Publishes `event` for `user_id` along `route` (encoded once). Returns how many gateway subjects it
/// was published on.
///
/// # Errors
/// The first publish the bus refuses (later gateways are still tried).
pub async fn publish_user_event(
    bus: &dyn Bus,
    user_id: i64,
    mut event: UserEvent,
    route: Route<'_>,
    headers: Vec<(String, String)>,
) -> Result<usize> {
    event.user_id = user_id;
    let payload = Bytes::from(event.encode_to_vec());
    match route {
        Route::Everywhere => {
            bus.publish(&Subject::all_gateways_users(), headers, payload)
                .await?;
            Ok(1)
        }
        Route::Gateways(gateways) => {
            let mut first_error = None;
            for gateway in gateways {
                if let Err(e) = bus
                    .publish(
                        &Subject::gateway_users(gateway),
                        headers.clone(),
                        payload.clone(),
                    )
                    .await
                {
                    first_error.get_or_insert(e);
                }
            }
            match first_error {
                Some(e) => Err(e),
                None => Ok(gateways.len()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryBus;
    use zhibo_proto::bus::{user_event, DeviceSignedOut};

    fn signed_out() -> UserEvent {
        UserEvent {
            user_id: 0,
            event: Some(user_event::Event::DeviceSignedOut(DeviceSignedOut {
                user_id: 7,
                device_id: 9,
            })),
        }
    }

    #[tokio::test]
    async fn an_event_goes_to_each_named_gateway_or_everywhere() {
        let bus = MemoryBus::new();
        let mut a = bus.subscribe(&Subject::gateway_users("a")).await.unwrap();
        let mut b = bus.subscribe(&Subject::gateway_users("b")).await.unwrap();
        let mut c = bus.subscribe(&Subject::gateway_users("c")).await.unwrap();
        let mut all = bus.subscribe(&Subject::all_gateways_users()).await.unwrap();
        let gateways = ["a".to_owned(), "b".to_owned()];
        let n = publish_user_event(&bus, 7, signed_out(), Route::Gateways(&gateways), vec![])
            .await
            .unwrap();
        assert_eq!(n, 2);
        for sub in [&mut a, &mut b] {
            let m = sub.next().await.unwrap();
            assert_eq!(UserEvent::decode(m.payload).unwrap().user_id, 7);
        }
        publish_user_event(&bus, 8, signed_out(), Route::Everywhere, vec![])
            .await
            .unwrap();
        let m = all.next().await.unwrap();
        assert_eq!(UserEvent::decode(m.payload).unwrap().user_id, 8);
        // Gateway c was named by nobody: it got nothing (the next thing it sees is this marker).
        publish_user_event(
            &bus,
            9,
            signed_out(),
            Route::Gateways(&["c".into()]),
            vec![],
        )
        .await
        .unwrap();
        let m = c.next().await.unwrap();
        assert_eq!(UserEvent::decode(m.payload).unwrap().user_id, 9);
    }
}
