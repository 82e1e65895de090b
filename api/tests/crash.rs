//! Crash safety: the real `metal-api` binary is SIGKILLed in the middle of a stream of
//! allocations, restarted on the same store, and every acknowledged allocation is there, none is
//! duplicated, and retrying every request (same idempotency keys) allocates nothing twice.

mod common;

use common::*;
use metal_types::*;
use reqwest::{Method, StatusCode};
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The binary as a child process; killed on drop.
struct Server {
    child: Child,
    base: String,
}

impl Server {
    fn start(db: &str) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_metal-api"))
            .args(["--listen", "127.0.0.1:0", "--db", db, "--admin-token", ADMIN, "--log-format", "json"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn metal-api");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(i) = line.find("listening on ") {
                    let addr: String = line[i + 13..].chars().take_while(|c| !c.is_whitespace() && *c != '"').collect();
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr);
                    }
                }
            }
        });
        let addr = rx.recv_timeout(Duration::from_secs(30)).expect("metal-api printed `listening on <addr>`");
        Server { child, base: format!("http://{addr}") }
    }

    fn kill(&mut self) {
        let _ = self.child.kill(); // SIGKILL: no graceful anything
        let _ = self.child.wait();
    }

    fn api(&self) -> Api {
        Api { running: None, base: self.base.clone(), http: http_client() }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn crash_during_allocations(db: &Db) {
    let mut server = Server::start(&db.url);
    let api = server.api();
    let cat = api.catalog().await;
    const MACHINES: u32 = 40;
    for i in 0..MACHINES {
        Agent::new(5000 + i).join_pool(&api, &cat.pixie).await;
    }

    // Four clients stream allocations with unique idempotency keys until the server dies.
    let acked: Arc<Mutex<HashMap<String, Allocation>>> = Arc::default();
    let sent: Arc<Mutex<Vec<String>>> = Arc::default();
    let count = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for w in 0..4 {
        let (base, tenant) = (api.base.clone(), cat.tenant1.clone());
        let (acked, sent, count) = (acked.clone(), sent.clone(), count.clone());
        workers.push(tokio::spawn(async move {
            let http = http_client();
            for n in 0.. {
                let key = format!("k-{w}-{n}");
                sent.lock().unwrap().push(key.clone());
                let body = json!({"project": "p1", "partition": "lab", "size": "small", "image": "test-os",
                                  "hostname": format!("c{w}-{n}"), "idempotency_key": key});
                let Ok(r) = http.post(format!("{base}/v1/allocations")).bearer_auth(&tenant).json(&body).send().await else {
                    return;
                };
                let status = r.status();
                let Ok(v) = r.json::<serde_json::Value>().await else { return };
                match status {
                    StatusCode::CREATED => {
                        acked.lock().unwrap().insert(key, serde_json::from_value(v).unwrap());
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                    StatusCode::CONFLICT => return, // pool empty
                    other => panic!("{other}: {v}"),
                }
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while count.load(Ordering::SeqCst) < 15 {
        assert!(Instant::now() < deadline, "allocations did not get going");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.kill();
    for w in workers {
        w.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let sent = sent.lock().unwrap().clone();
    assert!(acked.len() >= 15);

    // Restart on the same store.
    let server = Server::start(&db.url);
    let api = server.api();
    let allocs: Vec<Allocation> = api.ok(Method::GET, "/v1/allocations", ADMIN, None).await;
    let by_id: HashMap<AllocationId, &Allocation> = allocs.iter().map(|a| (a.id, a)).collect();
    for (key, a) in &acked {
        let stored = by_id.get(&a.id).unwrap_or_else(|| panic!("acknowledged allocation {key} {} lost", a.id));
        assert_eq!(*stored, a);
    }
    let machines: HashSet<MachineId> = allocs.iter().map(|a| a.machine).collect();
    assert_eq!(machines.len(), allocs.len(), "a machine is allocated twice");
    let ms: Vec<Machine> = api.ok(Method::GET, "/v1/machines", ADMIN, None).await;
    for m in &ms {
        if let Some(a) = &m.allocation {
            assert_eq!(a.machine, m.id);
            assert!(by_id.contains_key(&a.id));
        }
    }
    assert_eq!(ms.iter().filter(|m| m.allocation.is_some()).count(), allocs.len());

    // Retrying every request sent (acknowledged or not) never allocates twice.
    for key in &sent {
        let (w, n) = key[2..].split_once('-').unwrap();
        let body = json!({"project": "p1", "partition": "lab", "size": "small", "image": "test-os",
                          "hostname": format!("c{w}-{n}"), "idempotency_key": key});
        let (s, v) = api.post("/v1/allocations", &cat.tenant1, body).await;
        match s {
            StatusCode::OK => {
                let a: Allocation = serde_json::from_value(v).unwrap();
                if let Some(first) = acked.get(key) {
                    assert_eq!(a.id, first.id, "retry of {key} returned another allocation");
                }
            }
            StatusCode::CREATED => assert!(!acked.contains_key(key), "acknowledged {key} allocated again"),
            StatusCode::CONFLICT => assert_eq!(v["code"], "no_machine_available"),
            other => panic!("{other}: {v}"),
        }
    }
    let allocs: Vec<Allocation> = api.ok(Method::GET, "/v1/allocations", ADMIN, None).await;
    let keys: HashSet<_> = allocs.iter().map(|a| a.idempotency_key.clone().unwrap()).collect();
    assert_eq!(keys.len(), allocs.len(), "one key, two allocations");
    let machines: HashSet<MachineId> = allocs.iter().map(|a| a.machine).collect();
    assert_eq!(machines.len(), allocs.len());
    assert!(allocs.len() <= MACHINES as usize);
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_during_allocations_sqlite() {
    crash_during_allocations(&Db::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_during_allocations_postgres() {
    let Some(db) = Db::postgres().await else { return };
    crash_during_allocations(&db).await;
    db.drop_pg().await;
}
