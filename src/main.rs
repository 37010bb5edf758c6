//! The `readthrough` command line: parse, load settings, call into the library.

use clap::{Parser, Subcommand};
use readthrough::{
    app::{self, Application},
    config::{Config, DatabaseConfig, ServeConfig, TelemetryConfig},
    domain::CategoryId,
    ops::{self, SeedOptions, WarmOptions},
    service::Services,
    store, telemetry, tls,
};

/// glibc's allocator spent a fifth of the CPU of a warm GetUser (profile in
/// docs/benchmarks.md); mimalloc's thread-local free lists make that a few percent.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    version,
    about = "gRPC data service: users and products in PostgreSQL, read through a shared Redis cache"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    telemetry: TelemetryConfig,
}

#[derive(Subcommand)]
enum Command {
    /// Serve gRPC (and Prometheus metrics) until SIGINT or SIGTERM.
    Serve(Box<ServeConfig>),
    /// Create the database if needed and apply pending migrations.
    Migrate(DatabaseConfig),
    /// Load demo users and products (rows that exist already are kept).
    Seed {
        #[command(flatten)]
        config: Config,
        #[arg(long, default_value_t = 10_000)]
        users: u32,
        #[arg(long, default_value_t = 50_000)]
        products: u32,
        #[arg(long, default_value_t = 50)]
        categories: u32,
    },
    /// Exit 0 if the instance at `--url` answers SERVING to a gRPC health check (for container health checks).
    Health {
        /// `https://…` when the instance serves TLS.
        #[arg(long, env = "HEALTH_URL", default_value = "http://127.0.0.1:50051")]
        url: String,
        #[arg(long, default_value_t = 3)]
        timeout_secs: u64,
        #[command(flatten)]
        tls: ops::health::HealthTls,
    },
    /// Pre-populate the cache: given categories, or the most recently modified rows.
    Warm {
        #[command(flatten)]
        config: Config,
        /// A category whose list and products to cache; repeat for several.
        #[arg(long = "category", value_parser = parse_category)]
        categories: Vec<CategoryId>,
        /// How many of the most recently modified users to cache.
        #[arg(long, default_value_t = 0)]
        recent_users: u32,
        /// How many of the most recently modified products to cache.
        #[arg(long, default_value_t = 0)]
        recent_products: u32,
    },
}

fn parse_category(raw: &str) -> Result<CategoryId, String> {
    CategoryId::parse(raw).map_err(|e| e.to_string())
}

fn main() -> anyhow::Result<()> {
    app::runtime()?.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let tracing = telemetry::init(&cli.telemetry)?;
    tls::install_crypto_provider();
    let outcome = run_command(cli.command).await;
    tracing.shutdown().await;
    outcome
}

async fn run_command(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(config) => {
            tracing::info!(?config, "starting");
            let app = Application::build(*config).await?;
            app.run_until_stopped(app::shutdown_signal()).await?;
        }
        Command::Health { url, timeout_secs, tls } => {
            ops::health::check(&url, &tls, std::time::Duration::from_secs(timeout_secs)).await?;
            println!("SERVING");
        }
        Command::Migrate(database) => {
            store::migrate(&database).await?;
            tracing::info!("migrations applied");
        }
        Command::Seed {
            config,
            users,
            products,
            categories,
        } => {
            store::migrate(&config.database).await?;
            let services = Services::connect(&config).await?;
            let started = std::time::Instant::now();
            let report = ops::seed(
                &services,
                SeedOptions {
                    users,
                    products,
                    categories,
                },
            )
            .await?;
            tracing::info!(?report, elapsed = ?started.elapsed(), "seeded");
        }
        Command::Warm {
            config,
            categories,
            recent_users,
            recent_products,
        } => {
            let services = Services::connect(&config).await?;
            let options = WarmOptions {
                categories,
                recent_users,
                recent_products,
            };
            let report = ops::warm(&services.users, &services.products, &options).await?;
            tracing::info!(?report, "warmed");
        }
    }
    Ok(())
}
