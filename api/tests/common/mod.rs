//! Test harness: a real API server on 127.0.0.1:0 over a real database (a SQLite file in a temp
//! dir, or a fresh database on the PostgreSQL of `METAL_TEST_POSTGRES_URL`), an HTTP client, a
//! catalog fixture and a simulated metal-hammer.
#![allow(dead_code)]

use metal_client::sim::SimAgent;
use metal_types::cmdline::HammerParams;
use metal_types::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sqlx::Connection;

/// The bootstrap admin token of every test API (it must pass the 128-bit strength check).
pub const ADMIN: &str = "adm_test_5f3c9a17e2b84d06a1c7f49e3b2d8a60";

/// Where the API keeps its data; survives restarts of the server.
pub struct Db {
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    /// (server URL, database name) to drop at the end.
    pg: Option<(String, String)>,
}

impl Db {
    pub fn sqlite() -> Db {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("metal.db").display());
        Db { url, _dir: Some(dir), pg: None }
    }

    /// A fresh database on the test PostgreSQL, or `None` (with a notice) when there is none;
    /// in a run that must run everything a missing PostgreSQL fails the test (`metal_testkit`).
    pub async fn postgres() -> Option<Db> {
        let url = std::env::var("METAL_TEST_POSTGRES_URL").ok();
        let what =
            "the PostgreSQL tests need METAL_TEST_POSTGRES_URL=postgres://user:pass@host/db (api/scripts/with-postgres sets it)";
        if !metal_testkit::require(url.is_some(), what) {
            return None;
        }
        let base = url.unwrap_or_default();
        let name = format!("metal_test_{}", uuid::Uuid::new_v4().simple());
        let mut c = sqlx::PgConnection::connect(&base).await.expect("connect to METAL_TEST_POSTGRES_URL");
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut c).await.expect("CREATE DATABASE (the role needs CREATEDB)");
        c.close().await.ok();
        let (prefix, _) = base.rsplit_once('/').expect("postgres URL with a database");
        let (_, query) = base.split_once('?').map(|(a, q)| (a, format!("?{q}"))).unwrap_or((&base, String::new()));
        let url = format!("{prefix}/{name}{query}");
        Some(Db { url, _dir: None, pg: Some((base, name)) })
    }

    pub async fn drop_pg(&self) {
        if let Some((base, name)) = &self.pg {
            if let Ok(mut c) = sqlx::PgConnection::connect(base).await {
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut c).await;
            }
        }
    }
}

impl Drop for Db {
    /// Drops the test database even when the test failed (on a thread of its own, since this
    /// may run inside the test's runtime).
    fn drop(&mut self) {
        if let Some((base, name)) = self.pg.take() {
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                rt.block_on(async {
                    if let Ok(mut c) = sqlx::PgConnection::connect(&base).await {
                        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut c).await;
                    }
                });
            })
            .join();
        }
    }
}

/// A plain reqwest client; the ring provider is installed first (reqwest is built without one).
pub fn http_client() -> reqwest::Client {
    metal_client::tls::install_provider();
    reqwest::Client::new()
}

pub struct Api {
    pub running: Option<metal_api::Running>,
    pub base: String,
    pub http: reqwest::Client,
}

impl Api {
    pub async fn start(db: &Db) -> Api {
        Self::start_with(db, |_| {}).await
    }

    pub async fn start_with(db: &Db, tweak: impl FnOnce(&mut metal_api::Config)) -> Api {
        let mut config = metal_api::Config { db: db.url.clone(), admin_token: Some(ADMIN.into()), ..Default::default() };
        tweak(&mut config);
        let running = metal_api::start(config, "127.0.0.1:0").await.expect("start API");
        let base = running.base_url();
        Api { running: Some(running), base, http: http_client() }
    }

    /// The typed client on this API (sharing the test's HTTP client), with `token`.
    pub fn client(&self, token: Option<&str>) -> metal_client::api::Client {
        metal_client::api::Client::with_http(&self.base, token.map(Into::into), self.http.clone()).expect("the API's base URL")
    }

    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await;
        }
    }

    /// Sends a request; returns the status and the JSON body (`Null` when empty).
    pub async fn call(&self, method: Method, path: &str, token: Option<&str>, body: Option<Value>) -> (StatusCode, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status();
        let bytes = resp.bytes().await.expect("body");
        let v = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        (status, v)
    }

    pub async fn get(&self, path: &str, token: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, Some(token), None).await
    }
    pub async fn post(&self, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, Some(token), Some(body)).await
    }
    pub async fn delete(&self, path: &str, token: &str) -> (StatusCode, Value) {
        self.call(Method::DELETE, path, Some(token), None).await
    }

    /// Asserts success and decodes.
    pub async fn ok<T: serde::de::DeserializeOwned>(&self, method: Method, path: &str, token: &str, body: Option<Value>) -> T {
        let (s, v) = self.call(method.clone(), path, Some(token), body).await;
        assert!(s.is_success(), "{method} {path}: {s} {v}");
        serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{method} {path}: cannot decode {v}: {e}"))
    }

    /// Creates partition `lab`, size `small`, image `test-os-20261124`, layout `default`,
    /// projects `p1` and `p2`; returns (pixie token, tenant token of p1, tenant token of p2).
    pub async fn catalog(&self) -> Catalog {
        let a = ADMIN;
        let partition = json!({"id": "lab", "boot": {
            "kernel_url": "http://10.99.0.1:8081/hammer/vmlinuz",
            "initrd_url": "http://10.99.0.1:8081/hammer/initrd.img",
            "cmdline": "console=ttyS0",
            "api_url": self.base,
        }});
        assert_eq!(self.post("/v1/partitions", a, partition).await.0, StatusCode::CREATED);
        let size = json!({"id": "small", "constraints": [
            {"kind": "cores", "min": 1, "max": 4},
            {"kind": "memory", "min": 1u64 << 30, "max": 8u64 << 30},
        ]});
        assert_eq!(self.post("/v1/sizes", a, size).await.0, StatusCode::CREATED);
        let image = json!({
            "url": "http://10.99.0.1:8081/images/test-os-20261124.tar.zst",
            "name": "test-os", "version": "20261124", "format": "tar.zst",
            "compressed_size": 1000, "uncompressed_size": 4000,
            "sha256": "a".repeat(64), "kernel": "boot/vmlinuz", "cmdline": "console=ttyS0",
        });
        assert_eq!(self.post("/v1/images", a, image).await.0, StatusCode::CREATED);
        let layout = json!({"id": "default",
            "disks": [{"device": "first", "partitions": [
                {"number": 1, "label": "efi", "size_mib": 64, "type": "efi"},
                {"number": 2, "label": "root", "size_mib": 0, "type": "linux"}]}],
            "filesystems": [
                {"source": "first:1", "kind": "vfat", "mount": "/boot/efi"},
                {"source": "first:2", "kind": "ext4", "mount": "/"}]});
        assert_eq!(self.post("/v1/layouts", a, layout).await.0, StatusCode::CREATED);
        for p in ["p1", "p2"] {
            assert_eq!(self.post("/v1/projects", a, json!({"id": p})).await.0, StatusCode::CREATED);
        }
        let pixie: TokenResponse = self.ok(Method::POST, "/v1/tokens", a, Some(json!({"role": "pixie"}))).await;
        let t1: TokenResponse = self.ok(Method::POST, "/v1/tokens", a, Some(json!({"role": "tenant", "project": "p1"}))).await;
        let t2: TokenResponse = self.ok(Method::POST, "/v1/tokens", a, Some(json!({"role": "tenant", "project": "p2"}))).await;
        Catalog { pixie: pixie.token, tenant1: t1.token, tenant2: t2.token }
    }
}

pub struct Catalog {
    pub pixie: String,
    pub tenant1: String,
    pub tenant2: String,
}

/// The simulated machine's inventory (`metal_client::sim::inventory`) with this suite's disk
/// (8 GiB, serial `d1`) and DMI names.
pub fn inventory(uuid: MachineId, mac: &str) -> Inventory {
    let mut inv = metal_client::sim::inventory(uuid, mac);
    inv.disks[0].size_bytes = 8 << 30;
    inv.disks[0].serial = "d1".into();
    inv.dmi = Dmi { sys_vendor: "QEMU".into(), product_name: "Standard PC".into(), ..Default::default() };
    inv
}

/// A simulated metal-hammer: `metal_client::sim::SimAgent` with this module's inventory,
/// asserting every step succeeds.
pub struct Agent {
    pub machine: MachineId,
    pub mac: String,
    pub credential: String,
}

impl Agent {
    pub fn new(n: u32) -> Agent {
        Agent { machine: metal_client::sim::machine_id(n), mac: metal_client::sim::mac(n), credential: String::new() }
    }

    fn sim(&self, api: &Api) -> SimAgent {
        let sim = SimAgent::with_inventory(&api.client(None), "lab", inventory(self.machine, &self.mac));
        if self.credential.is_empty() {
            sim
        } else {
            sim.with_credential(self.credential.clone())
        }
    }

    /// What pixie does when the machine PXE boots: report the event, ask for a decision.
    pub async fn pxe_boot(&self, api: &Api, pixie: &str) -> BootDecision {
        self.sim(api).pxe_boot(&api.client(Some(pixie))).await.expect("pxe-event and boot decision")
    }

    /// Boots metal-hammer from a decision and registers; returns the response.
    pub async fn register(&mut self, api: &Api, decision: &BootDecision) -> RegisterResponse {
        let BootDecision::Hammer { cmdline, .. } = decision else { panic!("expected a hammer boot, got {decision:?}") };
        let params = HammerParams::parse(cmdline).expect("hammer params on the command line");
        assert_eq!(params.api_url, api.base);
        let mut sim = self.sim(api);
        let r = sim.register(decision).await.expect("register");
        self.credential = r.credential.clone();
        r
    }

    pub async fn events(&self, api: &Api, events: &[ProvisioningEvent]) {
        let evs: Vec<_> = events.iter().map(|e| (*e, "sim")).collect();
        self.sim(api).events(&evs).await.expect("events");
    }

    pub async fn wipe(&self, api: &Api) {
        self.sim(api).wipe().await.expect("wipe-report");
    }

    /// One long-poll. `Some` with instructions, `None` on 204.
    pub async fn wait(&self, api: &Api, timeout_s: u64) -> Option<InstallInstructions> {
        self.sim(api).wait(timeout_s).await.expect("wait")
    }

    /// PXE boot → register → wipe → Waiting.
    pub async fn join_pool(&mut self, api: &Api, pixie: &str) -> RegisterResponse {
        let d = self.pxe_boot(api, pixie).await;
        let r = self.register(api, &d).await;
        self.wipe(api).await;
        self.events(api, &[ProvisioningEvent::Waiting]).await;
        r
    }
}

pub fn event_names(events: &[MachineEvent]) -> Vec<&'static str> {
    events.iter().map(|e| e.event.as_str()).collect()
}

/// One integer from the test database, read on a connection of its own.
pub async fn sql_i64(db: &Db, query: &str) -> i64 {
    sqlx::any::install_default_drivers();
    let mut c = sqlx::AnyConnection::connect(&db.url).await.expect("connect to the test database");
    let r = sqlx::query(query).fetch_one(&mut c).await.unwrap_or_else(|e| panic!("{query}: {e}"));
    let v = sqlx::Row::try_get::<i64, _>(&r, 0).unwrap_or_else(|e| panic!("{query}: {e}"));
    c.close().await.ok();
    v
}
