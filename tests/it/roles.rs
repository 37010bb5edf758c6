//! The service needs no superuser: a role that owns its database migrates it
//! and serves, as compose runs it (deploy/postgres-init.sql).

use readthrough_client::proto::ListProductsRequest;
use sqlx::{Connection, Executor, PgConnection, postgres::PgConnectOptions};

use crate::helpers::{Sandbox, spawn_app_with, use_database};

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
        let (admin, name) = (self.admin.clone(), self.name.clone());
        // Drop runs inside the test's runtime: clean up on a thread of its own.
        let _ = std::thread::spawn(move || {
            tokio::runtime::Runtime::new().unwrap().block_on(async {
                if let Ok(mut admin) = PgConnection::connect_with(&admin).await {
                    let _ = admin
                        .execute(sqlx::AssertSqlSafe(format!(
                            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                        )))
                        .await;
                    let _ = admin
                        .execute(sqlx::AssertSqlSafe(format!("DROP ROLE IF EXISTS {name}")))
                        .await;
                }
            })
        })
        .join();
    }
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
