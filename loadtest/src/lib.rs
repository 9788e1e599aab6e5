//! # Layout
//! - [`client`]: a zhibo client over TCP, WebSocket and QUIC (sign-in, requests matched by request id).
//! - [`http`]: the user-api calls a client needs (register device, sign up, sign in).
#![warn(missing_docs)]

pub mod client;
pub mod http;
