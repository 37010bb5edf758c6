//! The gRPC client of readthrough: its protos, the stubs tonic and prost
//! generate from them, and [`Client`], a small typed client that gives every
//! call a deadline, a bearer token when one is set, and retries of
//! `UNAVAILABLE` with backoff.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//!
//! let client = readthrough_client::Client::builder("http://127.0.0.1:50051")
//!     .bearer_token("dev-token")
//!     .deadline(Duration::from_secs(2))
//!     .connect()
//!     .await?;
//! let user = client.create_user("ada@example.com", None).await?;
//! let again = client.with_deadline(Duration::from_millis(300)).get_user(&user.id).await?;
//! assert_eq!(user.email, again.email);
//! # Ok(())
//! # }
//! ```
//!
//! `examples/quickstart.rs` in this crate is a whole program to copy. Errors are the server's [`tonic::Status`]:
//! `INVALID_ARGUMENT` names the offending field, then `NOT_FOUND`,
//! `ALREADY_EXISTS`, `ABORTED` (a version precondition), `UNAVAILABLE`,
//! `UNAUTHENTICATED`/`PERMISSION_DENIED`, `RESOURCE_EXHAUSTED` (load shed) and
//! `DEADLINE_EXCEEDED`.
//!
//! # Which calls are retried
//!
//! Only `UNAVAILABLE`: the channel could not reach the server, or the server
//! could not reach its database. A write that failed so has usually not
//! happened, but not always (the connection to the database can break while it
//! commits), so a method is retried only when running it twice does no more
//! than running it once:
//!
//! - reads (`get_*`, `batch_get_users`, `list_products`): always retried;
//! - `update_*`: retried. A repeat writes the same values again (the version
//!   grows once more); with `expected_version` set, the repeat of a write that
//!   did land is `ABORTED` instead, so check the stored version before you
//!   count that as a conflict with someone else;
//! - `delete_*`: retried; the repeat of a delete that did land is `NOT_FOUND`;
//! - `create_user`, `create_product`: **never retried**. The server picks the
//!   id, so a repeated CreateProduct would make a second product, and a
//!   repeated CreateUser answers `ALREADY_EXISTS` (emails are unique) for a
//!   user the first attempt created. Retry them yourself, after looking up
//!   whether the first attempt landed;
//! - cache administration: the `invalidate_*` deletes are retried;
//!   `invalidate_all` is not (each call retires every cached key once more).

mod retry;

use std::{fmt, time::Duration};

use prost_types::{FieldMask, Struct};
use tonic::{
    Request, Status,
    metadata::{AsciiMetadataValue, errors::InvalidMetadataValue},
    transport::{Channel, ClientTlsConfig, Endpoint},
};

pub use retry::Backoff;
use retry::Retry;

use proto::{
    cache_admin_service_client::CacheAdminServiceClient, product_service_client::ProductServiceClient,
    user_service_client::UserServiceClient,
};

/// Messages and client stubs generated from `proto/readthrough/v1/*.proto`
/// (package `readthrough.v1`), for calls the typed [`Client`] does not cover.
pub mod proto {
    tonic::include_proto!("readthrough.v1");
}

/// How long a call may take, retries included, unless set otherwise.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(5);

/// How long connecting may take, unless set otherwise.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Settings of a [`Client`]: where, with which token, how long and how often.
/// Its `Debug` output leaves the token out.
#[derive(Clone)]
pub struct ClientBuilder {
    endpoint: String,
    token: Option<String>,
    deadline: Duration,
    backoff: Backoff,
    connect_timeout: Duration,
    tls: Option<ClientTlsConfig>,
}

impl ClientBuilder {
    /// A client of the server at `endpoint` (`http://host:port`, or
    /// `https://…` with [`ClientBuilder::tls`]).
    pub fn new(endpoint: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            token: None,
            deadline: DEFAULT_DEADLINE,
            backoff: Backoff::default(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            tls: None,
        }
    }

    /// Sends `authorization: Bearer <token>` with every call.
    pub fn bearer_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// The deadline of every call (retries included), sent to the server as
    /// `grpc-timeout` too; [`Client::with_deadline`] changes it for some calls.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// How many times a call that may repeat is retried after `UNAVAILABLE`
    /// (0: never), keeping the backoff's waits.
    pub fn retries(mut self, retries: u32) -> Self {
        self.backoff.retries = retries;
        self
    }

    /// The whole retry policy: how many retries and how long between them.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// How long connecting may take.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// TLS for an `https://` endpoint: the CA to trust, and a client
    /// certificate for mutual TLS.
    pub fn tls(mut self, tls: ClientTlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Connects now: fails if the server cannot be reached.
    pub async fn connect(self) -> Result<Client, ConnectError> {
        let channel = self.endpoint()?.connect().await.map_err(ConnectError::Transport)?;
        self.with_channel(channel)
    }

    /// Connects on the first call (and reconnects whenever needed), so that
    /// a client can be made before its server is up.
    pub fn connect_lazy(self) -> Result<Client, ConnectError> {
        let channel = self.endpoint()?.connect_lazy();
        self.with_channel(channel)
    }

    /// A client on a channel made elsewhere; the endpoint, TLS and connect
    /// timeout set here are not used.
    pub fn with_channel(self, channel: Channel) -> Result<Client, ConnectError> {
        let token = self.token.as_deref().map(bearer).transpose()?;
        Ok(Client {
            users: UserServiceClient::new(channel.clone()),
            products: ProductServiceClient::new(channel.clone()),
            admin: CacheAdminServiceClient::new(channel.clone()),
            channel,
            options: CallOptions {
                token,
                deadline: self.deadline,
                backoff: self.backoff,
            },
        })
    }

    fn endpoint(&self) -> Result<Endpoint, ConnectError> {
        let endpoint = Endpoint::from_shared(self.endpoint.clone())
            .map_err(ConnectError::Transport)?
            .connect_timeout(self.connect_timeout);
        match &self.tls {
            Some(tls) => endpoint.tls_config(tls.clone()).map_err(ConnectError::Transport),
            None => Ok(endpoint),
        }
    }
}

impl fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("deadline", &self.deadline)
            .field("backoff", &self.backoff)
            .field("connect_timeout", &self.connect_timeout)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// The `authorization` value; sensitive, so HTTP/2 never indexes it in its
/// header tables and `Debug` does not print it.
fn bearer(token: &str) -> Result<AsciiMetadataValue, ConnectError> {
    let mut value: AsciiMetadataValue = format!("Bearer {token}").parse().map_err(ConnectError::InvalidToken)?;
    value.set_sensitive(true);
    Ok(value)
}

/// Why a [`Client`] could not be made.
#[derive(Debug)]
pub enum ConnectError {
    /// A bad endpoint, bad TLS settings, or a server that cannot be reached.
    Transport(tonic::transport::Error),
    /// The bearer token has characters a header cannot carry.
    InvalidToken(InvalidMetadataValue),
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Transport(error) => write!(f, "cannot connect: {error}"),
            Self::InvalidToken(_) => f.write_str("the bearer token is not a valid header value"),
        }
    }
}

impl std::error::Error for ConnectError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Transport(error) => Some(error),
            Self::InvalidToken(error) => Some(error),
        }
    }
}

#[derive(Clone)]
struct CallOptions {
    token: Option<AsciiMetadataValue>,
    deadline: Duration,
    backoff: Backoff,
}

impl fmt::Debug for CallOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallOptions")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("deadline", &self.deadline)
            .field("backoff", &self.backoff)
            .finish()
    }
}

/// A typed client of `UserService`, `ProductService` and `CacheAdminService`
/// over one channel. Cheap to clone and safe to share: clones use the same
/// connection. Each method is one RPC (see the protos for its rules), with
/// the client's deadline, token and retries (see the [crate] docs for which
/// calls are retried).
#[derive(Clone, Debug)]
pub struct Client {
    channel: Channel,
    users: UserServiceClient<Channel>,
    products: ProductServiceClient<Channel>,
    admin: CacheAdminServiceClient<Channel>,
    options: CallOptions,
}

impl Client {
    /// Settings for a client of the server at `endpoint`.
    pub fn builder(endpoint: impl Into<String>) -> ClientBuilder {
        ClientBuilder::new(endpoint)
    }

    /// A client of `endpoint` with the default settings, connected now.
    pub async fn connect(endpoint: impl Into<String>) -> Result<Self, ConnectError> {
        ClientBuilder::new(endpoint).connect().await
    }

    /// This client with another deadline, for the calls made through it.
    pub fn with_deadline(&self, deadline: Duration) -> Self {
        let mut client = self.clone();
        client.options.deadline = deadline;
        client
    }

    /// This client with another retry policy, for the calls made through it.
    pub fn with_backoff(&self, backoff: Backoff) -> Self {
        let mut client = self.clone();
        client.options.backoff = backoff;
        client
    }

    /// This client with another bearer token (`None`: none), for the calls
    /// made through it.
    pub fn with_token(&self, token: Option<&str>) -> Result<Self, ConnectError> {
        let mut client = self.clone();
        client.options.token = token.map(bearer).transpose()?;
        Ok(client)
    }

    /// The channel, for stubs of other services on the same connection.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// One call: `send` with the request built from `message`, as often as
    /// `retry` and the backoff allow, within the deadline.
    async fn call<M, R, F, Fut>(&self, retry: Retry, message: M, mut send: F) -> Result<R, Status>
    where
        M: Clone,
        F: FnMut(Request<M>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<R>, Status>>,
    {
        let options = &self.options;
        retry::run(&options.backoff, retry, options.deadline, |left| {
            let mut request = Request::new(message.clone());
            request.set_timeout(left);
            if let Some(token) = &options.token {
                request.metadata_mut().insert("authorization", token.clone());
            }
            let response = send(request);
            async move { response.await.map(tonic::Response::into_inner) }
        })
        .await
    }
}

/// `UserService`.
impl Client {
    /// The user `id`; `NOT_FOUND` if there is none.
    pub async fn get_user(&self, id: &str) -> Result<proto::User, Status> {
        let message = proto::GetUserRequest { id: id.into() };
        self.call(Retry::Idempotent, message, |request| {
            let mut users = self.users.clone();
            async move { users.get_user(request).await }
        })
        .await
    }

    /// Up to 100 users at once: those found, in the order asked, and the ids
    /// of the others.
    pub async fn batch_get_users<I>(&self, ids: I) -> Result<proto::BatchGetUsersResponse, Status>
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        let message = proto::BatchGetUsersRequest {
            ids: ids.into_iter().map(Into::into).collect(),
        };
        self.call(Retry::Idempotent, message, |request| {
            let mut users = self.users.clone();
            async move { users.batch_get_users(request).await }
        })
        .await
    }

    /// A new user; `ALREADY_EXISTS` if the email (ignoring case) is taken.
    /// Never retried.
    pub async fn create_user(&self, email: &str, preferences: Option<Struct>) -> Result<proto::User, Status> {
        let message = proto::CreateUserRequest {
            email: email.into(),
            preferences,
        };
        self.call(Retry::Once, message, |request| {
            let mut users = self.users.clone();
            async move { users.create_user(request).await }
        })
        .await
    }

    /// Sets the fields of `user` named in `fields` (`"email"`,
    /// `"preferences"`) on the user `user.id`. `expected_version` 0 writes
    /// unconditionally; otherwise a user at another version is `ABORTED`.
    pub async fn update_user(
        &self,
        user: proto::User,
        fields: &[&str],
        expected_version: i64,
    ) -> Result<proto::User, Status> {
        let message = proto::UpdateUserRequest {
            user: Some(user),
            update_mask: Some(mask(fields)),
            expected_version,
        };
        self.call(Retry::Idempotent, message, |request| {
            let mut users = self.users.clone();
            async move { users.update_user(request).await }
        })
        .await
    }

    /// Deletes the user `id`; `NOT_FOUND` if there is none.
    pub async fn delete_user(&self, id: &str) -> Result<(), Status> {
        let message = proto::DeleteUserRequest { id: id.into() };
        self.call(Retry::Idempotent, message, |request| {
            let mut users = self.users.clone();
            async move { users.delete_user(request).await }
        })
        .await
    }
}

/// Which page of a category [`Client::list_products`] reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Page {
    /// By number, from 0: fine near the start, costs more the deeper it is
    /// unless the category's list is cached.
    Number(i32),
    /// The page after the one that answered with this `next_page_token`:
    /// any depth costs what the first page does.
    After(String),
}

/// `ProductService`.
impl Client {
    /// The product `id`; `NOT_FOUND` if there is none.
    pub async fn get_product(&self, id: &str) -> Result<proto::Product, Status> {
        let message = proto::GetProductRequest { id: id.into() };
        self.call(Retry::Idempotent, message, |request| {
            let mut products = self.products.clone();
            async move { products.get_product(request).await }
        })
        .await
    }

    /// One page of `category_id`'s products, ordered by name then id, of
    /// `page_size` products (0: 20; at most 100).
    pub async fn list_products(
        &self,
        category_id: &str,
        page: Page,
        page_size: i32,
    ) -> Result<proto::ListProductsResponse, Status> {
        let (page, page_token) = match page {
            Page::Number(number) => (number, String::new()),
            Page::After(token) => (0, token),
        };
        let message = proto::ListProductsRequest {
            category_id: category_id.into(),
            page,
            page_size,
            page_token,
        };
        self.call(Retry::Idempotent, message, |request| {
            let mut products = self.products.clone();
            async move { products.list_products(request).await }
        })
        .await
    }

    /// A new product. Never retried: a repeat would make a second product.
    pub async fn create_product(&self, product: proto::CreateProductRequest) -> Result<proto::Product, Status> {
        self.call(Retry::Once, product, |request| {
            let mut products = self.products.clone();
            async move { products.create_product(request).await }
        })
        .await
    }

    /// Sets the fields of `product` named in `fields` (`"category_id"`,
    /// `"name"`, `"description"`, `"price_cents"`, `"currency"`) on the
    /// product `product.id`. `expected_version` 0 writes unconditionally;
    /// otherwise a product at another version is `ABORTED`.
    pub async fn update_product(
        &self,
        product: proto::Product,
        fields: &[&str],
        expected_version: i64,
    ) -> Result<proto::Product, Status> {
        let message = proto::UpdateProductRequest {
            product: Some(product),
            update_mask: Some(mask(fields)),
            expected_version,
        };
        self.call(Retry::Idempotent, message, |request| {
            let mut products = self.products.clone();
            async move { products.update_product(request).await }
        })
        .await
    }

    /// Deletes the product `id`; `NOT_FOUND` if there is none.
    pub async fn delete_product(&self, id: &str) -> Result<(), Status> {
        let message = proto::DeleteProductRequest { id: id.into() };
        self.call(Retry::Idempotent, message, |request| {
            let mut products = self.products.clone();
            async move { products.delete_product(request).await }
        })
        .await
    }
}

/// `CacheAdminService`: served on the admin listener (`ADMIN_ADDR`, port
/// 50052 by default), so call these on a client connected there. They need
/// the `admin` role.
impl Client {
    /// Drops the user `id`'s cache entry (with `dry_run`: only reports it).
    pub async fn invalidate_user(&self, id: &str, dry_run: bool) -> Result<proto::InvalidateResponse, Status> {
        let message = proto::InvalidateUserRequest { id: id.into(), dry_run };
        self.call(Retry::Idempotent, message, |request| {
            let mut admin = self.admin.clone();
            async move { admin.invalidate_user(request).await }
        })
        .await
    }

    /// Drops the product `id`'s cache entry (with `dry_run`: only reports it).
    pub async fn invalidate_product(&self, id: &str, dry_run: bool) -> Result<proto::InvalidateResponse, Status> {
        let message = proto::InvalidateProductRequest { id: id.into(), dry_run };
        self.call(Retry::Idempotent, message, |request| {
            let mut admin = self.admin.clone();
            async move { admin.invalidate_product(request).await }
        })
        .await
    }

    /// Drops a category's cached list (with `dry_run`: only reports it).
    pub async fn invalidate_category(
        &self,
        category_id: &str,
        dry_run: bool,
    ) -> Result<proto::InvalidateResponse, Status> {
        let message = proto::InvalidateCategoryRequest {
            category_id: category_id.into(),
            dry_run,
        };
        self.call(Retry::Idempotent, message, |request| {
            let mut admin = self.admin.clone();
            async move { admin.invalidate_category(request).await }
        })
        .await
    }

    /// Retires every cached key of `entity` (`"user"`, `"product"`, `"list"`,
    /// or `""` for all); with `dry_run`, counts them instead. Never retried.
    pub async fn invalidate_all(&self, entity: &str, dry_run: bool) -> Result<proto::InvalidateAllResponse, Status> {
        let message = proto::InvalidateAllRequest {
            entity: entity.into(),
            dry_run,
        };
        self.call(Retry::Once, message, |request| {
            let mut admin = self.admin.clone();
            async move { admin.invalidate_all(request).await }
        })
        .await
    }
}

fn mask(fields: &[&str]) -> FieldMask {
    FieldMask {
        paths: fields.iter().map(|field| field.to_string()).collect(),
    }
}
