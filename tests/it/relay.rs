//! The outbox relay under operational events: a batch that misses its
//! deadline, a backlog too large to carry out key by key, a TRUNCATE, and
//! the cost of watching the backlog, and plans that fit a long outbox.

use std::time::Duration;

use readthrough::{
    cache::Kind,
    config::ServeConfig,
    store::{self, outbox},
};
use sqlx::{PgPool, postgres::PgPoolOptions};
use tonic::Code;

use readthrough_testkit::{Load, RedisProxy, Sandbox, TestApp, eventually, spawn_app, spawn_app_with};

const TO_OPEN: &str = r#"readthrough_cache_breaker_transitions_total{to="open"}"#;
const GET_ERRORS: &str = r#"readthrough_cache_errors_total{operation="get"}"#;
/// Batches (the relay's, here: no write goes through the service) that Redis did not confirm.
const BATCH_ERRORS: &str = r#"readthrough_cache_errors_total{operation="del"}"#;

/// `count` users inserted in SQL, their outbox carried out, and the first
/// `warm` of them cached; their ids.
async fn users_in_bulk(app: &TestApp, count: i64, warm: usize) -> Vec<String> {
    let ids: Vec<String> = sqlx::query_scalar(
        "INSERT INTO users (id, email) \
         SELECT gen_random_uuid(), 'bulk-' || n || '@example.com' FROM generate_series(1, $1) AS n \
         RETURNING id::text",
    )
    .bind(count)
    .fetch_all(&app.db)
    .await
    .unwrap();
    app.outbox_drained().await;
    for chunk in ids[..warm].chunks(500) {
        let found = app.client.batch_get_users(chunk).await.unwrap();
        assert_eq!(found.users.len(), chunk.len());
    }
    ids
}

async fn outbox_rows(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM cache_outbox")
        .fetch_one(&app.db)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_batch_that_misses_its_deadline_leaves_reads_and_the_breaker_alone() {
    let proxy = RedisProxy::start(&Sandbox::new().redis_url).await;
    let url = proxy.url.clone();
    let app = spawn_app_with(|config| {
        config.backends.cache.redis_url = url.parse().unwrap();
        // Carried out key by key, however long that takes.
        config.backends.cache.outbox_retire_after = Duration::from_secs(600);
        // Reads' deadline with room for a parallel test run's scheduling
        // delays; still below the relay's (250 ms and up), which a batch misses.
        config.backends.cache.redis_timeout = Duration::from_millis(200);
    })
    .await;
    let ids = users_in_bulk(&app, 1000, 50).await;

    // A congested link: a batch of 1000 rows (about 700 KB) takes 0.7 s,
    // far past its deadline; a GET takes well under a millisecond.
    proxy.limit_bandwidth(Some(1_000_000));
    let readers = Load::start(&app, &ids[..50]);
    let mut update = app.db.begin().await.unwrap();
    sqlx::query("UPDATE users SET email = 'changed-' || email")
        .execute(&mut *update)
        .await
        .unwrap();
    // All its rows past the writers' grace at once, so that one batch takes
    // them all (on a busy machine, rows aging a few at a time made batches
    // small enough to make their deadline).
    sqlx::query("UPDATE cache_outbox SET created_at = created_at - interval '1 second'")
        .execute(&mut *update)
        .await
        .unwrap();
    update.commit().await.unwrap();
    let drained = eventually(Duration::from_secs(30), || async { outbox_rows(&app).await == 0 }).await;
    let reads = readers.finish().await;
    proxy.limit_bandwidth(None);

    assert!(
        drained,
        "the backlog drained, in batches small enough to make their deadline"
    );
    let failed: Vec<&String> = reads.iter().filter_map(|r| r.error.as_ref()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} reads failed, e.g. {:?}",
        failed.len(),
        reads.len(),
        failed.first()
    );
    let [opened, get_errors, batch_errors] = app.metrics(&[TO_OPEN, GET_ERRORS, BATCH_ERRORS]).await[..] else {
        unreachable!("three samples")
    };
    assert!(batch_errors >= 1.0, "a relay batch missed its deadline");
    assert_eq!(
        (opened, get_errors),
        (0.0, 0.0),
        "and the reads' breaker never heard of it"
    );
    for id in &ids[..50] {
        assert!(app.get_user(id).await.email.starts_with("changed-"), "{id} is fresh");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_left_while_redis_was_unreachable_is_retired_with_a_new_key_epoch() {
    let proxy = RedisProxy::start(&Sandbox::new().redis_url).await;
    let url = proxy.url.clone();
    let app = spawn_app_with(|config| config.backends.cache.redis_url = url.parse().unwrap()).await;
    let ids = users_in_bulk(&app, 12_000, 100).await;
    let epoch = app.keys.epochs_known().of(Kind::User);

    proxy.cut();
    sqlx::query("UPDATE users SET email = 'changed-' || email")
        .execute(&app.db)
        .await
        .unwrap();
    // Older than OUTBOX_RETIRE_AFTER_MS (1 s) by the time Redis is back.
    let overdue = eventually(Duration::from_secs(5), || async {
        sqlx::query_scalar::<_, bool>(
            "SELECT coalesce(min(created_at) < clock_timestamp() - interval '1100 ms', false) FROM cache_outbox",
        )
        .fetch_one(&app.db)
        .await
        .unwrap()
    })
    .await;
    assert!(overdue);
    proxy.restore();

    let drained = eventually(Duration::from_secs(10), || async { outbox_rows(&app).await == 0 }).await;
    assert!(drained, "the backlog is gone");
    assert!(
        app.keys.epochs_known().of(Kind::User) > epoch,
        "users have a new key epoch"
    );
    assert_eq!(
        app.metric(r#"readthrough_events_published_total{event="user.retired"}"#)
            .await,
        1.0,
        "one event says every user changed"
    );
    for id in &ids[..100] {
        assert!(app.get_user(id).await.email.starts_with("changed-"), "{id} is fresh");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backlog_gauge_counts_every_waiting_row() {
    let proxy = RedisProxy::start(&Sandbox::new().redis_url).await;
    let url = proxy.url.clone();
    let app = spawn_app_with(|config| config.backends.cache.redis_url = url.parse().unwrap()).await;
    proxy.cut(); // nothing is relayed meanwhile
    sqlx::query(
        "INSERT INTO cache_outbox (entity, entity_id, event) \
         SELECT 'user', gen_random_uuid(), 'user.updated' FROM generate_series(1, 150000)",
    )
    .execute(&app.db)
    .await
    .unwrap();
    let counted = eventually(Duration::from_secs(5), || async {
        app.metric("readthrough_outbox_backlog_rows").await >= 150_000.0
    })
    .await;
    assert!(counted, "the gauge shows all 150,000 rows");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_a_truncate_is_swept_no_instance_serves_a_row_from_before_it() {
    let first = spawn_app().await;
    let second = first.spawn_sibling().await;
    for round in 0..3 {
        let user = first.create_user(&format!("truncated-{round}@example.com")).await;
        first.outbox_drained().await;
        second.get_user(&user.id).await;
        assert_eq!(second.get_user(&user.id).await, user, "cached in the other instance");

        sqlx::query("TRUNCATE users").execute(&first.db).await.unwrap();
        first.outbox_drained().await;
        let status = second.client.get_user(&user.id).await.unwrap_err();
        assert_eq!(
            status.code(),
            Code::NotFound,
            "round {round}: the row is gone for every instance"
        );
    }
}

/// Calls each statement on the outbox once (none changes a row that exists)
/// and returns, per statement, how many rows sequential scans read for it.
async fn outbox_rows_scanned(pool: &PgPool) -> Vec<(&'static str, i64)> {
    let mut scanned = Vec::new();
    let mut before = seq_rows_read(pool).await;
    let mut note = |name, after: i64| {
        scanned.push((name, after - before));
        before = after;
    };
    let mut tx = pool.begin().await.unwrap();
    outbox::take(&mut tx, 2000, Duration::ZERO, 0).await.unwrap();
    tx.rollback().await.unwrap();
    note("take", seq_rows_read(pool).await);
    let mut tx = pool.begin().await.unwrap();
    outbox::recorded(&mut tx).await.unwrap();
    tx.rollback().await.unwrap();
    note("recorded", seq_rows_read(pool).await);
    outbox::confirm(pool, &[-1]).await.unwrap();
    note("confirm", seq_rows_read(pool).await);
    outbox::pending(pool, &[-1]).await.unwrap();
    note("pending", seq_rows_read(pool).await);
    outbox::fence(pool, &[-1]).await.unwrap();
    note("fence", seq_rows_read(pool).await);
    outbox::join_fence(pool, &[-1], &["product"], Duration::ZERO)
        .await
        .unwrap();
    note("join_fence", seq_rows_read(pool).await);
    outbox::fenced(pool).await.unwrap();
    note("fenced", seq_rows_read(pool).await);
    outbox::overdue(pool, Duration::from_secs(3600), 10_000).await.unwrap();
    note("overdue", seq_rows_read(pool).await);
    outbox::remove_covered(pool, &["user"], "1").await.unwrap();
    note("remove_covered", seq_rows_read(pool).await);
    store::outbox_backlog(pool).await.unwrap();
    note("backlog", seq_rows_read(pool).await);
    scanned
}

/// Rows of the outbox read by sequential scans so far (this connection's
/// counts flushed first).
async fn seq_rows_read(pool: &PgPool) -> i64 {
    sqlx::query("SELECT pg_stat_force_next_flush()")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query_scalar("SELECT seq_tup_read FROM pg_stat_user_tables WHERE relname = 'cache_outbox'")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_statements_first_run_on_an_empty_outbox_use_its_indexes_once_it_is_long() {
    // One connection, so every call meets the plans its earlier calls left.
    let (_sandbox, pool) = outbox_only(1).await;
    // No ANALYZE of the outbox while the test runs: plans see only its size.
    sqlx::query("ALTER TABLE cache_outbox SET (autovacuum_enabled = false)")
        .execute(&pool)
        .await
        .unwrap();
    // The outbox as it usually is: empty and vacuumed (autovacuum does so
    // after each burst of rows), every statement run often (a prepared
    // statement switches to a cached generic plan on its sixth run).
    sqlx::query("VACUUM ANALYZE cache_outbox").execute(&pool).await.unwrap();
    for _ in 0..6 {
        outbox_rows_scanned(&pool).await;
    }
    // A bulk change in SQL: 100,000 rows waiting.
    sqlx::query(
        "INSERT INTO cache_outbox (entity, entity_id, event) \
         SELECT 'product', gen_random_uuid(), 'product.updated' FROM generate_series(1, 100000)",
    )
    .execute(&pool)
    .await
    .unwrap();
    // A plan for a whole scan reads all 100,000; `overdue` may stop a scan after its 10,000.
    let whole_scans: Vec<_> = outbox_rows_scanned(&pool)
        .await
        .into_iter()
        .filter(|&(_, rows)| rows > 10_000)
        .collect();
    assert!(
        whole_scans.is_empty(),
        "statements that scanned the long outbox whole: {whole_scans:?}"
    );
}

/// A migrated database of its own (dropped with the sandbox), with no
/// instance (so no relay) on it; a pool of `connections` to it.
async fn outbox_only(connections: u32) -> (Sandbox, PgPool) {
    let sandbox = Sandbox::new();
    let mut database = ServeConfig::from_env().backends.database;
    database.name = Some(sandbox.database_name.clone());
    store::migrate(&database).await.unwrap();
    let pool = PgPoolOptions::new()
        .max_connections(connections)
        .connect_with(sandbox.connect_options())
        .await
        .unwrap();
    (sandbox, pool)
}

/// `count` outbox rows of users, recorded `seconds` ago; their ids.
async fn waiting_user_rows(pool: &PgPool, count: i64, seconds: i64) -> Vec<i64> {
    sqlx::query_scalar(
        "INSERT INTO cache_outbox (entity, entity_id, event, created_at) \
         SELECT 'user', gen_random_uuid(), 'user.updated', clock_timestamp() - $2 * interval '1 second' \
         FROM generate_series(1, $1) RETURNING id",
    )
    .bind(count)
    .bind(seconds as f64)
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_take_starts_past_the_given_id_oldest_first_and_says_how_long_its_first_row_waited() {
    let (_sandbox, pool) = outbox_only(2).await;
    let ids = waiting_user_rows(&pool, 10, 2).await;

    let mut tx = pool.begin().await.unwrap();
    let taken = outbox::take(&mut tx, 3, Duration::ZERO, ids[4]).await.unwrap();
    let taken_ids: Vec<i64> = taken.rows.iter().map(|row| row.id).collect();
    assert_eq!(taken_ids, ids[5..8], "the three rows after the fifth");
    assert!(
        (Duration::from_secs(2)..Duration::from_secs(60)).contains(&taken.oldest_age),
        "waited about 2 s: {:?}",
        taken.oldest_age
    );
    tx.commit().await.unwrap();
    let left: Vec<i64> = sqlx::query_scalar("SELECT id FROM cache_outbox ORDER BY id")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(left, [&ids[..5], &ids[8..]].concat(), "only those were deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_held_elsewhere_while_a_backlog_drains_past_it_is_carried_out_by_a_later_pass() {
    let app = spawn_app().await;
    // Not takeable yet (dated in the future), then made takeable in a
    // transaction that holds its lock: as if another relay had claimed it.
    let held: i64 = sqlx::query_scalar(
        "INSERT INTO cache_outbox (entity, entity_id, event, created_at) \
         VALUES ('user', gen_random_uuid(), 'user.updated', clock_timestamp() + interval '1 hour') RETURNING id",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    let mut holder = app.db.begin().await.unwrap();
    sqlx::query("UPDATE cache_outbox SET created_at = clock_timestamp() - interval '1 second' WHERE id = $1")
        .bind(held)
        .execute(&mut *holder)
        .await
        .unwrap();
    // Behind it, a backlog of several batches (too few rows to be retired).
    waiting_user_rows(&app.db, 5000, 1).await;

    let passed = eventually(Duration::from_secs(10), || async { outbox_rows(&app).await == 1 }).await;
    assert!(passed, "the relay carried out the backlog past the held row");
    holder.commit().await.unwrap();
    app.outbox_drained().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_looks_for_backlogs_to_retire_only_after_a_full_take_of_old_rows() {
    let app = spawn_app().await;
    let looked = r#"readthrough_db_duration_seconds_count{query="outbox.overdue"}"#;
    // Small changes by hand, carried out by the relay in takes that are not full.
    for round in 0..3 {
        sqlx::query("INSERT INTO users (id, email) VALUES (gen_random_uuid(), $1)")
            .bind(format!("small-{round}@example.com"))
            .execute(&app.db)
            .await
            .unwrap();
        app.outbox_drained().await;
    }
    assert_eq!(app.metric(looked).await, 0.0, "no look for a backlog");

    // A backlog large and old enough to retire: the relay looks, and retires it.
    let epoch = app.keys.epochs_known().of(Kind::User);
    waiting_user_rows(&app.db, 15_000, 2).await;
    app.outbox_drained().await;
    assert!(
        app.metric(looked).await >= 1.0,
        "looked once a take was full of old rows"
    );
    assert!(app.keys.epochs_known().of(Kind::User) > epoch, "and retired the users");
}
