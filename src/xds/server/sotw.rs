//! State of the world: every response carries the full set (CDS, LDS) or the changed and newly
//! requested names (EDS, RDS); ACKs repeat the subscription.

use std::collections::HashSet;
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use tonic::Status;

use super::super::names::Names;
use super::super::snapshot::Res;
use super::super::transport::Msg;
use super::super::TypeKind;
use super::sotw_request::SotwRequest;
use super::state::{parse_hex, Out, Reply, StreamState};
use crate::metrics::RequestError;

/// Whether a SotW request names exactly the subscribed set. Clients repeat their names in the same
/// order in every ACK, usually sorted: that case is one pass without allocating.
fn same_names(req: &[&str], subscribed: &Names) -> bool {
    if req.len() == subscribed.len() && req.iter().zip(subscribed.iter()).all(|(a, b)| *a == &**b) {
        return true;
    }
    if req.len() < subscribed.len() {
        return false;
    }
    let mut sorted: Vec<&str> = req.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    sorted.len() == subscribed.len()
        && sorted
            .iter()
            .zip(subscribed.iter())
            .all(|(a, b)| *a == &**b)
}

impl StreamState {
    /// SotW: responses for what changed in the latest snapshot.
    pub(super) fn sotw_push(&mut self) -> Vec<Reply> {
        let changed = self.advance();
        let mut outs = Vec::new();
        for k in TypeKind::ALL {
            if let Some(only) = changed.get(&k) {
                outs.extend(self.sotw_build(k, false, only.as_ref()));
            }
        }
        outs
    }

    pub(super) fn sotw_request(&mut self, req: SotwRequest) -> Result<Vec<Reply>, Status> {
        self.check_node(req.node.as_ref())?;
        let Some(kind) = TypeKind::from_url(&req.type_url).filter(|k| *k != TypeKind::VirtualHost)
        else {
            tracing::debug!(type_url = %req.type_url, "ignoring request for an unserved type");
            return Ok(vec![]);
        };
        if self.generation == 0 {
            self.advance();
        }
        let ts = self.types.get_or_default(kind);
        if let Some(err) = &req.error_detail {
            if parse_hex(&req.response_nonce) == Some(ts.nonce) {
                let msg = err.message.clone();
                self.on_nack(kind, &req.response_nonce, &msg);
            }
            return Ok(vec![]);
        }
        if !req.response_nonce.is_empty() && parse_hex(&req.response_nonce) != Some(ts.nonce) {
            // Stale: a newer response is on its way; this request is superseded.
            return Ok(vec![]);
        }
        let first = !ts.active;
        ts.active = true;
        // The common case: an ACK repeating, byte for byte, the names of the request that set
        // the subscription. Nothing to split, compare or allocate.
        let names_hash = req.names_hash();
        if !first && names_hash == ts.names_hash {
            return Ok(self.sotw_same(kind, &req));
        }
        let all = req.names().map_err(|e| {
            self.metrics.xds_request_error(RequestError::Undecodable);
            Status::invalid_argument(format!("resource_names: a name is not UTF-8: {e}"))
        })?;
        let ts = self.types.get_or_default(kind);
        let names: Vec<&str> = all.iter().copied().filter(|n| *n != "*").collect();
        let star = all.contains(&"*");
        let wildcard = star || (names.is_empty() && !ts.ever_named && kind.wildcard_capable());
        if !names.is_empty() {
            ts.ever_named = true;
        }
        // The common case, an ACK repeating the same names: no allocation, no rebuild.
        let same = !first && wildcard == ts.wildcard && same_names(&names, &ts.names);
        if same {
            ts.names_hash = names_hash;
            return Ok(self.sotw_same(kind, &req));
        }
        let new_names = self
            .sets
            .set(names.iter().map(|n| self.intern(kind, n)).collect());
        let ts = &self.types[&kind];
        let added: Vec<Arc<str>> = new_names
            .iter()
            .filter(|n| !ts.names.contains(n))
            .cloned()
            .collect();
        let removed: Vec<Arc<str>> = ts
            .names
            .iter()
            .filter(|n| !new_names.contains(n))
            .cloned()
            .collect();
        let wildcard_flip = wildcard != ts.wildcard;
        let wildcard_added = wildcard && !ts.wildcard;
        // What the client holds of everything whose coverage changes.
        self.pin(kind, added.iter().chain(&removed).cloned());
        if wildcard_flip {
            let covered = self.wildcard_set(kind).into_iter().map(|e| e.name.clone());
            self.pin(kind, covered.collect::<Vec<_>>());
        }
        if kind == TypeKind::Listener {
            for n in &added {
                self.prepare_api_listener(n);
            }
        }
        let ts = self.types.get_mut(&kind).expect("active");
        ts.wildcard = wildcard;
        ts.names = new_names;
        ts.names_hash = names_hash;
        // SotW EDS/RDS: forget resources no longer requested (there is no removal message).
        if !kind.wildcard_capable() {
            for n in &removed {
                self.set_held(kind, n.clone(), None);
            }
        }
        if kind == TypeKind::Listener {
            for n in &removed {
                if !self.types[&kind]
                    .overlay
                    .get(n)
                    .is_some_and(|h| h.is_some())
                {
                    self.locals.api.remove(n);
                }
            }
        }
        // A client that resumes on a new stream (another replica, a restarted server) with the
        // version of exactly what it should hold is sent nothing: versions are content hashes
        // of the held set, the same wherever it was computed.
        if first && req.response_nonce.is_empty() && !req.version_info.is_empty() {
            if let Some(v) = parse_hex(&req.version_info) {
                let desired = self.desired_set(kind);
                let agg = desired
                    .iter()
                    .fold(0, |a, r| a ^ super::state::entry_hash(&r.name, r.version));
                if agg == v && !desired.is_empty() {
                    for r in desired {
                        self.set_held(kind, r.name.clone(), Some(r.version));
                    }
                    let mut st = self.status.types.lock();
                    let s = st.get_or_default(kind);
                    s.version_sent = Some(v);
                    s.version_acked = Some(v);
                    return Ok(vec![]);
                }
            }
        }
        // Newly requested names are answered at once, even if sent before; LDS/CDS (full set)
        // and the first request answer with everything.
        let ts = self.types.get_mut(&kind).expect("active");
        if first || wildcard_added || (kind.wildcard_capable() && !added.is_empty()) {
            ts.force_all = true;
        } else {
            ts.force.extend(added);
        }
        if !req.response_nonce.is_empty() {
            let version = parse_hex(&req.version_info).unwrap_or_default();
            self.on_ack(kind, &req.response_nonce, version);
        }
        Ok(self.sotw_build(kind, true, None).into_iter().collect())
    }

    /// A request for the subscription the client already has: an ACK, and the names whose
    /// re-sending waits on it (cluster warming).
    fn sotw_same(&mut self, kind: TypeKind, req: &SotwRequest) -> Vec<Reply> {
        let forced: Vec<Arc<str>> = self.types.get_or_default(kind).force.drain().collect();
        if !req.response_nonce.is_empty() {
            let version = parse_hex(&req.version_info).unwrap_or_default();
            self.on_ack(kind, &req.response_nonce, version);
        }
        if forced.is_empty() {
            return vec![];
        }
        self.sotw_forced(kind, forced).into_iter().collect()
    }

    /// Everything of `kind` the client should hold now (sorted by name).
    pub(super) fn desired_set(&self, kind: TypeKind) -> Vec<Res> {
        let mut names = self.wanted_names(kind);
        names.sort();
        names.dedup();
        names.iter().filter_map(|n| self.lookup(kind, n)).collect()
    }

    /// Builds a SotW response for `kind` if what the client should hold changed, or a request
    /// forces one (first request, new names, cluster warming).
    pub(super) fn sotw_build(
        &mut self,
        kind: TypeKind,
        on_request: bool,
        only: Option<&HashSet<Arc<str>>>,
    ) -> Option<Reply> {
        if !self.types.get(&kind).is_some_and(|t| t.active) {
            return None;
        }
        if let (false, false, Some(only)) = (kind.wildcard_capable(), on_request, only) {
            return self.sotw_changed(kind, only);
        }
        let desired = self.desired_set(kind);
        let keep: HashSet<&str> = desired.iter().map(|r| &*r.name).collect();
        let ts = &self.types[&kind];
        // Held but no longer wanted: pinned in the overlay (the implied view holds only wanted).
        let removed: Vec<Arc<str>> = ts
            .overlay
            .iter()
            .filter(|(n, h)| h.is_some() && !keep.contains(&***n))
            .map(|(n, _)| n.clone())
            .collect();
        let full_set = kind.wildcard_capable();
        let force_all = ts.force_all;
        let send: Vec<Res> = if full_set {
            // LDS/CDS carry the complete set whenever any of it changed (an empty set included).
            let unchanged = removed.is_empty()
                && desired
                    .iter()
                    .all(|r| self.held(kind, &r.name) == Some(r.version));
            if unchanged && !force_all && ts.nonce != 0 {
                self.types.get_mut(&kind).expect("active").force_all = false;
                return None;
            }
            desired
        } else {
            desired
                .into_iter()
                .filter(|r| {
                    force_all
                        || self.held(kind, &r.name) != Some(r.version)
                        || (on_request && ts.force.contains(&r.name))
                })
                .collect()
        };
        self.types.get_mut(&kind).expect("active").force_all = false;
        if send.is_empty() && !full_set {
            // EDS/RDS have no removal message: forget silently; nothing requested exists yet.
            for n in removed {
                self.set_held(kind, n, None);
            }
            return None;
        }
        Some(self.sotw_reply(kind, send, removed))
    }

    /// Records and frames a SotW response.
    pub(super) fn sotw_reply(
        &mut self,
        kind: TypeKind,
        resources: Vec<Res>,
        removed: Vec<Arc<str>>,
    ) -> Reply {
        let nonce = self.next_nonce();
        let out = Out {
            kind,
            resources,
            removed,
        };
        self.record(&out, nonce);
        let env = DiscoveryResponse {
            version_info: self.types[&kind].version_string(),
            type_url: kind.url().to_string(),
            nonce: format!("{nonce:x}"),
            ..Default::default()
        };
        Msg::sotw(&env, &out.resources)
    }

    /// SotW: re-send these names as they are (a warming cluster waits for its load assignment).
    pub(super) fn sotw_forced(&mut self, kind: TypeKind, names: Vec<Arc<str>>) -> Option<Reply> {
        let mut send: Vec<Res> = names.iter().filter_map(|n| self.lookup(kind, n)).collect();
        if send.is_empty() {
            return None;
        }
        send.sort_by(|a, b| a.name.cmp(&b.name));
        Some(self.sotw_reply(kind, send, vec![]))
    }

    /// SotW EDS/RDS after a snapshot change: look only at the names that changed.
    pub(super) fn sotw_changed(
        &mut self,
        kind: TypeKind,
        only: &HashSet<Arc<str>>,
    ) -> Option<Reply> {
        let mut send = Vec::new();
        let mut gone = Vec::new();
        for name in only {
            let ts = &self.types[&kind];
            let subscribed =
                ts.names.contains(name) || (ts.wildcard && self.in_wildcard(kind, name));
            let held = self.held(kind, name);
            match subscribed.then(|| self.lookup(kind, name)).flatten() {
                Some(r) if held != Some(r.version) => send.push(r),
                Some(_) => {}
                None if held.is_some() => gone.push(name.clone()),
                None => {}
            }
        }
        if send.is_empty() {
            for n in gone {
                self.set_held(kind, n, None);
            }
            return None;
        }
        send.sort_by(|a, b| a.name.cmp(&b.name));
        Some(self.sotw_reply(kind, send, gone))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xds::names::NameSets;

    #[test]
    fn same_names_compares_sets_whatever_the_order() {
        let sets = NameSets::default();
        let sub = sets.set(["a", "b", "c"].map(Arc::from).to_vec());
        let s = |v: &[&str]| v.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let check =
            |v: Vec<String>| same_names(&v.iter().map(String::as_str).collect::<Vec<_>>(), &sub);
        assert!(check(s(&["a", "b", "c"])));
        assert!(check(s(&["c", "a", "b"])));
        assert!(check(s(&["c", "a", "b", "a"])));
        assert!(
            !check(s(&["a", "a", "b"])),
            "a duplicate hides a missing name"
        );
        assert!(!check(s(&["a", "b"])));
        assert!(!check(s(&["a", "b", "c", "d"])));
        assert!(!check(s(&["a", "b", "x"])));
    }
}
