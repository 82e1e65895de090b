//! Catalog routes: partitions, sizes, layouts, projects (admins write, everybody reads what it may see) and images.

use super::{path, AppState, Body};
use crate::auth::{Principal, Scope};
use crate::error::{Error, Result};
use crate::App;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use metal_types::{CatalogObject, Image, Project};
/// Projects are the one kind a tenant sees only its own of (and deleting one revokes tokens).
fn is_project<T: CatalogObject>() -> bool {
    T::NOUN == Project::NOUN
}

pub(super) async fn create_item<T: CatalogObject>(
    State(app): AppState,
    p: Principal,
    Body(item): Body<T>,
) -> Result<(StatusCode, Json<T>)> {
    p.require_admin()?;
    item.validate().map_err(Error::BadRequest)?;
    let created = app.store.put_object(&item).await?;
    Ok((if created { StatusCode::CREATED } else { StatusCode::OK }, Json(item)))
}

pub(super) async fn list_items<T: CatalogObject>(State(app): AppState, p: Principal) -> Result<Json<Vec<T>>> {
    let scope = p.scope()?;
    let items: Vec<T> = app.store.list_objects().await?;
    Ok(Json(match &scope {
        Scope::Project(own) if is_project::<T>() => items.into_iter().filter(|i| i.id() == own).collect(),
        _ => items,
    }))
}

pub(super) async fn get_item<T: CatalogObject>(
    State(app): AppState,
    p: Principal,
    id: std::result::Result<Path<String>, PathRejection>,
) -> Result<Json<T>> {
    let scope = p.scope()?;
    let id = path(id)?;
    if is_project::<T>() && !scope.sees(&id) {
        return Err(Error::not_found(T::NOUN, &id));
    }
    match app.store.get_object::<T>(&id).await? {
        Some(item) => Ok(Json(item)),
        None => Err(Error::not_found(T::NOUN, &id)),
    }
}

pub(super) async fn delete_item<T: CatalogObject>(
    State(app): AppState,
    p: Principal,
    id: std::result::Result<Path<String>, PathRejection>,
) -> Result<StatusCode> {
    p.require_admin()?;
    let id = path(id)?;
    let deleted =
        if is_project::<T>() { app.store.delete_project(&id).await? } else { app.store.delete_object::<T>(&id).await? };
    if deleted {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(Error::not_found(T::NOUN, &id))
    }
}

pub(super) async fn create_image(
    State(app): AppState,
    p: Principal,
    Body(mut image): Body<Image>,
) -> Result<(StatusCode, Json<Image>)> {
    p.require_admin()?;
    image.validate().map_err(Error::BadRequest)?;
    let expires_ms =
        match &image.expires_at {
            None => None,
            Some(s) => Some(crate::parse_rfc3339(s).ok_or_else(|| {
                Error::bad_request(format!("expires_at {s:?} is not an RFC 3339 time like 2027-01-01T00:00:00Z"))
            })?),
        };
    image.id = image.manifest.id();
    let created = app.store.put_image(&image, expires_ms).await?;
    Ok((if created { StatusCode::CREATED } else { StatusCode::OK }, Json(image)))
}

pub(super) async fn list_images(State(app): AppState, p: Principal) -> Result<Json<Vec<Image>>> {
    p.scope()?;
    Ok(Json(app.store.list_images().await?))
}

/// An image by id, or by name: the newest version that has not expired.
pub(super) async fn find_image(app: &App, id_or_name: &str) -> Result<Option<Image>> {
    if let Some(i) = app.store.get_image(id_or_name).await? {
        return Ok(Some(i));
    }
    Ok(app.store.newest_image(id_or_name, app.now_ms()).await?)
}

async fn resolve_image(app: &App, id_or_name: &str) -> Result<Image> {
    find_image(app, id_or_name).await?.ok_or_else(|| crate::allocation::PlanError::ImageNotFound(id_or_name.to_string()).into())
}

pub(super) async fn get_image(
    State(app): AppState,
    p: Principal,
    id: std::result::Result<Path<String>, PathRejection>,
) -> Result<Json<Image>> {
    p.scope()?;
    Ok(Json(resolve_image(&app, &path(id)?).await?))
}

pub(super) async fn delete_image(
    State(app): AppState,
    p: Principal,
    id: std::result::Result<Path<String>, PathRejection>,
) -> Result<StatusCode> {
    p.require_admin()?;
    let id = path(id)?;
    if app.store.delete_image(&id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(Error::not_found("image", &id))
    }
}
