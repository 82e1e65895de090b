//! Token routes (admins): create, list, revoke.

use super::{path, AppState, Body};
use crate::auth::{self, Principal};
use crate::error::{Error, Result};
use crate::rfc3339;
use crate::store::tokens::TokenKind;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use metal_types::*;

pub(super) async fn create_token(
    State(app): AppState,
    p: Principal,
    Body(req): Body<TokenRequest>,
) -> Result<(StatusCode, Json<TokenResponse>)> {
    p.require_admin()?;
    let role = Role::from(req.role);
    match (req.role, &req.project) {
        (TokenRole::Tenant, None) => return Err(Error::bad_request("a tenant token needs a project")),
        (TokenRole::Tenant, Some(project)) => {
            if app.store.get_object::<Project>(project).await?.is_none() {
                return Err(Error::not_found("project", project));
            }
        }
        (_, Some(_)) => return Err(Error::bad_request("only tenant tokens belong to a project; leave project out")),
        (_, None) => {}
    }
    let expires_ms = match req.expires_in_s {
        Some(0) => {
            return Err(Error::bad_request("expires_in_s must be at least 1 (leave it out for a token that lives until revoked)"))
        }
        Some(s) if s > 100 * 365 * 86_400 => return Err(Error::bad_request("expires_in_s must be at most 100 years")),
        Some(s) => Some(app.now_ms() + s as i64 * 1000),
        None => None,
    };
    if req.description.len() > 200 {
        return Err(Error::bad_request("description must be at most 200 characters"));
    }
    let token = auth::generate(role);
    let mut row = auth::row(&token, role);
    row.project = req.project.clone();
    row.description = req.description.clone();
    row.expires_ms = expires_ms;
    app.store.insert_token(&row).await?;
    tracing::info!(token = %row.id, role = role.as_str(), project = ?req.project, "token created");
    Ok((
        StatusCode::CREATED,
        Json(TokenResponse { id: row.id, token, role: req.role, project: req.project, expires_at: expires_ms.map(rfc3339) }),
    ))
}

pub(super) async fn list_tokens(State(app): AppState, p: Principal) -> Result<Json<Vec<TokenInfo>>> {
    p.require_admin()?;
    let rows = app.store.list_tokens().await?;
    let infos = rows
        .into_iter()
        .map(|(t, created)| {
            let role = match t.kind {
                TokenKind::Role(r) => r.issued(),
                TokenKind::LegacyEnrolment => None,
            }
            .ok_or_else(|| Error::Internal(format!("token {} has role {:?}", t.id, t.kind)))?;
            Ok(TokenInfo {
                id: t.id,
                role,
                project: t.project,
                description: t.description,
                created_at: rfc3339(created),
                expires_at: t.expires_ms.map(rfc3339),
            })
        })
        .collect::<Result<_>>()?;
    Ok(Json(infos))
}

pub(super) async fn revoke_token(
    State(app): AppState,
    p: Principal,
    id: std::result::Result<Path<String>, PathRejection>,
) -> Result<StatusCode> {
    p.require_admin()?;
    let id = path(id)?;
    if app.store.revoke_token(&id).await? {
        tracing::info!(token = %id, "token revoked");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(Error::NotFound(format!(
            "token {id} not found (only admin, tenant and pixie tokens are listed and revoked); list them with GET /v1/tokens"
        )))
    }
}
