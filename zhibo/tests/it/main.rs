//! End-to-end tests of the whole system: real sockets on loopback, real user-api over HTTP, and either
//! the embedded mode (in-process bus, redb) or the distributed mode (real NATS, Redis and Cassandra from
//! the test harness), with the same scenarios run against both.

mod bad_input;
mod cli;
mod cluster;
mod faults;
mod loadtest_smoke;
mod rooms;
mod scenarios;
mod telemetry;
