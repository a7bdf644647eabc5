//! Cluster-wide rate limits and concurrency caps against a real `redis-server` (one per test, on a
//! free port, killed on drop). Several `Cluster` handles stand for several broker instances.
//!
//! `redis-server` must be on PATH (Debian/Ubuntu: `apt-get install redis-server`); without it these
//! tests fail, unless `MCP_BROKER_SKIP_REDIS=1` says to skip them.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mcp_broker::cluster::Cluster;
use mcp_broker::cluster::limits::{Permit, acquire_slot, take_token};
use mcp_broker::config::{ClusterConfig, RateLimit, Secret};
use mcp_broker::limits::{Concurrency, RateLimiter};
use support::Redis;
use tokio_util::sync::CancellationToken;

mod support;

/// One broker instance's handle on the cluster, once its heartbeat has reached Redis.
async fn instance(port: u16, name: &str, stop: &CancellationToken) -> Arc<Cluster> {
    let config = ClusterConfig {
        redis_url: Secret::new(format!("redis://127.0.0.1:{port}")),
        instance_id: name.into(),
        secret_key: Secret::new("k".repeat(32)),
        share_credentials: false,
    };
    let c = Cluster::start(config, Duration::from_secs(60), stop.child_token()).expect("start");
    wait_for(|| c.is_up(), "the cluster handle to reach Redis").await;
    c
}

async fn wait_for(cond: impl Fn() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Redis's clock, in seconds.
async fn redis_now(c: &Cluster) -> f64 {
    let (s, us): (u64, u64) = redis::cmd("TIME")
        .query_async(&mut c.conn())
        .await
        .expect("TIME");
    s as f64 + us as f64 / 1e6
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_share_one_bucket_within_one_token() {
    let Some(redis) = Redis::start() else { return };
    let stop = CancellationToken::new();
    let mut nodes = Vec::new();
    for name in ["a", "b", "c"] {
        nodes.push(instance(redis.port, name, &stop).await);
    }
    // One token every 50 ms: far coarser than a round trip, so the window's edges cost < 1 token.
    let limit = RateLimit {
        per_second: 20.0,
        burst: 10,
    };

    // A fresh bucket: the burst, then a refusal saying when the next token comes.
    let probe = RateLimit {
        per_second: 2.0,
        burst: 3,
    };
    for n in &nodes {
        assert_eq!(
            n.take_token("caller", "probe", &probe).await.unwrap(),
            Ok(())
        );
    }
    let wait = nodes[0]
        .take_token("caller", "probe", &probe)
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        wait > Duration::from_millis(400) && wait <= Duration::from_millis(500),
        "{wait:?}"
    );

    let admitted = Arc::new(AtomicUsize::new(0));
    let t0 = redis_now(&nodes[0]).await;
    let end = Instant::now() + Duration::from_secs(2);
    let mut tasks = Vec::new();
    for node in &nodes {
        for _ in 0..4 {
            let (node, admitted) = (node.clone(), admitted.clone());
            tasks.push(tokio::spawn(async move {
                while Instant::now() < end {
                    // A subject with key syntax in it: hashed into the key, it changes nothing.
                    match node.take_token("caller", "alice:*{x}", &limit).await {
                        Ok(Ok(())) => {
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Err(_)) => {}
                        Err(e) => panic!("redis: {e}"),
                    }
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let t1 = redis_now(&nodes[0]).await;
    let admitted = admitted.load(Ordering::Relaxed) as f64;
    // What one ideal bucket, full at t0 and asked without pause until t1, hands out: the burst
    // plus every whole token refilled meanwhile.
    let expected = f64::from(limit.burst) + (limit.per_second * (t1 - t0)).floor();
    assert!(
        (admitted - expected).abs() <= 1.0,
        "admitted {admitted}, expected {expected} (±1) over {:.3} s",
        t1 - t0
    );

    // The bucket's key expires when it would be full again (here: within burst / rate = 0.5 s).
    let key = mcp_broker::cluster::limits::bucket_key("caller", "alice:*{x}");
    let pttl: i64 = redis::cmd("PTTL")
        .arg(&key)
        .query_async(&mut nodes[0].conn())
        .await
        .unwrap();
    assert!(pttl > 0 && pttl <= 600, "pttl {pttl}");
    assert!(!key.contains("alice"), "{key}");
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_cap_holds_across_instances_and_dead_leases_expire() {
    let Some(redis) = Redis::start() else { return };
    let stop = CancellationToken::new();
    let mut nodes = Vec::new();
    for name in ["a", "b", "c"] {
        nodes.push(instance(redis.port, name, &stop).await);
    }
    const MAX: usize = 3;

    // Twelve workers on three instances contend for three slots.
    let in_flight = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let served = Arc::new(AtomicUsize::new(0));
    let end = Instant::now() + Duration::from_millis(1500);
    let mut tasks = Vec::new();
    for node in &nodes {
        for _ in 0..4 {
            let node = node.clone();
            let (in_flight, peak, served) = (in_flight.clone(), peak.clone(), served.clone());
            tasks.push(tokio::spawn(async move {
                while Instant::now() < end {
                    let lease = node
                        .lease(
                            "ledger",
                            MAX,
                            Duration::from_secs(10),
                            Duration::from_secs(2),
                        )
                        .await
                        .expect("redis");
                    let Some(lease) = lease else { continue };
                    let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    let live = node.leases("ledger").await.expect("redis");
                    assert!(live <= MAX, "{live} leases live");
                    tokio::time::sleep(Duration::from_millis(15)).await;
                    served.fetch_add(1, Ordering::Relaxed);
                    // Counted out before the lease goes: the count never exceeds the live leases.
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    drop(lease);
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        peak.load(Ordering::SeqCst),
        MAX,
        "the cap is reached, never passed"
    );
    assert!(served.load(Ordering::Relaxed) > 20, "slots were passed on");
    // Dropped leases are released (in the background).
    wait_for_leases(&nodes[0], 0).await;

    // A live instance renews a lease past its lifetime while the call runs ...
    let held = nodes[0]
        .lease("ledger", 1, Duration::from_millis(800), Duration::ZERO)
        .await
        .unwrap()
        .expect("a free slot");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        nodes[1]
            .lease("ledger", 1, Duration::from_secs(1), Duration::ZERO)
            .await
            .unwrap()
            .is_none(),
        "a renewed lease still holds its slot"
    );
    // ... and releases it on drop, at once.
    drop(held);
    let t = Instant::now();
    let next = nodes[1]
        .lease("ledger", 1, Duration::from_secs(1), Duration::from_secs(2))
        .await
        .unwrap();
    assert!(next.is_some() && t.elapsed() < Duration::from_millis(500));
    drop(next);
    wait_for_leases(&nodes[0], 0).await;

    // An instance that dies holding every slot: its guards never drop, its runtime (and so its
    // renewals) stops. Its leases expire after their lifetime.
    let port = redis.port;
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let stop = CancellationToken::new();
            let dead = instance(port, "dead", &stop).await;
            for _ in 0..MAX {
                let lease = dead
                    .lease("ledger", MAX, Duration::from_millis(1200), Duration::ZERO)
                    .await
                    .unwrap()
                    .expect("a free slot");
                std::mem::forget(lease);
            }
        });
        rt.shutdown_background();
    })
    .join()
    .unwrap();
    let died = Instant::now();
    assert_eq!(nodes[0].leases("ledger").await.unwrap(), MAX);
    assert!(
        nodes[0]
            .lease("ledger", MAX, Duration::from_secs(1), Duration::ZERO)
            .await
            .unwrap()
            .is_none()
    );
    let freed = nodes[0]
        .lease(
            "ledger",
            MAX,
            Duration::from_secs(1),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert!(freed.is_some(), "the dead instance's leases expired");
    assert!(
        died.elapsed() < Duration::from_millis(2500),
        "{:?}",
        died.elapsed()
    );
    stop.cancel();
}

async fn wait_for_leases(c: &Cluster, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let live = c.leases("ledger").await.expect("redis");
        if live == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{live} leases live, expected {n}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_are_global_while_redis_answers_and_local_when_it_does_not() {
    let Some(redis) = Redis::start() else { return };
    let port = redis.port;
    let stop = CancellationToken::new();
    let (a, b) = (
        instance(redis.port, "a", &stop).await,
        instance(redis.port, "b", &stop).await,
    );
    // Each instance has its own local buckets and semaphore, as in the broker.
    let (local_a, local_b) = (RateLimiter::default(), RateLimiter::default());
    let (slots_a, slots_b) = (Concurrency::new(1), Concurrency::new(1));
    let limit = RateLimit {
        per_second: 0.001,
        burst: 2,
    };
    let second = Duration::from_secs(1);
    let short = Duration::from_millis(50);

    // Up: one bucket and one cap for both instances.
    assert!(
        take_token(Some(&a), &local_a, "caller", "alice", &limit)
            .await
            .is_ok()
    );
    assert!(
        take_token(Some(&b), &local_b, "caller", "alice", &limit)
            .await
            .is_ok()
    );
    assert!(
        take_token(Some(&a), &local_a, "caller", "alice", &limit)
            .await
            .is_err()
    );
    let held = acquire_slot(Some(&a), &slots_a, "ledger", second, short).await;
    assert!(matches!(held, Some(Permit::Global(_))));
    assert!(
        acquire_slot(Some(&b), &slots_b, "ledger", second, short)
            .await
            .is_none()
    );
    drop(held);

    // Redis stops. Before the heartbeat notices, a failing command falls back to local buckets.
    drop(redis);
    assert!(
        take_token(Some(&a), &local_a, "caller", "bob", &limit)
            .await
            .is_ok()
    );
    // Once it has noticed, Redis is not tried at all.
    wait_for(
        || !a.is_up() && !b.is_up(),
        "the heartbeat to notice Redis is gone",
    )
    .await;
    assert!(
        take_token(Some(&a), &local_a, "caller", "bob", &limit)
            .await
            .is_ok()
    );
    assert!(
        take_token(Some(&a), &local_a, "caller", "bob", &limit)
            .await
            .is_err(),
        "still limited, by the local bucket"
    );
    // Each instance has a bucket of its own now (up to N× the limit until Redis is back).
    assert!(
        take_token(Some(&b), &local_b, "caller", "bob", &limit)
            .await
            .is_ok()
    );
    let held = acquire_slot(Some(&a), &slots_a, "ledger", second, short).await;
    assert!(matches!(held, Some(Permit::Local(_))));
    assert!(
        acquire_slot(Some(&a), &slots_a, "ledger", second, short)
            .await
            .is_none(),
        "still capped, by the local semaphore"
    );
    drop(held);
    let metrics = mcp_broker::metrics::global().render("");
    assert!(
        !metrics.contains("mcp_broker_cluster_limit_fallbacks_total 0\n"),
        "fallbacks are counted"
    );

    // Redis comes back (empty): the instances reconnect by themselves and limit globally again.
    let _redis = Redis::on(port);
    wait_for(
        || a.is_up() && b.is_up(),
        "the cluster handles to reconnect",
    )
    .await;
    assert!(
        take_token(Some(&a), &local_a, "caller", "carol", &limit)
            .await
            .is_ok()
    );
    assert!(
        take_token(Some(&b), &local_b, "caller", "carol", &limit)
            .await
            .is_ok()
    );
    assert!(
        take_token(Some(&b), &local_b, "caller", "carol", &limit)
            .await
            .is_err()
    );
    stop.cancel();
}
