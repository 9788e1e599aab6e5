//! Smoke tests of the test harness itself: each server `scripts/infra.sh up` starts is reachable
//! at the address `zhibo_testkit` reports and does its basic job. If one of these fails, every
//! other integration test that needs that server will fail too; start here.

mod cassandra;
mod nats;
mod redis;
