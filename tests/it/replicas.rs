//! Read replicas (`DATABASE_READ_URLS`): a primary and a streaming replica of
//! the test's own, the replica applying every change 500 ms late
//! (`recovery_min_apply_delay`), so it is always behind. Misses may read it,
//! but never a row older than a write that was acknowledged.

use std::time::{Duration, Instant};

use readthrough::domain::UserId;
use readthrough_client::proto;
use sqlx::PgPool;

use crate::consistency::assert_consistent;
use readthrough_testkit::{
    TestApp,
    checker::{self, Settings},
    eventually,
    own_postgres::OwnPostgres,
    spawn_app_with, use_database,
};

const REPLICA_READS: &str = r#"readthrough_db_miss_reads_total{server="replica"}"#;
const PRIMARY_READS: &str = r#"readthrough_db_miss_reads_total{server="primary"}"#;
/// How late the replica applies what the primary commits.
const APPLY_DELAY: &str = "500ms";

struct Topology {
    primary: OwnPostgres,
    replica: OwnPostgres,
}

impl Topology {
    async fn start() -> Self {
        let primary = OwnPostgres::init(&[], &[]).await;
        let replica = primary.replica(&[("recovery_min_apply_delay", APPLY_DELAY)]).await;
        Self { primary, replica }
    }

    fn database_url(&self) -> String {
        self.primary.url("readthrough")
    }

    fn read_urls(&self) -> Vec<String> {
        vec![self.replica.url("readthrough")]
    }

    /// An instance on this primary, loading misses from `read_url` when it may.
    async fn spawn_app_reading(&self, read_url: &str) -> TestApp {
        let database_url = self.database_url();
        spawn_app_with(|config| {
            use_database(config, &database_url);
            config.backends.replicas.read_urls = vec![read_url.parse().unwrap()];
        })
        .await
    }

    /// An instance on this primary and replica, once the replica is usable:
    /// it has the database the instance created, and is within the lag bound.
    async fn spawn_app(&self) -> TestApp {
        let app = self.spawn_app_reading(&self.read_urls()[0]).await;
        let replica_read = miss_until_counted(&app, REPLICA_READS).await;
        assert!(replica_read, "the replica serves misses once it has caught up");
        app
    }
}

/// Reads ids no one has (misses with no write marker, which a usable replica
/// may serve) until `sample` counts more than zero; whether it did in 20 s.
async fn miss_until_counted(app: &TestApp, sample: &str) -> bool {
    eventually(Duration::from_secs(20), || async {
        let unknown = proto::GetUserRequest {
            id: uuid::Uuid::new_v4().to_string(),
        };
        let _ = app.users.clone().get_user(unknown).await;
        app.metric(sample).await > 0.0
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_right_after_a_write_through_another_instance_is_never_the_replicas_old_row() {
    let topology = Topology::start().await;
    let app = topology.spawn_app().await;
    let mut other = app.spawn_sibling().await;
    let user = app.create_user("before@example.com").await;
    let id = UserId::parse(&user.id).unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await; // the replica has the user now

    let primary_before = other.metric(PRIMARY_READS).await;
    for round in 1..=10 {
        let email = format!("round-{round}@example.com");
        let written = app.rename_user(&user.id, &email).await.unwrap();
        let started = Instant::now();
        let read = other.get_user(&user.id).await;
        assert_eq!(
            (read.email.as_str(), read.version),
            (email.as_str(), written.version),
            "round {round}: the read right after the write ({:?} later) sees it",
            started.elapsed()
        );
        let cached: readthrough::cache::Entry<readthrough::domain::User> = other
            .cached_value(&other.keys.user(id))
            .await
            .expect("the read filled the cache");
        assert_eq!(
            cached.value.map(|user| user.version),
            Some(written.version),
            "round {round}: the cached entry is the new version"
        );
    }
    let primary_reads = other.metric(PRIMARY_READS).await - primary_before;
    assert!(
        primary_reads >= 10.0,
        "with the replica 500 ms behind, each read right after its write went to the primary ({primary_reads})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consistency_checker_finds_nothing_stale_with_a_lagging_replica() {
    let topology = Topology::start().await;
    // Creates the database and waits until the replica serves.
    let _app = topology.spawn_app().await;
    let report = checker::run(Settings {
        clients: 16,
        duration: Duration::from_secs(4),
        database: Some((topology.database_url(), topology.read_urls())),
        ..Settings::small()
    })
    .await;
    assert_consistent(&report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn most_misses_of_a_read_heavy_load_are_served_by_the_replica() {
    let topology = Topology::start().await;
    let app = topology.spawn_app().await;
    let mut ids = Vec::new();
    for n in 0..200 {
        ids.push(app.create_user(&format!("reader-{n}@example.com")).await.id);
    }
    app.outbox_drained().await;
    tokio::time::sleep(Duration::from_secs(1)).await; // the replica has them all
    let before = app.metrics(&[REPLICA_READS, PRIMARY_READS]).await;

    // Every user read once (a miss each), and one in ten then renamed and read again.
    for (n, id) in ids.iter().enumerate() {
        app.get_user(id).await;
        if n % 10 == 0 {
            let email = format!("renamed-{n}@example.com");
            app.rename_user(id, &email).await.unwrap();
            assert_eq!(app.get_user(id).await.email, email, "the write is read back");
        }
    }

    let after = app.metrics(&[REPLICA_READS, PRIMARY_READS]).await;
    let (replica, primary) = (after[0] - before[0], after[1] - before[1]);
    // PostgreSQL's own count agrees: the replica ran those lookups of users.
    let on_replica = PgPool::connect(&topology.read_urls()[0]).await.unwrap();
    let scanned = eventually(Duration::from_secs(5), || async {
        let scans: i64 = sqlx::query_scalar(
            "SELECT coalesce(sum(idx_scan), 0)::bigint FROM pg_stat_user_tables WHERE relname = 'users'",
        )
        .fetch_one(&on_replica)
        .await
        .unwrap();
        scans as f64 >= replica
    })
    .await;
    assert!(
        scanned,
        "the replica's pg_stat_user_tables counts at least {replica} index scans of users"
    );
    let share = replica / (replica + primary);
    println!(
        "misses served by the replica: {replica} of {} ({:.0} %)",
        replica + primary,
        share * 100.0
    );
    assert!(
        replica + primary >= 220.0,
        "every read was a miss: {replica} + {primary}"
    );
    assert!(share > 0.8, "most misses read the replica: {share:.2}");
    assert!(
        primary >= 20.0,
        "each read right after its write read the primary: {primary}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_replica_is_down_misses_read_the_primary() {
    let topology = Topology::start().await;
    let app = topology.spawn_app().await;
    let mut ids = Vec::new();
    for n in 0..20 {
        ids.push(app.create_user(&format!("fallback-{n}@example.com")).await.id);
    }
    tokio::time::sleep(Duration::from_secs(1)).await; // the replica has them all
    topology.replica.stop().await;

    let primary_before = app.metric(PRIMARY_READS).await;
    for id in &ids {
        assert_eq!(&app.get_user(id).await.id, id, "read while the replica is down");
    }
    let primary_reads = app.metric(PRIMARY_READS).await - primary_before;
    assert!(primary_reads >= 20.0, "the primary served every miss: {primary_reads}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misses_a_replica_fails_to_load_are_answered_by_the_primary() {
    let topology = Topology::start().await;
    // A role that may connect and be probed but may not read the tables: the
    // replica looks current, and every load sent to it fails.
    let admin = PgPool::connect(&topology.primary.url("postgres")).await.unwrap();
    sqlx::query("CREATE ROLE no_reads LOGIN").execute(&admin).await.unwrap();
    let read_url = topology
        .replica
        .url("readthrough")
        .replacen("postgres@", "no_reads@", 1);
    let app = topology.spawn_app_reading(&read_url).await;
    let mut ids = Vec::new();
    for n in 0..20 {
        ids.push(app.create_user(&format!("refused-{n}@example.com")).await.id);
    }
    const FAILURES: &str = r#"readthrough_db_replica_read_failures_total{replica="0"}"#;
    let replica_failed = miss_until_counted(&app, FAILURES).await;
    assert!(replica_failed, "the replica was asked, and failed");

    let primary_before = app.metric(PRIMARY_READS).await;
    for id in &ids {
        assert_eq!(&app.get_user(id).await.id, id, "read while the replica fails");
    }
    let [primary, replica] = app.metrics(&[PRIMARY_READS, REPLICA_READS]).await[..] else {
        unreachable!()
    };
    assert!(
        primary - primary_before >= 20.0,
        "the primary answered every miss: {primary}"
    );
    assert_eq!(replica, 0.0, "no load succeeded on the replica");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writes_marker_covers_its_commit_even_when_the_log_is_written_out_late() {
    // Asynchronous commit: a commit is visible before its log record is
    // written out, and the WAL writer writes only every 10 s.
    let primary = OwnPostgres::init(&[("synchronous_commit", "off"), ("wal_writer_delay", "10000ms")], &[]).await;
    let (database_url, read_url) = (primary.url("readthrough"), primary.url("readthrough"));
    // Any read URL makes writes mark their keys; this one (the primary) is never read as a replica.
    let mut app = spawn_app_with(|config| {
        use_database(config, &database_url);
        config.backends.replicas.read_urls = vec![read_url.parse().unwrap()];
    })
    .await;
    let user = app.create_user("marked@example.com").await;
    app.outbox_drained().await;

    let before: i64 = sqlx::query_scalar("SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint")
        .fetch_one(&app.db)
        .await
        .unwrap();
    app.rename_user(&user.id, "remarked@example.com").await.unwrap();
    let marker_key = app
        .keys
        .write_marker(readthrough::cache::Kind::User, UserId::parse(&user.id).unwrap());
    let marker = app.cached(&marker_key).await.expect("the write left a marker");
    let marked = readthrough::store::replicas::Lsn::from_marker(&marker).expect("a position");
    assert!(
        marked.0 > before as u64,
        "the marker ({:x}) lies past where the log was before the write ({before:x})",
        marked.0
    );
}
