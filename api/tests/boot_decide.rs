//! The boot decision only reads, and its enrolment tokens are signed, not stored: decisions
//! change no row; a token from one replica (or from before a restart) registers on another; a
//! deleted pixie token stops working within the cache TTL; deleting the key rotates it; stored
//! enrolment tokens of earlier versions still register until they expire.

mod common;

use common::*;
use metal_types::cmdline::HammerParams;
use metal_types::*;
use reqwest::{Method, StatusCode};
use serde_json::json;
use sqlx::Connection;
use std::time::{Duration, Instant};

async fn sql_exec(db: &Db, query: &str) {
    sqlx::any::install_default_drivers();
    let mut c = sqlx::AnyConnection::connect(&db.url).await.expect("connect to the test database");
    sqlx::query(query).execute(&mut c).await.unwrap_or_else(|e| panic!("{query}: {e}"));
    c.close().await.ok();
}

/// Row counts of every table and the newest machine timestamps: changes with any write.
async fn fingerprint(db: &Db) -> Vec<i64> {
    let mut v = Vec::new();
    for table in ["tokens", "machines", "machine_macs", "events", "allocations", "secrets", "partitions"] {
        v.push(sql_i64(db, &format!("SELECT COUNT(*) FROM {table}")).await);
    }
    v.push(sql_i64(db, "SELECT COALESCE(MAX(updated_ms), 0) FROM machines").await);
    v.push(sql_i64(db, "SELECT COALESCE(MAX(last_seen_ms), 0) FROM machines").await);
    v
}

async fn decide(api: &Api, pixie: &str, mac: &str, uuid: Option<MachineId>) -> BootDecision {
    api.ok(
        Method::POST,
        "/v1/boot/decide",
        pixie,
        Some(json!({"partition": "lab", "mac": mac, "uuid": uuid, "arch": "bios_x86"})),
    )
    .await
}

fn token_of(d: &BootDecision) -> String {
    let BootDecision::Hammer { cmdline, .. } = d else { panic!("expected a hammer boot, got {d:?}") };
    HammerParams::parse(cmdline).expect("hammer params").enrolment_token
}

async fn register_with(api: &Api, token: &str, agent: &Agent) -> (StatusCode, serde_json::Value) {
    api.post("/v1/agent/register", token, json!({"partition": "lab", "inventory": inventory(agent.machine, &agent.mac)})).await
}

async fn decisions_do_not_write(db: &Db) {
    let mut api = Api::start(db).await;
    let cat = api.catalog().await;
    let mut known = Agent::new(1);
    known.join_pool(&api, &cat.pixie).await;
    let before = fingerprint(db).await;
    let mut tokens = std::collections::HashSet::new();
    for i in 0..20 {
        let unknown = Agent::new(100 + i);
        tokens.insert(token_of(&decide(&api, &cat.pixie, &unknown.mac, None).await));
        tokens.insert(token_of(&decide(&api, &cat.pixie, &known.mac, None).await));
        tokens.insert(token_of(&decide(&api, &cat.pixie, &known.mac, Some(known.machine)).await));
    }
    assert_eq!(tokens.len(), 60, "every decision hands out its own token");
    assert!(tokens.iter().all(|t| t.starts_with("enr1.")), "{tokens:?}");
    assert_eq!(fingerprint(db).await, before, "a boot decision wrote to the database");
    // The stateless tokens work: the unknown machine registers with its own.
    let mut fresh = Agent::new(100);
    let d = decide(&api, &cat.pixie, &fresh.mac, None).await;
    fresh.register(&api, &d).await;
    api.stop().await;
}

#[tokio::test]
async fn decisions_do_not_write_sqlite() {
    decisions_do_not_write(&Db::sqlite()).await;
}

#[tokio::test]
async fn decisions_do_not_write_postgres() {
    let Some(db) = Db::postgres().await else { return };
    decisions_do_not_write(&db).await;
    db.drop_pg().await;
}

/// Two APIs on one database agree on the key: a token from one registers on the other. On SQLite
/// the "other" API is the same file after a restart.
async fn key_is_shared(db: &Db, concurrent: bool) {
    let mut a = Api::start(db).await;
    let cat = a.catalog().await;
    let agent = Agent::new(7);
    let token = token_of(&decide(&a, &cat.pixie, &agent.mac, None).await);
    if !concurrent {
        a.stop().await;
    }
    let mut b = Api::start(db).await;
    let (s, v) = register_with(&b, &token, &agent).await;
    assert_eq!(s, StatusCode::OK, "a token from the other API: {v}");
    // And the other way round.
    let other = Agent::new(8);
    let token = token_of(&decide(&b, &cat.pixie, &other.mac, None).await);
    if concurrent {
        let (s, v) = register_with(&a, &token, &other).await;
        assert_eq!(s, StatusCode::OK, "a token from the other API: {v}");
    }
    // A token is bound to its MAC on every replica.
    let (s, v) = register_with(&b, &token, &agent).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert!(v["message"].as_str().unwrap().contains(&other.mac), "{v}");
    assert_eq!(sql_i64(db, "SELECT COUNT(*) FROM secrets").await, 1);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn key_survives_a_restart_sqlite() {
    key_is_shared(&Db::sqlite(), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn key_is_shared_by_two_replicas_postgres() {
    let Some(db) = Db::postgres().await else { return };
    key_is_shared(&db, true).await;
    db.drop_pg().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_starting_together_agree_on_the_key_postgres() {
    let Some(db) = Db::postgres().await else { return };
    // Migrations and the key row are created by whichever replica wins; start four at once.
    let apis = futures::future::join_all((0..4).map(|_| Api::start(&db))).await;
    let cat = apis[0].catalog().await;
    for (i, from) in apis.iter().enumerate() {
        let agent = Agent::new(20 + i as u32);
        let token = token_of(&decide(from, &cat.pixie, &agent.mac, None).await);
        let to = &apis[(i + 1) % apis.len()];
        let (s, v) = register_with(to, &token, &agent).await;
        assert_eq!(s, StatusCode::OK, "replica {i}'s token on the next replica: {v}");
    }
    for mut a in apis {
        a.stop().await;
    }
    db.drop_pg().await;
}

/// Polls `f` until it returns true; panics with `what` after `limit`. Returns the time it took.
async fn within<F, Fut>(limit: Duration, what: &str, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if f().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "{what} did not happen within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn deleted_tokens_and_keys_stop_working(db: &Db) {
    const TTL_MS: u64 = 400;
    let mut api = Api::start_with(db, |c| c.cache_ttl_ms = TTL_MS).await;
    let cat = api.catalog().await;
    let agent = Agent::new(3);
    let old = token_of(&decide(&api, &cat.pixie, &agent.mac, None).await);

    // Rotating the key: delete its row. Tokens signed with the old key are refused (with a
    // message that says what to do), new decisions sign with the new key.
    sql_exec(db, "DELETE FROM secrets").await;
    let limit = Duration::from_millis(TTL_MS) + Duration::from_secs(5);
    let (a, g, old) = (&api, &agent, &old);
    within(limit, "refusing a token of the rotated key", move || async move {
        let (s, v) = register_with(a, old, g).await;
        s == StatusCode::UNAUTHORIZED && v["message"].as_str().is_some_and(|m| m.contains("signature") && m.contains("PXE boot"))
    })
    .await;
    assert_eq!(sql_i64(db, "SELECT COUNT(*) FROM secrets").await, 1, "a new key was stored");
    let new = token_of(&decide(&api, &cat.pixie, &agent.mac, None).await);
    let (s, v) = register_with(&api, &new, &agent).await;
    assert_eq!(s, StatusCode::OK, "{v}");

    // Revoking pixie's token (deleting its row) takes effect within the TTL, although the boot
    // decision keeps it in memory.
    sql_exec(db, "DELETE FROM tokens WHERE role = 'pixie'").await;
    let pixie = &cat.pixie;
    let took = within(limit, "refusing a deleted pixie token", move || async move {
        let (s, _) = a.post("/v1/boot/decide", pixie, json!({"partition": "lab", "mac": g.mac})).await;
        s == StatusCode::UNAUTHORIZED
    })
    .await;
    eprintln!("deleted pixie token refused after {took:?} (TTL {TTL_MS} ms)");
    api.stop().await;
}

#[tokio::test]
async fn deleted_tokens_and_keys_stop_working_sqlite() {
    deleted_tokens_and_keys_stop_working(&Db::sqlite()).await;
}

#[tokio::test]
async fn deleted_tokens_and_keys_stop_working_postgres() {
    let Some(db) = Db::postgres().await else { return };
    deleted_tokens_and_keys_stop_working(&db).await;
    db.drop_pg().await;
}

/// Enrolment tokens stored by the previous version (one row per decision) still register until
/// they expire; expired ones are deleted when the API starts.
#[tokio::test]
async fn stored_enrolment_tokens_of_earlier_versions() {
    let db = Db::sqlite();
    let mut api = Api::start(&db).await;
    let _cat = api.catalog().await;
    let app = api.running.as_ref().unwrap().app.clone();
    let agent = Agent::new(5);
    let now = metal_api::now_ms();
    let stored = |token: &str, expires_ms: i64| {
        let mut row = metal_api::auth::row(token, metal_types::Role::Machine);
        row.kind = metal_api::store::tokens::TokenKind::LegacyEnrolment;
        row.partition = Some("lab".into());
        row.mac = Some(agent.mac.clone());
        row.expires_ms = Some(expires_ms);
        row
    };
    let live = format!("enr_{}", metal_api::auth::generate(metal_types::Role::Machine));
    app.store.insert_token(&stored(&live, now + 3_600_000)).await.unwrap();
    let expired = format!("enr_{}", metal_api::auth::generate(metal_types::Role::Machine));
    app.store.insert_token(&stored(&expired, now - 1)).await.unwrap();
    let (s, v) = register_with(&api, &expired, &agent).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
    assert!(v["message"].as_str().unwrap().contains("expired"), "{v}");
    // Bound to its MAC like the new ones.
    let (s, v) = register_with(&api, &live, &Agent::new(6)).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let (s, v) = register_with(&api, &live, &agent).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    drop(app);
    api.stop().await;
    assert_eq!(sql_i64(&db, "SELECT COUNT(*) FROM tokens WHERE role = 'enrolment'").await, 2);
    let mut api = Api::start(&db).await;
    assert_eq!(sql_i64(&db, "SELECT COUNT(*) FROM tokens WHERE role = 'enrolment'").await, 1, "the expired row is gone");
    let (s, v) = register_with(&api, &live, &agent).await;
    assert_eq!(s, StatusCode::OK, "a live stored token still registers after a restart: {v}");
    api.stop().await;
}
