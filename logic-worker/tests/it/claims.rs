//! The send claim's decisions (docs/ARCHITECTURE.md "Send, persistence and seq"), on the embedded store
//! with an allocator that keeps claims the way Redis does and a message store that records which write
//! a send used.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use zhibo_bus::memory::MemoryBus;
use zhibo_logic::{Logic, LogicConfig};
use zhibo_proto::client::{ErrorCode, Message, SendMessageInput, SyncInput};
use zhibo_store::embedded::EmbeddedBackend;
use zhibo_store::presence::MemoryPresence;
use zhibo_store::{
    Claim, ConversationKey, ConversationSeqs, Error, ErrorKind, MessageStore, Result, SendPlan,
    SeqAllocator, Stores,
};

/// Claims as `RedisSeq` keeps them (a plan, or the marker `None`), failing on demand.
struct Claims {
    inner: Arc<dyn SeqAllocator>,
    held: Mutex<HashMap<(i64, String), Option<SendPlan>>>,
    fail: AtomicBool,
}

impl Claims {
    fn check(&self) -> Result<()> {
        if self.fail.load(Ordering::Relaxed) {
            return Err(Error::new(ErrorKind::Unavailable, "redis down"));
        }
        Ok(())
    }
}

fn claim_of(held: Option<&Option<SendPlan>>) -> Claim {
    match held {
        None => Claim::Free,
        Some(Some(plan)) => Claim::Planned(plan.clone()),
        Some(None) => Claim::Unknown,
    }
}

#[async_trait]
impl SeqAllocator for Claims {
    async fn next(&self, user_ids: &[i64]) -> Result<Vec<u64>> {
        self.inner.next(user_ids).await
    }
    async fn next_in_conversation(
        &self,
        user_ids: &[i64],
        conversation: ConversationKey,
    ) -> Result<ConversationSeqs> {
        self.inner
            .next_in_conversation(user_ids, conversation)
            .await
    }
    async fn current(&self, user_id: i64) -> Result<u64> {
        self.inner.current(user_id).await
    }
    async fn try_lock(&self, name: &str, holder: &str, ttl: std::time::Duration) -> Result<bool> {
        self.inner.try_lock(name, holder, ttl).await
    }
    async fn unlock(&self, name: &str, holder: &str) -> Result<()> {
        self.inner.unlock(name, holder).await
    }
    async fn claimed(&self, device_id: i64, client_msg_id: &str) -> Result<Claim> {
        self.check()?;
        let held = self.held.lock().expect("lock");
        Ok(claim_of(held.get(&(device_id, client_msg_id.to_owned()))))
    }
    async fn claim_send(
        &self,
        device_id: i64,
        client_msg_id: &str,
        plan: Option<&SendPlan>,
    ) -> Result<Claim> {
        self.check()?;
        let mut held = self.held.lock().expect("lock");
        let key = (device_id, client_msg_id.to_owned());
        let before = claim_of(held.get(&key));
        held.entry(key).or_insert_with(|| plan.cloned());
        Ok(before)
    }
}

/// Counts which write each send used.
struct Recording {
    inner: Arc<dyn MessageStore>,
    arbitrated: AtomicUsize,
    claimed: AtomicUsize,
}

#[async_trait]
impl MessageStore for Recording {
    async fn append(&self, user_id: i64, message: &Message) -> Result<()> {
        self.inner.append(user_id, message).await
    }
    async fn append_many(&self, entries: &[(i64, Message)]) -> Result<()> {
        self.inner.append_many(entries).await
    }
    async fn sync(&self, user_id: i64, after_seq: u64, limit: usize) -> Result<Vec<Message>> {
        self.inner.sync(user_id, after_seq, limit).await
    }
    async fn max_seq(&self, user_id: i64) -> Result<u64> {
        self.inner.max_seq(user_id).await
    }
    async fn get_dedup(&self, device_id: i64, client_msg_id: &str) -> Result<Option<SendPlan>> {
        self.inner.get_dedup(device_id, client_msg_id).await
    }
    async fn put_dedup_if_absent(
        &self,
        device_id: i64,
        client_msg_id: &str,
        result: &SendPlan,
    ) -> Result<Option<SendPlan>> {
        self.inner
            .put_dedup_if_absent(device_id, client_msg_id, result)
            .await
    }
    async fn record_send(
        &self,
        device_id: i64,
        client_msg_id: &str,
        plan: &SendPlan,
        entries: &[(i64, Message)],
    ) -> Result<Option<SendPlan>> {
        self.arbitrated.fetch_add(1, Ordering::Relaxed);
        self.inner
            .record_send(device_id, client_msg_id, plan, entries)
            .await
    }
    async fn record_claimed_send(
        &self,
        device_id: i64,
        client_msg_id: &str,
        plan: &SendPlan,
        entries: &[(i64, Message)],
    ) -> Result<Option<SendPlan>> {
        self.claimed.fetch_add(1, Ordering::Relaxed);
        self.inner
            .record_claimed_send(device_id, client_msg_id, plan, entries)
            .await
    }
    async fn ack(&self, user_id: i64, device_id: i64, seq: u64) -> Result<()> {
        self.inner.ack(user_id, device_id, seq).await
    }
    async fn acked(&self, user_id: i64, device_id: i64) -> Result<u64> {
        self.inner.acked(user_id, device_id).await
    }
}

struct Setup {
    logic: Logic,
    claims: Arc<Claims>,
    writes: Arc<Recording>,
}

async fn setup(config: LogicConfig) -> Setup {
    let mut stores: Stores = Arc::new(EmbeddedBackend::temporary().expect("store")).stores();
    for id in [1, 2] {
        stores
            .users
            .insert_user(&super::user(id))
            .await
            .expect("user");
    }
    let claims = Arc::new(Claims {
        inner: stores.seq.clone(),
        held: Mutex::default(),
        fail: AtomicBool::new(false),
    });
    let writes = Arc::new(Recording {
        inner: stores.messages.clone(),
        arbitrated: AtomicUsize::new(0),
        claimed: AtomicUsize::new(0),
    });
    stores.seq = claims.clone();
    stores.messages = writes.clone();
    let logic = Logic::new(
        stores,
        Arc::new(MemoryBus::new()),
        Arc::new(MemoryPresence::new()),
        LogicConfig {
            allow_strangers: true,
            ..config
        },
    );
    Setup {
        logic,
        claims,
        writes,
    }
}

fn marked(id: &str, text: &str) -> SendMessageInput {
    SendMessageInput {
        first_attempt: true,
        ..super::input(2, id, text)
    }
}

impl Setup {
    fn writes(&self) -> (usize, usize) {
        (
            self.writes.claimed.load(Ordering::Relaxed),
            self.writes.arbitrated.load(Ordering::Relaxed),
        )
    }

    async fn inbox_of_2(&self) -> Vec<String> {
        let out = self
            .logic
            .sync(2, &SyncInput { seq: 0, limit: 100 })
            .await
            .expect("sync");
        out.messages
            .iter()
            .map(|m| String::from_utf8_lossy(&m.content).into_owned())
            .collect()
    }
}

/// A marked first attempt whose claim was free writes without arbitration; an unmarked send, and a
/// marked one with `claimed_plans = false`, arbitrate; a resend of the marked one is finished from its
/// claim (no new plan), marked or not.
#[tokio::test]
async fn only_a_marked_send_holding_its_claim_skips_the_arbitrated_write() {
    let s = setup(LogicConfig::default()).await;
    let origin = super::origin(1, 10);
    let first = s
        .logic
        .send_message(&origin, &marked("m1", "one"))
        .await
        .expect("marked send");
    assert_eq!(s.writes(), (1, 0), "the claimed write");
    for again in [marked("m1", "one"), super::input(2, "m1", "one")] {
        let out = s.logic.send_message(&origin, &again).await.expect("resend");
        assert!(out.duplicate);
        assert_eq!((out.message_id, out.seq), (first.message_id, first.seq));
    }
    assert_eq!(s.writes(), (1, 0), "a resend finishes the claimed plan");
    s.logic
        .send_message(&origin, &super::input(2, "u1", "two"))
        .await
        .expect("unmarked send");
    assert_eq!(s.writes(), (1, 1), "an unmarked send arbitrates");
    assert_eq!(s.inbox_of_2().await, ["one", "two"]);

    let off = setup(LogicConfig {
        claimed_plans: false,
        ..LogicConfig::default()
    })
    .await;
    off.logic
        .send_message(&origin, &marked("m1", "one"))
        .await
        .expect("marked send");
    assert_eq!(off.writes(), (0, 1), "claimed_plans = false: arbitrated");
}

/// A claim Redis cannot take refuses the send as retryable, marked or not, and stores nothing; the
/// resend once Redis is back is stored once.
#[tokio::test]
async fn a_claim_that_fails_refuses_the_send_as_retryable() {
    let s = setup(LogicConfig::default()).await;
    let origin = super::origin(1, 10);
    s.claims.fail.store(true, Ordering::Relaxed);
    for input in [marked("f1", "one"), super::input(2, "f1", "one")] {
        let e = s
            .logic
            .send_message(&origin, &input)
            .await
            .expect_err("no claim, no send");
        assert_eq!(e.code, ErrorCode::Unavailable, "{e}");
        assert!(e.message.contains("same client_msg_id"), "{e}");
    }
    assert_eq!(s.writes(), (0, 0));
    assert!(s.inbox_of_2().await.is_empty(), "nothing stored");
    s.claims.fail.store(false, Ordering::Relaxed);
    let out = s
        .logic
        .send_message(&origin, &super::input(2, "f1", "one"))
        .await
        .expect("resend after Redis is back");
    assert!(!out.duplicate);
    assert_eq!(s.inbox_of_2().await, ["one"]);
}

/// A resend finishing a plan found in a claim yields to a different plan already stored (written by
/// an attempt that had lost its claim to a Redis loss): the stored one is the message.
#[tokio::test]
async fn a_claimed_plan_yields_to_a_different_stored_one() {
    let s = setup(LogicConfig::default()).await;
    let origin = super::origin(1, 10);
    let stored = s
        .logic
        .send_message(&origin, &super::input(2, "y1", "one"))
        .await
        .expect("stored by an unmarked send");
    // Redis lost that send's claim, and another attempt claimed it with a plan of its own.
    let ConversationSeqs {
        inbox: seqs,
        conv_seq,
        ..
    } = s
        .claims
        .next_in_conversation(&[1, 2], ConversationKey::direct(1, 2))
        .await
        .expect("seqs");
    let other = SendPlan {
        message_id: stored.message_id + 1_000,
        seq: seqs[0],
        server_time_ms: 1,
        recipients: vec![(1, seqs[0]), (2, seqs[1])],
        conv_seq,
    };
    s.claims
        .held
        .lock()
        .expect("lock")
        .insert((10, "y1".to_owned()), Some(other));
    let again = s
        .logic
        .send_message(&origin, &super::input(2, "y1", "one"))
        .await
        .expect("resend");
    assert!(again.duplicate);
    assert_eq!(
        (again.message_id, again.seq),
        (stored.message_id, stored.seq)
    );
    assert_eq!(s.inbox_of_2().await, ["one"], "stored once");
}
