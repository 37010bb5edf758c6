//! Demo data, inserted in batches with `UNNEST` (one statement per batch).
//!
//! Ids are derived from the row number (UUID v5), so seeding twice inserts
//! nothing new and the README can name ids that exist on every machine.
//!
//! The outbox triggers record every inserted row, as for any write. Seed
//! carries out each batch's invalidations itself, coalesced (a handful of
//! category lists and the rows' own keys, in one round trip, no events), and
//! then deletes the batch's outbox rows, so a `serve` started afterwards does
//! not relay a million rows one event at a time. If Redis does not answer,
//! the rows stay for the relay, as for any write.

use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use crate::{
    domain::{ProductId, UserId},
    service::{Services, relay},
    store::{StoreError, outbox},
};

/// Namespace of the demo data's v5 UUIDs.
const DEMO_NAMESPACE: Uuid = Uuid::from_u128(0x6f2c_1d3e_8a4b_4c5d_9e6f_7a8b_9c0d_1e2f);
const BATCH: u32 = 5_000;

const ADJECTIVES: &[&str] = &[
    "Amber", "Bold", "Calm", "Deft", "Eager", "Fine", "Grand", "Hardy", "Ivory", "Jolly", "Keen", "Lucid",
];
const NOUNS: &[&str] = &[
    "Anvil", "Basket", "Candle", "Drum", "Easel", "Flask", "Globe", "Hammer", "Inkwell", "Jug", "Kettle", "Lamp",
];
const CURRENCIES: &[&str] = &["EUR", "USD", "GBP"];

#[derive(Debug, Clone, Copy)]
pub struct SeedOptions {
    pub users: u32,
    pub products: u32,
    pub categories: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeedReport {
    pub users_inserted: u64,
    pub products_inserted: u64,
    /// Outbox rows left to the relay because Redis did not confirm their invalidation.
    pub left_to_relay: u64,
}

/// The id of demo user `n` (0-based).
pub fn demo_user_id(n: u32) -> UserId {
    UserId::from_uuid(Uuid::new_v5(&DEMO_NAMESPACE, format!("user-{n}").as_bytes()))
}

/// The id of demo product `n` (0-based).
pub fn demo_product_id(n: u32) -> ProductId {
    ProductId::from_uuid(Uuid::new_v5(&DEMO_NAMESPACE, format!("product-{n}").as_bytes()))
}

/// Demo category `n`: `category-00`, `category-01`, ...
fn demo_category(n: u32) -> String {
    format!("category-{n:02}")
}

/// Inserts the demo rows that are not there yet, and invalidates what they touch.
pub async fn seed(services: &Services, options: SeedOptions) -> Result<SeedReport, StoreError> {
    let pool = services.pool();
    let mut report = SeedReport {
        users_inserted: 0,
        products_inserted: 0,
        left_to_relay: 0,
    };
    for start in (0..options.users).step_by(BATCH as usize) {
        let rows: Vec<u32> = (start..options.users.min(start + BATCH)).collect();
        let ids: Vec<Uuid> = rows.iter().map(|&n| demo_user_id(n).as_uuid()).collect();
        let emails: Vec<String> = rows.iter().map(|n| format!("user{n}@example.com")).collect();
        let preferences: Vec<serde_json::Value> = rows
            .iter()
            .map(
                |n| serde_json::json!({ "theme": if n % 2 == 0 { "dark" } else { "light" }, "newsletter": n % 3 == 0 }),
            )
            .collect();
        let mut tx = pool.begin().await?;
        report.users_inserted += sqlx::query(
            "INSERT INTO users (id, email, preferences) \
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::jsonb[]) ON CONFLICT DO NOTHING",
        )
        .bind(ids)
        .bind(emails)
        .bind(preferences)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        report.left_to_relay += commit_and_invalidate(services, tx).await?;
    }
    let categories = options.categories.max(1);
    for start in (0..options.products).step_by(BATCH as usize) {
        let rows: Vec<u32> = (start..options.products.min(start + BATCH)).collect();
        let ids: Vec<Uuid> = rows.iter().map(|&n| demo_product_id(n).as_uuid()).collect();
        let category_ids: Vec<String> = rows.iter().map(|n| demo_category(n % categories)).collect();
        let names: Vec<String> = rows
            .iter()
            .map(|&n| {
                let n = n as usize;
                format!(
                    "{} {} {n}",
                    ADJECTIVES[n * 7 % ADJECTIVES.len()],
                    NOUNS[n * 5 % NOUNS.len()]
                )
            })
            .collect();
        let descriptions: Vec<String> = names.iter().map(|name| format!("A demo product: {name}.")).collect();
        let prices: Vec<i64> = rows.iter().map(|&n| i64::from(n) * 7_919 % 100_000).collect();
        let currencies: Vec<&str> = rows
            .iter()
            .map(|&n| CURRENCIES[n as usize % CURRENCIES.len()])
            .collect();
        let mut tx = pool.begin().await?;
        report.products_inserted += sqlx::query(
            "INSERT INTO products (id, category_id, name, description, price_cents, currency) \
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::text[]) \
             ON CONFLICT DO NOTHING",
        )
        .bind(ids)
        .bind(category_ids)
        .bind(names)
        .bind(descriptions)
        .bind(prices)
        .bind(currencies)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        report.left_to_relay += commit_and_invalidate(services, tx).await?;
    }
    Ok(report)
}

/// Commits a batch, invalidates what its outbox rows name (coalesced, no
/// events), and deletes those rows; how many rows were left to the relay.
async fn commit_and_invalidate(services: &Services, mut tx: Transaction<'_, Postgres>) -> Result<u64, StoreError> {
    let (pool, cache) = (services.pool(), &services.cache);
    let rows = outbox::recorded(&mut tx).await?;
    tx.commit().await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let planned = relay::Invalidations {
        events: Vec::new(),
        ..relay::invalidations(cache, &rows, services.database.write_position().await)
    };
    if !relay::carry_out_batch(cache, &planned).await {
        return Ok(rows.len() as u64);
    }
    let ids: Vec<i64> = rows.iter().map(|row| row.id).collect();
    outbox::confirm(pool, &ids).await?;
    Ok(0)
}
