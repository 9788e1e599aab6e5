//! # Layout
//! - [`client`]: one raw connection over TCP, WebSocket and QUIC (`zhibo_client::conn`, re-exported).
//! - [`http`]: the user-api calls a client needs (`zhibo_client::api`, re-exported).
//! - [`bench`]: the load generator and benchmark scenarios (`zhibo-loadtest bench <scenario>`), with
//!   their report (JSON + SVG charts) and the ceilings (raw NATS, Redis, WebSocket).
#![warn(missing_docs)]

pub mod bench;
pub use zhibo_client::api as http;
pub use zhibo_client::conn as client;
