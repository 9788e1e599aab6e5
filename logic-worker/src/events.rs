//! Bus events the pipeline raises besides messages: a signed-out device's connections are closed.

use tracing::warn;
use zhibo_proto::bus::{user_event, UserEvent};
use zhibo_proto::client::ErrorCode;

use crate::{Logic, LogicError};

impl Logic {
    /// Closes every live connection of a device that signed out (its tokens are already revoked, so it
    /// cannot sign in again with them).
    ///
    /// # Errors
    /// [`LogicError`] with `UNAVAILABLE` when the bus refuses the event.
    pub async fn kick_signed_out(&self, user_id: i64, device_id: i64) -> Result<(), LogicError> {
        let event = UserEvent {
            user_id,
            event: Some(user_event::Event::DeviceSignedOut(
                zhibo_proto::bus::DeviceSignedOut { user_id, device_id },
            )),
        };
        self.route_user_event(user_id, event, Vec::new())
            .await
            .map_err(|e| {
                warn!(user_id, device_id, error = %e, "sign-out kick not published");
                LogicError::new(ErrorCode::Unavailable, "try again later")
            })
    }
}
