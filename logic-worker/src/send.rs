//! 1:1 and group sends: validation, dedup, authorisation, seqs, the durable write, replay of a resend and
//! live delivery to every device of every recipient.

use bytes::Bytes;
use tracing::{debug, warn, Instrument};
use zhibo_bus::route::{publish_user_event, Route};
use zhibo_proto::bus::{user_event, Delivery, Origin, UserEvent};
use zhibo_proto::client::packet::Body;
use zhibo_proto::client::{
    ErrorCode, Message, Packet, ReceiverType, SendMessageInput, SendMessageOutput,
};
use zhibo_store::ids::now_ms;
use zhibo_store::{Claim, ConversationKey, ConversationSeqs, SendPlan, SeqGap};
use zhibo_telemetry::metrics::KindLabel;

use crate::error::send_err;
use crate::hook::{BeforeSendHook, Verdict};
use crate::{Logic, LogicError, Op};

impl Logic {
    /// Sends a message from `origin` (a device, or device 0 for a server-side send). Returns only after
    /// the message is durable in every recipient's inbox.
    ///
    /// # Errors
    /// [`LogicError`] with the code the client sees.
    pub async fn send_message(
        &self,
        origin: &Origin,
        input: &SendMessageInput,
    ) -> Result<SendMessageOutput, LogicError> {
        if input.receiver_type == ReceiverType::Room as i32 {
            return self.send_room_message(origin, input).await;
        }
        if input.client_msg_id.is_empty()
            || input.client_msg_id.len() > self.config.max_client_msg_id
        {
            return Err(LogicError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "client_msg_id must be 1..={} bytes",
                    self.config.max_client_msg_id
                ),
            ));
        }
        if input.content.len() > self.config.max_content {
            return Err(LogicError::new(
                ErrorCode::InvalidArgument,
                format!("content exceeds {} bytes", self.config.max_content),
            ));
        }
        if input.receiver_id <= 0 {
            // Ids are positive: 0 or less is a client bug, not an unknown user or group.
            return Err(LogicError::new(
                ErrorCode::InvalidArgument,
                "receiver_id must be > 0",
            ));
        }
        if input.content_type < 0 {
            // Tombstones (-10 recalled, -11 deleted) and room notices are zhibo's: a sent one
            // would pass for a recall or a deletion on every recipient's screen.
            return Err(LogicError::new(
                ErrorCode::InvalidArgument,
                "negative content types are reserved for zhibo",
            ));
        }
        let sender = origin.user_id;
        let mut stages = Stages::start(&self.metrics);
        let dedup_key = dedup_device(origin);
        let hooked = self.hook_for(origin, input.receiver_type).is_some();
        // What is known of this (device, client_msg_id) already. A first attempt (the client says so)
        // needs nothing: it claims with its plan once it has one (below). Any other send claims now,
        // with a marker; a resend within the claim window thus finds its first attempt's plan there
        // (no database read). A claim that says nothing (a marker, none kept; for a marked send, Redis
        // unreachable: an unmarked one is refused below) costs the dedup read, and so does a send the before-send hook would be asked about (the backend is
        // never asked about a message already stored: a replay asks it once, see `replay`).
        let known = match (input.first_attempt, hooked) {
            (true, false) => Ok(Claim::Free),
            (true, true) => {
                self.stores
                    .seq
                    .claimed(dedup_key, &input.client_msg_id)
                    .await
            }
            (false, _) => {
                self.stores
                    .seq
                    .claim_send(dedup_key, &input.client_msg_id, None)
                    .await
            }
        }
        .or_else(|e| {
            if input.first_attempt {
                // Only a hint here (the claim at step 4 decides): read the dedup plan instead.
                warn!(error = %e, "send claim unreadable; reading the dedup plan");
                Ok(Claim::Unknown)
            } else {
                // Without its claim, this send could race a first attempt that holds one and writes
                // its plan with a plain insert: refuse (retryable) rather than risk a second copy.
                Err(self.claim_failed(e))
            }
        })?;
        let looked = match known {
            Claim::Planned(plan) => return self.replay_claimed(origin, input, plan).await,
            Claim::Unknown => true,
            Claim::Free => hooked,
        };
        if looked {
            if let Some(plan) = self.stored_plan(dedup_key, input).await? {
                return self.replay(origin, input, plan).await;
            }
        }
        let (recipients, conversation) = match self.authorize(origin, input).await {
            Ok(r) => r,
            // A refused send may be the resend of a stored message whose answer has changed since
            // (unfriended, left the group): the stored plan answers it, as the dedup read would have.
            Err(e) if !looked && e.code != ErrorCode::Unavailable => {
                return match self.stored_plan(dedup_key, input).await? {
                    Some(plan) => self.replay(origin, input, plan).await,
                    None => Err(e),
                };
            }
            Err(e) => return Err(e),
        };
        // After authorisation (the backend is only asked about sends zhibo would accept), before any id or
        // seq: a rejected message leaves nothing behind, so its resend is asked again.
        let replaced = match self.hook_for(origin, input.receiver_type) {
            Some(hook) => match hook.check(origin, input, self.config.max_content).await? {
                Verdict::AsSent => None,
                Verdict::Replace(content) => Some(content),
            },
            None => None,
        };
        stages.done("authorize");
        // Minted before the seqs, so a refusal (no node lease) wastes none.
        let message_id = self.next_id(Op::Send).await?;
        // The inbox seqs and the conversation seq in one allocator call (one Redis script call).
        let ConversationSeqs {
            inbox: seqs,
            conv_seq,
            skipped,
        } = self
            .stores
            .seq
            .next_in_conversation(&recipients, conversation)
            .instrument(tracing::info_span!("seq.allocate", n = recipients.len()))
            .await
            .inspect_err(|_| {
                self.metrics.store_errors.inc();
            })
            .map_err(send_err)?;
        let recipients: Vec<(i64, u64)> = recipients.into_iter().zip(seqs).collect();
        let plan = SendPlan {
            message_id,
            seq: recipients
                .iter()
                .find(|(u, _)| *u == sender)
                .map_or(0, |(_, s)| *s),
            server_time_ms: now_ms(),
            recipients,
            conv_seq,
        };
        // A first attempt's claim holds its plan: a racing resend (another worker, the same client
        // after a timeout) finds it and finishes this plan instead of making its own, so this plan
        // needs no insert-if-absent. Any other send may be the resend of a message stored before the
        // claim window (or before Redis lost the claims), and its claim (made above) holds a marker:
        // the dedup plan's insert-if-absent arbitrates, between racing attempts too.
        let claimed = if input.first_attempt {
            match self
                .stores
                .seq
                .claim_send(dedup_key, &input.client_msg_id, Some(&plan))
                .await
            {
                Ok(Claim::Planned(existing)) => {
                    return self.replay_claimed(origin, input, existing).await
                }
                Ok(Claim::Free) => self.config.claimed_plans,
                Ok(Claim::Unknown) => false,
                // As above: another attempt may hold the claim and be writing without arbitration.
                Err(e) => return Err(self.claim_failed(e)),
            }
        } else {
            false
        };
        stages.done("allocate");
        let content = replaced.as_ref().unwrap_or(&input.content);
        let entries = inbox_entries(&plan, &new_message(origin, input, content, &plan));
        let messages = &self.stores.messages;
        let recorded = if claimed {
            messages
                .record_claimed_send(dedup_key, &input.client_msg_id, &plan, &entries)
                .instrument(tracing::info_span!("store.write", n = entries.len()))
                .await
        } else {
            messages
                .record_send(dedup_key, &input.client_msg_id, &plan, &entries)
                .instrument(tracing::info_span!("store.write", n = entries.len()))
                .await
        };
        match recorded
            .inspect_err(|_| {
                self.metrics.store_errors.inc();
            })
            .map_err(send_err)?
        {
            // A racing resend stored its plan first: finish that one; our seqs stay unused.
            Some(existing) => self.replay(origin, input, existing).await,
            None => {
                if let Some(gap) = skipped {
                    self.record_gap(conversation, &plan, gap).await;
                }
                stages.done("store");
                self.metrics.messages_sent.inc();
                let output = self.deliver(origin, &plan, entries, false, replaced).await;
                stages.done("deliver");
                Ok(output)
            }
        }
    }

    /// Records in every recipient's row of `conversation` the seqs its counter skipped when this
    /// send's allocation recovered it after a Redis loss, so they do not count as unread. Before the
    /// deliveries: a client that sees the message and lists its conversations sees the right count.
    /// A failure is logged, not the send's: the message is stored, and the only cost is the
    /// over-count the gap would have removed (until the members read past it).
    async fn record_gap(&self, conversation: ConversationKey, plan: &SendPlan, gap: SeqGap) {
        let users: Vec<i64> = plan.recipients.iter().map(|&(u, _)| u).collect();
        if let Err(e) = self
            .stores
            .conversations
            .record_gap(conversation, &users, gap)
            .await
        {
            self.metrics.store_errors.inc();
            tracing::warn!(
                ?conversation,
                from = gap.from,
                to = gap.to,
                error = %e,
                "seq gap after a counter recovery not recorded; unread counts it until read past"
            );
        }
    }

    /// Who receives a 1:1 or group send of `origin`, and its conversation: the refusals
    /// (`NOT_FOUND`, `NOT_FRIENDS`, `NOT_GROUP_MEMBER`, `INVALID_ARGUMENT`) as errors.
    async fn authorize(
        &self,
        origin: &Origin,
        input: &SendMessageInput,
    ) -> Result<(Vec<i64>, ConversationKey), LogicError> {
        let sender = origin.user_id;
        Ok(match ReceiverType::try_from(input.receiver_type) {
            Ok(ReceiverType::User) => {
                let receiver = input.receiver_id;
                let needs_friendship =
                    receiver != sender && !self.config.allow_strangers && origin.device_id != 0;
                // Both checks at once, each skipped when the cache holds its "yes" (see authz.rs).
                let exists = async {
                    if self.authz.user_exists(receiver) {
                        return Ok(true);
                    }
                    let found = self.stores.users.get_user(receiver).await?.is_some();
                    if found {
                        self.authz.remember_user(receiver);
                    }
                    Ok(found)
                };
                let friends = async {
                    if !needs_friendship || self.authz.friends(sender, receiver) {
                        return Ok(true);
                    }
                    let epoch = self.authz.epoch();
                    let found = self
                        .stores
                        .friends
                        .get_friend(sender, receiver)
                        .await?
                        .is_some();
                    if found {
                        self.authz.remember_friends(sender, receiver, epoch);
                    }
                    Ok(found)
                };
                let (exists, friends): (bool, bool) =
                    futures::try_join!(exists, friends).map_err(send_err)?;
                if !exists {
                    return Err(LogicError::new(ErrorCode::NotFound, "no such user"));
                }
                if !friends {
                    return Err(LogicError::new(
                        ErrorCode::NotFriends,
                        "you are not friends with this user",
                    ));
                }
                let recipients = if input.receiver_id == sender {
                    vec![sender]
                } else {
                    vec![sender, input.receiver_id]
                };
                (
                    recipients,
                    ConversationKey::direct(sender, input.receiver_id),
                )
            }
            Ok(ReceiverType::Group) => {
                let group = input.receiver_id;
                // The member list kept under the group's current membership version (authz.rs); a
                // version Redis cannot give only costs the reads.
                let version = if self.authz.keeps_groups() {
                    self.stores
                        .seq
                        .group_version(group)
                        .await
                        .unwrap_or_else(|e| {
                            debug!(error = %e, "no membership version; reading the members");
                            None
                        })
                } else {
                    None
                };
                if let Some(members) = version.and_then(|v| self.authz.group_members(group, v)) {
                    if members.binary_search(&sender).is_ok() {
                        return Ok((members.to_vec(), ConversationKey::Group(group)));
                    }
                }
                let epoch = self.authz.epoch();
                // The membership check first, as a point read: a non-member's send (refused) must
                // not cost a read of a group of up to `max_group_size` members.
                if self
                    .stores
                    .groups
                    .get_member(input.receiver_id, sender)
                    .await
                    .map_err(send_err)?
                    .is_none()
                {
                    let unknown = self
                        .stores
                        .groups
                        .get_group(input.receiver_id)
                        .await
                        .map_err(send_err)?
                        .is_none();
                    return Err(if unknown {
                        LogicError::new(ErrorCode::NotFound, "no such group")
                    } else {
                        LogicError::new(
                            ErrorCode::NotGroupMember,
                            "you are not a member of this group",
                        )
                    });
                }
                let mut members = self
                    .stores
                    .groups
                    .member_ids(input.receiver_id)
                    .await
                    .map_err(send_err)?;
                if let Some(v) = version {
                    members.sort_unstable();
                    let kept: std::sync::Arc<[i64]> = members.as_slice().into();
                    self.authz.remember_group(group, v, kept, epoch);
                }
                (members, ConversationKey::Group(group))
            }
            _ => {
                return Err(LogicError::new(
                    ErrorCode::InvalidArgument,
                    "receiver_type must be USER, GROUP or ROOM",
                ))
            }
        })
    }

    /// The dedup plan stored for `(dedup_key, input.client_msg_id)`, if any.
    async fn stored_plan(
        &self,
        dedup_key: i64,
        input: &SendMessageInput,
    ) -> Result<Option<SendPlan>, LogicError> {
        self.stores
            .messages
            .get_dedup(dedup_key, &input.client_msg_id)
            .await
            .map_err(send_err)
    }

    /// The answer to a send whose claim Redis could not take or read: retryable, as any store failure
    /// of a send (`UNAVAILABLE`, resend with the same `client_msg_id`).
    fn claim_failed(&self, e: zhibo_store::Error) -> LogicError {
        warn!(error = %e, "send claim failed; refusing the send as retryable");
        self.metrics.store_errors.inc();
        send_err(e)
    }

    /// Finishes a send whose plan another attempt claimed in Redis. That attempt may have died before
    /// writing the plan to the database, and the claim expires: the plan is written there first
    /// (insert-if-absent, a rare path), so a resend after the claim window still finds it. A different
    /// plan already stored (written by an attempt that had lost its claim to a Redis loss) wins.
    async fn replay_claimed(
        &self,
        origin: &Origin,
        input: &SendMessageInput,
        plan: SendPlan,
    ) -> Result<SendMessageOutput, LogicError> {
        let stored = self
            .stores
            .messages
            .put_dedup_if_absent(dedup_device(origin), &input.client_msg_id, &plan)
            .await
            .inspect_err(|_| {
                self.metrics.store_errors.inc();
            })
            .map_err(send_err)?;
        self.replay(origin, input, stored.unwrap_or(plan)).await
    }

    /// Finishes a resend of a planned message: writes the plan's inbox entries again (idempotent), and
    /// publishes them again (the first attempt may have died before publishing).
    async fn replay(
        &self,
        origin: &Origin,
        input: &SendMessageInput,
        plan: SendPlan,
    ) -> Result<SendMessageOutput, LogicError> {
        let fresh = new_message(origin, input, &input.content, &plan);
        // A resend replays the plan from the message as first stored (the sender's own inbox entry), so a
        // resend can never rewrite what recipients already have; one that differs is refused. Only when
        // nothing was stored yet (a crash between plan and writes) does the resend's content go in.
        let stored = self.stored_original(origin.user_id, &plan).await?;
        let template = match stored {
            Some(original) => {
                // A before-send hook may have replaced the stored content: then only the rest is compared
                // (a resend carries the content as the client wrote it).
                let same = original.receiver_type == fresh.receiver_type
                    && original.receiver_id == fresh.receiver_id
                    && original.content_type == fresh.content_type
                    && (original.content == fresh.content
                        || self.hook_for(origin, input.receiver_type).is_some());
                if !same {
                    return Err(LogicError::new(
                        ErrorCode::InvalidArgument,
                        "client_msg_id already used for a different message",
                    ));
                }
                original
            }
            // The first attempt's hook answer is not stored: ask again, so a replacement is not lost and
            // a rejection still holds (the plan's seqs then stay unused, a gap in numbering only).
            None => match self.hook_for(origin, input.receiver_type) {
                Some(hook) => match hook.check(origin, input, self.config.max_content).await? {
                    Verdict::AsSent => fresh,
                    Verdict::Replace(content) => Message { content, ..fresh },
                },
                None => fresh,
            },
        };
        let replaced = (template.content != input.content).then(|| template.content.clone());
        let entries = inbox_entries(&plan, &template);
        self.stores
            .messages
            .append_many(&entries)
            .instrument(tracing::info_span!("store.write", n = entries.len()))
            .await
            .inspect_err(|_| {
                self.metrics.store_errors.inc();
            })
            .map_err(send_err)?;
        // The conversation rows too (idempotent): the first attempt may have stopped before them.
        // A replay is rare, so its separate round trips do not matter.
        if plan.conv_seq > 0 {
            self.stores
                .conversations
                .record_message(plan.conv_seq, &template, &plan.recipients)
                .await
                .inspect_err(|_| {
                    self.metrics.store_errors.inc();
                })
                .map_err(send_err)?;
        }
        // Nothing records whether the first attempt published its deliveries: a worker killed after the
        // writes and before (or during) the publishes leaves a stored message no device was pushed. So a
        // replay always publishes them again; a device that already had it drops the repeat by its seq
        // and message_id (live delivery is at least once, see proto/README.md).
        Ok(self.deliver(origin, &plan, entries, true, replaced).await)
    }

    /// The before-send hook for a send from `origin` to `receiver_type`, if one is configured for it.
    /// Server-side sends (device 0) come from the app backend itself and are not checked.
    pub(crate) fn hook_for(&self, origin: &Origin, receiver_type: i32) -> Option<&BeforeSendHook> {
        self.before_send
            .as_ref()
            .filter(|h| origin.device_id != 0 && h.applies(receiver_type))
    }

    /// Publishes stored inbox entries to their users' devices (all but the sending device).
    async fn deliver(
        &self,
        origin: &Origin,
        plan: &SendPlan,
        entries: Vec<(i64, Message)>,
        duplicate: bool,
        replaced: Option<Bytes>,
    ) -> SendMessageOutput {
        // One presence read for every recipient: routes the deliveries, and says who is offline.
        let users: Vec<i64> = entries.iter().map(|(u, _)| *u).collect();
        let gateways = self.gateways_of(&users).await;
        // Before the ACK: a sender who saw the ACK can count on the events being queued.
        self.push_offline(origin.user_id, &entries, &gateways).await;
        if let Some((_, template)) = entries.first() {
            self.webhook_message_stored(origin, plan, template).await;
        }
        let publish = tracing::info_span!("delivery.publish", n = entries.len());
        let headers = zhibo_telemetry::trace::inject(&publish);
        async {
            for ((user_id, message), gateways) in entries.into_iter().zip(&gateways) {
                let exclude = if user_id == origin.user_id {
                    origin.device_id
                } else {
                    0
                };
                let event = delivery(user_id, exclude, Packet::new(0, Body::Message(message)));
                // Stored already: a device that misses it gets it at its next sync.
                if self
                    .publish_to_user(
                        user_id,
                        event,
                        Route::of(gateways.as_deref()),
                        headers.clone(),
                    )
                    .await
                {
                    self.metrics.messages_delivered.inc();
                }
            }
        }
        .instrument(publish)
        .await;
        output(plan, duplicate, replaced)
    }

    /// Publishes `packet` to every connected device of `user_id` but `exclude_device_id` (0: none),
    /// on the gateways presence names for the user: the one way the worker delivers to a single user
    /// (messages go through [`Logic::deliver`], which reads presence once for all recipients; the
    /// conversation notices of `conversations.rs` come here). `false` when the bus refused it.
    pub(crate) async fn deliver_to_user(
        &self,
        user_id: i64,
        exclude_device_id: i64,
        packet: Packet,
        headers: Vec<(String, String)>,
    ) -> bool {
        let event = delivery(user_id, exclude_device_id, packet);
        match self.route_user_event(user_id, event, headers).await {
            Ok(()) => true,
            Err(e) => self.delivery_failed(user_id, &e),
        }
    }

    /// Publishes `event` for `user_id` to the gateways presence names for the user (every gateway when
    /// presence cannot be read).
    ///
    /// # Errors
    /// When the bus refuses it.
    pub(crate) async fn route_user_event(
        &self,
        user_id: i64,
        event: UserEvent,
        headers: Vec<(String, String)>,
    ) -> zhibo_bus::Result<()> {
        let gateways = self.gateways_of(&[user_id]).await;
        publish_user_event(
            self.bus.as_ref(),
            user_id,
            event,
            Route::of(gateways[0].as_deref()),
            headers,
        )
        .await
        .map(|_| ())
    }

    /// For each of `users`, the gateways holding a connection of theirs, or `None` when unknown:
    /// presence just lost entries, or cannot be read (logged, counted). A `None` is routed to every
    /// gateway, and counts as offline for push.
    pub(crate) async fn gateways_of(&self, users: &[i64]) -> Vec<Option<Vec<String>>> {
        match self.presence.gateways(users).await {
            Ok(g) if g.len() == users.len() => g,
            Ok(_) | Err(_) => {
                let failures = self.metrics.bus_errors.get_or_create(&KindLabel {
                    kind: "presence_read",
                });
                // Once per power of two: every send fails alike while Redis is down.
                if failures.inc().saturating_add(1).is_power_of_two() {
                    warn!(
                        failures = failures.get(),
                        "presence unreadable: routing to every gateway"
                    );
                }
                vec![None; users.len()]
            }
        }
    }

    async fn publish_to_user(
        &self,
        user_id: i64,
        event: UserEvent,
        route: Route<'_>,
        headers: Vec<(String, String)>,
    ) -> bool {
        match publish_user_event(self.bus.as_ref(), user_id, event, route, headers).await {
            Ok(_) => true,
            Err(e) => self.delivery_failed(user_id, &e),
        }
    }

    /// Logs and counts a live delivery the bus refused; `false`.
    fn delivery_failed(&self, user_id: i64, e: &zhibo_bus::Error) -> bool {
        self.metrics
            .bus_errors
            .get_or_create(&KindLabel {
                kind: "publish_delivery",
            })
            .inc();
        warn!(user_id, error = %e, "live delivery failed");
        false
    }

    /// The sender's stored copy of a planned message, if the plan's writes reached the sender's inbox.
    async fn stored_original(
        &self,
        sender: i64,
        plan: &SendPlan,
    ) -> Result<Option<Message>, LogicError> {
        if plan.seq == 0 {
            return Ok(None);
        }
        let found = self
            .stores
            .messages
            .sync(sender, plan.seq - 1, 1)
            .await
            .map_err(send_err)?;
        Ok(found
            .into_iter()
            .find(|m| m.seq == plan.seq && m.message_id == plan.message_id))
    }
}

/// The device part of the dedup key: the sending device, or for a server-side send (device 0) the
/// negated user id, so two users' server sends never share a `client_msg_id` space (device ids are > 0).
fn dedup_device(origin: &Origin) -> i64 {
    if origin.device_id == 0 {
        -origin.user_id
    } else {
        origin.device_id
    }
}

/// The message `input` becomes under `plan` with `content` (the input's, or the hook's replacement),
/// before a seq is set per inbox.
fn new_message(
    origin: &Origin,
    input: &SendMessageInput,
    content: &Bytes,
    plan: &SendPlan,
) -> Message {
    Message {
        message_id: plan.message_id,
        seq: 0,
        sender_user_id: origin.user_id,
        sender_device_id: origin.device_id,
        receiver_type: input.receiver_type,
        receiver_id: input.receiver_id,
        client_msg_id: input.client_msg_id.clone(),
        server_time_ms: plan.server_time_ms,
        content_type: input.content_type,
        content: content.clone(),
        conv_seq: plan.conv_seq,
    }
}

/// One inbox entry per recipient of `plan`: `template` at that recipient's seq. Only the sender's own
/// copy names the sending device: device ids are the sender's business (they identify the install whose
/// tokens a sign-out revokes), so other users get `sender_device_id` 0.
fn inbox_entries(plan: &SendPlan, template: &Message) -> Vec<(i64, Message)> {
    plan.recipients
        .iter()
        .map(|&(user_id, seq)| {
            let sender_device_id = if user_id == template.sender_user_id {
                template.sender_device_id
            } else {
                0
            };
            (
                user_id,
                Message {
                    seq,
                    sender_device_id,
                    ..template.clone()
                },
            )
        })
        .collect()
}

/// The sender's answer; `replaced` = the stored content when the before-send hook replaced it.
fn output(plan: &SendPlan, duplicate: bool, replaced: Option<Bytes>) -> SendMessageOutput {
    SendMessageOutput {
        message_id: plan.message_id,
        seq: plan.seq,
        server_time_ms: plan.server_time_ms,
        duplicate,
        content_replaced: replaced.is_some(),
        content: replaced.unwrap_or_default(),
        conv_seq: plan.conv_seq,
    }
}

/// `packet` for every device of `user_id` but `exclude_device_id` (0: none), as a user event.
fn delivery(user_id: i64, exclude_device_id: i64, packet: Packet) -> UserEvent {
    UserEvent {
        user_id,
        event: Some(user_event::Event::Delivery(Delivery {
            conn_id: 0,
            exclude_device_id,
            packets: vec![packet],
        })),
    }
}

/// Times the stages of a new message into `zhibo_send_stage_seconds{kind}`: each [`Stages::done`]
/// observes the time since the previous one (or the start).
struct Stages<'a> {
    metrics: &'a zhibo_telemetry::metrics::Metrics,
    last: std::time::Instant,
}

impl<'a> Stages<'a> {
    fn start(metrics: &'a zhibo_telemetry::metrics::Metrics) -> Self {
        Stages {
            metrics,
            last: std::time::Instant::now(),
        }
    }

    fn done(&mut self, kind: &'static str) {
        let now = std::time::Instant::now();
        self.metrics
            .send_stage_seconds
            .get_or_create(&KindLabel { kind })
            .observe(now.duration_since(self.last).as_secs_f64());
        self.last = now;
    }
}
