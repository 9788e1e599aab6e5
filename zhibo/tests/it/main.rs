//! End-to-end tests of the whole system: real sockets on loopback, real user-api over HTTP, and either
//! the embedded mode (in-process bus, redb) or the distributed mode (real NATS, Redis and Cassandra from
//! the test harness), with the same scenarios run against both.

/// One test per scenario and mode: `both_modes!(Fixture, worker_threads, scenario, …)` defines
/// `embedded::scenario` and `distributed::scenario`, each starting the fixture (`embedded()` or
/// `distributed()`), running `scenario(&fixture)` and stopping it.
macro_rules! both_modes {
    ($fixture:path, $threads:literal, $($name:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = $threads)]
                async fn $name() {
                    use $fixture as Fixture;
                    let fixture = Fixture::embedded().await;
                    super::$name(&fixture).await;
                    fixture.stop().await;
                }
            )*
        }
        mod distributed {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = $threads)]
                async fn $name() {
                    use $fixture as Fixture;
                    let fixture = Fixture::distributed().await;
                    super::$name(&fixture).await;
                    fixture.stop().await;
                }
            )*
        }
    };
}

mod bad_input;
mod cli;
mod cluster;
mod clustered_infra;
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
