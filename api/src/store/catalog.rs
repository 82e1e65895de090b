//! The catalog: partitions, sizes, layouts and projects (one JSON document per id in the table
//! named by [`CatalogObject::PLURAL`]) and
//! images (immutable, found by id or by name's newest version). Reads go through the SQLite
//! catalog cache; the boot decision's partitions through the boot cache on both backends.

use super::cache::read_through;
use super::{parse_json, Conflict, Result, Store, StoreError};
use crate::policy;
use metal_types::CatalogObject;
use metal_types::Image;
use sqlx::{AnyConnection, Row};
use std::sync::Arc;

/// (version, expires_ms, body) of one image.
pub(super) type ImageRow = (String, Option<i64>, String);

/// Whether `table` holds a document `id` identical to `body` (`Ok(true)`), none (`Ok(false)`), or
/// one with other content (a conflict: catalog objects are changed by deleting and creating).
async fn stored_identical(
    c: &mut AnyConnection,
    table: &str,
    noun: &'static str,
    id: &str,
    body: &serde_json::Value,
) -> Result<bool> {
    let existing: Option<String> = sqlx::query(&format!("SELECT body FROM {table} WHERE id = $1"))
        .bind(id)
        .fetch_optional(c)
        .await?
        .map(|r| r.try_get("body"))
        .transpose()?;
    match existing {
        None => Ok(false),
        Some(existing) if &parse_json::<serde_json::Value>(noun, &existing)? == body => Ok(true),
        Some(_) => Err(Conflict::Exists { kind: noun, id: id.to_string() }.into()),
    }
}

impl Store {
    /// Inserts a catalog document. `Ok(true)`: created; `Ok(false)`: an identical one existed.
    pub async fn put_object<T: CatalogObject>(&self, item: &T) -> Result<bool> {
        let id = item.id();
        let body = serde_json::to_value(item).expect("wire types always serialize");
        let body = &body;
        let mut tx = self.write().await?;
        if stored_identical(tx.c(), T::PLURAL, T::NOUN, id, body).await? {
            return Ok(false);
        }
        sqlx::query(&format!("INSERT INTO {} (id, body, created_ms) VALUES ($1, $2, $3)", T::PLURAL))
            .bind(id)
            .bind(body.to_string())
            .bind(self.now_ms())
            .execute(tx.c())
            .await?;
        tx.commit().await?;
        self.catalog_changed();
        Ok(true)
    }

    pub async fn get_object<T: CatalogObject>(&self, id: &str) -> Result<Option<T>> {
        let load = async {
            let row =
                sqlx::query(&format!("SELECT body FROM {} WHERE id = $1", T::PLURAL)).bind(id).fetch_optional(&self.pool).await?;
            Ok::<_, StoreError>(row.map(|r| r.try_get::<String, _>("body")).transpose()?)
        };
        let cache = self.catalog_cache.as_ref().map(|c| &c.objects);
        let body = read_through(cache, format!("{}/{id}", T::PLURAL), load).await?;
        body.map(|b| parse_json(T::NOUN, &b)).transpose()
    }

    /// A partition for the boot decision: parsed once and kept for at most the cache TTL. A
    /// missing partition is not cached (one created on another replica counts at once).
    pub async fn boot_partition(&self, id: &str) -> Result<Option<Arc<metal_types::Partition>>> {
        let (generation, hit) = self.boot_partitions.get(id);
        if let Some(p) = hit {
            return Ok(Some(p));
        }
        let Some(p) = self.get_object::<metal_types::Partition>(id).await? else {
            return Ok(None);
        };
        let p = Arc::new(p);
        self.boot_partitions.put(generation, id.to_string(), p.clone());
        Ok(Some(p))
    }

    pub async fn list_objects<T: CatalogObject>(&self) -> Result<Vec<T>> {
        let load = async {
            let rows = sqlx::query(&format!("SELECT body FROM {} ORDER BY id", T::PLURAL)).fetch_all(&self.pool).await?;
            Ok::<_, StoreError>(rows.iter().map(|r| r.try_get::<String, _>("body")).collect::<Result<Vec<_>, _>>()?)
        };
        let cache = self.catalog_cache.as_ref().map(|c| &c.lists);
        let bodies = read_through(cache, T::PLURAL.to_string(), load).await?;
        bodies.iter().map(|b| parse_json(T::NOUN, b)).collect()
    }

    pub async fn delete_object<T: CatalogObject>(&self, id: &str) -> Result<bool> {
        let mut tx = self.write().await?;
        let n = sqlx::query(&format!("DELETE FROM {} WHERE id = $1", T::PLURAL)).bind(id).execute(tx.c()).await?.rows_affected();
        tx.commit().await?;
        self.catalog_changed();
        Ok(n > 0)
    }

    /// Deletes a project and revokes its tenant tokens in one transaction, refusing while it has
    /// active allocations. A project created again with the same id starts with no tokens.
    pub async fn delete_project(&self, id: &str) -> Result<bool> {
        let mut tx = self.write().await?;
        let active: i64 = sqlx::query("SELECT COUNT(*) AS n FROM allocations WHERE freed_ms IS NULL AND project = $1")
            .bind(id)
            .fetch_one(tx.c())
            .await?
            .try_get("n")?;
        if active > 0 {
            return Err(Conflict::ProjectInUse { id: id.to_string(), active }.into());
        }
        let n = sqlx::query("DELETE FROM projects WHERE id = $1").bind(id).execute(tx.c()).await?.rows_affected();
        let revoked = sqlx::query("DELETE FROM tokens WHERE role = 'tenant' AND project = $1")
            .bind(id)
            .execute(tx.c())
            .await?
            .rows_affected();
        tx.commit().await?;
        self.catalog_changed();
        self.tokens_changed();
        if revoked > 0 {
            tracing::info!(project = id, revoked, "project deleted; its tenant tokens are revoked");
        }
        Ok(n > 0)
    }

    /// Adds an image. `Ok(true)`: created; `Ok(false)`: an identical one existed; an image with
    /// that id and other content is a conflict (images are immutable).
    pub async fn put_image(&self, image: &Image, expires_ms: Option<i64>) -> Result<bool> {
        let body = serde_json::to_value(image).expect("wire types always serialize");
        let mut tx = self.write().await?;
        if stored_identical(tx.c(), Image::PLURAL, Image::NOUN, &image.id, &body).await? {
            return Ok(false);
        }
        sqlx::query("INSERT INTO images (id, name, version, expires_ms, body, created_ms) VALUES ($1, $2, $3, $4, $5, $6)")
            .bind(&image.id)
            .bind(&image.manifest.name)
            .bind(&image.manifest.version)
            .bind(expires_ms)
            .bind(body.to_string())
            .bind(self.now_ms())
            .execute(tx.c())
            .await?;
        tx.commit().await?;
        self.catalog_changed();
        Ok(true)
    }

    /// The rows of the images with this id (`by = "id"`) or name (`by = "name"`).
    async fn image_rows(&self, by: &'static str, key: &str) -> Result<Vec<ImageRow>> {
        let load = async {
            let rows = sqlx::query(&format!("SELECT version, expires_ms, body FROM images WHERE {by} = $1"))
                .bind(key)
                .fetch_all(&self.pool)
                .await?;
            let rows = rows
                .iter()
                .map(|r| Ok((r.try_get("version")?, r.try_get("expires_ms")?, r.try_get("body")?)))
                .collect::<Result<Vec<_>, sqlx::Error>>()?;
            Ok::<_, StoreError>(rows)
        };
        let cache = self.catalog_cache.as_ref().map(|c| &c.images);
        read_through(cache, format!("{by}/{key}"), load).await
    }

    pub async fn get_image(&self, id: &str) -> Result<Option<Image>> {
        self.image_rows("id", id).await?.first().map(|(_, _, b)| parse_json("image", b)).transpose()
    }

    /// The newest version of `name` that has not expired at `now`.
    pub async fn newest_image(&self, name: &str, now: i64) -> Result<Option<Image>> {
        let rows = self.image_rows("name", name).await?;
        let best =
            rows.iter().filter(|(_, exp, _)| exp.is_none_or(|e| e > now)).max_by(|a, b| policy::compare_versions(&a.0, &b.0));
        best.map(|(_, _, b)| parse_json("image", b)).transpose()
    }

    pub async fn image_expires_ms(&self, id: &str) -> Result<Option<i64>> {
        Ok(self.image_rows("id", id).await?.first().and_then(|(_, e, _)| *e))
    }

    pub async fn list_images(&self) -> Result<Vec<Image>> {
        sqlx::query("SELECT body FROM images ORDER BY id")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| parse_json("image", &r.try_get::<String, _>("body")?))
            .collect()
    }

    pub async fn delete_image(&self, id: &str) -> Result<bool> {
        let mut tx = self.write().await?;
        let n = sqlx::query("DELETE FROM images WHERE id = $1").bind(id).execute(tx.c()).await?.rows_affected();
        tx.commit().await?;
        self.catalog_changed();
        Ok(n > 0)
    }
}
