//! Errors of the REST API in PolarisMesh's shape: `code` from PolarisMesh's table, `info` with its
//! English text, and, after it, what exactly was wrong (the field that was rejected, and why).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::code::{self, Entity};
use crate::model::FieldError;
use crate::registry;

/// A request the API rejected as a whole.
#[derive(Debug)]
pub struct ApiError {
    /// PolarisMesh's code.
    pub code: u32,
    /// What was wrong, beyond the code's text (the field, and why).
    pub detail: String,
    /// The HTTP status when it is not the code's (framework errors: 404, 405, 413).
    pub status: Option<StatusCode>,
    /// Answer in the shape of a batch response (`size`, `responses`), for batch endpoints.
    pub batch: bool,
}

impl ApiError {
    /// An error with `code` and `detail`.
    pub fn new(code: u32, detail: impl Into<String>) -> Self {
        ApiError {
            code,
            detail: detail.into(),
            status: None,
            batch: false,
        }
    }

    /// A rejected field of an `entity` request; the code is PolarisMesh's for that field.
    pub fn field(entity: Entity, e: FieldError) -> Self {
        ApiError::new(
            code::for_field(entity, &e.field),
            format!("{}: {}", e.field, e.reason),
        )
    }

    /// The same error, answered as a batch response.
    pub fn in_batch(mut self) -> Self {
        self.batch = true;
        self
    }

    /// The text of `info`: the code's, then the detail.
    pub fn info(&self) -> String {
        if self.detail.is_empty() {
            code::info(self.code).to_string()
        } else {
            format!("{}: {}", code::info(self.code), self.detail)
        }
    }

    /// Maps a registry error of an `entity` request.
    pub fn registry(entity: Entity, e: registry::Error) -> Self {
        match e {
            registry::Error::Invalid(f) => ApiError::field(entity, f),
            registry::Error::NotFound(what) => {
                ApiError::new(code::NOT_FOUND, format!("{what} not found"))
            }
            e @ registry::Error::HealthCheckOff(_) => {
                ApiError::new(code::HEARTBEAT_ON_DISABLED, e.to_string())
            }
            // A store that cannot be reached (etcd down, timeouts) is unavailable, not broken:
            // 503, so clients and load balancers retry elsewhere or later.
            registry::Error::Store(s)
                if matches!(
                    *s,
                    crate::store::Error::Backend {
                        backend: "etcd",
                        ..
                    }
                ) =>
            {
                ApiError {
                    status: Some(StatusCode::SERVICE_UNAVAILABLE),
                    ..ApiError::new(code::STORE_EXCEPTION, s.to_string())
                }
            }
            e @ registry::Error::Store(_) => ApiError::new(code::STORE_EXCEPTION, e.to_string()),
            e @ registry::Error::Forward(..) => ApiError {
                status: Some(StatusCode::SERVICE_UNAVAILABLE),
                ..ApiError::new(code::EXECUTE_EXCEPTION, e.to_string())
            },
            e @ registry::Error::Conflict(_) => ApiError {
                status: Some(StatusCode::CONFLICT),
                ..ApiError::new(code::EXECUTE_EXCEPTION, e.to_string())
            },
            e @ registry::Error::Closed => ApiError {
                status: Some(StatusCode::SERVICE_UNAVAILABLE),
                ..ApiError::new(code::EXECUTE_EXCEPTION, e.to_string())
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status.unwrap_or_else(|| code::http_status(self.code));
        let body = if self.batch {
            // The batch's `info` is exactly the code's text, as PolarisMesh's clients compare it;
            // the detail goes with the item.
            json!({
                "code": self.code,
                "info": code::info(self.code),
                "size": 1,
                "responses": [{"code": self.code, "info": self.info()}],
            })
        } else {
            json!({"code": self.code, "info": self.info()})
        };
        (status, Json(body)).into_response()
    }
}
