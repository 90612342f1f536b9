//! The Kubernetes controller: Services and EndpointSlices synced into the registry.
//!
//! `translate` turns Kubernetes objects into the registry state they stand for (pure, tested from
//! recorded API objects).

pub mod translate;
