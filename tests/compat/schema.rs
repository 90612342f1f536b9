//! PolarisMesh's message shapes, written from its protos (`polarismesh/specification`,
//! `api/v1/model/namespace.proto`, `api/v1/service_manage/{service,response}.proto`,
//! `api/v1/model/model.proto`), and a strict check of JSON against them the way protobuf JSON
//! decoders (Go's `jsonpb.Unmarshal`, which PolarisMesh's clients use) read it: every key must be
//! a field of the message, under its JSON name or its protobuf name, with a value of its type.

use serde_json::Value;

/// A field's type.
#[derive(Debug, Clone, Copy)]
pub enum T {
    /// `google.protobuf.StringValue` (or `string`).
    Str,
    /// `google.protobuf.UInt32Value` (or `uint32`).
    U32,
    /// `google.protobuf.BoolValue`.
    Bool,
    /// `map<string, string>`.
    StrMap,
    /// A message.
    Msg(&'static str),
    /// `repeated` message.
    Repeated(&'static str),
    /// `repeated google.protobuf.StringValue`.
    RepeatedStr,
    /// An enum, by value name.
    Enum(&'static [&'static str]),
    /// `google.protobuf.Any` and messages we never answer with: must be absent.
    Unused,
}

/// A field: protobuf name, JSON name, type.
type F = (&'static str, &'static str, T);

const NAMESPACE: &[F] = &[
    ("name", "name", T::Str),
    ("comment", "comment", T::Str),
    ("owners", "owners", T::Str),
    ("token", "token", T::Str),
    ("ctime", "ctime", T::Str),
    ("mtime", "mtime", T::Str),
    ("total_service_count", "total_service_count", T::U32),
    (
        "total_health_instance_count",
        "total_health_instance_count",
        T::U32,
    ),
    ("total_instance_count", "total_instance_count", T::U32),
    ("user_ids", "user_ids", T::RepeatedStr),
    ("group_ids", "group_ids", T::RepeatedStr),
    ("remove_user_ids", "remove_user_ids", T::RepeatedStr),
    ("remove_group_ids", "remove_group_ids", T::RepeatedStr),
    ("id", "id", T::Str),
    ("editable", "editable", T::Bool),
];

const SERVICE: &[F] = &[
    ("name", "name", T::Str),
    ("namespace", "namespace", T::Str),
    ("metadata", "metadata", T::StrMap),
    ("ports", "ports", T::Str),
    ("business", "business", T::Str),
    ("department", "department", T::Str),
    ("cmdb_mod1", "cmdb_mod1", T::Str),
    ("cmdb_mod2", "cmdb_mod2", T::Str),
    ("cmdb_mod3", "cmdb_mod3", T::Str),
    ("comment", "comment", T::Str),
    ("owners", "owners", T::Str),
    ("token", "token", T::Str),
    ("ctime", "ctime", T::Str),
    ("mtime", "mtime", T::Str),
    ("revision", "revision", T::Str),
    ("platform_id", "platform_id", T::Str),
    ("total_instance_count", "total_instance_count", T::U32),
    ("healthy_instance_count", "healthy_instance_count", T::U32),
    ("user_ids", "user_ids", T::RepeatedStr),
    ("group_ids", "group_ids", T::RepeatedStr),
    ("remove_user_ids", "remove_user_ids", T::RepeatedStr),
    ("remove_group_ids", "remove_group_ids", T::RepeatedStr),
    ("id", "id", T::Str),
    ("editable", "editable", T::Bool),
    ("export_to", "export_to", T::RepeatedStr),
    ("deleteable", "deleteable", T::Bool),
];

const SERVICE_ALIAS: &[F] = &[
    ("service", "service", T::Str),
    ("namespace", "namespace", T::Str),
    ("alias", "alias", T::Str),
    ("alias_namespace", "alias_namespace", T::Str),
    ("type", "type", T::Enum(&["DEFAULT", "CL5SID"])),
    ("owners", "owners", T::Str),
    ("comment", "comment", T::Str),
    ("service_token", "service_token", T::Str),
    ("ctime", "ctime", T::Str),
    ("mtime", "mtime", T::Str),
    ("id", "id", T::Str),
    ("editable", "editable", T::Bool),
];

const INSTANCE: &[F] = &[
    ("id", "id", T::Str),
    ("service", "service", T::Str),
    ("namespace", "namespace", T::Str),
    ("vpc_id", "vpc_id", T::Str),
    ("host", "host", T::Str),
    ("port", "port", T::U32),
    ("protocol", "protocol", T::Str),
    ("version", "version", T::Str),
    ("priority", "priority", T::U32),
    ("weight", "weight", T::U32),
    ("enable_health_check", "enableHealthCheck", T::Bool),
    ("health_check", "healthCheck", T::Msg("HealthCheck")),
    ("healthy", "healthy", T::Bool),
    ("isolate", "isolate", T::Bool),
    ("location", "location", T::Msg("Location")),
    ("metadata", "metadata", T::StrMap),
    ("logic_set", "logic_set", T::Str),
    ("ctime", "ctime", T::Str),
    ("mtime", "mtime", T::Str),
    ("revision", "revision", T::Str),
    ("service_token", "service_token", T::Str),
];

const HEALTH_CHECK: &[F] = &[
    ("type", "type", T::Enum(&["UNKNOWN", "HEARTBEAT"])),
    ("heartbeat", "heartbeat", T::Msg("HeartbeatHealthCheck")),
];

const HEARTBEAT: &[F] = &[("ttl", "ttl", T::U32)];

const LOCATION: &[F] = &[
    ("region", "region", T::Str),
    ("zone", "zone", T::Str),
    ("campus", "campus", T::Str),
];

const RESPONSE: &[F] = &[
    ("code", "code", T::U32),
    ("info", "info", T::Str),
    ("client", "client", T::Unused),
    ("namespace", "namespace", T::Msg("Namespace")),
    ("service", "service", T::Msg("Service")),
    ("instance", "instance", T::Msg("Instance")),
    ("routing", "routing", T::Unused),
    ("alias", "alias", T::Msg("ServiceAlias")),
    ("rateLimit", "rateLimit", T::Unused),
    ("circuitBreaker", "circuitBreaker", T::Unused),
    ("data", "data", T::Unused),
];

const BATCH_WRITE: &[F] = &[
    ("code", "code", T::U32),
    ("info", "info", T::Str),
    ("size", "size", T::U32),
    ("responses", "responses", T::Repeated("Response")),
];

const BATCH_QUERY: &[F] = &[
    ("code", "code", T::U32),
    ("info", "info", T::Str),
    ("amount", "amount", T::U32),
    ("size", "size", T::U32),
    ("namespaces", "namespaces", T::Repeated("Namespace")),
    ("services", "services", T::Repeated("Service")),
    ("instances", "instances", T::Repeated("Instance")),
    ("routings", "routings", T::Unused),
    ("aliases", "aliases", T::Repeated("ServiceAlias")),
    ("rateLimits", "rateLimits", T::Unused),
    ("data", "data", T::Unused),
];

fn message(name: &str) -> &'static [F] {
    match name {
        "Namespace" => NAMESPACE,
        "Service" => SERVICE,
        "ServiceAlias" => SERVICE_ALIAS,
        "Instance" => INSTANCE,
        "HealthCheck" => HEALTH_CHECK,
        "HeartbeatHealthCheck" => HEARTBEAT,
        "Location" => LOCATION,
        "Response" => RESPONSE,
        "BatchWriteResponse" => BATCH_WRITE,
        "BatchQueryResponse" => BATCH_QUERY,
        other => panic!("no schema for {other}"),
    }
}

/// Checks `v` against message `name` the way a strict protobuf JSON decoder would.
pub fn check(name: &str, v: &Value) -> Result<(), String> {
    check_at(name, v, name)
}

fn check_at(name: &str, v: &Value, path: &str) -> Result<(), String> {
    let fields = message(name);
    let obj = v
        .as_object()
        .ok_or_else(|| format!("{path}: not an object"))?;
    for (k, val) in obj {
        let (_, _, t) = fields
            .iter()
            .find(|(proto, json, _)| k == proto || k == json)
            .ok_or_else(|| format!("{path}: unknown field {k:?} in {name}"))?;
        let at = format!("{path}.{k}");
        if val.is_null() {
            continue;
        }
        check_type(*t, val, &at)?;
    }
    Ok(())
}

fn check_type(t: T, v: &Value, at: &str) -> Result<(), String> {
    let bad = |what: &str| Err(format!("{at}: expected {what}, got {v}"));
    match t {
        T::Str => {
            if !v.is_string() {
                return bad("a string");
            }
        }
        T::U32 => {
            let ok = v.as_u64().is_some_and(|n| n <= u64::from(u32::MAX))
                || v.as_str().is_some_and(|s| s.parse::<u32>().is_ok());
            if !ok {
                return bad("a uint32");
            }
        }
        T::Bool => {
            if !v.is_boolean() {
                return bad("a bool");
            }
        }
        T::StrMap => {
            let ok = v
                .as_object()
                .is_some_and(|m| m.values().all(Value::is_string));
            if !ok {
                return bad("a map of strings");
            }
        }
        T::Msg(m) => check_at(m, v, at)?,
        T::Repeated(m) => {
            let Some(items) = v.as_array() else {
                return bad("an array");
            };
            for (i, item) in items.iter().enumerate() {
                check_at(m, item, &format!("{at}[{i}]"))?;
            }
        }
        T::RepeatedStr => {
            if !v.as_array().is_some_and(|a| a.iter().all(Value::is_string)) {
                return bad("an array of strings");
            }
        }
        T::Enum(values) => {
            let ok = v.as_str().is_some_and(|s| values.contains(&s))
                || v.as_u64().is_some_and(|n| (n as usize) < values.len());
            if !ok {
                return bad("an enum value");
            }
        }
        T::Unused => return bad("nothing (we never answer with this field)"),
    }
    Ok(())
}
