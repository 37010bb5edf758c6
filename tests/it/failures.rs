//! Redis failing under load: stopped and started again, black-holed, and the
//! circuit breaker's life cycle (see `cache::breaker`). Every wait is bounded,
//! and everything runs on loopback.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use readthrough::{
    cache::{Entry, Hooks},
    domain::{User, UserId},
};

use readthrough_testkit::{
    Load, OwnRedis, READERS, RedisProxy, Sandbox, TestApp, eventually, spawn_app_with, spawn_app_with_hooks, warm_users,
};

const USER_HITS: &str = r#"readthrough_cache_hits_total{entity="user"}"#;
const USER_MISSES: &str = r#"readthrough_cache_misses_total{entity="user"}"#;
const GET_ERRORS: &str = r#"readthrough_cache_errors_total{operation="get"}"#;
const GET_SKIPPED: &str = r#"readthrough_cache_skipped_total{operation="get"}"#;
const BREAKER_STATE: &str = "readthrough_cache_breaker_state";
const TO_OPEN: &str = r#"readthrough_cache_breaker_transitions_total{to="open"}"#;
const TO_HALF_OPEN: &str = r#"readthrough_cache_breaker_transitions_total{to="half_open"}"#;
const TO_CLOSED: &str = r#"readthrough_cache_breaker_transitions_total{to="closed"}"#;
/// The values of `BREAKER_STATE`.
const CLOSED: f64 = 0.0;
const HALF_OPEN: f64 = 1.0;
const OPEN: f64 = 2.0;

/// Latencies of `READERS` readers reading `ids` from `app` for `period`.
async fn latencies(app: &TestApp, ids: &[String], period: Duration) -> Vec<Duration> {
    let load = Load::start(app, ids);
    tokio::time::sleep(period).await;
    let reads = load.finish().await;
    let failed: Vec<&String> = reads.iter().filter_map(|r| r.error.as_ref()).collect();
    assert!(failed.is_empty(), "{} reads failed, e.g. {:?}", failed.len(), failed[0]);
    reads.into_iter().map(|r| r.took).collect()
}

fn p99(latencies: &mut [Duration]) -> Duration {
    latencies.sort();
    latencies[(latencies.len() * 99).div_ceil(100) - 1]
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// The user hit and miss counters, scraped every 50 ms for `period`.
async fn sample_outcomes(app: &TestApp, period: Duration, samples: &mut Vec<(Instant, f64, f64)>) {
    let until = Instant::now() + period;
    while Instant::now() < until {
        let counts = app.metrics(&[USER_HITS, USER_MISSES]).await;
        samples.push((Instant::now(), counts[0], counts[1]));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The first sample at or after `from` whose trailing `window` has a hit rate
/// above `rate`: how long after `from` it came, and that rate.
fn first_window_above(
    samples: &[(Instant, f64, f64)],
    from: Instant,
    window: Duration,
    rate: f64,
) -> Option<(Duration, f64)> {
    samples.iter().enumerate().find_map(|(end, &(at, hits, misses))| {
        if at < from {
            return None;
        }
        let start = samples[..end].iter().rev().find(|(t, _, _)| *t + window <= at)?;
        let (hits, reads) = (hits - start.1, hits + misses - start.1 - start.2);
        (reads > 0.0 && hits / reads > rate).then(|| (at - from, hits / reads))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_for_3_s_under_read_load_fails_no_read_and_hits_return_within_2_s() {
    let mut redis_server = OwnRedis::start().await;
    let url = redis_server.url.clone();
    let mut app = spawn_app_with(|config| config.backends.cache.redis_url = url.parse().unwrap()).await;
    let ids = warm_users(&mut app, 50).await;

    let load = Load::start(&app, &ids);
    let mut samples = Vec::new();
    sample_outcomes(&app, Duration::from_secs(1), &mut samples).await;
    redis_server.kill();
    let stopped = Instant::now();
    sample_outcomes(&app, Duration::from_secs(3), &mut samples).await;
    redis_server.start_again().await; // same port, empty
    let returned = Instant::now();
    sample_outcomes(&app, Duration::from_secs(3), &mut samples).await;
    let reads = load.finish().await;

    let failed: Vec<&String> = reads.iter().filter_map(|r| r.error.as_ref()).collect();
    let during_outage = reads
        .iter()
        .filter(|r| r.started >= stopped && r.started < returned)
        .count();
    let recovery = first_window_above(&samples, returned, Duration::from_millis(250), 0.99);
    let skipped = app.metric(GET_SKIPPED).await;
    println!(
        "{} reads ({during_outage} while Redis was down for {:.1} s), {} failed; \
         {skipped} GETs skipped by the open breaker; hit rate above 99 % (250 ms window) {} after Redis returned",
        reads.len(),
        (returned - stopped).as_secs_f64(),
        failed.len(),
        recovery.map_or("never".to_string(), |(after, rate)| format!(
            "{:.0} ms (at {:.2} %)",
            ms(after),
            rate * 100.0
        )),
    );
    assert!(failed.is_empty(), "{} reads failed, e.g. {:?}", failed.len(), failed[0]);
    assert!(during_outage > 0, "reads went on while Redis was down");
    let (after, _) = recovery.expect("the hit rate came back above 99 %");
    assert!(
        after <= Duration::from_secs(2),
        "hits came back {after:?} after Redis returned"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_redis_costs_a_request_at_most_one_deadline_and_then_none() {
    const DEADLINE: Duration = Duration::from_millis(300);
    let proxy = RedisProxy::start(&Sandbox::new().redis_url).await;
    let url = proxy.url.clone();
    let mut app = spawn_app_with(|config| {
        config.backends.cache.redis_url = url.parse().unwrap();
        config.backends.cache.redis_timeout = DEADLINE;
    })
    .await;
    // The same database and requests, read without Redis: what the breaker should come close to.
    let cache_off = app
        .spawn_sibling_with(|config| config.backends.cache.enabled = false)
        .await;
    let ids = warm_users(&mut app, 50).await;
    let failures = f64::from(app.config.backends.cache.redis_breaker_failures);

    proxy.black_hole();
    let load = Load::start(&app, &ids);
    let opened = eventually(Duration::from_secs(10), || async {
        app.metric(GET_SKIPPED).await > 0.0
    })
    .await;
    let before_open = load.finish().await;
    assert!(opened, "the breaker opened");
    let errors_at_open = app.metric(GET_ERRORS).await;
    let failed: Vec<&String> = before_open.iter().filter_map(|r| r.error.as_ref()).collect();
    assert!(failed.is_empty(), "{} reads failed, e.g. {:?}", failed.len(), failed[0]);
    let slowest = before_open.iter().map(|r| r.took).max().unwrap();
    println!(
        "black hole: the breaker opened after {errors_at_open} GET deadlines (REDIS_BREAKER_FAILURES={failures}); \
         slowest read before that {:.0} ms (deadline {} ms)",
        ms(slowest),
        DEADLINE.as_millis()
    );
    assert!(
        slowest < 2 * DEADLINE,
        "a read waited for more than one deadline: {slowest:?}"
    );
    // The run that opened it, plus the calls the other readers had in flight then.
    assert!(
        (failures..failures + READERS as f64).contains(&errors_at_open),
        "{errors_at_open} deadlines before the breaker opened"
    );

    // Rounds taken in turn, so that both see the same machine (other builds run too).
    let (mut off, mut open) = (Vec::new(), Vec::new());
    for _ in 0..4 {
        off.extend(latencies(&cache_off, &ids, Duration::from_millis(500)).await);
        open.extend(latencies(&app, &ids, Duration::from_millis(500)).await);
    }
    let (off_p99, open_p99) = (p99(&mut off), p99(&mut open));
    let ratio = open_p99.as_secs_f64() / off_p99.as_secs_f64();
    println!(
        "black hole, breaker open: GetUser p99 {:.3} ms over {} calls; cache off: p99 {:.3} ms over {} calls; ratio {ratio:.2}",
        ms(open_p99),
        open.len(),
        ms(off_p99),
        off.len()
    );
    assert_eq!(
        app.metric(GET_ERRORS).await,
        errors_at_open,
        "no read waited for a deadline once the breaker was open"
    );
    assert!(app.metric(BREAKER_STATE).await >= HALF_OPEN, "still open (or probing)");
    assert!(
        ratio <= 2.0,
        "p99 with the breaker open is {ratio:.2} x the cache-off p99"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_opens_skips_probes_once_and_closes_when_redis_answers_again() {
    const DEADLINE: Duration = Duration::from_millis(1000);
    const COOLDOWN: Duration = Duration::from_millis(500);
    let proxy = RedisProxy::start(&Sandbox::new().redis_url).await;
    let url = proxy.url.clone();
    let app = spawn_app_with(|config| {
        config.backends.cache.redis_url = url.parse().unwrap();
        config.backends.cache.redis_timeout = DEADLINE;
        config.backends.cache.redis_breaker_failures = 3;
        config.backends.cache.redis_breaker_cooldown = COOLDOWN;
    })
    .await;
    let user = app.create_user("cycle@example.com").await;
    app.get_user(&user.id).await; // cached
    assert_eq!(app.metric(BREAKER_STATE).await, CLOSED);

    // Two reads at once, each failing open after one deadline: one stall as
    // far as the breaker can tell, so it stays closed.
    proxy.black_hole();
    let reads: Vec<_> = (0..2)
        .map(|_| {
            let (client, id) = (app.client.clone(), user.id.clone());
            tokio::spawn(async move { client.get_user(&id).await.map(|u| u.email) })
        })
        .collect();
    for read in reads {
        assert_eq!(read.await.unwrap().unwrap(), "cycle@example.com");
    }
    assert_eq!(
        app.metrics(&[BREAKER_STATE, GET_ERRORS]).await,
        [CLOSED, 2.0],
        "two deadlines missed together (state, GET errors)"
    );
    // A third read, sent after them, misses its deadline too: the run has
    // lasted a deadline, and its third failure opens it.
    assert_eq!(app.get_user(&user.id).await.email, "cycle@example.com");
    assert_eq!(
        app.metrics(&[BREAKER_STATE, TO_OPEN, GET_ERRORS]).await,
        [OPEN, 1.0, 3.0],
        "open after 3 failures over a deadline (state, transitions to open, GET errors)"
    );

    // Open: reads skip Redis, without waiting for its deadline.
    for _ in 0..5 {
        let started = Instant::now();
        assert_eq!(app.get_user(&user.id).await.email, "cycle@example.com");
        assert!(
            started.elapsed() < DEADLINE,
            "a skipped read took {:?}",
            started.elapsed()
        );
    }
    assert_eq!(
        app.metrics(&[GET_SKIPPED, GET_ERRORS]).await,
        [5.0, 3.0],
        "every read skipped Redis (GETs skipped, GET errors)"
    );

    // After the cool-down the next read half-opens it and sends the one probe,
    // which Redis does not answer either: while it waits, reads still skip.
    tokio::time::sleep(COOLDOWN + Duration::from_millis(100)).await;
    app.get_user(&user.id).await;
    assert_eq!(app.metric(BREAKER_STATE).await, HALF_OPEN, "probing");
    for _ in 0..5 {
        app.get_user(&user.id).await;
    }
    assert_eq!(
        app.metrics(&[TO_HALF_OPEN, GET_SKIPPED, GET_ERRORS]).await,
        [1.0, 11.0, 3.0],
        "one probe; every read skipped while it ran (transitions to half-open, GETs skipped, GET errors)"
    );
    let reopened = eventually(Duration::from_secs(5), || async {
        app.metrics(&[BREAKER_STATE, TO_OPEN]).await == [OPEN, 2.0]
    })
    .await;
    assert!(reopened, "the unanswered probe opened the breaker again");

    // Redis answers again (on new connections): the next probe closes it, and reads hit.
    proxy.cut();
    proxy.restore();
    let closed = eventually(Duration::from_secs(10), || {
        let (app, id) = (&app, &user.id);
        async move {
            app.get_user(id).await;
            app.metrics(&[BREAKER_STATE, TO_CLOSED]).await == [CLOSED, 1.0]
        }
    })
    .await;
    assert!(closed, "the breaker closed once Redis answered");
    // A connection the outage broke is found out by its next command (at once,
    // not by a deadline) and replaced, so allow a read or two for that.
    let hit = eventually(Duration::from_secs(5), || {
        let (app, id) = (&app, &user.id);
        async move {
            let hits = app.metric(USER_HITS).await;
            app.get_user(id).await;
            app.metric(USER_HITS).await == hits + 1.0
        }
    })
    .await;
    assert!(hit, "reads are served from Redis again");
    let transitions = app.metrics(&[TO_OPEN, TO_HALF_OPEN, TO_CLOSED]).await;
    println!(
        "breaker transitions: to open {}, half-open {}, closed {}",
        transitions[0], transitions[1], transitions[2]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_made_while_the_breaker_is_open_is_invalidated_once_redis_returns() {
    let proxy = RedisProxy::start(&Sandbox::new().redis_url).await;
    let url = proxy.url.clone();
    let mut app = spawn_app_with(|config| config.backends.cache.redis_url = url.parse().unwrap()).await;
    let user = app.create_user("before@example.com").await;
    let key = app.keys.user(UserId::parse(&user.id).unwrap());
    assert!(
        app.read_until_cached(&key, || app.get_user(&user.id)).await,
        "version 1 is cached"
    );

    proxy.cut();
    for _ in 0..app.config.backends.cache.redis_breaker_failures {
        app.get_user(&user.id).await;
    }
    assert_eq!(app.metric(BREAKER_STATE).await, OPEN);

    let updated = app.rename_user(&user.id, "after@example.com").await.unwrap();
    assert_eq!(updated.version, 2, "the write commits while the breaker is open");
    assert!(app.exists(&key).await, "the stale entry is still in Redis");
    assert!(app.metric("readthrough_invalidation_failures_total").await >= 1.0);
    let read = app.get_user(&user.id).await;
    assert_eq!(read.email, "after@example.com", "reads skip the stale entry while open");

    proxy.restore();
    let gone = app.eventually_exists(&key, false, Duration::from_secs(10)).await;
    assert!(gone, "the relay removed the stale entry once Redis was back");
    // The relay's connection is outside the breaker: reads close it (the
    // first after the cooldown probes Redis), whenever the relay ran.
    let closed = eventually(Duration::from_secs(5), || async {
        app.get_user(&user.id).await;
        app.metric(BREAKER_STATE).await == CLOSED
    })
    .await;
    assert!(closed, "the breaker closed again once Redis was back");
    app.outbox_drained().await;
    // Once the write's fence is seen lifted, reads fill the cache again.
    let mut filled = false;
    for _ in 0..100 {
        let read = app.get_user(&user.id).await;
        assert_eq!(read.email, "after@example.com");
        if app.exists(&key).await {
            filled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(filled, "filled again");
    let cached: Entry<User> = app.cached_value(&key).await.expect("filled again");
    assert_eq!(
        cached.value.map(|u| (u.email, u.version)),
        Some(("after@example.com".to_string(), 2))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_the_open_breaker_skips_gives_its_lease_back() {
    let sandbox = Sandbox::new();
    let proxy = RedisProxy::start(&sandbox.redis_url).await;
    let id = uuid::Uuid::new_v4().to_string();
    // The first fill of `id` waits until the test lets it go.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let hooks = Hooks {
        before_fill: Some(Arc::new({
            let (gate, id) = (gate.clone(), id.clone());
            move |key: &str| {
                let (gate, wait) = (gate.clone(), key.contains(&id));
                Box::pin(async move {
                    if wait {
                        let _ = gate.acquire().await.map(|permit| permit.forget());
                    }
                })
            }
        })),
        ..Hooks::default()
    };
    let url = proxy.url.clone();
    let app = spawn_app_with_hooks(hooks, |config| {
        config.backends.cache.redis_url = url.parse().unwrap();
        config.backends.cache.lease = Duration::from_secs(10);
    })
    .await;
    let direct = sandbox.redis_url.clone();
    let other = app
        .spawn_sibling_with(|config| config.backends.cache.redis_url = direct.parse().unwrap())
        .await;
    // Five users too big to come through a slow link within the deadline
    // (about 7 KB each, compressed), cached by the other instance.
    let big: Vec<String> = sqlx::query_scalar(
        "INSERT INTO users (id, email, preferences) \
         SELECT gen_random_uuid(), 'big-' || n || '@example.com', \
                jsonb_build_object('blob', (SELECT string_agg(md5(random()::text || n || k), '') FROM generate_series(1, 400) k)) \
         FROM generate_series(1, 5) n RETURNING id::text",
    )
    .fetch_all(&app.db)
    .await
    .unwrap();
    sqlx::query("INSERT INTO users (id, email) VALUES ($1::uuid, 'leased@example.com')")
        .bind(&id)
        .execute(&app.db)
        .await
        .unwrap();
    app.outbox_drained().await;
    for user in &big {
        other.get_user(user).await;
    }

    // The instance takes the lease and loads; its fill waits at the gate.
    let lease = app.keys.lease(&app.keys.user(UserId::parse(&id).unwrap()));
    let read = tokio::spawn({
        let client = app.client.clone();
        let id = id.clone();
        async move { client.get_user(&id).await }
    });
    assert!(
        app.eventually_exists(&lease, true, Duration::from_secs(2)).await,
        "leased"
    );
    // Its reads of the big users miss their deadline: the breaker opens.
    proxy.limit_bandwidth(Some(5_000));
    let opened = eventually(Duration::from_secs(10), || async {
        for user in &big {
            app.get_user(user).await;
        }
        app.metric(BREAKER_STATE).await == OPEN
    })
    .await;
    assert!(opened, "the breaker opened");
    gate.add_permits(1);
    assert_eq!(read.await.unwrap().unwrap().id, id, "answered from PostgreSQL");

    let started = Instant::now();
    assert_eq!(other.get_user(&id).await.id, id);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the other instance took the lease at once instead of waiting out its 10 s ({:?})",
        started.elapsed()
    );
}
