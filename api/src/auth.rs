//! Tokens and who is calling.
//!
//! Tokens are 32 random bytes (hex) behind a role prefix (`adm_`, `ten_`, `pix_`, `mch_`,
//! `phh_`). The store keeps only their SHA-256; a presented token is hashed, looked up, and the
//! hashes compared once more in constant time. Enrolment tokens (`enr1.…`) are not stored: they
//! are signed claims, checked by [`crate::enrolment::verify`]. Stored enrolment tokens of earlier
//! versions (`enr_…`, role `enrolment`) are still accepted until they expire.

use crate::error::{Error, Result};
use crate::store::tokens::TokenKind;
use crate::store::TokenRow;
use crate::App;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use metal_types::{AllocationId, Mac, MachineId, Role};
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// Who is calling, from the bearer token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Admin,
    Tenant {
        project: String,
    },
    Pixie,
    /// A short-lived token from the kernel command line, for `POST /v1/agent/register`: the
    /// partition and MAC it was issued for, and the machine the boot request named or the MAC
    /// belonged to.
    Enrolment {
        partition: Option<String>,
        mac: Option<Mac>,
        machine: Option<MachineId>,
    },
    /// A machine's credential, bound to its UUID.
    Machine {
        machine: MachineId,
    },
    /// An installed OS phoning home for one allocation.
    PhoneHome {
        machine: MachineId,
        allocation: AllocationId,
    },
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

/// A new random token of `role`: its prefix and 32 random bytes in hex.
pub fn generate(role: Role) -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("{}_{}", role.prefix(), hex::encode(bytes))
}

/// The phone-home token of an allocation: `phh_` and the hex HMAC-SHA256 of the allocation id
/// under the API's key. Deterministic, so every `wait` answer for one allocation carries the same
/// token without the API keeping the token itself (it stores only the hash, as for every token).
pub fn phone_home_token(key: &crate::enrolment::Key, allocation: AllocationId) -> String {
    format!("{}_{}", Role::PhoneHome.prefix(), hex::encode(key.sign(format!("phone-home\0{allocation}").as_bytes())))
}

/// A rough, conservative estimate of a token's strength in bits: its length times log2 of the
/// alphabet its character classes span (lower, upper, digits, other), and zero when it has
/// fewer than 10 distinct characters (`aaaa…`). Random hex of 32 digits is 165 bits by this
/// count, a passphrase of words is overrated — it is a guard against `changeme`, not a proof.
pub fn estimated_bits(token: &str) -> f64 {
    let distinct: std::collections::HashSet<char> = token.chars().collect();
    if distinct.len() < 10 {
        return 0.0;
    }
    let classes = [
        (token.chars().any(|c| c.is_ascii_lowercase()), 26.0),
        (token.chars().any(|c| c.is_ascii_uppercase()), 26.0),
        (token.chars().any(|c| c.is_ascii_digit()), 10.0),
        (token.chars().any(|c| !c.is_ascii_alphanumeric()), 33.0),
    ];
    let alphabet: f64 = classes.iter().filter(|(present, _)| *present).map(|(_, n)| n).sum();
    token.chars().count() as f64 * alphabet.log2()
}

/// Bits the bootstrap admin token must have at least (by [`estimated_bits`]).
pub const MIN_BOOTSTRAP_BITS: f64 = 128.0;

pub fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A token row for a new token.
pub fn row(token: &str, role: Role) -> TokenRow {
    TokenRow {
        id: uuid::Uuid::new_v4().to_string(),
        hash: hash(token),
        kind: TokenKind::Role(role),
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
        return match crate::enrolment::verify(&app.enrolment_key(), token, app.now_ms()) {
            Ok(c) => {
                let mac = c.mac.as_deref().map(str::parse::<Mac>).transpose().map_err(|_| {
                    Error::Unauthorized("the enrolment token is malformed; PXE boot the machine again for a fresh one".into())
                })?;
                Ok(Principal::Enrolment { partition: Some(c.partition), mac, machine: c.machine })
            }
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
    if let Some(e) = t.expires_ms.filter(|e| *e <= app.now_ms()) {
        let what = match t.kind {
            TokenKind::LegacyEnrolment => {
                "; an enrolment token lives for --enrolment-ttl-s: PXE boot the machine again for a fresh one"
            }
            TokenKind::Role(Role::PhoneHome) => "; a phone-home token lives for --phone-home-ttl-s after its allocation was made",
            TokenKind::Role(_) => "; ask an operator for a new one",
        };
        return Err(Error::Unauthorized(format!("the token expired at {}{what}", crate::rfc3339(e))));
    }
    let machine = || -> Result<MachineId> {
        t.machine
            .as_deref()
            .ok_or_else(|| Error::Internal(format!("token {} has no machine", t.id)))?
            .parse()
            .map_err(|e| Error::Internal(format!("token {}: {e}", t.id)))
    };
    Ok(match t.kind {
        TokenKind::Role(Role::Admin) => Principal::Admin,
        TokenKind::Role(Role::Tenant) => Principal::Tenant {
            project: t.project.clone().ok_or_else(|| Error::Internal(format!("tenant token {} has no project", t.id)))?,
        },
        TokenKind::Role(Role::Pixie) => Principal::Pixie,
        TokenKind::LegacyEnrolment => Principal::Enrolment {
            partition: t.partition.clone(),
            mac: t.mac.as_deref().and_then(|m| m.parse().ok()),
            machine: None,
        },
        TokenKind::Role(Role::Machine) => Principal::Machine { machine: machine()? },
        TokenKind::Role(Role::PhoneHome) => Principal::PhoneHome {
            machine: machine()?,
            allocation: t
                .allocation
                .as_deref()
                .ok_or_else(|| Error::Internal(format!("token {} has no allocation", t.id)))?
                .parse()
                .map_err(|e| Error::Internal(format!("token {}: {e}", t.id)))?,
        },
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
    fn token_strength_estimate() {
        assert!(estimated_bits(&generate(Role::Admin)) >= MIN_BOOTSTRAP_BITS);
        assert!(
            estimated_bits(&hex::encode([
                0x5au8, 0x13, 0x99, 0xe0, 0x42, 0x7c, 0xd1, 0x08, 0x6b, 0xf3, 0x21, 0x84, 0x3e, 0xa7, 0x55, 0xc9
            ])) >= MIN_BOOTSTRAP_BITS,
            "openssl rand -hex 16"
        );
        for weak in ["changeme", "test-admin-token", "0123456789abcdef", &"a".repeat(100), "correct horse"] {
            assert!(estimated_bits(weak) < MIN_BOOTSTRAP_BITS, "{weak:?}");
        }
    }

    #[test]
    fn phone_home_tokens_are_per_allocation() {
        let key = crate::enrolment::Key::random();
        let a = AllocationId::new_random();
        assert_eq!(phone_home_token(&key, a), phone_home_token(&key, a));
        assert_ne!(phone_home_token(&key, a), phone_home_token(&key, AllocationId::new_random()));
        assert_ne!(phone_home_token(&key, a), phone_home_token(&crate::enrolment::Key::random(), a));
        assert!(phone_home_token(&key, a).starts_with("phh_") && phone_home_token(&key, a).len() == 4 + 64);
    }

    #[test]
    fn tokens_are_random_and_hashes_stable() {
        let a = generate(Role::Admin);
        let b = generate(Role::Admin);
        assert_ne!(a, b);
        assert!(a.starts_with("adm_") && a.len() == 4 + 64);
        assert_eq!(hash(&a), hash(&a));
        assert_eq!(hash(&a).len(), 64);
    }
}
