//! Event webhooks emitted through the pipeline: `message.stored`, once a 1:1 or group message is
//! stored, before the sender's ACK (a resend emits it again with the same key); and the group
//! membership events, for user-api ([`Logic::group_membership_changed`]). See docs/ARCHITECTURE.md,
//! "Offline push".

use serde_json::json;
use zhibo_proto::bus::Origin;
use zhibo_proto::client::{Message, ReceiverType};
use zhibo_push::webhook::occurrence;
use zhibo_push::{EventType, Webhooks};
use zhibo_store::SendPlan;

use crate::Logic;

/// A change of a group's membership, for its webhook event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MembershipChange {
    /// `group.member_joined`: added by a member, or accepted an invitation.
    Joined,
    /// `group.member_left`: left on their own.
    Left,
    /// `group.member_kicked`: removed by the owner or an admin.
    Kicked,
}

impl Logic {
    /// Emits the webhook event of `change` for `user_id` in `group_id`, done by `by_user_id`, when
    /// configured; returns once the sink has it (durable, in embedded mode).
    pub async fn group_membership_changed(
        &self,
        change: MembershipChange,
        group_id: i64,
        user_id: i64,
        by_user_id: i64,
    ) {
        let Some(webhooks) = &self.webhooks else {
            return;
        };
        let t = match change {
            MembershipChange::Joined => EventType::GroupMemberJoined,
            MembershipChange::Left => EventType::GroupMemberLeft,
            MembershipChange::Kicked => EventType::GroupMemberKicked,
        };
        if !webhooks.wants(t) {
            return;
        }
        let data = json!({"group_id": group_id, "user_id": user_id, "by_user_id": by_user_id});
        webhooks
            .emit(t, &format!("{group_id}:{user_id}:{}", occurrence()), data)
            .await;
    }

    /// Emits `message.stored` for the message `template` stored under `plan`, when configured.
    pub(crate) async fn webhook_message_stored(
        &self,
        origin: &Origin,
        plan: &SendPlan,
        template: &Message,
    ) {
        let Some(webhooks) = &self.webhooks else {
            return;
        };
        if !webhooks.wants(EventType::MessageStored) {
            return;
        }
        let receiver_type = if template.receiver_type == ReceiverType::Group as i32 {
            "group"
        } else {
            "user"
        };
        let data = json!({
            "message_id": plan.message_id.to_string(),
            "sender_user_id": origin.user_id,
            "sender_device_id": origin.device_id,
            "receiver_type": receiver_type,
            "receiver_id": template.receiver_id,
            "content_type": template.content_type,
            "server_time_ms": plan.server_time_ms,
            "recipients": plan.recipients.len(),
        });
        webhooks
            .emit(EventType::MessageStored, &plan.message_id.to_string(), data)
            .await;
    }

    /// The webhook emitter, when any event type is configured (user-api emits the group events).
    pub fn webhooks(&self) -> Option<&Webhooks> {
        self.webhooks.as_ref()
    }
}
