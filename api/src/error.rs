//! The API's error type and the one place where errors become HTTP responses.
//!
//! Every 4xx carries a stable `code` and a message that says what to do; every 5xx says
//! "internal error" to the client and logs the detail.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use metal_types::ApiError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NoMachineAvailable(String),
    #[error("database error")]
    Db(#[from] sqlx::Error),
    #[error("stored {what} is not valid JSON")]
    Corrupt { what: &'static str, source: serde_json::Error },
    #[error("{0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn not_found(what: &str, id: impl std::fmt::Display) -> Error {
        Error::NotFound(format!("{what} {id} not found; list them with GET /v1/{what}s"))
    }

    pub fn bad_request(msg: impl Into<String>) -> Error {
        Error::BadRequest(msg.into())
    }

    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Error::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            Error::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            Error::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Error::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            Error::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Error::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            Error::NoMachineAvailable(_) => (StatusCode::CONFLICT, "no_machine_available"),
            Error::Db(_) | Error::Corrupt { .. } | Error::Internal(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        }
    }

    /// Whether this error is a unique-constraint violation from the database.
    pub fn is_unique_violation(&self) -> bool {
        match self {
            Error::Db(sqlx::Error::Database(e)) => e.is_unique_violation(),
            _ => false,
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let message = if status.is_server_error() {
            // The chain goes to the log, never to the client.
            let mut chain = self.to_string();
            let mut src = std::error::Error::source(&self);
            while let Some(s) = src {
                chain.push_str(": ");
                chain.push_str(&s.to_string());
                src = s.source();
            }
            tracing::error!(error = %chain, "request failed");
            "internal error; the API logged the details".to_string()
        } else {
            self.to_string()
        };
        let mut resp = (status, axum::Json(ApiError { code: code.to_string(), message: message.clone() })).into_response();
        resp.extensions_mut().insert(Refusal { code, message });
        resp
    }
}

/// Attached to error responses so the request log can say why a request was refused.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub code: &'static str,
    pub message: String,
}

impl From<JsonRejection> for Error {
    fn from(rej: JsonRejection) -> Error {
        match rej.status() {
            StatusCode::PAYLOAD_TOO_LARGE => Error::PayloadTooLarge(format!(
                "request body is too large (limit {} bytes); send a smaller body",
                crate::BODY_LIMIT
            )),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => {
                Error::BadRequest("request body must be JSON: send `Content-Type: application/json`".into())
            }
            _ => Error::BadRequest(format!("invalid JSON body: {}", rej.body_text())),
        }
    }
}

impl From<QueryRejection> for Error {
    fn from(rej: QueryRejection) -> Error {
        Error::BadRequest(format!("invalid query string: {}", rej.body_text()))
    }
}

impl From<PathRejection> for Error {
    fn from(rej: PathRejection) -> Error {
        Error::BadRequest(format!("invalid path: {}", rej.body_text()))
    }
}
