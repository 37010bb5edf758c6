//! The one table of what this service answers: every RPC of the served
//! descriptor sets (the API, health and reflection) by request path, with the
//! role a call needs, what it costs at admission, and its metric labels.
//! Authentication, admission and the RPC metrics all look a path up here, so
//! a new RPC is one row in `row`.

use std::{collections::HashMap, sync::OnceLock};

use prost::Message;

/// An RPC as the edge sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Method {
    /// `package.Service`, the `service` metric label.
    pub service: &'static str,
    /// The method's name, the `method` metric label.
    pub name: &'static str,
    pub access: Access,
    pub cost: Cost,
}

/// A role a call may need, and a token grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Read,
    Write,
    Admin,
}

impl Role {
    pub(super) fn parse(raw: &str) -> Option<Self> {
        match raw {
            "read" => Some(Self::Read),
            "write" => Some(Self::Write),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }

    pub(super) fn bit(self) -> u8 {
        match self {
            Self::Read => 1,
            Self::Write => 2,
            Self::Admin => 4,
        }
    }
}

/// What a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Open,
    Needs(Role),
}

/// What a call takes of the admission limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cost {
    /// Skips the line (health checks: a busy server is still alive).
    Free,
    /// Units of about one cached read's CPU.
    Units(u32),
}

/// A call of an RPC no listener serves, or of one without a row: it needs the
/// most trusted role, so a new RPC is closed until listed, and shares one set
/// of labels, so clients cannot mint label values.
const UNKNOWN: Method = Method {
    service: "unknown",
    name: "unknown",
    access: Access::Needs(Role::Admin),
    cost: WRITE,
};

const READ: Cost = Cost::Units(1);
/// Writes (and cache administration) hold a database connection or walk keys.
const WRITE: Cost = Cost::Units(8);

/// The row of an RPC: its access and cost.
fn row(service: &str, method: &str) -> Option<(Access, Cost)> {
    use Access::{Needs, Open};
    use Role::{Admin, Read, Write};
    Some(match (service, method) {
        ("grpc.health.v1.Health", _) => (Open, Cost::Free),
        ("grpc.reflection.v1.ServerReflection" | "grpc.reflection.v1alpha.ServerReflection", _) => (Open, WRITE),
        ("readthrough.v1.UserService", "GetUser") | ("readthrough.v1.ProductService", "GetProduct") => {
            (Needs(Read), READ)
        }
        ("readthrough.v1.UserService", "BatchGetUsers") => (Needs(Read), Cost::Units(4)),
        // Decodes and encodes a page of up to 100 products.
        ("readthrough.v1.ProductService", "ListProducts") => (Needs(Read), Cost::Units(16)),
        ("readthrough.v1.UserService", "CreateUser" | "UpdateUser" | "DeleteUser")
        | ("readthrough.v1.ProductService", "CreateProduct" | "UpdateProduct" | "DeleteProduct") => {
            (Needs(Write), WRITE)
        }
        ("readthrough.v1.CacheAdminService", _) => (Needs(Admin), WRITE),
        _ => return None,
    })
}

/// The method of a request path (`/package.Service/Method`).
pub fn of(path: &str) -> &'static Method {
    static METHODS: OnceLock<HashMap<String, Method>> = OnceLock::new();
    METHODS.get_or_init(served).get(path).unwrap_or(&UNKNOWN)
}

/// Every RPC of the served descriptor sets, by path. Built once; the names
/// live as long as the process.
fn served() -> HashMap<String, Method> {
    let sets = [
        crate::proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ];
    let mut methods = HashMap::new();
    for set in sets {
        let set = prost_types::FileDescriptorSet::decode(set).expect("the embedded descriptor sets are valid");
        for file in &set.file {
            for service in &file.service {
                let service_name: &'static str = format!("{}.{}", file.package(), service.name()).leak();
                for method in &service.method {
                    let name: &'static str = method.name().to_string().leak();
                    let (access, cost) = row(service_name, name).unwrap_or((UNKNOWN.access, UNKNOWN.cost));
                    let method = Method {
                        service: service_name,
                        name,
                        access,
                        cost,
                    };
                    methods.insert(format!("/{service_name}/{name}"), method);
                }
            }
        }
    }
    methods
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_served_rpc_has_a_row() {
        let served = served();
        // 14 of the API, Check and Watch, and reflection's one method in two versions.
        assert_eq!(served.len(), 14 + 2 + 2);
        for method in served.values() {
            assert!(row(method.service, method.name).is_some(), "{method:?}");
        }
    }

    #[test]
    fn reads_writes_and_administration_need_their_roles() {
        let set = prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET).unwrap();
        for file in &set.file {
            for service in &file.service {
                for method in &service.method {
                    let path = format!("/{}.{}/{}", file.package(), service.name(), method.name());
                    let expected = match service.name() {
                        "CacheAdminService" => Role::Admin,
                        _ if ["Get", "List", "BatchGet"]
                            .iter()
                            .any(|verb| method.name().starts_with(verb)) =>
                        {
                            Role::Read
                        }
                        _ => Role::Write,
                    };
                    assert_eq!(of(&path).access, Access::Needs(expected), "{path}");
                }
            }
        }
        assert_eq!(of("/grpc.health.v1.Health/Check").access, Access::Open);
        assert_eq!(
            of("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo").access,
            Access::Open
        );
    }

    #[test]
    fn cheap_reads_cost_less_than_pages_and_writes_and_health_is_free() {
        let cost = |path: &str| of(path).cost;
        assert_eq!(cost("/readthrough.v1.UserService/GetUser"), Cost::Units(1));
        assert_eq!(cost("/readthrough.v1.ProductService/GetProduct"), Cost::Units(1));
        assert_eq!(cost("/readthrough.v1.UserService/BatchGetUsers"), Cost::Units(4));
        assert_eq!(cost("/readthrough.v1.ProductService/ListProducts"), Cost::Units(16));
        assert_eq!(cost("/readthrough.v1.UserService/UpdateUser"), Cost::Units(8));
        assert_eq!(cost("/grpc.health.v1.Health/Check"), Cost::Free);
    }

    #[test]
    fn every_served_rpc_has_its_own_labels_and_other_paths_share_one() {
        let labels = |path: &str| (of(path).service, of(path).name);
        assert_eq!(
            labels("/readthrough.v1.UserService/GetUser"),
            ("readthrough.v1.UserService", "GetUser")
        );
        assert_eq!(
            labels("/grpc.health.v1.Health/Check"),
            ("grpc.health.v1.Health", "Check")
        );
        assert_eq!(
            labels("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"),
            ("grpc.reflection.v1alpha.ServerReflection", "ServerReflectionInfo")
        );
        for path in ["/readthrough.v1.UserService/Nope", "/../../etc/passwd", "garbage"] {
            assert_eq!(of(path), &UNKNOWN, "{path}");
        }
        assert_eq!(UNKNOWN.access, Access::Needs(Role::Admin), "unknown methods are closed");
    }
}
