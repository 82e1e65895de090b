//! The API's error type and the one place where errors become HTTP responses.
//!
//! Every 4xx carries a stable `code` and a message that says what to do; every 5xx says
//! "internal error" to the client and logs the detail.

use crate::allocation::PlanError;
use crate::store::{Conflict, NoMachine, StoreError};
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
            Error::Db(_) | Error::Corrupt { .. } | Error::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
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

/// The store says what is the case; this says what to do about it.
impl From<StoreError> for Error {
    fn from(e: StoreError) -> Error {
        match e {
            StoreError::NotFound { kind, id } => Error::not_found(kind, id),
            StoreError::Conflict(c) => Error::Conflict(match c {
                Conflict::Exists { kind: "image", id } => format!(
                    "image {id} exists with different content; images are immutable: publish a new version, or DELETE /v1/images/{id} first"
                ),
                Conflict::Exists { kind, id } => {
                    format!("{kind} {id} exists with different content; DELETE /v1/{kind}s/{id} first or use another id")
                }
                Conflict::ProjectInUse { id, active } => format!("project {id} has {active} active allocations; free them first"),
                Conflict::LastAdminToken { id } => {
                    format!("token {id} is the last admin token; create another admin token first, then revoke this one")
                }
                Conflict::InstalledOs { machine, allocation, since_ms } => format!(
                    "machine {machine} is running the installed OS of allocation {allocation} (phoned home at {}); it registers \
                     again only after the allocation is freed",
                    crate::rfc3339(since_ms)
                ),
                Conflict::MacTaken { mac, owner, machine } => format!(
                    "NIC {mac} belongs to machine {owner}; if it moved to machine {machine}, an operator must decommission {owner} first"
                ),
                Conflict::NotAllocated { machine } => format!("machine {machine} is not allocated; there is nothing to free"),
                Conflict::NotCurrentAllocation { allocation } => {
                    format!("allocation {allocation} is not this machine's current allocation; wait for new instructions")
                }
                Conflict::Contended { attempts } => {
                    format!("could not allocate after {attempts} attempts because of concurrent allocations; retry the request")
                }
            }),
            StoreError::Refused(crate::store::Refusal::UnknownNic { machine, mac }) => Error::Forbidden(format!(
                "machine {machine} is registered with other NICs than {mac}, the MAC this enrolment token was issued to; PXE boot \
                 the machine from one of its own NICs (if its NICs really changed, an operator must decommission the machine first)"
            )),
            StoreError::NoMachine(NoMachine::NotInPartition { machine, partition }) => {
                Error::NotFound(format!("machine {machine} not found in partition {partition}"))
            }
            StoreError::NoMachine(NoMachine::Ineligible { machine, why }) => Error::NoMachineAvailable(format!(
                "machine {machine} cannot be allocated: {why}; pick another machine or ask for a size"
            )),
            StoreError::NoMachine(NoMachine::PoolEmpty { size, partition }) => Error::NoMachineAvailable(format!(
                "no machine of size {size} is waiting in partition {partition}; retry when machines return to the pool, or try \
                 another size or partition"
            )),
            StoreError::Db(e) => Error::Db(e),
            StoreError::Corrupt { what, source } => Error::Corrupt { what, source },
            StoreError::Config(m) => Error::BadRequest(m),
            StoreError::Internal(m) => Error::Internal(m),
        }
    }
}

/// The planner says what is wrong with a request; this says what to do about it.
impl From<PlanError> for Error {
    fn from(e: PlanError) -> Error {
        match e {
            PlanError::ProjectNotFound(id) => Error::not_found("project", id),
            PlanError::PartitionNotFound(id) => Error::not_found("partition", id),
            PlanError::BadHostname(h) => Error::bad_request(format!(
                "hostname {h:?} is invalid: use labels of letters, digits and '-' (1-63 characters each), separated by dots"
            )),
            e @ (PlanError::BadIdempotencyKey | PlanError::UserDataTooLarge) => Error::bad_request(e.to_string()),
            PlanError::ImageNotFound(id_or_name) => Error::NotFound(format!(
                "image {id_or_name} not found (neither an image id nor the name of an image that has not expired); list them with GET /v1/images"
            )),
            PlanError::ImageExpired { id, at_ms } => Error::bad_request(format!(
                "image {id} expired at {}; use a newer version (or just the image name)",
                crate::rfc3339(at_ms)
            )),
            PlanError::MachineNotInPartition { machine, partition } => {
                Error::NotFound(format!("machine {machine} not found in partition {partition}"))
            }
            PlanError::SizeNotFound(id) => Error::not_found("size", id),
            PlanError::NoSizeOrMachine => Error::bad_request("give a size (to pick from the pool) or a machine"),
            PlanError::LayoutNotFound(id) => Error::not_found("layout", id),
            PlanError::LayoutDoesNotFit { layout, size, image } => {
                Error::bad_request(format!("layout {layout} does not allow size {size} with image {image}; pick another layout"))
            }
            PlanError::NoLayoutFits { size, image } => Error::bad_request(format!(
                "no filesystem layout fits size {size} and image {image}; create one with POST /v1/layouts"
            )),
        }
    }
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
