//! Concurrency: 64 simultaneous allocation requests for 50 waiting machines get exactly 50
//! allocations of 50 distinct machines; the rest a clear `no_machine_available`. On PostgreSQL
//! through two API replicas on one database, on SQLite through one. Also: one idempotency key
//! never allocates twice, and a wait on one replica wakes when another replica allocates.

mod common;

use common::*;
use metal_types::*;
use reqwest::{Method, StatusCode};
use serde_json::json;
use std::collections::HashSet;
use std::time::{Duration, Instant};

const MACHINES: u32 = 50;
const REQUESTS: usize = 64;

async fn fill_pool(api: &Api, pixie: &str, n: u32) -> Vec<Agent> {
    let mut agents = Vec::new();
    for i in 0..n {
        let mut a = Agent::new(1000 + i);
        a.join_pool(api, pixie).await;
        agents.push(a);
    }
    agents
}

async fn race(replicas: &[&Api], tenant: &str) {
    let mut tasks = Vec::new();
    for i in 0..REQUESTS {
        let api_base = replicas[i % replicas.len()].base.clone();
        let tenant = tenant.to_string();
        tasks.push(tokio::spawn(async move {
            let body = json!({"project": "p1", "partition": "lab", "size": "small", "image": "test-os",
                              "hostname": format!("race-{i}")});
            let r = reqwest::Client::new()
                .post(format!("{api_base}/v1/allocations"))
                .bearer_auth(tenant)
                .json(&body)
                .send()
                .await
                .unwrap();
            (r.status(), r.json::<serde_json::Value>().await.unwrap())
        }));
    }
    let mut machines = HashSet::new();
    let mut refused = 0;
    for t in tasks {
        let (status, v) = t.await.unwrap();
        match status {
            StatusCode::CREATED => {
                let a: Allocation = serde_json::from_value(v).unwrap();
                assert!(machines.insert(a.machine), "machine {} allocated twice", a.machine);
            }
            StatusCode::CONFLICT => {
                let e: ApiError = serde_json::from_value(v).unwrap();
                assert_eq!(e.code, "no_machine_available", "{}", e.message);
                assert!(e.message.contains("small") && e.message.contains("lab"), "{}", e.message);
                refused += 1;
            }
            other => panic!("unexpected {other}: {v}"),
        }
    }
    assert_eq!(machines.len(), MACHINES as usize);
    assert_eq!(refused, REQUESTS - MACHINES as usize);
    // The store agrees: 50 active allocations, each machine points at its own.
    let allocs: Vec<Allocation> = replicas[0].ok(Method::GET, "/v1/allocations", ADMIN, None).await;
    assert_eq!(allocs.len(), MACHINES as usize);
    let ms: Vec<Machine> = replicas[0].ok(Method::GET, "/v1/machines", ADMIN, None).await;
    for m in &ms {
        let a = m.allocation.as_ref().expect("every machine allocated");
        assert_eq!(a.machine, m.id);
    }
    let ids: HashSet<_> = allocs.iter().map(|a| a.machine).collect();
    assert_eq!(ids, machines);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn race_sqlite_one_replica() {
    let db = Db::sqlite();
    let mut api = Api::start(&db).await;
    let cat = api.catalog().await;
    fill_pool(&api, &cat.pixie, MACHINES).await;
    race(&[&api], &cat.tenant1).await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn race_postgres_two_replicas() {
    let Some(db) = Db::postgres().await else { return };
    let mut a = Api::start(&db).await;
    let mut b = Api::start(&db).await;
    let cat = a.catalog().await;
    fill_pool(&a, &cat.pixie, MACHINES).await;
    race(&[&a, &b], &cat.tenant1).await;
    a.stop().await;
    b.stop().await;
    db.drop_pg().await;
}

async fn same_key_allocates_once(replicas: &[&Api], tenant: &str) {
    let mut tasks = Vec::new();
    for i in 0..16 {
        let base = replicas[i % replicas.len()].base.clone();
        let tenant = tenant.to_string();
        tasks.push(tokio::spawn(async move {
            let body = json!({"project": "p1", "partition": "lab", "size": "small", "image": "test-os",
                              "hostname": "once", "idempotency_key": "the-key"});
            let r = reqwest::Client::new()
                .post(format!("{base}/v1/allocations"))
                .bearer_auth(tenant)
                .json(&body)
                .send()
                .await
                .unwrap();
            (r.status(), r.json::<Allocation>().await.unwrap())
        }));
    }
    let mut ids = HashSet::new();
    let mut created = 0;
    for t in tasks {
        let (s, a) = t.await.unwrap();
        if s == StatusCode::CREATED {
            created += 1;
        } else {
            assert_eq!(s, StatusCode::OK);
        }
        ids.insert(a.id);
    }
    assert_eq!(created, 1);
    assert_eq!(ids.len(), 1);
    let allocs: Vec<Allocation> = replicas[0].ok(Method::GET, "/v1/allocations", ADMIN, None).await;
    assert_eq!(allocs.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idempotency_key_sqlite() {
    let db = Db::sqlite();
    let mut api = Api::start(&db).await;
    let cat = api.catalog().await;
    fill_pool(&api, &cat.pixie, 4).await;
    same_key_allocates_once(&[&api], &cat.tenant1).await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idempotency_key_postgres_two_replicas() {
    let Some(db) = Db::postgres().await else { return };
    let mut a = Api::start(&db).await;
    let mut b = Api::start(&db).await;
    let cat = a.catalog().await;
    fill_pool(&a, &cat.pixie, 4).await;
    same_key_allocates_once(&[&a, &b], &cat.tenant1).await;
    a.stop().await;
    b.stop().await;
    db.drop_pg().await;
}

/// A machine long-polls replica A; replica B allocates it; A's wait returns at once
/// (PostgreSQL LISTEN/NOTIFY).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wait_wakes_across_replicas_postgres() {
    let Some(db) = Db::postgres().await else { return };
    let mut a = Api::start(&db).await;
    let mut b = Api::start(&db).await;
    let cat = a.catalog().await;
    let mut agents = fill_pool(&a, &cat.pixie, 1).await;
    let agent = agents.pop().unwrap();
    let (base, cred) = (a.base.clone(), agent.credential.clone());
    let waiter = tokio::spawn(async move {
        let t = Instant::now();
        let r = reqwest::Client::new().get(format!("{base}/v1/agent/wait?timeout_s=30")).bearer_auth(cred).send().await.unwrap();
        (r.status(), t.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(500)).await; // let the wait park on A
    let body = json!({"project": "p1", "partition": "lab", "size": "small", "image": "test-os", "hostname": "x"});
    let (s, v) = b.post("/v1/allocations", &cat.tenant1, body).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (status, took) = tokio::time::timeout(Duration::from_secs(10), waiter).await.expect("wait woke").unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(took < Duration::from_secs(10), "{took:?}");
    a.stop().await;
    b.stop().await;
    db.drop_pg().await;
}
