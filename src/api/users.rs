//! `readthrough.v1.UserService`.

use tonic::{Request, Response, Status};

use super::{
    convert::{UserField, mask_fields, preferences, user_to_proto},
    respond,
};
use crate::{
    domain::{Email, ExpectedVersion, NewUser, UserId, UserPatch, ValidationError},
    proto::{self, user_service_server::UserService},
    service::Users,
};

/// Most ids one BatchGetUsers call may ask for.
const MAX_BATCH: usize = 100;

pub struct UserApi {
    users: Users,
}

impl UserApi {
    pub fn new(users: Users) -> Self {
        Self { users }
    }
}

#[tonic::async_trait]
impl UserService for UserApi {
    async fn get_user(&self, request: Request<proto::GetUserRequest>) -> Result<Response<proto::User>, Status> {
        respond(async {
            let id = UserId::parse(&request.get_ref().id)?;
            Ok(user_to_proto(self.users.get(id).await?))
        })
        .await
    }

    async fn batch_get_users(
        &self,
        request: Request<proto::BatchGetUsersRequest>,
    ) -> Result<Response<proto::BatchGetUsersResponse>, Status> {
        respond(async {
            let raw = &request.get_ref().ids;
            if raw.len() > MAX_BATCH {
                return Err(ValidationError::new(
                    "ids",
                    format!("at most {MAX_BATCH} ids per call, got {}", raw.len()),
                )
                .into());
            }
            let mut ids: Vec<UserId> = Vec::with_capacity(raw.len());
            for id in raw {
                let id = UserId::parse(id).map_err(|e| e.in_field("ids"))?;
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
            let found = self.users.get_many(&ids).await?;
            let mut response = proto::BatchGetUsersResponse::default();
            for (id, user) in ids.iter().zip(found) {
                match user {
                    Some(user) => response.users.push(user_to_proto(user)),
                    None => response.missing_ids.push(id.to_string()),
                }
            }
            Ok(response)
        })
        .await
    }

    async fn create_user(&self, request: Request<proto::CreateUserRequest>) -> Result<Response<proto::User>, Status> {
        respond(async {
            let request = request.into_inner();
            let new = NewUser {
                email: Email::parse(&request.email)?,
                preferences: preferences(request.preferences)?,
            };
            Ok(user_to_proto(self.users.create(new).await?))
        })
        .await
    }

    async fn update_user(&self, request: Request<proto::UpdateUserRequest>) -> Result<Response<proto::User>, Status> {
        respond(async {
            let request = request.into_inner();
            let user = request
                .user
                .ok_or_else(|| ValidationError::new("user", "is required"))?;
            let mut patch = UserPatch {
                id: UserId::parse(&user.id).map_err(|e| e.in_field("user.id"))?,
                email: None,
                preferences: None,
                expected_version: ExpectedVersion::parse(request.expected_version)?,
            };
            for field in mask_fields(request.update_mask.as_ref())? {
                match field {
                    UserField::Email => patch.email = Some(Email::parse(&user.email)?),
                    UserField::Preferences => patch.preferences = Some(preferences(user.preferences.clone())?),
                }
            }
            Ok(user_to_proto(self.users.update(patch).await?))
        })
        .await
    }

    async fn delete_user(&self, request: Request<proto::DeleteUserRequest>) -> Result<Response<()>, Status> {
        respond(async {
            let id = UserId::parse(&request.get_ref().id)?;
            self.users.delete(id).await?;
            Ok(())
        })
        .await
    }
}
