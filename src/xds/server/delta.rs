//! Incremental: responses carry what changed and what was removed; subscriptions change by name.

use std::collections::HashSet;
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};
use tonic::Status;

use super::super::resources as r;
use super::super::transport::Msg;
use super::super::TypeKind;
use super::state::{Reply, StreamState, ABSENT};

impl StreamState {
    /// Delta: responses for what changed in the latest snapshot.
    pub(super) fn delta_push(&mut self) -> Vec<Reply> {
        let changed = self.advance();
        let mut outs: Vec<Reply> = Vec::new();
        for k in TypeKind::ALL {
            // A cluster update forgot its load assignment: send that one again too.
            let rewarm = if k == TypeKind::Endpoint {
                std::mem::take(&mut self.rewarm)
            } else {
                HashSet::new()
            };
            let only = match changed.get(&k) {
                Some(None) => None,
                Some(Some(names)) => Some(names.union(&rewarm).cloned().collect()),
                None if !rewarm.is_empty() => Some(rewarm),
                None => continue,
            };
            outs.extend(self.delta_build(k, only.as_ref()));
        }
        outs
    }

    pub(super) fn delta_request(
        &mut self,
        req: DeltaDiscoveryRequest,
    ) -> Result<Vec<Reply>, Status> {
        self.check_node(req.node.as_ref())?;
        let Some(kind) = TypeKind::from_url(&req.type_url) else {
            tracing::debug!(type_url = %req.type_url, "ignoring request for an unserved type");
            return Ok(vec![]);
        };
        if self.generation == 0 {
            self.advance();
        }
        let ts = self.types.get_or_default(kind);
        let first = !ts.active;
        ts.active = true;
        let mut full = false;
        if first {
            for (name, v) in &req.initial_resource_versions {
                let v = u64::from_str_radix(v, 16).unwrap_or(u64::MAX);
                let name = self.intern(kind, name);
                self.set_held(kind, name, Some(if v == ABSENT { u64::MAX } else { v }));
            }
            if req.resource_names_subscribe.is_empty() && kind.wildcard_capable() {
                self.set_wildcard(kind, true);
                full = true;
            }
        }
        let mut evaluate: HashSet<Arc<str>> = HashSet::new();
        if req.resource_names_subscribe.iter().any(|n| n == "*") && !self.types[&kind].wildcard {
            self.set_wildcard(kind, true);
            full = true;
        }
        let subscribe: Vec<Arc<str>> = req
            .resource_names_subscribe
            .iter()
            .filter(|n| *n != "*")
            .map(|n| self.intern(kind, n))
            .collect();
        let unsubscribe: Vec<Arc<str>> = req
            .resource_names_unsubscribe
            .iter()
            .filter(|n| *n != "*")
            .map(|n| {
                self.types[&kind]
                    .names
                    .get(n)
                    .cloned()
                    .unwrap_or_else(|| self.intern(kind, n))
            })
            .collect();
        if !subscribe.is_empty() || !unsubscribe.is_empty() {
            // What the client holds of every name whose coverage changes, then the new set.
            self.pin(kind, subscribe.iter().chain(&unsubscribe).cloned());
            if kind == TypeKind::Listener {
                for n in &subscribe {
                    self.prepare_api_listener(n);
                }
            }
            let ts = &self.types[&kind];
            let fresh: Vec<bool> = subscribe.iter().map(|n| !ts.names.contains(n)).collect();
            let was_named: Vec<bool> = unsubscribe.iter().map(|n| ts.names.contains(n)).collect();
            let names = self.sets.with(&ts.names, &subscribe, &unsubscribe);
            let ts = self.types.get_mut(&kind).expect("active");
            ts.names = names;
            ts.ever_named |= !subscribe.is_empty();
            for (name, fresh) in subscribe.into_iter().zip(fresh) {
                // A (re)subscribed name must be provided even if we think the client has it; on
                // the first request, initial_resource_versions says what it has.
                let claimed = first && req.initial_resource_versions.contains_key(&*name);
                if !claimed && (fresh || self.held(kind, &name) != Some(ABSENT)) {
                    self.set_held(kind, name.clone(), None);
                }
                evaluate.insert(name);
            }
            let wildcard = self.types[&kind].wildcard;
            for (name, was_named) in unsubscribe.into_iter().zip(was_named) {
                if kind == TypeKind::Listener {
                    self.locals.api.remove(&name);
                }
                if wildcard {
                    // Still covered by `*`: resend it; not covered: it must appear in
                    // removed_resources.
                    if self.in_wildcard(kind, &name) {
                        self.set_held(kind, name.clone(), None);
                    } else {
                        self.set_held(kind, name.clone(), Some(u64::MAX));
                    }
                    evaluate.insert(name);
                } else if was_named {
                    self.set_held(kind, name, None);
                }
            }
        }
        if req.resource_names_unsubscribe.iter().any(|n| n == "*") {
            if self.types[&kind].wildcard {
                self.set_wildcard(kind, false);
            }
            full = true;
        }
        if let Some(err) = &req.error_detail {
            let msg = err.message.clone();
            self.on_nack(kind, &req.response_nonce, &msg);
        } else if !req.response_nonce.is_empty() {
            let version = self.types[&kind].agg;
            self.on_ack(kind, &req.response_nonce, version);
        }
        if first && !full {
            // Initial named subscription: evaluate the named resources and what the client claims.
            evaluate.extend(self.types[&kind].overlay.keys().cloned());
        }
        if full {
            let mut out: Vec<Reply> = self.delta_build(kind, None).into_iter().collect();
            if out.is_empty()
                && first
                && kind.wildcard_capable()
                && req.initial_resource_versions.is_empty()
            {
                // Nothing to send yet (an on-demand sidecar's clusters, an empty namespace): Envoy
                // still waits for a first response before it initializes, and delivers none that
                // changes nothing, so this one removes a name no resource can have. A client that
                // resumes (it names what it holds) is initialized already and is sent nothing.
                out.push(self.delta_empty(kind, format!("{}?", kind.short())));
            }
            out.extend(self.rewarm_now());
            return Ok(out);
        }
        if evaluate.is_empty() {
            if first && kind == TypeKind::VirtualHost {
                // Envoy's VHDS subscription starts empty and holds the listener's initialization
                // until a first (empty) response arrives.
                return Ok(vec![
                    self.delta_empty(kind, format!("{}/", r::ON_DEMAND_ROUTE))
                ]);
            }
            return Ok(vec![]);
        }
        let mut out: Vec<Reply> = self
            .delta_build(kind, Some(&evaluate))
            .into_iter()
            .collect();
        out.extend(self.rewarm_now());
        Ok(out)
    }

    /// A first response with nothing in it but the removal of `absent`, a name no resource has:
    /// Envoy ignores removals of names it never had, but an update with no change at all does not
    /// reach the subscription (and would not end its initialization).
    fn delta_empty(&mut self, kind: TypeKind, absent: String) -> Reply {
        let nonce = self.next_nonce();
        self.types.get_mut(&kind).expect("active").nonce = nonce;
        let env = DeltaDiscoveryResponse {
            system_version_info: self.types[&kind].version_string(),
            type_url: kind.url().to_string(),
            removed_resources: vec![absent],
            nonce: format!("{nonce:x}"),
            ..Default::default()
        };
        Msg::delta(&env, &[])
    }

    /// Turns the wildcard subscription of `kind` on or off, pinning what it covers first.
    pub(super) fn set_wildcard(&mut self, kind: TypeKind, on: bool) {
        let covered: Vec<Arc<str>> = self
            .wildcard_set(kind)
            .into_iter()
            .map(|e| e.name.clone())
            .collect();
        self.pin(kind, covered);
        self.types.get_mut(&kind).expect("active").wildcard = on;
    }

    /// Re-sends load assignments whose cluster a request-triggered response just updated.
    pub(super) fn rewarm_now(&mut self) -> Option<Reply> {
        if self.rewarm.is_empty() {
            return None;
        }
        let names = std::mem::take(&mut self.rewarm);
        self.delta_build(TypeKind::Endpoint, Some(&names))
    }

    pub(super) fn delta_build(
        &mut self,
        kind: TypeKind,
        only: Option<&HashSet<Arc<str>>>,
    ) -> Option<Reply> {
        let out = self.diff(kind, only);
        if out.resources.is_empty() && out.removed.is_empty() {
            return None;
        }
        let nonce = self.next_nonce();
        self.record(&out, nonce);
        let ts = &self.types[&kind];
        let env = DeltaDiscoveryResponse {
            system_version_info: ts.version_string(),
            type_url: kind.url().to_string(),
            removed_resources: out.removed.iter().map(|n| n.to_string()).collect(),
            nonce: format!("{nonce:x}"),
            ..Default::default()
        };
        Some(Msg::delta(&env, &out.resources))
    }
}
