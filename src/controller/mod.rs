//! The Kubernetes controller: Services and EndpointSlices synced into the registry.
//!
//! `translate` turns Kubernetes objects into the registry state they stand for (pure, tested from
//! objects recorded from a real API server); `reconcile` plans the writes that close the
//! difference, touching only what this cluster owns, and applies them in batches.

pub mod reconcile;
pub mod run;
pub mod translate;
