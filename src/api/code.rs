//! PolarisMesh's response codes (`apicode`) and their English texts, for the codes we answer
//! with. The HTTP status of an answer is its code divided by 1,000, as in PolarisMesh.

use crate::registry::Rejection;

/// Success.
pub const OK: u32 = 200000;
/// A client's discovery answer is current: nothing is sent again.
pub const DATA_NO_CHANGE: u32 = 200001;
/// Bad request.
pub const BAD_REQUEST: u32 = 400000;
/// The body is not parseable JSON.
pub const PARSE: u32 = 400001;
/// The request array is empty.
pub const EMPTY_REQUEST: u32 = 400002;
/// A parameter is invalid.
pub const INVALID_PARAMETER: u32 = 400103;
/// Invalid namespace name.
pub const INVALID_NAMESPACE_NAME: u32 = 400110;
/// Invalid namespace owners.
pub const INVALID_NAMESPACE_OWNERS: u32 = 400111;
/// Invalid service name.
pub const INVALID_SERVICE_NAME: u32 = 400120;
/// Invalid service owners.
pub const INVALID_SERVICE_OWNERS: u32 = 400121;
/// Invalid service metadata.
pub const INVALID_SERVICE_METADATA: u32 = 400123;
/// Invalid service ports.
pub const INVALID_SERVICE_PORTS: u32 = 400124;
/// Invalid service business.
pub const INVALID_SERVICE_BUSINESS: u32 = 400125;
/// Invalid service department.
pub const INVALID_SERVICE_DEPARTMENT: u32 = 400126;
/// Invalid service CMDB fields.
pub const INVALID_SERVICE_CMDB: u32 = 400127;
/// Invalid service comment.
pub const INVALID_SERVICE_COMMENT: u32 = 400128;
/// Invalid alias comment.
pub const INVALID_ALIAS_COMMENT: u32 = 400129;
/// Invalid instance id.
pub const INVALID_INSTANCE_ID: u32 = 400130;
/// Invalid instance host.
pub const INVALID_INSTANCE_HOST: u32 = 400131;
/// Invalid instance port.
pub const INVALID_INSTANCE_PORT: u32 = 400132;
/// Invalid alias name.
pub const INVALID_ALIAS: u32 = 400133;
/// Invalid alias owners.
pub const INVALID_ALIAS_OWNERS: u32 = 400135;
/// Invalid instance protocol.
pub const INVALID_INSTANCE_PROTOCOL: u32 = 400136;
/// Invalid instance version.
pub const INVALID_INSTANCE_VERSION: u32 = 400137;
/// Invalid instance logic set.
pub const INVALID_INSTANCE_LOGIC_SET: u32 = 400138;
/// Invalid instance isolate flag.
pub const INVALID_INSTANCE_ISOLATE: u32 = 400139;
/// Heartbeat for an instance without a heartbeat health check.
pub const HEARTBEAT_ON_DISABLED: u32 = 400141;
/// Invalid metadata.
pub const INVALID_METADATA: u32 = 400150;
/// The resource exists.
pub const EXISTED: u32 = 400201;
/// The resource does not exist.
pub const NOT_FOUND: u32 = 400202;
/// The namespace still has services.
pub const NAMESPACE_HAS_SERVICES: u32 = 400203;
/// The service still has instances.
pub const SERVICE_HAS_INSTANCES: u32 = 400204;
/// The service still has aliases.
pub const SERVICE_HAS_ALIASES: u32 = 400210;
/// The service does not exist.
pub const NOT_FOUND_SERVICE: u32 = 400301;
/// The instance does not exist.
pub const NOT_FOUND_INSTANCE: u32 = 400303;
/// The alias does not exist.
pub const NOT_FOUND_ALIAS: u32 = 400304;
/// The namespace does not exist.
pub const NOT_FOUND_NAMESPACE: u32 = 400305;
/// Aliases are not updated through the service paths.
pub const NOT_ALLOW_ALIAS_UPDATE: u32 = 400501;
/// Instances do not register to an alias.
pub const NOT_ALLOW_ALIAS_INSTANCE: u32 = 400502;
/// An alias of an alias.
pub const NOT_ALLOW_ALIAS_OF_ALIAS: u32 = 400504;
/// No token, or one that authenticates nothing (PolarisMesh's `Unauthorized`).
pub const UNAUTHORIZED: u32 = 401000;
/// The token is valid but may not do this (ours: PolarisMesh answers 401000 for both).
pub const FORBIDDEN: u32 = 403000;
/// Too many failed attempts from one address (PolarisMesh's `IPRateLimit`).
pub const IP_RATE_LIMIT: u32 = 403001;
/// A discovery request for a kind of resource this server does not serve.
pub const INVALID_DISCOVER_RESOURCE: u32 = 400004;
/// Failure inside the server.
pub const EXECUTE_EXCEPTION: u32 = 500000;
/// The store failed.
pub const STORE_EXCEPTION: u32 = 500001;

/// PolarisMesh's English text of a code (what its server puts in `info`).
pub fn info(code: u32) -> &'static str {
    match code {
        OK => "execute success",
        DATA_NO_CHANGE => "discover data is no change",
        INVALID_DISCOVER_RESOURCE => "invalid discover resource",
        BAD_REQUEST => "bad request",
        PARSE => "request decode failed",
        EMPTY_REQUEST => "empty request",
        INVALID_PARAMETER => "invalid parameter",
        INVALID_NAMESPACE_NAME => "invalid namespace name",
        INVALID_NAMESPACE_OWNERS => "invalid namespace owners",
        INVALID_SERVICE_NAME => "invalid service name",
        INVALID_SERVICE_OWNERS => "invalid service owners",
        INVALID_SERVICE_METADATA => "invalid service metadata",
        INVALID_SERVICE_PORTS => "invalid service ports",
        INVALID_SERVICE_BUSINESS => "invalid service business",
        INVALID_SERVICE_DEPARTMENT => "invalid service department",
        INVALID_SERVICE_CMDB => "invalid service CMDB",
        INVALID_SERVICE_COMMENT => "invalid service comment",
        INVALID_ALIAS_COMMENT => "invalid service alias comment",
        INVALID_INSTANCE_ID => "invalid instance id",
        INVALID_INSTANCE_HOST => "invalid instance host",
        INVALID_INSTANCE_PORT => "invalid instance port",
        INVALID_ALIAS => "invalid service alias",
        INVALID_ALIAS_OWNERS => "invalid service alias owners",
        INVALID_INSTANCE_PROTOCOL => "invalid instance protocol",
        INVALID_INSTANCE_VERSION => "invalid instance version",
        INVALID_INSTANCE_LOGIC_SET => "invalid instance logic set",
        INVALID_INSTANCE_ISOLATE => "invalid instance isolate",
        HEARTBEAT_ON_DISABLED => "heartbeat on disabled instance",
        INVALID_METADATA => {
            "the length of metadata is too long or metadata contains invalid characters"
        }
        EXISTED => "existed resource",
        NOT_FOUND => "not found resource",
        NAMESPACE_HAS_SERVICES => "some services existed in namespace",
        SERVICE_HAS_INSTANCES => "some instances existed in service",
        SERVICE_HAS_ALIASES => "some aliases existed in service",
        NOT_FOUND_SERVICE => "not found service",
        NOT_FOUND_INSTANCE => "not found instances",
        NOT_FOUND_ALIAS => "not found service alias",
        NOT_FOUND_NAMESPACE => "not found namespace",
        NOT_ALLOW_ALIAS_UPDATE => "not allow service alias updating",
        NOT_ALLOW_ALIAS_INSTANCE => "not allow service alias creating instance",
        NOT_ALLOW_ALIAS_OF_ALIAS => "only source service can create alias",
        UNAUTHORIZED => "unauthorized",
        FORBIDDEN => "access is not allowed",
        IP_RATE_LIMIT => "ip rate limit",
        EXECUTE_EXCEPTION => "execute exception",
        STORE_EXCEPTION => "store layer exception",
        _ => "bad request",
    }
}

/// The HTTP status of an answer with `code`.
pub fn http_status(code: u32) -> axum::http::StatusCode {
    axum::http::StatusCode::from_u16((code / 1000) as u16)
        .unwrap_or(axum::http::StatusCode::BAD_REQUEST)
}

/// What a request was about, for the code of a field it got wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entity {
    /// Namespaces.
    Namespace,
    /// Services.
    Service,
    /// Service aliases.
    Alias,
    /// Instances.
    Instance,
    /// Anything else (instance groups).
    Other,
}

/// PolarisMesh's code for a rejected field of `entity` (the field as our errors name it,
/// possibly prefixed with `[i].`).
pub fn for_field(entity: Entity, field: &str) -> u32 {
    let field = field.rsplit_once("].").map_or(field, |(_, f)| f);
    let head = field.split('.').next().unwrap_or(field);
    match (entity, head) {
        (_, "body") => BAD_REQUEST,
        (Entity::Alias, "alias") => INVALID_ALIAS,
        (Entity::Alias, "aliasNamespace" | "namespace") => INVALID_NAMESPACE_NAME,
        (Entity::Alias, "comment") => INVALID_ALIAS_COMMENT,
        (Entity::Alias, "owners") => INVALID_ALIAS_OWNERS,
        (Entity::Alias, "service") => INVALID_SERVICE_NAME,
        (Entity::Namespace, "name") | (_, "namespace") => INVALID_NAMESPACE_NAME,
        (Entity::Namespace, "owners") => INVALID_NAMESPACE_OWNERS,
        (Entity::Service, "name") | (_, "service") => INVALID_SERVICE_NAME,
        (Entity::Service, "owners") => INVALID_SERVICE_OWNERS,
        (Entity::Service, "metadata") => INVALID_SERVICE_METADATA,
        (Entity::Service, "ports") => INVALID_SERVICE_PORTS,
        (Entity::Service, "business") => INVALID_SERVICE_BUSINESS,
        (Entity::Service, "department") => INVALID_SERVICE_DEPARTMENT,
        (Entity::Service, "cmdbMod1" | "cmdbMod2" | "cmdbMod3") => INVALID_SERVICE_CMDB,
        (Entity::Service, "comment") => INVALID_SERVICE_COMMENT,
        (Entity::Instance, "id") => INVALID_INSTANCE_ID,
        (Entity::Instance, "host") => INVALID_INSTANCE_HOST,
        (Entity::Instance, "port") => INVALID_INSTANCE_PORT,
        (Entity::Instance, "protocol") => INVALID_INSTANCE_PROTOCOL,
        (Entity::Instance, "version") => INVALID_INSTANCE_VERSION,
        (Entity::Instance, "logic_set") => INVALID_INSTANCE_LOGIC_SET,
        (Entity::Instance, "isolate") => INVALID_INSTANCE_ISOLATE,
        (Entity::Instance, "metadata") => INVALID_METADATA,
        _ => INVALID_PARAMETER,
    }
}

/// PolarisMesh's code for an item the registry did not apply.
pub fn for_rejection(r: Rejection) -> u32 {
    match r {
        Rejection::RuleMissing => NOT_FOUND,
        Rejection::Exists => EXISTED,
        Rejection::NamespaceMissing => NOT_FOUND_NAMESPACE,
        Rejection::ServiceMissing => NOT_FOUND_SERVICE,
        Rejection::InstanceMissing => NOT_FOUND_INSTANCE,
        Rejection::SystemNamespace => BAD_REQUEST,
        Rejection::NamespaceHasServices => NAMESPACE_HAS_SERVICES,
        Rejection::ServiceHasInstances => SERVICE_HAS_INSTANCES,
        Rejection::ServiceHasAliases => SERVICE_HAS_ALIASES,
        Rejection::AliasOfAlias => NOT_ALLOW_ALIAS_OF_ALIAS,
        Rejection::AliasTakesNoInstances => NOT_ALLOW_ALIAS_INSTANCE,
        Rejection::AliasUpdate => NOT_ALLOW_ALIAS_UPDATE,
        Rejection::NotAnAlias => NOT_FOUND_ALIAS,
        Rejection::IdOfAnotherService => EXISTED,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_of_fields_and_statuses() {
        assert_eq!(
            for_field(Entity::Namespace, "[0].name"),
            INVALID_NAMESPACE_NAME
        );
        assert_eq!(for_field(Entity::Service, "[3].name"), INVALID_SERVICE_NAME);
        assert_eq!(
            for_field(Entity::Service, "metadata.k"),
            INVALID_SERVICE_METADATA
        );
        assert_eq!(for_field(Entity::Alias, "alias"), INVALID_ALIAS);
        assert_eq!(for_field(Entity::Alias, "comment"), INVALID_ALIAS_COMMENT);
        assert_eq!(
            for_field(Entity::Instance, "[1].port"),
            INVALID_INSTANCE_PORT
        );
        assert_eq!(
            for_field(Entity::Instance, "[1].namespace"),
            INVALID_NAMESPACE_NAME
        );
        assert_eq!(
            for_field(Entity::Instance, "healthCheck.heartbeat.ttl"),
            INVALID_PARAMETER
        );
        assert_eq!(http_status(OK), 200);
        assert_eq!(http_status(NAMESPACE_HAS_SERVICES), 400);
        assert_eq!(http_status(STORE_EXCEPTION), 500);
        assert_eq!(info(INVALID_NAMESPACE_NAME), "invalid namespace name");
    }
}
