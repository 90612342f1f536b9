//! The sidecar injector: a mutating admission webhook (`/inject`) adding Envoy, its bootstrap and
//! the certificate agent to pods (`patch` decides and builds the patch; `webhook` serves it).

pub mod patch;
pub mod webhook;
