//! Namespaces, services, aliases, instances and instance groups: PolarisMesh's naming paths.
//!
//! A request's items are validated first, all of them; a malformed item rejects the request and
//! nothing is written. Then each item is applied or rejected on its own against what is stored (an
//! existing name, a namespace that still has services), and the answer says so item by item, as
//! PolarisMesh does.

use axum::body::Bytes;
use axum::extract::State;
use axum::response::Response;
use axum::Extension;
use serde::Deserialize;
use serde_json::{json, Value};
use utoipa::ToSchema;

use super::auth::{self, Principal};
use super::code::{self, Entity};
use super::error::ApiError;
use super::input::{each, parse_batch, parse_json, Params};
use super::view::{self, Item as Answer, NamespaceCounts};
use super::AppState;
use crate::model::{
    new_token, now_rfc3339, validate_name, validate_namespace_name, AliasInput, FieldError,
    InstanceGroup, InstanceInput, InstanceRef, NamespaceInput, ServiceInput, ServiceKey,
};
use crate::registry::{self, Command, Item, ServiceEntry};

type ApiResult = Result<Response, ApiError>;

async fn submit(
    st: &AppState,
    who: &Principal,
    entity: Entity,
    cmd: Command,
) -> Result<Vec<Item>, ApiError> {
    auth::write(&st.registry, &st.metrics, who, cmd)
        .await
        .map_err(|e| e.into_api(entity).in_batch())
}

/// The answer of one registry item: `ok` builds the object of an applied item, `echo` the object
/// a rejected or missing item names.
fn answer(item: Item, field: &'static str, echo: Value, ok: impl FnOnce(Item) -> Value) -> Answer {
    match item {
        Item::Rejected { reason, detail } => {
            Answer::failed(code::for_rejection(reason), detail, Some((field, echo)))
        }
        // Deleting what does not exist succeeds, as in PolarisMesh.
        Item::Missing(_) => Answer::ok(field, echo),
        item => Answer::ok(field, ok(item)),
    }
}

// ---- Namespaces ----

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(super) struct NameRef {
    #[serde(default)]
    name: Option<String>,
}

fn counts(reg: &registry::State) -> std::collections::HashMap<&str, NamespaceCounts> {
    let mut out: std::collections::HashMap<&str, NamespaceCounts> = Default::default();
    for (k, e) in &reg.services {
        if e.service.alias_for.is_some() {
            continue;
        }
        let c = out.entry(k.namespace.as_str()).or_default();
        c.services += 1;
        c.instances += e.instances.len() as u32;
        c.healthy += e
            .instances
            .values()
            .filter(|i| i.healthy && !i.isolate)
            .count() as u32;
    }
    out
}

/// A name filter: exact, or a prefix when it ends with `*` (PolarisMesh's fuzzy match).
fn name_matches(filters: &[&str], name: &str) -> bool {
    filters.is_empty()
        || filters.iter().any(|f| match f.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => *f == name,
        })
}

/// `GET /naming/v1/namespaces` (`name` may repeat; `offset`, `limit`).
#[utoipa::path(get, path = "/naming/v1/namespaces",
    params(("name" = Option<Vec<String>>, Query, description = "Names (repeatable; a trailing * matches a prefix)"),
           ("offset" = Option<usize>, Query), ("limit" = Option<usize>, Query)),
    responses((status = 200, description = "BatchQueryResponse with `namespaces`")))]
pub(super) async fn list_namespaces(State(st): State<AppState>, uri: axum::http::Uri) -> ApiResult {
    let p = Params::of(&uri);
    let (offset, limit) = p.page()?;
    let names = p.all("name");
    let reg = st.registry.read();
    let counts = counts(&reg);
    let all: Vec<_> = reg
        .namespaces
        .values()
        .filter(|n| name_matches(&names, &n.name))
        .collect();
    let page = all
        .iter()
        .skip(offset)
        .take(limit)
        .map(|n| {
            let c = counts.get(n.name.as_str()).copied().unwrap_or_default();
            serde_json::to_value(view::namespace(n, Some(c))).unwrap_or_default()
        })
        .collect();
    Ok(view::batch_query("namespaces", all.len(), page))
}

/// `POST /naming/v1/namespaces`.
#[utoipa::path(post, path = "/naming/v1/namespaces", request_body = Vec<NamespaceInput>,
    responses((status = 200, description = "BatchWriteResponse; each created namespace carries its token"),
              (status = 400, description = "Bad input, or some items exist already (per item)")))]
pub(super) async fn create_namespaces(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    body: Bytes,
) -> ApiResult {
    let list: Vec<NamespaceInput> = parse_batch(&body, Entity::Namespace)?;
    let now = now_rfc3339();
    let mut tokens = Vec::new();
    let list = each(list, Entity::Namespace, |n| {
        let mut ns = n.validate(&now)?;
        let (token, hash) = new_token();
        ns.token_hash = hash;
        Ok((ns, token))
    })?;
    let (list, echo): (Vec<_>, Vec<_>) = list
        .into_iter()
        .map(|(ns, token)| {
            tokens.push(token);
            let echo = json!({"name": ns.name});
            (ns, echo)
        })
        .unzip();
    let items = submit(
        &st,
        &who,
        Entity::Namespace,
        Command::CreateNamespaces(list),
    )
    .await?;
    let answers: Vec<Answer> = items
        .into_iter()
        .zip(echo.into_iter().zip(tokens))
        .map(|(item, (echo, token))| {
            answer(item, "namespace", echo, |i| match i {
                Item::Namespace(ns) => {
                    serde_json::to_value(view::new_namespace(&ns, token)).unwrap_or_default()
                }
                _ => Value::Null,
            })
        })
        .collect();
    Ok(view::batch_write(&answers))
}

/// `PUT /naming/v1/namespaces`: comment and owners.
#[utoipa::path(put, path = "/naming/v1/namespaces", request_body = Vec<NamespaceInput>,
    responses((status = 200, description = "BatchWriteResponse")))]
pub(super) async fn update_namespaces(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    body: Bytes,
) -> ApiResult {
    let list: Vec<NamespaceInput> = parse_batch(&body, Entity::Namespace)?;
    let now = now_rfc3339();
    let echo = each(list.clone(), Entity::Namespace, |n| {
        n.validate(&now)?;
        Ok(json!({"name": n.name}))
    })?;
    let items = submit(
        &st,
        &who,
        Entity::Namespace,
        Command::UpdateNamespaces(list),
    )
    .await?;
    Ok(view::batch_write(&namespace_answers(items, echo)))
}

fn namespace_answers(items: Vec<Item>, echo: Vec<Value>) -> Vec<Answer> {
    items
        .into_iter()
        .zip(echo)
        .map(|(item, echo)| {
            answer(item, "namespace", echo, |i| match i {
                Item::Namespace(ns) => {
                    serde_json::to_value(view::namespace(&ns, None)).unwrap_or_default()
                }
                _ => Value::Null,
            })
        })
        .collect()
}

/// `POST /naming/v1/namespaces/delete`.
#[utoipa::path(post, path = "/naming/v1/namespaces/delete", request_body = Vec<NameRef>,
    responses((status = 200, description = "BatchWriteResponse (a missing namespace is a success)"),
              (status = 400, description = "Some namespace still has services: 400203 for that item, the others are deleted")))]
pub(super) async fn delete_namespaces(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    body: Bytes,
) -> ApiResult {
    let list: Vec<NameRef> = parse_batch(&body, Entity::Namespace)?;
    let names = each(list, Entity::Namespace, |n| {
        let name = n.name.clone().unwrap_or_default();
        validate_namespace_name(&name, "name")?;
        Ok(name)
    })?;
    let echo = names.iter().map(|n| json!({"name": n})).collect();
    let items = submit(
        &st,
        &who,
        Entity::Namespace,
        Command::DeleteNamespaces(names),
    )
    .await?;
    Ok(view::batch_write(&namespace_answers(items, echo)))
}

// ---- Services ----

/// `GET /naming/v1/services` (`namespace`, `name`, `business`, `department`, metadata `keys` and
/// `values`, `offset`, `limit`); aliases are listed by `/naming/v1/service/aliases`.
#[utoipa::path(get, path = "/naming/v1/services",
    params(("namespace" = Option<String>, Query), ("name" = Option<String>, Query, description = "Exact, or a prefix ending in *"),
           ("business" = Option<String>, Query), ("department" = Option<String>, Query),
           ("keys" = Option<String>, Query, description = "Metadata key (with `values`)"), ("values" = Option<String>, Query),
           ("offset" = Option<usize>, Query), ("limit" = Option<usize>, Query)),
    responses((status = 200, description = "BatchQueryResponse with `services` (instance counts, revision)")))]
pub(super) async fn list_services(State(st): State<AppState>, uri: axum::http::Uri) -> ApiResult {
    let p = Params::of(&uri);
    let (offset, limit) = p.page()?;
    let names = p.all("name");
    let meta = metadata_filter(&p)?;
    let reg = st.registry.read();
    let all: Vec<&ServiceEntry> = reg
        .services
        .iter()
        .filter(|(_, e)| e.service.alias_for.is_none())
        .filter(|(k, _)| p.get("namespace").is_none_or(|n| k.namespace == n))
        .filter(|(k, _)| name_matches(&names, &k.name))
        .filter(|(_, e)| p.get("business").is_none_or(|b| e.service.business == b))
        .filter(|(_, e)| {
            p.get("department")
                .is_none_or(|d| e.service.department == d)
        })
        .filter(|(_, e)| {
            meta.iter()
                .all(|(k, v)| e.service.metadata.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, e)| e)
        .collect();
    let page = all
        .iter()
        .skip(offset)
        .take(limit)
        .map(|e| serde_json::to_value(view::listed_service(e)).unwrap_or_default())
        .collect();
    Ok(view::batch_query("services", all.len(), page))
}

fn metadata_filter(p: &Params) -> Result<Vec<(&str, &str)>, ApiError> {
    match (p.get("keys"), p.get("values")) {
        (None, None) => Ok(vec![]),
        (Some(k), Some(v)) => {
            let ks: Vec<_> = k.split(',').collect();
            let vs: Vec<_> = v.split(',').collect();
            if ks.len() != vs.len() {
                return Err(ApiError::new(
                    code::INVALID_PARAMETER,
                    "query parameter values: needs as many values as keys",
                ));
            }
            Ok(ks.into_iter().zip(vs).collect())
        }
        _ => Err(ApiError::new(
            code::INVALID_PARAMETER,
            "query parameters keys and values go together",
        )),
    }
}

/// `POST /naming/v1/services`.
#[utoipa::path(post, path = "/naming/v1/services", request_body = Vec<ServiceInput>,
    responses((status = 200, description = "BatchWriteResponse; each created service carries its token"),
              (status = 400, description = "Bad input, or per item: exists, namespace missing")))]
pub(super) async fn create_services(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    body: Bytes,
) -> ApiResult {
    let list: Vec<ServiceInput> = parse_batch(&body, Entity::Service)?;
    let now = now_rfc3339();
    let list = each(list, Entity::Service, |s| {
        let mut svc = s.validate(&now)?;
        let (token, hash) = new_token();
        svc.token_hash = hash;
        Ok((svc, token))
    })?;
    let echo: Vec<Value> = list
        .iter()
        .map(|(s, _)| json!({"namespace": s.namespace, "name": s.name}))
        .collect();
    let (list, tokens): (Vec<_>, Vec<_>) = list.into_iter().unzip();
    let items = submit(&st, &who, Entity::Service, Command::CreateServices(list)).await?;
    let answers: Vec<Answer> = items
        .into_iter()
        .zip(echo.into_iter().zip(tokens))
        .map(|(item, (echo, token))| {
            answer(item, "service", echo, |i| match i {
                Item::Service(s) => {
                    serde_json::to_value(view::new_service(&s, token)).unwrap_or_default()
                }
                _ => Value::Null,
            })
        })
        .collect();
    Ok(view::batch_write(&answers))
}

fn service_answers(items: Vec<Item>, echo: Vec<Value>) -> Vec<Answer> {
    items
        .into_iter()
        .zip(echo)
        .map(|(item, echo)| {
            answer(item, "service", echo, |i| match i {
                Item::Service(s) => serde_json::to_value(view::service(&s)).unwrap_or_default(),
                _ => Value::Null,
            })
        })
        .collect()
}

/// `PUT /naming/v1/services`: the fields that are set; `metadata` replaces.
#[utoipa::path(put, path = "/naming/v1/services", request_body = Vec<ServiceInput>,
    responses((status = 200, description = "BatchWriteResponse"), (status = 400, description = "Bad input, or per item: no such service")))]
pub(super) async fn update_services(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    body: Bytes,
) -> ApiResult {
    let list: Vec<ServiceInput> = parse_batch(&body, Entity::Service)?;
    let now = now_rfc3339();
    // Every field validated up front, so a bad item rejects the whole request.
    let echo = each(list.clone(), Entity::Service, |s| {
        s.validate(&now)?;
        Ok(json!({"namespace": s.namespace, "name": s.name}))
    })?;
    let items = submit(&st, &who, Entity::Service, Command::UpdateServices(list)).await?;
    Ok(view::batch_write(&service_answers(items, echo)))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(super) struct ServiceRef {
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

fn service_key(
    ns: &Option<String>,
    name: &Option<String>,
    name_field: &str,
) -> Result<ServiceKey, FieldError> {
    let ns = ns.clone().unwrap_or_default();
    validate_namespace_name(&ns, "namespace")?;
    let name = name.clone().unwrap_or_default();
    validate_name(&name, name_field)?;
    Ok(ServiceKey::new(ns, name))
}

/// `POST /naming/v1/services/delete`.
#[utoipa::path(post, path = "/naming/v1/services/delete", request_body = Vec<ServiceRef>,
    responses((status = 200, description = "BatchWriteResponse (a missing service is a success)"),
              (status = 400, description = "Per item: the service still has instances or aliases")))]
pub(super) async fn delete_services(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    body: Bytes,
) -> ApiResult {
    let list: Vec<ServiceRef> = parse_batch(&body, Entity::Service)?;
    let keys = each(list, Entity::Service, |s| {
        service_key(&s.namespace, &s.name, "name")
    })?;
    let echo = keys
        .iter()
        .map(|k| json!({"namespace": k.namespace, "name": k.name}))
        .collect();
    let items = submit(&st, &who, Entity::Service, Command::DeleteServices(keys)).await?;
    Ok(view::batch_write(&service_answers(items, echo)))
}

// ---- Aliases ----

/// `POST /naming/v1/service/alias`: one alias; the answer is a `Response` with `alias`.
#[utoipa::path(post, path = "/naming/v1/service/alias", request_body = AliasInput,
    responses((status = 200, description = "Response with the `alias`"),
              (status = 400, description = "Bad input; the service is missing (400301) or is an alias (400504); the alias exists (400201)")))]
pub(super) async fn create_alias(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    body: Bytes,
) -> ApiResult {
    let input: AliasInput = parse_json(&body, Entity::Alias)?;
    let alias = input
        .validate(&now_rfc3339())
        .map_err(|e| ApiError::field(Entity::Alias, e))?;
    let echo = serde_json::to_value(view::alias(&alias)).unwrap_or_default();
    let items = auth::write(
        &st.registry,
        &st.metrics,
        &who,
        Command::CreateAlias(Box::new(alias)),
    )
    .await
    .map_err(|e| e.into_api(Entity::Alias))?;
    let item = items.into_iter().next().expect("one item per alias");
    Ok(view::single(&answer(item, "alias", echo, |i| match i {
        Item::Service(s) => serde_json::to_value(view::alias(&s)).unwrap_or_default(),
        _ => Value::Null,
    })))
}

/// `GET /naming/v1/service/aliases` (`namespace` and `service` of the target, `alias`,
/// `alias_namespace`, `offset`, `limit`).
#[utoipa::path(get, path = "/naming/v1/service/aliases",
    params(("namespace" = Option<String>, Query), ("service" = Option<String>, Query),
           ("alias" = Option<String>, Query), ("alias_namespace" = Option<String>, Query),
           ("offset" = Option<usize>, Query), ("limit" = Option<usize>, Query)),
    responses((status = 200, description = "BatchQueryResponse with `aliases`")))]
pub(super) async fn list_aliases(State(st): State<AppState>, uri: axum::http::Uri) -> ApiResult {
    let p = Params::of(&uri);
    let (offset, limit) = p.page()?;
    let reg = st.registry.read();
    let all: Vec<_> = reg
        .services
        .values()
        .filter_map(|e| e.service.alias_for.as_ref().map(|t| (t, &e.service)))
        .filter(|(t, _)| p.get("namespace").is_none_or(|n| t.namespace == n))
        .filter(|(t, _)| p.get("service").is_none_or(|s| t.service == s))
        .filter(|(_, a)| p.get("alias").is_none_or(|n| a.name == n))
        .filter(|(_, a)| {
            p.get("alias_namespace")
                .or(p.get("aliasNamespace"))
                .is_none_or(|n| a.namespace == n)
        })
        .map(|(_, a)| a)
        .collect();
    let page = all
        .iter()
        .skip(offset)
        .take(limit)
        .map(|a| serde_json::to_value(view::alias(a)).unwrap_or_default())
        .collect();
    Ok(view::batch_query("aliases", all.len(), page))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(super) struct AliasRef {
    #[serde(default)]
    alias: Option<String>,
    #[serde(default)]
    alias_namespace: Option<String>,
}

/// `POST /naming/v1/service/aliases/delete`.
#[utoipa::path(post, path = "/naming/v1/service/aliases/delete", request_body = Vec<AliasRef>,
    responses((status = 200, description = "BatchWriteResponse (a missing alias is a success)")))]
pub(super) async fn delete_aliases(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    body: Bytes,
) -> ApiResult {
    let list: Vec<AliasRef> = parse_batch(&body, Entity::Alias)?;
    let keys = each(list, Entity::Alias, |a| {
        let ns = a.alias_namespace.clone().unwrap_or_default();
        validate_namespace_name(&ns, "aliasNamespace")?;
        let name = a.alias.clone().unwrap_or_default();
        validate_name(&name, "alias")?;
        Ok(ServiceKey::new(ns, name))
    })?;
    let echo: Vec<Value> = keys
        .iter()
        .map(|k| json!({"alias": k.name, "alias_namespace": k.namespace}))
        .collect();
    let items = submit(&st, &who, Entity::Alias, Command::DeleteAliases(keys)).await?;
    let answers: Vec<Answer> = items
        .into_iter()
        .zip(echo)
        .map(|(item, echo)| {
            answer(item, "alias", echo, |i| match i {
                Item::Service(s) => serde_json::to_value(view::alias(&s)).unwrap_or_default(),
                _ => Value::Null,
            })
        })
        .collect();
    Ok(view::batch_write(&answers))
}

// ---- Instances ----

/// `GET /naming/v1/instances` (`namespace` with `service`, `healthy`, `isolate`, `host`, `port`,
/// metadata `keys`/`values`, `group`, `offset`, `limit`); an alias lists its target's instances.
#[utoipa::path(get, path = "/naming/v1/instances",
    params(("namespace" = Option<String>, Query), ("service" = Option<String>, Query),
           ("healthy" = Option<bool>, Query), ("isolate" = Option<bool>, Query),
           ("host" = Option<String>, Query), ("port" = Option<u16>, Query),
           ("keys" = Option<String>, Query), ("values" = Option<String>, Query),
           ("group" = Option<String>, Query, description = "Only instances of this group (needs service)"),
           ("offset" = Option<usize>, Query), ("limit" = Option<usize>, Query)),
    responses((status = 200, description = "BatchQueryResponse with `instances`")))]
pub(super) async fn list_instances(State(st): State<AppState>, uri: axum::http::Uri) -> ApiResult {
    let p = Params::of(&uri);
    let (offset, limit) = p.page()?;
    let meta = metadata_filter(&p)?;
    let healthy: Option<bool> = p.parsed("healthy")?;
    let isolate: Option<bool> = p.parsed("isolate")?;
    let port: Option<u16> = p.parsed("port")?;
    let reg = st.registry.read();
    let mut key = None;
    if let Some(svc) = p.get("service") {
        let ns = p.get("namespace").ok_or_else(|| {
            ApiError::new(
                code::INVALID_NAMESPACE_NAME,
                "namespace is required with service",
            )
        })?;
        let mut k = ServiceKey::new(ns, svc);
        if let Some(t) = reg
            .services
            .get(&k)
            .and_then(|e| e.service.alias_for.clone())
        {
            k = ServiceKey::new(t.namespace, t.service);
        }
        key = Some(k);
    }
    let group = match (p.get("group"), &key) {
        (None, _) => None,
        (Some(g), Some(k)) => Some(
            reg.services
                .get(k)
                .and_then(|e| e.groups.get(g))
                .ok_or_else(|| ApiError::new(code::NOT_FOUND, format!("group {g}")))?,
        ),
        (Some(_), None) => {
            return Err(ApiError::new(
                code::INVALID_PARAMETER,
                "query parameter group: needs namespace and service",
            ))
        }
    };
    let entries: Box<dyn Iterator<Item = &ServiceEntry>> = match &key {
        Some(k) => Box::new(reg.services.get(k).into_iter()),
        None => Box::new(
            reg.services
                .iter()
                .filter(|(k, _)| p.get("namespace").is_none_or(|n| k.namespace == n))
                .map(|(_, e)| e),
        ),
    };
    let all: Vec<_> = entries
        .flat_map(|e| e.instances.values())
        .filter(|i| healthy.is_none_or(|h| i.healthy == h))
        .filter(|i| isolate.is_none_or(|h| i.isolate == h))
        .filter(|i| p.get("host").is_none_or(|h| i.host == h))
        .filter(|i| port.is_none_or(|p| i.port == p))
        .filter(|i| {
            meta.iter()
                .all(|(k, v)| i.metadata.get(*k).map(String::as_str) == Some(*v))
        })
        .filter(|i| group.is_none_or(|g| g.contains(i)))
        .collect();
    let page = all
        .iter()
        .skip(offset)
        .take(limit)
        .map(|i| serde_json::to_value(view::instance(i)).unwrap_or_default())
        .collect();
    Ok(view::batch_query("instances", all.len(), page))
}

fn instance_echo(i: &InstanceInput) -> Value {
    json!({"namespace": i.namespace, "service": i.service, "host": i.host, "port": i.port})
}

fn instance_answers(items: Vec<Item>, echo: Vec<Value>) -> Vec<Answer> {
    items
        .into_iter()
        .zip(echo)
        .map(|(item, echo)| {
            answer(item, "instance", echo, |i| match i {
                Item::Instance(i) => serde_json::to_value(view::instance(&i)).unwrap_or_default(),
                _ => Value::Null,
            })
        })
        .collect()
}

/// `POST /naming/v1/instances`: register (an existing instance is replaced); unknown services
/// are created.
#[utoipa::path(post, path = "/naming/v1/instances", request_body = Vec<InstanceInput>,
    responses((status = 200, description = "BatchWriteResponse"), (status = 400, description = "Bad input; names the field, nothing written")))]
pub(super) async fn create_instances(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    body: Bytes,
) -> ApiResult {
    let list: Vec<InstanceInput> = parse_batch(&body, Entity::Instance)?;
    let now = now_rfc3339();
    let echo: Vec<Value> = list.iter().map(instance_echo).collect();
    let list = each(list, Entity::Instance, |i| i.validate(&now))?;
    let n = list.len() as u64;
    let items = submit(
        &st,
        &who,
        Entity::Instance,
        Command::RegisterInstances(list),
    )
    .await?;
    st.metrics.registrations.add(n);
    Ok(view::batch_write(&instance_answers(items, echo)))
}

/// `PUT /naming/v1/instances`: the fields that are set, on instances named by `id` or by
/// namespace, service, host and port.
#[utoipa::path(put, path = "/naming/v1/instances", request_body = Vec<InstanceInput>,
    responses((status = 200, description = "BatchWriteResponse"), (status = 400, description = "Bad input, or per item: no such instance")))]
pub(super) async fn update_instances(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    body: Bytes,
) -> ApiResult {
    let list: Vec<Value> = parse_batch(&body, Entity::Instance)?;
    let echo: Vec<Value> = list.iter().map(Value::clone).collect();
    let list = each(list, Entity::Instance, |v| {
        let r: InstanceRef = from_value(v)?;
        let input: InstanceInput = from_value(v)?;
        Ok((r.validate()?, input))
    })?;
    let echo = echo
        .iter()
        .map(|v| {
            from_value::<InstanceInput>(v)
                .map(|i| instance_echo(&i))
                .unwrap_or_default()
        })
        .collect();
    let items = submit(&st, &who, Entity::Instance, Command::UpdateInstances(list)).await?;
    Ok(view::batch_write(&instance_answers(items, echo)))
}

/// A JSON value as an input type, with protobuf or camelCase field names.
fn from_value<T: serde::de::DeserializeOwned>(v: &Value) -> Result<T, FieldError> {
    T::deserialize(crate::protojson::ProtoNames(v))
        .map_err(|e| FieldError::new("body", e.to_string()))
}

/// `POST /naming/v1/instances/delete`: by `id`, or by namespace, service, host and port.
#[utoipa::path(post, path = "/naming/v1/instances/delete", request_body = Vec<InstanceRef>,
    responses((status = 200, description = "BatchWriteResponse (a missing instance is a success)")))]
pub(super) async fn delete_instances(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    body: Bytes,
) -> ApiResult {
    let list: Vec<InstanceRef> = parse_batch(&body, Entity::Instance)?;
    let echo: Vec<Value> = list
        .iter()
        .map(|r| json!({"id": r.id, "namespace": r.namespace, "service": r.service, "host": r.host, "port": r.port}))
        .collect();
    let sels = each(list, Entity::Instance, |r| r.validate())?;
    let items = submit(
        &st,
        &who,
        Entity::Instance,
        Command::DeregisterInstances(sels),
    )
    .await?;
    st.metrics.deregistrations.add(
        items
            .iter()
            .filter(|i| matches!(i, Item::Instance(_)))
            .count() as u64,
    );
    Ok(view::batch_write(&instance_answers(items, echo)))
}

// ---- Instance groups (ours; PolarisMesh has none) ----

/// `GET /naming/v1/groups?namespace=&service=`.
#[utoipa::path(get, path = "/naming/v1/groups",
    params(("namespace" = String, Query), ("service" = String, Query)),
    responses((status = 200, description = "`groups` of the service")))]
pub(super) async fn list_groups(State(st): State<AppState>, uri: axum::http::Uri) -> ApiResult {
    let p = Params::of(&uri);
    let key = service_key(
        &p.get("namespace").map(str::to_string),
        &p.get("service").map(str::to_string),
        "service",
    )
    .map_err(|e| ApiError::field(Entity::Other, e))?;
    let reg = st.registry.read();
    let e = reg
        .services
        .get(&key)
        .ok_or_else(|| ApiError::new(code::NOT_FOUND_SERVICE, format!("service {key}")))?;
    let groups = e
        .groups
        .values()
        .map(|g| serde_json::to_value(g).unwrap_or_default())
        .collect::<Vec<_>>();
    Ok(view::batch_query("groups", groups.len(), groups))
}

/// `POST /naming/v1/groups`: create or replace.
#[utoipa::path(post, path = "/naming/v1/groups", request_body = Vec<InstanceGroup>,
    responses((status = 200, description = "BatchWriteResponse with `group`s"), (status = 400, description = "Bad matcher")))]
pub(super) async fn put_groups(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    body: Bytes,
) -> ApiResult {
    let list: Vec<InstanceGroup> = parse_batch(&body, Entity::Other)?;
    let list = each(list, Entity::Other, |g| g.validate().map(|_| g.clone()))?;
    let echo = list
        .iter()
        .map(|g| json!({"namespace": g.namespace, "service": g.service, "name": g.name}))
        .collect();
    let items = submit(&st, &who, Entity::Other, Command::PutGroups(list)).await?;
    Ok(view::batch_write(&group_answers(items, echo)))
}

fn group_answers(items: Vec<Item>, echo: Vec<Value>) -> Vec<Answer> {
    items
        .into_iter()
        .zip(echo)
        .map(|(item, echo)| {
            answer(item, "group", echo, |i| match i {
                Item::Group(g) => serde_json::to_value(g).unwrap_or_default(),
                _ => Value::Null,
            })
        })
        .collect()
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(super) struct GroupRef {
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    service: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

/// `POST /naming/v1/groups/delete`.
#[utoipa::path(post, path = "/naming/v1/groups/delete", request_body = Vec<GroupRef>,
    responses((status = 200, description = "BatchWriteResponse")))]
pub(super) async fn delete_groups(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    body: Bytes,
) -> ApiResult {
    let list: Vec<GroupRef> = parse_batch(&body, Entity::Other)?;
    let refs = each(list, Entity::Other, |g| {
        let key = service_key(&g.namespace, &g.service, "service")?;
        let name = g.name.clone().unwrap_or_default();
        validate_name(&name, "name")?;
        Ok((key, name))
    })?;
    let echo = refs
        .iter()
        .map(|(k, n)| json!({"namespace": k.namespace, "service": k.name, "name": n}))
        .collect();
    let items = submit(&st, &who, Entity::Other, Command::DeleteGroups(refs)).await?;
    Ok(view::batch_write(&group_answers(items, echo)))
}
