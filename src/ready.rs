//! Readiness of the server's components, answered by `/readyz` (liveness stays `/healthz`): a
//! component that needs time before it serves correctly (the Kubernetes controller until its
//! watches have listed and its first pass has run) registers as not ready and says when it is.

use std::collections::BTreeMap;

use parking_lot::Mutex;

/// Components by name: `None` when ready, else why not.
#[derive(Debug, Default)]
pub struct Readiness {
    components: Mutex<BTreeMap<&'static str, Option<String>>>,
}

impl Readiness {
    /// `name` is not ready, because `why`.
    pub fn not_ready(&self, name: &'static str, why: impl Into<String>) {
        self.components.lock().insert(name, Some(why.into()));
    }

    /// `name` is ready.
    pub fn ready(&self, name: &'static str) {
        self.components.lock().insert(name, None);
    }

    /// Whether every component is ready, and the ones that are not with why.
    pub fn report(&self) -> (bool, BTreeMap<&'static str, Option<String>>) {
        let c = self.components.lock().clone();
        (c.values().all(Option::is_none), c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_once_every_component_is() {
        let r = Readiness::default();
        assert!(r.report().0, "nothing registered");
        r.not_ready("controller", "watches not listed");
        r.ready("webhook");
        let (ok, c) = r.report();
        assert!(!ok);
        assert_eq!(c["controller"].as_deref(), Some("watches not listed"));
        r.ready("controller");
        assert!(r.report().0);
    }
}
