//! Stored tokens (only their SHA-256, never a token) and the secrets every replica shares (the
//! HMAC key of enrolment and phone-home tokens). Long-lived tokens are looked up through the boot
//! cache on every backend (and through the token cache on SQLite).

use super::cache::read_through;
use super::{Conflict, Result, Store, StoreError};
use metal_types::Role;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

/// What a stored token is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    Role(Role),
    /// An enrolment token stored by an earlier version (enrolment tokens are signed, not stored,
    /// now); accepted until it expires.
    LegacyEnrolment,
}

impl TokenKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenKind::Role(r) => r.as_str(),
            TokenKind::LegacyEnrolment => "enrolment",
        }
    }

    fn parse(s: &str) -> Result<TokenKind> {
        match s {
            "enrolment" => Ok(TokenKind::LegacyEnrolment),
            other => other.parse().map(TokenKind::Role).map_err(StoreError::Internal),
        }
    }
}

/// A stored token (never the token itself: only its SHA-256).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRow {
    pub id: String,
    pub hash: String,
    pub kind: TokenKind,
    pub project: Option<String>,
    pub partition: Option<String>,
    pub machine: Option<String>,
    pub allocation: Option<String>,
    /// Enrolment tokens: the MAC address that PXE booted.
    pub mac: Option<String>,
    pub description: String,
    pub expires_ms: Option<i64>,
}

impl TokenRow {
    /// Whether this is one of the long-lived roles the boot cache keeps.
    fn long_lived(&self) -> bool {
        matches!(self.kind, TokenKind::Role(r) if r.issued().is_some())
    }
}

fn token_row(r: &AnyRow) -> Result<TokenRow> {
    Ok(TokenRow {
        id: r.try_get("id")?,
        hash: r.try_get("hash")?,
        kind: TokenKind::parse(&r.try_get::<String, _>("role")?)?,
        project: r.try_get("project")?,
        partition: r.try_get("partition")?,
        machine: r.try_get("machine")?,
        allocation: r.try_get("allocation")?,
        mac: r.try_get("mac")?,
        description: r.try_get("description")?,
        expires_ms: r.try_get("expires_ms")?,
    })
}

impl Store {
    pub(super) async fn insert_token_in(&self, c: &mut AnyConnection, t: &TokenRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO tokens (id, hash, role, project, partition, machine, allocation, mac, description, expires_ms, created_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(&t.id)
        .bind(&t.hash)
        .bind(t.kind.as_str())
        .bind(&t.project)
        .bind(&t.partition)
        .bind(&t.machine)
        .bind(&t.allocation)
        .bind(&t.mac)
        .bind(&t.description)
        .bind(t.expires_ms)
        .bind(self.now_ms())
        .execute(c)
        .await?;
        Ok(())
    }

    pub async fn insert_token(&self, t: &TokenRow) -> Result<()> {
        let mut tx = self.write().await?;
        self.insert_token_in(tx.c(), t).await?;
        tx.commit().await?;
        self.tokens_changed();
        Ok(())
    }

    /// Makes sure a token with this hash exists (the bootstrap admin token, phone-home tokens).
    pub async fn ensure_token(&self, t: &TokenRow) -> Result<()> {
        let mut tx = self.write().await?;
        let exists = sqlx::query("SELECT id FROM tokens WHERE hash = $1").bind(&t.hash).fetch_optional(tx.c()).await?;
        // Replicas starting together race here: the loser's insert (PostgreSQL) or commit
        // (SQLite) meets the unique hash, and the token is there either way.
        let r = match exists {
            Some(_) => tx.commit().await,
            None => match self.insert_token_in(tx.c(), t).await {
                Ok(()) => tx.commit().await,
                Err(e) => Err(e),
            },
        };
        let r = match r {
            Err(e) if e.is_unique_violation() => Ok(()),
            other => other,
        };
        self.tokens_changed();
        r
    }

    /// The token with this hash. Long-lived tokens (admin, tenant, pixie) are kept for at most
    /// the cache TTL on every backend, so a token deleted from the database on another replica or
    /// by hand stops working within that time; tokens that writes replace (machine credentials,
    /// phone-home and stored enrolment tokens) are read from the database each time on PostgreSQL.
    pub async fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRow>> {
        if self.token_cache.is_some() {
            // SQLite: the token cache already keeps every token for at most the TTL.
            return self.token_by_hash_read(hash).await;
        }
        let (generation, hit) = self.boot_tokens.get(hash);
        if let Some(t) = hit {
            return Ok(Some(t));
        }
        let t = self.token_by_hash_read(hash).await?;
        if let Some(t) = t.as_ref().filter(|t| t.long_lived()) {
            self.boot_tokens.put(generation, hash.to_string(), t.clone());
        }
        Ok(t)
    }

    /// Through the SQLite token cache when there is one, else from the database.
    async fn token_by_hash_read(&self, hash: &str) -> Result<Option<TokenRow>> {
        let load = async {
            let row = sqlx::query("SELECT * FROM tokens WHERE hash = $1").bind(hash).fetch_optional(&self.pool).await?;
            row.as_ref().map(token_row).transpose()
        };
        read_through(self.token_cache.as_ref(), hash.to_string(), load).await
    }

    /// Drops expired enrolment tokens stored by earlier versions (which wrote one per boot
    /// decision); returns how many. Enrolment tokens are stateless now (`enrolment.rs`).
    pub async fn drop_expired_stored_enrolments(&self) -> Result<u64> {
        let mut tx = self.write().await?;
        let n = sqlx::query("DELETE FROM tokens WHERE role = 'enrolment' AND expires_ms < $1")
            .bind(self.now_ms())
            .execute(tx.c())
            .await?
            .rows_affected();
        tx.commit().await?;
        self.tokens_changed();
        Ok(n)
    }

    /// Admin, tenant and pixie tokens with their creation time (ms).
    pub async fn list_tokens(&self) -> Result<Vec<(TokenRow, i64)>> {
        sqlx::query("SELECT * FROM tokens WHERE role IN ('admin', 'tenant', 'pixie') ORDER BY created_ms, id")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| Ok((token_row(r)?, r.try_get("created_ms")?)))
            .collect()
    }

    /// Revokes the admin, tenant or pixie token `id`. Refuses to revoke the last admin token
    /// that has not expired (nobody could administer the API any more). `Ok(false)`: no such token.
    pub async fn revoke_token(&self, id: &str) -> Result<bool> {
        let mut tx = self.write().await?;
        let row = sqlx::query("SELECT role FROM tokens WHERE id = $1 AND role IN ('admin', 'tenant', 'pixie')")
            .bind(id)
            .fetch_optional(tx.c())
            .await?;
        let Some(row) = row else { return Ok(false) };
        if row.try_get::<String, _>("role")? == Role::Admin.as_str() {
            let others = sqlx::query(
                "SELECT COUNT(*) AS n FROM tokens WHERE role = 'admin' AND id <> $1 AND (expires_ms IS NULL OR expires_ms > $2)",
            )
            .bind(id)
            .bind(self.now_ms())
            .fetch_one(tx.c())
            .await?;
            if others.try_get::<i64, _>("n")? == 0 {
                return Err(Conflict::LastAdminToken { id: id.to_string() }.into());
            }
        }
        sqlx::query("DELETE FROM tokens WHERE id = $1").bind(id).execute(tx.c()).await?;
        tx.commit().await?;
        self.tokens_changed();
        Ok(true)
    }

    /// The secret `name`, created from `fresh()` by whichever API gets there first: every
    /// replica ends up with the same value.
    pub async fn secret(&self, name: &str, fresh: impl FnOnce() -> String) -> Result<String> {
        if let Some(v) = self.read_secret(name).await? {
            return Ok(v);
        }
        let mut tx = self.write().await?;
        sqlx::query("INSERT INTO secrets (name, value, created_ms) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING")
            .bind(name)
            .bind(fresh())
            .bind(self.now_ms())
            .execute(tx.c())
            .await?;
        tx.commit().await?;
        self.read_secret(name)
            .await?
            .ok_or_else(|| StoreError::Internal(format!("secret {name} vanished right after it was created")))
    }

    /// The secret `name` as stored now, if there is one.
    pub async fn read_secret(&self, name: &str) -> Result<Option<String>> {
        let row = sqlx::query("SELECT value FROM secrets WHERE name = $1").bind(name).fetch_optional(&self.pool).await?;
        Ok(row.map(|r| r.try_get("value")).transpose()?)
    }
}
