//! A service calling readthrough: creates a user, reads it back twice (the
//! second read comes from the cache), and lists a page of a category.
//!
//! ```sh
//! scripts/run                                            # in one terminal
//! cargo run -p readthrough-client --example quickstart   # in another
//! ```
//!
//! Settings, from the environment:
//! - `READTHROUGH_ADDR`: the server (default `http://127.0.0.1:50051`;
//!   `https://…` needs `.tls(…)` on the builder);
//! - `READTHROUGH_TOKEN`: a bearer token with the `read` and `write` roles,
//!   when the server checks tokens (compose's is `dev-token`);
//! - `READTHROUGH_CATEGORY`: the category to list (default `category-07`, one
//!   of `readthrough seed`'s).

use std::{
    env,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use readthrough_client::{Client, Page};
use tonic::Code;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = env::var("READTHROUGH_ADDR").unwrap_or_else(|_| "http://127.0.0.1:50051".into());
    let category = env::var("READTHROUGH_CATEGORY").unwrap_or_else(|_| "category-07".into());

    // One client for the whole program: it is cheap to clone and shares one connection.
    let mut builder = Client::builder(&addr)
        .deadline(Duration::from_secs(2)) // every call, retries included
        .retries(3); // UNAVAILABLE, with backoff; never for creates
    if let Ok(token) = env::var("READTHROUGH_TOKEN") {
        builder = builder.bearer_token(token);
    }
    let client = builder.connect().await?;

    // An email of its own on every run: a taken one is ALREADY_EXISTS.
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis();
    let user = match client
        .create_user(&format!("quickstart-{stamp}@example.com"), None)
        .await
    {
        Ok(user) => user,
        Err(status) if status.code() == Code::AlreadyExists => return Err("that email is taken".into()),
        Err(status) => return Err(status.into()),
    };
    println!("created user {} <{}>, version {}", user.id, user.email, user.version);

    for read in ["from PostgreSQL, then cached", "from the cache"] {
        let user = client.get_user(&user.id).await?;
        println!("read user {} ({read})", user.id);
    }

    // A shorter deadline for one call only.
    let page = client
        .with_deadline(Duration::from_millis(500))
        .list_products(&category, Page::Number(0), 5)
        .await?;
    println!(
        "{category}: {} products; the first {}:",
        page.total_count,
        page.products.len()
    );
    for product in &page.products {
        let price = product.price_cents as f64 / 100.0;
        println!("  {:<40} {price:>10.2} {}", product.name, product.currency);
    }
    if !page.next_page_token.is_empty() {
        let next = client
            .list_products(&category, Page::After(page.next_page_token), 5)
            .await?;
        println!("and {} more on the next page", next.products.len());
    }
    Ok(())
}
