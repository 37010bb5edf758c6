//! The floor: a bare tonic server that answers `readthrough.v1.UserService/GetUser`
//! with a constant User and does no I/O. What a gRPC call costs on this machine
//! with nothing behind it; `scripts/bench` reports readthrough as a ratio of it.
//!
//! Usage: `floor <address>` (e.g. `127.0.0.1:50071`). Other methods are UNIMPLEMENTED.

use std::collections::BTreeMap;

use prost_types::{Struct, Timestamp, Value, value::Kind};
use readthrough::proto::{
    self, BatchGetUsersRequest, BatchGetUsersResponse, CreateUserRequest, DeleteUserRequest, GetUserRequest,
    UpdateUserRequest,
    user_service_server::{UserService, UserServiceServer},
};
use tonic::{Request, Response, Status, transport::Server};

/// The allocator readthrough uses, so the ratio compares work, not allocators.
/// (The runtime, too: see `main`.)
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Floor {
    user: proto::User,
}

#[tonic::async_trait]
impl UserService for Floor {
    async fn get_user(&self, _: Request<GetUserRequest>) -> Result<Response<proto::User>, Status> {
        Ok(Response::new(self.user.clone()))
    }

    async fn batch_get_users(
        &self,
        _: Request<BatchGetUsersRequest>,
    ) -> Result<Response<BatchGetUsersResponse>, Status> {
        Err(Status::unimplemented("floor serves GetUser only"))
    }

    async fn create_user(&self, _: Request<CreateUserRequest>) -> Result<Response<proto::User>, Status> {
        Err(Status::unimplemented("floor serves GetUser only"))
    }

    async fn update_user(&self, _: Request<UpdateUserRequest>) -> Result<Response<proto::User>, Status> {
        Err(Status::unimplemented("floor serves GetUser only"))
    }

    async fn delete_user(&self, _: Request<DeleteUserRequest>) -> Result<Response<()>, Status> {
        Err(Status::unimplemented("floor serves GetUser only"))
    }
}

/// A user shaped like the demo data's, so both servers send the same bytes.
fn constant_user() -> proto::User {
    let text = |s: &str| Value {
        kind: Some(Kind::StringValue(s.to_string())),
    };
    let preferences = BTreeMap::from([
        (
            "newsletter".to_string(),
            Value {
                kind: Some(Kind::BoolValue(true)),
            },
        ),
        ("theme".to_string(), text("dark")),
    ]);
    let at = Timestamp {
        seconds: 1_795_000_000,
        nanos: 123_456_000,
    };
    proto::User {
        id: "e5186cf1-cf92-566d-9fbd-dc53ac388f84".to_string(),
        email: "user0@example.com".to_string(),
        preferences: Some(Struct { fields: preferences }),
        version: 1,
        created_at: Some(at),
        last_modified: Some(at),
    }
}

/// The runtime readthrough runs on, for the same reason as the allocator.
fn main() -> anyhow::Result<()> {
    readthrough::app::runtime()?.block_on(serve())
}

async fn serve() -> anyhow::Result<()> {
    let address = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:50071".to_string())
        .parse()?;
    Server::builder()
        .tcp_nodelay(true)
        .add_service(UserServiceServer::new(Floor { user: constant_user() }))
        .serve_with_shutdown(address, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
