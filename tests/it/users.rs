//! UserService: cache-aside reads and write-then-invalidate, seen through Redis and metrics.

use prost_types::{Struct, Value, value::Kind};
use readthrough::{
    cache::Entry,
    domain::{User, UserId},
};
use readthrough_client::proto;
use tonic::Code;

use readthrough_testkit::{TestApp, email_change, redis, spawn_app};

fn preferences(theme: &str) -> Struct {
    Struct {
        fields: [(
            "theme".to_string(),
            Value {
                kind: Some(Kind::StringValue(theme.to_string())),
            },
        )]
        .into(),
    }
}

async fn create_user(app: &TestApp, email: &str) -> proto::User {
    let preferences = Some(preferences("dark"));
    app.client.create_user(email, preferences).await.unwrap()
}

async fn get_user(app: &TestApp, id: &str) -> Result<proto::User, tonic::Status> {
    app.client.get_user(id).await
}

fn key(app: &TestApp, id: &str) -> String {
    app.keys.user(UserId::parse(id).unwrap())
}

#[tokio::test]
async fn second_read_is_a_cache_hit() {
    let mut app = spawn_app().await;
    let created = create_user(&app, "ada@example.com").await;

    let first = get_user(&app, &created.id).await.unwrap();
    assert!(
        app.exists(&key(&app, &created.id)).await,
        "the first read fills the cache"
    );
    assert_eq!(app.metric(r#"readthrough_cache_hits_total{entity="user"}"#).await, 0.0);
    assert_eq!(
        app.metric(r#"readthrough_db_queries_total{query="user.get_many"}"#)
            .await,
        1.0
    );

    let second = get_user(&app, &created.id).await.unwrap();
    assert_eq!(second, first);
    assert_eq!(app.metric(r#"readthrough_cache_hits_total{entity="user"}"#).await, 1.0);
    assert_eq!(
        app.metric(r#"readthrough_db_queries_total{query="user.get_many"}"#)
            .await,
        1.0,
        "the second read did not reach PostgreSQL"
    );
}

#[tokio::test]
async fn update_through_one_instance_is_read_through_another() {
    let writer = spawn_app().await;
    let reader = writer.spawn_sibling().await;
    let created = create_user(&writer, "grace@example.com").await;
    let before = get_user(&reader, &created.id).await.unwrap();
    assert_eq!(before.email, "grace@example.com");

    let renamed = email_change(&created.id, "grace.hopper@example.com");
    writer.client.update_user(renamed, &["email"], 1).await.unwrap();

    let after = get_user(&reader, &created.id).await.unwrap();
    assert_eq!(after.email, "grace.hopper@example.com");
    assert_eq!(after.version, 2);
    assert_eq!(
        after.preferences, before.preferences,
        "fields outside the mask are kept"
    );
}

#[tokio::test]
async fn deleted_user_is_not_found_and_its_key_is_gone() {
    let mut app = spawn_app().await;
    let created = create_user(&app, "linus@example.com").await;
    let key = key(&app, &created.id);
    assert!(app.read_until_cached(&key, || get_user(&app, &created.id)).await);

    app.client.delete_user(&created.id).await.unwrap();

    assert!(!app.exists(&key).await, "delete invalidates before it returns");
    let status = get_user(&app, &created.id).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let again = app.client.delete_user(&created.id).await.unwrap_err();
    assert_eq!(again.code(), Code::NotFound);
}

#[tokio::test]
async fn garbage_in_a_cached_user_is_a_miss_and_is_repaired() {
    let mut app = spawn_app().await;
    let created = create_user(&app, "barbara@example.com").await;
    let expected = get_user(&app, &created.id).await.unwrap();
    let key = key(&app, &created.id);

    for garbage in [
        &b"\x00\xffnot messagepack"[..],
        b"",
        b"\x01\x00\x93\x01\x02\x03",
        b"\x01\x01zstd?",
    ] {
        let _: () = redis::cmd("SET")
            .arg(&key)
            .arg(garbage)
            .query_async(&mut app.redis)
            .await
            .unwrap();
        assert_eq!(
            get_user(&app, &created.id).await.unwrap(),
            expected,
            "garbage {garbage:?}"
        );
        let repaired: User = app
            .cached_value::<Entry<User>>(&key)
            .await
            .and_then(|e| e.value)
            .expect("refilled");
        assert_eq!(repaired.id.to_string(), created.id);
        assert_eq!(repaired.email, "barbara@example.com");
    }
    assert_eq!(
        app.metric(r#"readthrough_cache_corrupt_total{entity="user"}"#).await,
        4.0
    );
}

#[tokio::test]
async fn a_cached_value_of_another_user_is_not_served() {
    let mut app = spawn_app().await;
    let alice = create_user(&app, "alice@example.com").await;
    let bob = create_user(&app, "bob@example.com").await;
    get_user(&app, &alice.id).await.unwrap();
    let alice_bytes = app.cached(&key(&app, &alice.id)).await.unwrap();
    let bob_key = key(&app, &bob.id);
    let _: () = redis::cmd("SET")
        .arg(&bob_key)
        .arg(alice_bytes)
        .query_async(&mut app.redis)
        .await
        .unwrap();

    assert_eq!(get_user(&app, &bob.id).await.unwrap().email, "bob@example.com");
}

#[tokio::test]
async fn batch_get_returns_found_users_and_reports_missing_ids() {
    let mut app = spawn_app().await;
    let a = create_user(&app, "a@example.com").await;
    let b = create_user(&app, "b@example.com").await;
    let absent = uuid::Uuid::new_v4().to_string();
    get_user(&app, &a.id).await.unwrap();

    let response = app
        .client
        .batch_get_users([&a.id, &absent, &b.id, &a.id])
        .await
        .unwrap();

    let ids: Vec<&str> = response.users.iter().map(|u| u.id.as_str()).collect();
    assert_eq!(ids, [a.id.as_str(), b.id.as_str()], "in request order, duplicates once");
    assert_eq!(response.missing_ids, [absent]);
    assert_eq!(
        app.metric(r#"readthrough_cache_hits_total{entity="user"}"#).await,
        1.0,
        "a was cached"
    );
    assert!(app.exists(&key(&app, &b.id)).await, "the miss was filled");
}

#[tokio::test]
async fn version_preconditions_and_duplicate_emails_are_enforced() {
    let app = spawn_app().await;
    let user = create_user(&app, "ken@example.com").await;
    create_user(&app, "dennis@example.com").await;
    let update = |email: &str, expected_version: i64| {
        app.client
            .update_user(email_change(&user.id, email), &["email"], expected_version)
    };

    let stale = update("ken2@example.com", 7).await.unwrap_err();
    assert_eq!(stale.code(), Code::Aborted);
    let taken = update("DENNIS@example.com", 0).await.unwrap_err();
    assert_eq!(
        taken.code(),
        Code::AlreadyExists,
        "emails are unique regardless of case"
    );
    let duplicate = app.client.create_user("Ken@Example.com", None).await.unwrap_err();
    assert_eq!(duplicate.code(), Code::AlreadyExists);

    let composed = app.client.create_user("caf\u{e9}@example.com", None).await.unwrap();
    let decomposed = app
        .client
        .create_user("cafe\u{301}@example.com", None)
        .await
        .unwrap_err();
    assert_eq!(
        decomposed.code(),
        Code::AlreadyExists,
        "an email typed with a combining accent is the same address"
    );
    assert_eq!(composed.email, "caf\u{e9}@example.com", "stored composed (NFC)");

    let updated = update("ken2@example.com", 1).await.unwrap();
    assert_eq!((updated.email.as_str(), updated.version), ("ken2@example.com", 2));
}
