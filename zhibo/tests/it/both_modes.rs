//! `both_modes!`, shared by the `it` and `hooks` test binaries (each includes this file with `#[macro_use]`).

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
