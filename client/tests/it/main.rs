//! The SDK against real servers: an embedded node (`zhibo dev` in-process) and the distributed cluster
//! (real NATS, Redis and Cassandra), with a frame-aware TCP proxy to cut the network under a client.

/// `both_modes!(scenario, …)` defines `embedded::scenario` and `distributed::scenario`.
macro_rules! both_modes {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let cluster = crate::fixture::Cluster::embedded().await;
                    super::$name(&cluster).await;
                    cluster.stop().await;
                }
            )*
        }
        mod distributed {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let cluster = crate::fixture::Cluster::distributed().await;
                    super::$name(&cluster).await;
                    cluster.stop().await;
                }
            )*
        }
    };
}

mod app;
mod fixture;
mod proxy;
mod session;
