//! The service needs no superuser: a role that owns its database migrates it
//! and serves, as compose runs it (deploy/postgres-init.sql).

use readthrough_client::proto::ListProductsRequest;
use sqlx::{Connection, Executor, PgConnection, postgres::PgConnectOptions};

use readthrough_testkit::{Sandbox, spawn_app_with, use_database};

/// A role like compose's `readthrough` and a database it owns; dropped on Drop.
struct OwnedDatabase {
    admin: PgConnectOptions,
    name: String,
}

impl OwnedDatabase {
    async fn create(sandbox: &Sandbox) -> Self {
        let admin = sandbox.admin_options();
        let name = format!("rt_owner_{}", uuid::Uuid::new_v4().simple());
        let mut conn = PgConnection::connect_with(&admin).await.unwrap();
        conn.execute(sqlx::AssertSqlSafe(format!(
            "CREATE ROLE {name} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE"
        )))
        .await
        .unwrap();
        conn.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name} OWNER {name}")))
            .await
            .unwrap();
        Self { admin, name }
    }

    /// The database, as its owner (the machine's PostgreSQL trusts local connections).
    fn url(&self) -> String {
        let (host, port) = (self.admin.get_host(), self.admin.get_port());
        format!("postgres://{}@{host}:{port}/{}", self.name, self.name)
    }
}

impl Drop for OwnedDatabase {
    fn drop(&mut self) {
        cleanup(vec![
            (
                self.admin.clone(),
                format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
            ),
            (self.admin.clone(), format!("DROP ROLE IF EXISTS {}", self.name)),
        ]);
    }
}

/// Runs each statement on its server as the admin, in order, ignoring
/// failures. Drop runs inside the test's runtime: this runs on a thread of its own.
fn cleanup(statements: Vec<(PgConnectOptions, String)>) {
    let _ = std::thread::spawn(move || {
        tokio::runtime::Runtime::new().unwrap().block_on(async {
            for (server, statement) in statements {
                if let Ok(mut conn) = PgConnection::connect_with(&server).await {
                    let _ = conn.execute(sqlx::AssertSqlSafe(statement)).await;
                }
            }
        })
    })
    .join();
}

#[tokio::test]
async fn a_role_that_owns_its_database_but_is_no_superuser_migrates_and_serves() {
    let sandbox = Sandbox::new();
    let owned = OwnedDatabase::create(&sandbox).await;
    let url = owned.url();
    let mut app = spawn_app_with(|config| use_database(config, &url)).await;

    let superuser: bool = sqlx::query_scalar("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert!(!superuser, "the test connects as the owner, not a superuser");

    let user = app.create_user("owner@example.com").await;
    app.rename_user(&user.id, "renamed@example.com")
        .await
        .expect("writes, with their outbox triggers, work as the owner");
    let read = app.client.get_user(&user.id).await.unwrap();
    assert_eq!(read.email, "renamed@example.com");
    app.create_products("owned", 3).await;
    let page = app
        .products
        .list_products(ListProductsRequest {
            category_id: "owned".into(),
            page_size: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.total_count, 3);
    sqlx::query("TRUNCATE products")
        .execute(&app.db)
        .await
        .expect("the owner may truncate, and its trigger records the sweep");
    app.outbox_drained().await;
}

/// A login role (trusted locally, no password), dropped with its grants on Drop.
struct Role {
    admin: PgConnectOptions,
    name: String,
    database: String,
}

impl Role {
    async fn create(owned: &OwnedDatabase, prefix: &str) -> Self {
        let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
        let mut admin = PgConnection::connect_with(&owned.admin).await.unwrap();
        admin
            .execute(sqlx::AssertSqlSafe(format!("CREATE ROLE {name} LOGIN")))
            .await
            .unwrap();
        Self {
            admin: owned.admin.clone(),
            name,
            database: owned.name.clone(),
        }
    }

    fn url(&self) -> String {
        let (host, port) = (self.admin.get_host(), self.admin.get_port());
        format!("postgres://{}@{host}:{port}/{}", self.name, self.database)
    }

    async fn connect(&self) -> PgConnection {
        PgConnection::connect(&self.url()).await.unwrap()
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        cleanup(vec![
            // Its grants live in the database: drop them there first.
            (
                self.admin.clone().database(&self.database),
                format!("DROP OWNED BY {}", self.name),
            ),
            (self.admin.clone(), format!("DROP ROLE IF EXISTS {}", self.name)),
        ]);
    }
}

#[tokio::test]
async fn serve_runs_as_a_role_that_may_only_read_and_write_rows() {
    let sandbox = Sandbox::new();
    let owned = OwnedDatabase::create(&sandbox).await;
    let service = Role::create(&owned, "rt_service").await;
    let other = Role::create(&owned, "rt_other").await;
    let owner_url = owned.url();
    let service_name = service.name.clone();
    // The owner migrates, granting the service role its privileges.
    let migrated = spawn_app_with(|config| {
        use_database(config, &owner_url);
        config.backends.database.service_role = service_name;
    })
    .await;
    drop(migrated);

    let service_url = service.url();
    let app = spawn_app_with(|config| {
        use_database(config, &service_url);
        config.server.migrate_on_start = false;
    })
    .await;
    let user = app.create_user("least@example.com").await;
    app.rename_user(&user.id, "privilege@example.com")
        .await
        .expect("writes, their triggers and the outbox work as the service role");
    assert_eq!(
        app.client.get_user(&user.id).await.unwrap().email,
        "privilege@example.com"
    );
    app.create_products("least", 3).await;
    let first = app
        .products
        .clone()
        .list_products(ListProductsRequest {
            category_id: "least".into(),
            page_size: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let second = app
        .products
        .clone()
        .list_products(ListProductsRequest {
            category_id: "least".into(),
            page_size: 2,
            page_token: first.next_page_token,
            ..Default::default()
        })
        .await
        .expect("page tokens are signed with the key the service role may read")
        .into_inner();
    assert_eq!(first.products.len() + second.products.len(), 3);
    app.client.delete_user(&user.id).await.unwrap();
    app.outbox_drained().await;

    let mut conn = service.connect().await;
    for (what, sql) in [
        ("create a table", "CREATE TABLE intruder (id int)"),
        ("alter a table", "ALTER TABLE users ADD COLUMN intruder int"),
        ("truncate", "TRUNCATE users"),
        ("read the migrations", "SELECT count(*) FROM _sqlx_migrations"),
        (
            "change a page token key",
            "UPDATE page_token_keys SET created_at = now()",
        ),
        ("add a page token key", "INSERT INTO page_token_keys (key) VALUES ('x')"),
    ] {
        let error = conn
            .execute(sqlx::AssertSqlSafe(sql))
            .await
            .expect_err(&format!("the service role may not {what}"));
        assert_eq!(insufficient_privilege(&error), Some(true), "{what}: {error}");
    }
    let mut conn = other.connect().await;
    for table in ["page_token_keys", "users"] {
        let error = conn
            .execute(sqlx::AssertSqlSafe(format!("SELECT * FROM {table}")))
            .await
            .expect_err("a role granted nothing reads nothing");
        assert_eq!(insufficient_privilege(&error), Some(true), "{table}: {error}");
    }
}

/// Whether PostgreSQL refused for want of a privilege (SQLSTATE 42501:
/// "permission denied", "must be owner").
fn insufficient_privilege(error: &sqlx::Error) -> Option<bool> {
    Some(error.as_database_error()?.code()? == "42501")
}
