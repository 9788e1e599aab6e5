//! # Layout
//! - [`session`]: [`Session`], a signed-in device that stays connected and owns the protocol's rules
//!   (heartbeat, resume from the last contiguous seq, sync on a gap, resends with the same
//!   `client_msg_id`, GoAway, Kick, back-off with jitter, rooms), and its [`Events`].
//! - [`seq`]: which seqs a device holds ([`SeqTracker`], no I/O) and where the resume point is kept
//!   ([`SeqStore`], [`MemorySeqStore`]).
//! - [`backoff`]: reconnection delays with jitter (no I/O).
//! - [`conn`]: one raw connection over TCP, WebSocket or QUIC (framing, sign-in, request ids); the
//!   load generator and the end-to-end tests use it directly.
//! - [`api`]: the user-api calls a client makes (devices, sign-up/in, friends, user search).
//! - [`error`]: the [`Error`] type.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use zhibo_client::{Api, Event, Options, Session, Transport};
//! use zhibo_client::proto::client::ReceiverType;
//!
//! let api = Api::new("http://127.0.0.1:7000");
//! let device = api.register_device("pc").await?;
//! let creds = api.sign_up_and_in("alice", "a long password", device).await?;
//! let (session, mut events) =
//!     Session::connect(Options::new(Transport::Tcp, "127.0.0.1:7001", creds)).await?;
//! let ack = session.send(ReceiverType::User, 42, 1, "hello").await?;
//! println!("sent as seq {}", ack.seq);
//! while let Some(event) = events.next().await {
//!     if let Event::Message(m) = event {
//!         println!("{}: {}", m.sender_user_id, String::from_utf8_lossy(&m.content));
//!     }
//! }
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

pub mod api;
pub mod backoff;
pub mod conn;
pub mod error;
pub mod seq;
pub mod session;

pub use api::{Api, ApiError};
pub use conn::{Client, Credentials, Transport};
pub use error::Error;
pub use seq::{MemorySeqStore, SeqStore, SeqTracker};
pub use session::{Event, Events, Options, Session};
/// The wire protocol's types.
pub use zhibo_proto as proto;
