//! Endpoint health views on Redis: the worst fresh view of each endpoint
//! wins, a view older than the TTL counts for nothing (and is removed by the
//! next write), every org's endpoints work on a Redis Cluster, and a Redis
//! that is gone answers an error within the timeout.
//!
//! Every test uses its own org and endpoint ids, so tests share Redis safely.

use std::time::{Duration, Instant};

use domain::routing::EndpointHealth::{self, Ejected, Healthy, Probing, Unknown};
use limits::health::VIEW_TTL;
use limits::HealthViews;
use testkit::{RedisCluster, RedisServer};
use uuid::Uuid;

const SHARED_REDIS: &str = "redis://127.0.0.1:6379";

/// Views on `urls` waiting `timeout` at most, once a read succeeds (waits up to 10 s).
async fn connected(urls: &[String], timeout: Duration) -> HealthViews {
    let views = HealthViews::open(urls, timeout).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while views
        .worst(Uuid::new_v4(), &[Uuid::new_v4()])
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "never reached Redis at {urls:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    views
}

async fn shared() -> Option<HealthViews> {
    if !testkit::redis::listening(6379) {
        testkit::skip_unless_ci("Redis at 127.0.0.1:6379 (.ci/run starts one)");
        return None;
    }
    Some(connected(&[SHARED_REDIS.to_owned()], Duration::from_millis(500)).await)
}

#[tokio::test]
async fn the_worst_fresh_view_of_each_endpoint_is_shown() {
    let Some(views) = shared().await else { return };
    let org = Uuid::new_v4();
    let [a, b, c, d] = [(); 4].map(|_| Uuid::new_v4());
    views
        .report(
            "replica-1",
            org,
            &[(a, Healthy), (b, Healthy), (c, Probing)],
        )
        .await
        .unwrap();
    views
        .report(
            "replica-2",
            org,
            &[(a, Ejected), (b, Healthy), (c, Healthy)],
        )
        .await
        .unwrap();
    assert_eq!(
        views.worst(org, &[a, b, c, d]).await.unwrap(),
        [Ejected, Healthy, Probing, Unknown]
    );
    // A replica's newer view replaces its older one.
    views
        .report("replica-2", org, &[(a, Healthy)])
        .await
        .unwrap();
    assert_eq!(views.worst(org, &[a]).await.unwrap(), [Healthy]);
    // Another org's endpoints with the same ids are its own.
    assert_eq!(
        views.worst(Uuid::new_v4(), &[a, b]).await.unwrap(),
        [Unknown, Unknown]
    );
    // Unknown is never written; no endpoints, no call.
    views
        .report("replica-3", org, &[(d, Unknown)])
        .await
        .unwrap();
    assert_eq!(views.worst(org, &[d]).await.unwrap(), [Unknown]);
    assert!(views.worst(org, &[]).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_view_older_than_the_ttl_counts_for_nothing_and_is_removed() {
    let Some(views) = shared().await else { return };
    let mut redis = redis::Client::open(SHARED_REDIS)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let (org, endpoint) = (Uuid::new_v4(), Uuid::new_v4());
    let key = format!("llmgw:{{{org}}}:health:{endpoint}");
    // A replica that stopped: its last view ("3", ejected), written a TTL and a second ago.
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut redis).await.unwrap();
    let old = secs * 1000 + micros / 1000 - VIEW_TTL.as_millis() as u64 - 1000;
    let _: () = redis::cmd("HSET")
        .arg(&key)
        .arg("gone")
        .arg(format!("3:{old}"))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(views.worst(org, &[endpoint]).await.unwrap(), [Unknown]);
    views
        .report("live", org, &[(endpoint, Healthy)])
        .await
        .unwrap();
    assert_eq!(views.worst(org, &[endpoint]).await.unwrap(), [Healthy]);
    let fields: Vec<String> = redis::cmd("HKEYS")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(
        fields,
        ["live"],
        "the stale view is removed by the next write"
    );
    let ttl_ms: i64 = redis::cmd("PTTL")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(
        (1..=VIEW_TTL.as_millis() as i64).contains(&ttl_ms),
        "the hash expires with its last view: {ttl_ms}"
    );
}

#[tokio::test]
async fn views_of_many_orgs_work_on_a_cluster() {
    let Some(cluster) = RedisCluster::start(3) else {
        return;
    };
    let views = connected(&cluster.urls(), Duration::from_millis(500)).await;
    // Enough orgs that their hash tags fall on every node.
    let orgs: Vec<(Uuid, [Uuid; 3])> = (0..12)
        .map(|_| (Uuid::new_v4(), [(); 3].map(|_| Uuid::new_v4())))
        .collect();
    for (i, (org, eps)) in orgs.iter().enumerate() {
        let states = [Healthy, Probing, Ejected];
        let mine: Vec<(Uuid, EndpointHealth)> = eps.iter().map(|e| (*e, states[i % 3])).collect();
        views.report("replica-1", *org, &mine).await.unwrap();
        views
            .report("replica-2", *org, &[(eps[0], Healthy)])
            .await
            .unwrap();
    }
    for (i, (org, eps)) in orgs.iter().enumerate() {
        let want = [Healthy, Probing, Ejected][i % 3];
        assert_eq!(views.worst(*org, eps).await.unwrap(), [want; 3], "org {i}");
    }
}

#[tokio::test]
async fn a_redis_gone_answers_an_error_within_the_timeout() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let urls = [server.url()];
    // The settings API's bound.
    let views = connected(&urls, Duration::from_millis(50)).await;
    let org = Uuid::new_v4();
    let endpoint = Uuid::new_v4();
    views
        .report("r", org, &[(endpoint, Ejected)])
        .await
        .unwrap();
    assert_eq!(views.worst(org, &[endpoint]).await.unwrap(), [Ejected]);
    server.kill();
    for _ in 0..5 {
        let start = Instant::now();
        assert!(views.worst(org, &[endpoint]).await.is_err());
        assert!(views
            .report("r", org, &[(endpoint, Healthy)])
            .await
            .is_err());
        assert!(
            start.elapsed() < Duration::from_millis(300),
            "{:?}",
            start.elapsed()
        );
    }
    // Back (empty): reports work again on the same views.
    server.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    while views
        .report("r", org, &[(endpoint, Healthy)])
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "never reconnected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(views.worst(org, &[endpoint]).await.unwrap(), [Healthy]);
}
