//! Tokens and who is calling.
//!
//! Tokens are 32 random bytes (hex) behind a role prefix (`adm_`, `ten_`, `pix_`, `mch_`,
//! `phh_`). The store keeps only their SHA-256; a presented token is hashed, looked up, and the
//! hashes compared once more in constant time. Enrolment tokens (`enr1.…`) are not stored: they
//! are signed claims, checked by [`crate::enrolment::verify`]. Stored enrolment tokens of earlier
//! versions (`enr_…`, role `enrolment`) are still accepted until they expire.

use crate::error::{Error, Result};
use crate::store::TokenRow;
use crate::App;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use metal_types::{AllocationId, MachineId};
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// Who is calling, from the bearer token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Admin,
    Tenant { project: String },
    Pixie,
    /// A short-lived token from the kernel command line, for `POST /v1/agent/register`.
    Enrolment { partition: Option<String>, mac: Option<String> },
    /// A machine's credential, bound to its UUID.
    Machine { machine: MachineId },
    /// An installed OS phoning home for one allocation.
    PhoneHome { machine: MachineId, allocation: AllocationId },
}

/// What a caller may see of projects' things.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    All,
    Project(String),
}

impl Scope {
    pub fn project(&self) -> Option<&str> {
        match self {
            Scope::All => None,
            Scope::Project(p) => Some(p),
        }
    }
    pub fn sees(&self, project: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::Project(p) => p == project,
        }
    }
}

impl Principal {
    fn describe(&self) -> String {
        match self {
            Principal::Admin => "an admin token".into(),
            Principal::Tenant { project } => format!("a tenant token of project {project}"),
            Principal::Pixie => "a pixie token".into(),
            Principal::Enrolment { .. } => "an enrolment token".into(),
            Principal::Machine { machine } => format!("the credential of machine {machine}"),
            Principal::PhoneHome { machine, .. } => format!("the phone-home token of machine {machine}"),
        }
    }

    fn forbidden(&self, needs: &str) -> Error {
        Error::Forbidden(format!("this endpoint needs {needs}; you sent {}", self.describe()))
    }

    pub fn require_admin(&self) -> Result<()> {
        match self {
            Principal::Admin => Ok(()),
            _ => Err(self.forbidden("an admin token")),
        }
    }

    /// Operators see everything, tenants their project; anybody else is refused.
    pub fn scope(&self) -> Result<Scope> {
        match self {
            Principal::Admin => Ok(Scope::All),
            Principal::Tenant { project } => Ok(Scope::Project(project.clone())),
            _ => Err(self.forbidden("an admin or tenant token")),
        }
    }

    pub fn require_pixie(&self) -> Result<()> {
        match self {
            Principal::Pixie | Principal::Admin => Ok(()),
            _ => Err(self.forbidden("a pixie (or admin) token")),
        }
    }

    pub fn require_machine(&self) -> Result<MachineId> {
        match self {
            Principal::Machine { machine } => Ok(*machine),
            _ => Err(self.forbidden("the machine credential from POST /v1/agent/register")),
        }
    }
}

/// A new random token with a role prefix.
pub fn generate(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("{prefix}_{}", hex::encode(bytes))
}

pub fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A token row for a new token.
pub fn row(token: &str, role: &str) -> TokenRow {
    TokenRow {
        id: uuid::Uuid::new_v4().to_string(),
        hash: hash(token),
        role: role.to_string(),
        project: None,
        partition: None,
        machine: None,
        allocation: None,
        mac: None,
        description: String::new(),
        expires_ms: None,
    }
}

fn bearer(parts: &Parts) -> Result<&str> {
    let missing = || {
        Error::Unauthorized(
            "missing credentials: send `Authorization: Bearer <token>` (an admin or tenant token from POST /v1/tokens, \
             or the machine's credential)"
                .into(),
        )
    };
    let value = parts.headers.get(axum::http::header::AUTHORIZATION).ok_or_else(missing)?;
    let value = value.to_str().map_err(|_| missing())?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or_else(|| Error::Unauthorized("the Authorization header must be `Bearer <token>`".into()))?;
    let token = token.trim();
    if token.is_empty() {
        return Err(missing());
    }
    Ok(token)
}

pub async fn authenticate(app: &App, token: &str) -> Result<Principal> {
    if token.starts_with(crate::enrolment::PREFIX) {
        return match crate::enrolment::verify(&app.enrolment_key(), token, crate::now_ms()) {
            Ok(c) => Ok(Principal::Enrolment { partition: Some(c.partition), mac: c.mac }),
            Err(crate::enrolment::TokenError::Expired { expires_ms }) => Err(Error::Unauthorized(format!(
                "the enrolment token expired at {} (it lives for --enrolment-ttl-s): PXE boot the machine again for a fresh one",
                crate::rfc3339(expires_ms)
            ))),
            Err(e) => Err(Error::Unauthorized(format!("{e}; PXE boot the machine again for a fresh one"))),
        };
    }
    let h = hash(token);
    let unknown = || Error::Unauthorized("the token is not valid (unknown or revoked); ask an operator for a new one".into());
    let Some(t) = app.store.token_by_hash(&h).await? else {
        return Err(unknown());
    };
    if !bool::from(t.hash.as_bytes().ct_eq(h.as_bytes())) {
        return Err(unknown());
    }
    if t.expires_ms.is_some_and(|e| e <= crate::now_ms()) {
        return Err(Error::Unauthorized(
            "the token expired; an enrolment token lives for --enrolment-ttl-s: PXE boot the machine again for a fresh one".into(),
        ));
    }
    let machine = || -> Result<MachineId> {
        t.machine
            .as_deref()
            .ok_or_else(|| Error::Internal(format!("token {} has no machine", t.id)))?
            .parse()
            .map_err(|e| Error::Internal(format!("token {}: {e}", t.id)))
    };
    Ok(match t.role.as_str() {
        "admin" => Principal::Admin,
        "tenant" => Principal::Tenant {
            project: t.project.clone().ok_or_else(|| Error::Internal(format!("tenant token {} has no project", t.id)))?,
        },
        "pixie" => Principal::Pixie,
        "enrolment" => Principal::Enrolment { partition: t.partition.clone(), mac: t.mac.clone() },
        "machine" => Principal::Machine { machine: machine()? },
        "phone_home" => Principal::PhoneHome {
            machine: machine()?,
            allocation: t
                .allocation
                .as_deref()
                .ok_or_else(|| Error::Internal(format!("token {} has no allocation", t.id)))?
                .parse()
                .map_err(|e| Error::Internal(format!("token {}: {e}", t.id)))?,
        },
        other => return Err(Error::Internal(format!("token {} has unknown role {other:?}", t.id))),
    })
}

impl FromRequestParts<Arc<App>> for Principal {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self> {
        let token = bearer(parts)?;
        authenticate(app, token).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_hashes_stable() {
        let a = generate("adm");
        let b = generate("adm");
        assert_ne!(a, b);
        assert!(a.starts_with("adm_") && a.len() == 4 + 64);
        assert_eq!(hash(&a), hash(&a));
        assert_eq!(hash(&a).len(), 64);
    }
}
