//! Allocation throughput and latency: N registered waiting machines (default 10,000), 64
//! concurrent clients allocating until the pool is empty, on SQLite (one API) and, when
//! `METAL_TEST_POSTGRES_URL` is set, on PostgreSQL with two API replicas. Counts double
//! allocations (must be 0).
//!
//! `cargo bench -p metal-api --bench allocate` (env: `METAL_BENCH_MACHINES`, `METAL_BENCH_CLIENTS`).

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use metal_types::*;
use reqwest::StatusCode;
use serde_json::json;
use std::collections::HashSet;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

struct Outcome {
    label: String,
    machines: usize,
    clients: usize,
    allocated: usize,
    refused: usize,
    doubles: usize,
    seconds: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

async fn bench(label: &str, db: &Db, replicas: usize, machines: usize, clients: usize) -> Outcome {
    let mut apis = Vec::new();
    for _ in 0..replicas {
        let normal = std::env::var("METAL_BENCH_SQLITE_SYNC").is_ok_and(|v| v == "normal");
        apis.push(
            Api::start_with(db, |c| {
                c.dead_after_s = 3600;
                c.sqlite_sync_normal = normal;
            })
            .await,
        );
    }
    let cat = apis[0].catalog().await;
    // Register the pool through the store (the HTTP path is exercised by the tests).
    let t = Instant::now();
    let app = apis[0].running.as_ref().unwrap().app.clone();
    for i in 0..machines {
        let id = MachineId(uuid::Uuid::from_u128(0xbe00_0000_0000_4000_8000_0000_0000_0000 + i as u128));
        let mac = format!("52:54:01:{:02x}:{:02x}:{:02x}", (i >> 16) & 0xff, (i >> 8) & 0xff, i & 0xff);
        let cred = metal_api::auth::generate(metal_types::Role::Machine);
        let mut row = metal_api::auth::row(&cred, metal_types::Role::Machine);
        row.machine = Some(id.to_string());
        let inv = inventory(id, &mac);
        let reg = metal_api::store::Registration {
            id,
            partition: "lab",
            size: "small",
            inventory: &inv,
            credential: &row,
            token_mac: None,
        };
        app.store.register(&reg).await.unwrap();
        app.store.record_events(id, &[(ProvisioningEvent::Waiting, metal_api::now_ms(), String::new())]).await.unwrap();
    }
    eprintln!("{label}: registered {machines} machines in {:.1} s", t.elapsed().as_secs_f64());

    let remaining = Arc::new(AtomicI64::new(machines as i64 + clients as i64)); // a few more than machines
    let http = reqwest::Client::builder().pool_max_idle_per_host(clients).build().unwrap();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let base = apis[c % replicas].base.clone();
        let (tenant, remaining, http) = (cat.tenant1.clone(), remaining.clone(), http.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut got = Vec::new();
            let mut refused = 0usize;
            let mut n = 0;
            while remaining.fetch_sub(1, Ordering::SeqCst) > 0 {
                n += 1;
                let body = json!({"project": "p1", "partition": "lab", "size": "small", "image": "test-os",
                                  "hostname": format!("b{c}-{n}")});
                let t = Instant::now();
                let r = http.post(format!("{base}/v1/allocations")).bearer_auth(&tenant).json(&body).send().await.unwrap();
                let status = r.status();
                let bytes = r.bytes().await.unwrap();
                lat.push(t.elapsed());
                match status {
                    StatusCode::CREATED => got.push(serde_json::from_slice::<Allocation>(&bytes).unwrap().machine),
                    StatusCode::CONFLICT => refused += 1,
                    other => panic!("{other}: {}", String::from_utf8_lossy(&bytes)),
                }
            }
            (lat, got, refused)
        }));
    }
    let mut lat = Vec::new();
    let mut got = Vec::new();
    let mut refused = 0;
    for t in tasks {
        let (l, g, r) = t.await.unwrap();
        lat.extend(l);
        got.extend(g);
        refused += r;
    }
    let seconds = start.elapsed().as_secs_f64();
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)].as_secs_f64() * 1000.0;
    let distinct: HashSet<_> = got.iter().collect();
    let stored: Vec<Allocation> = apis[0].ok(reqwest::Method::GET, "/v1/allocations", ADMIN, None).await;
    let stored_machines: HashSet<_> = stored.iter().map(|a| a.machine).collect();
    let doubles = (got.len() - distinct.len()) + (stored.len() - stored_machines.len());
    assert_eq!(stored.len(), got.len(), "acknowledged and stored allocations differ");
    for mut a in apis {
        a.stop().await;
    }
    Outcome {
        label: label.into(),
        machines,
        clients,
        allocated: got.len(),
        refused,
        doubles,
        seconds,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        max_ms: lat.last().map_or(0.0, |d: &Duration| d.as_secs_f64() * 1000.0),
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let machines = env_num("METAL_BENCH_MACHINES", 10_000);
    let clients = env_num("METAL_BENCH_CLIENTS", 64);
    let mut outcomes = Vec::new();
    rt.block_on(async {
        let db = Db::sqlite();
        outcomes.push(bench("SQLite, 1 replica", &db, 1, machines, clients).await);
        if let Some(db) = Db::postgres().await {
            outcomes.push(bench("PostgreSQL, 2 replicas", &db, 2, machines, clients).await);
            db.drop_pg().await;
        }
    });
    println!("| store | machines | clients | allocated | refused | double | allocations/s | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for o in outcomes {
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.0} | {:.1} | {:.1} | {:.1} |",
            o.label,
            o.machines,
            o.clients,
            o.allocated,
            o.refused,
            o.doubles,
            o.allocated as f64 / o.seconds,
            o.p50_ms,
            o.p99_ms,
            o.max_ms
        );
    }
}
