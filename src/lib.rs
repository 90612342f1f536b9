//! polaris-mesh: a service registry and governance center whose heart is an Envoy xDS control plane.
//!
//! Data flows one way: REST writes → [`registry`] (validated, durable through [`store`]) → change
//! feed → `xds` snapshot → ADS streams. See `ARCHITECTURE.md`.

pub mod agent;
pub mod api;
pub mod bench;
pub mod bootstrap;
pub mod ca;
pub mod cluster;
pub mod config;
pub mod controller;
pub mod inject;
pub mod limit;
pub mod metrics;
pub mod model;
pub mod net;
pub mod protojson;
pub mod ready;
pub mod registry;
pub mod rls;
pub mod server;
pub mod store;
pub mod xds;
