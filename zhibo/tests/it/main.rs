//! End-to-end tests of the whole system: real sockets on loopback, real user-api over HTTP, and either
//! the embedded mode (in-process bus, redb) or the distributed mode (real NATS, Redis and Cassandra from
//! the test harness), with the same scenarios run against both.

#[macro_use]
mod both_modes;

mod bad_input;
mod cli;
mod cluster;
mod conversations;
mod faults;
mod ids;
mod isolation;
mod loadtest_smoke;
mod processes;
mod push;
mod reliability;
mod replay;
mod room_shaping;
mod rooms;
mod scenarios;
mod security;
mod telemetry;
mod webhooks;
