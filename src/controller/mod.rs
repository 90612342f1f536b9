//! The Kubernetes controller: Services and EndpointSlices synced into the registry.
//!
//! `translate` turns Kubernetes objects into the registry state they stand for (pure, tested from
//! objects recorded from a real API server); `reconcile` plans the writes that close the
//! difference, touching only what this cluster owns, and applies them in batches; `target` is
//! where the plans are applied: the registry in the same process (`polaris server --kubernetes`),
//! or a control plane's REST API (`polaris controller`), which plans and applies them itself.

pub mod reconcile;
pub mod run;
pub mod target;
pub mod translate;
