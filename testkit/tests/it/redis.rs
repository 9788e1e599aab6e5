use fred::prelude::*;
use zhibo_testkit::{require_redis, unique_name};

#[tokio::test]
async fn incr_counts_from_one() {
    let url = require_redis().await;
    let client = Builder::from_config(Config::from_url(&url).expect("redis URL"))
        .build()
        .expect("build Redis client");
    client.init().await.expect("connect to Redis");
    let key = unique_name("it_redis");

    let first: i64 = client.incr(&key).await.expect("INCR");
    let second: i64 = client.incr(&key).await.expect("INCR");
    assert_eq!((first, second), (1, 2));

    let _: i64 = client.del(&key).await.expect("DEL");
    client.quit().await.expect("QUIT");
}
