//! # Layout
//! - [`client`]: a zhibo client over TCP, WebSocket and QUIC (sign-in, requests matched by request id).
//! - [`chat`]: the terminal chat client (`zhibo-loadtest chat`).
//! - [`http`]: the user-api calls a client needs (register device, sign up, sign in).
//! - [`bench`]: the load generator and benchmark scenarios (`zhibo-loadtest bench <scenario>`), with
//!   their report (JSON + SVG charts) and the ceilings (raw NATS, Redis, WebSocket).
#![warn(missing_docs)]

pub mod bench;
pub mod chat;
pub mod client;
pub mod http;
