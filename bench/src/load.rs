//! A load generator of our own, for requests that vary from call to call
//! (random ids, a mix of reads and writes): tonic clients over a number of
//! HTTP/2 connections, a fixed number of calls in flight, for a fixed time.
//! It runs in the harness's process, apart from the servers it measures.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use prost_types::{Struct, Value, value::Kind};
use rand::{Rng, seq::IndexedRandom};
use readthrough_client::proto::{
    GetProductRequest, GetUserRequest, ListProductsRequest, UpdateUserRequest, User,
    product_service_client::ProductServiceClient, user_service_client::UserServiceClient,
};
use tonic::transport::Channel;

use crate::stats::Latencies;

/// What the load consists of.
#[derive(Clone)]
pub enum Workload {
    /// GetUser on ids drawn at random.
    RandomUsers(Arc<Vec<String>>),
    /// GetProduct on ids drawn at random.
    RandomProducts(Arc<Vec<String>>),
    /// 90 % GetUser on random ids, 5 % ListProducts (a random page of the
    /// first 100 of `category`), 5 % UpdateUser (a new preferences value).
    Mixed { users: Arc<Vec<String>>, category: String },
}

#[derive(Debug, Default)]
pub struct LoadRun {
    pub requests: u64,
    /// Calls that ended with another code than OK, by code.
    pub errors: BTreeMap<String, u64>,
    pub seconds: f64,
    pub latencies: Latencies,
}

/// `connections` HTTP/2 connections to `url`.
pub async fn connect(url: &str, connections: usize) -> anyhow::Result<Vec<Channel>> {
    let mut channels = Vec::with_capacity(connections);
    for _ in 0..connections {
        channels.push(Channel::from_shared(url.to_string())?.connect().await?);
    }
    Ok(channels)
}

/// Runs `workload` with `in_flight` calls at once over `channels` for `duration`.
pub async fn run(channels: &[Channel], workload: &Workload, in_flight: usize, duration: Duration) -> LoadRun {
    run_until(
        channels,
        workload,
        in_flight,
        duration,
        Arc::new(AtomicBool::new(false)),
    )
    .await
}

/// As `run`, but ends as soon as `stop` is set (at the latest after
/// `duration`): a load that lasts as long as something else does. Calls in
/// flight then finish, so none is counted as cancelled.
pub async fn run_until(
    channels: &[Channel],
    workload: &Workload,
    in_flight: usize,
    duration: Duration,
    stop: Arc<AtomicBool>,
) -> LoadRun {
    let started = Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = (0..in_flight)
        .map(|i| {
            let channel = channels[i % channels.len()].clone();
            let workload = workload.clone();
            let stop = stop.clone();
            tokio::spawn(async move { caller(channel, workload, deadline, &stop).await })
        })
        .collect();
    let mut run = LoadRun::default();
    let mut latencies = Vec::new();
    for task in tasks {
        if let Ok((done, errors)) = task.await {
            run.requests += done.len() as u64;
            latencies.extend(done);
            for (code, count) in errors {
                *run.errors.entry(code).or_default() += count;
            }
        }
    }
    run.seconds = started.elapsed().as_secs_f64();
    run.latencies = Latencies::from_durations(latencies);
    run
}

/// One caller: a call at a time until `deadline`; latencies of the calls that
/// succeeded, and the codes of those that did not.
async fn caller(
    channel: Channel,
    workload: Workload,
    deadline: Instant,
    stop: &AtomicBool,
) -> (Vec<Duration>, BTreeMap<String, u64>) {
    let mut users = UserServiceClient::new(channel.clone());
    let mut products = ProductServiceClient::new(channel);
    let (mut done, mut errors) = (Vec::new(), BTreeMap::new());
    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        let began = Instant::now();
        let outcome = match next_call(&workload) {
            Call::GetUser(id) => users.get_user(GetUserRequest { id }).await.map(drop),
            Call::GetProduct(id) => products.get_product(GetProductRequest { id }).await.map(drop),
            Call::ListProducts(request) => products.list_products(request).await.map(drop),
            Call::UpdateUser(request) => users.update_user(request).await.map(drop),
        };
        match outcome {
            Ok(()) => done.push(began.elapsed()),
            Err(status) => *errors.entry(format!("{:?}", status.code())).or_default() += 1,
        }
    }
    (done, errors)
}

enum Call {
    GetUser(String),
    GetProduct(String),
    ListProducts(ListProductsRequest),
    UpdateUser(UpdateUserRequest),
}

fn next_call(workload: &Workload) -> Call {
    let mut rng = rand::rng();
    match workload {
        Workload::RandomUsers(ids) => Call::GetUser(ids.choose(&mut rng).cloned().unwrap_or_default()),
        Workload::RandomProducts(ids) => Call::GetProduct(ids.choose(&mut rng).cloned().unwrap_or_default()),
        Workload::Mixed { users, category } => {
            let id = users.choose(&mut rng).cloned().unwrap_or_default();
            match rng.random_range(0..100) {
                0..90 => Call::GetUser(id),
                90..95 => Call::ListProducts(ListProductsRequest {
                    category_id: category.clone(),
                    page: rng.random_range(0..100),
                    page_size: 20,
                    ..Default::default()
                }),
                _ => Call::UpdateUser(new_preferences(id, rng.random_range(0..1_000_000))),
            }
        }
    }
}

/// An UpdateUser that sets `preferences` to `{"bench": n}`.
pub fn new_preferences(id: String, n: u32) -> UpdateUserRequest {
    UpdateUserRequest {
        user: Some(with_preferences(id, n)),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["preferences".into()],
        }),
        expected_version: 0,
    }
}

/// A user with only an id and `preferences` `{"bench": n}`: the change `new_preferences` sends.
pub fn with_preferences(id: String, n: u32) -> User {
    let preferences = Struct {
        fields: [(
            "bench".to_string(),
            Value {
                kind: Some(Kind::NumberValue(f64::from(n))),
            },
        )]
        .into(),
    };
    User {
        id,
        preferences: Some(preferences),
        ..Default::default()
    }
}
