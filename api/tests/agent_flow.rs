//! The whole life of a machine, driven by a simulated metal-hammer against a real server:
//! PXE → register → wipe → Waiting → allocate → wait returns → Installing → install report →
//! Booting New Kernel → phone home → boot from disk → free → Machine Reclaim → re-register →
//! Waiting; then a restart of the API loses nothing. On SQLite and on PostgreSQL.

mod common;

use common::*;
use metal_types::ProvisioningEvent as Ev;
use metal_types::*;
use reqwest::{Method, StatusCode};
use serde_json::json;
use std::time::{Duration, Instant};

async fn machine_lifecycle(db: &Db) {
    let mut api = Api::start(db).await;
    let cat = api.catalog().await;
    let mut agent = Agent::new(1);

    // Discovery and the warm pool.
    let reg = agent.join_pool(&api, &cat.pixie).await;
    assert_eq!(reg.machine, agent.machine);
    assert_eq!(reg.size, "small");
    assert_eq!(agent.wait(&api, 0).await, None, "nothing allocated yet");
    let m: Machine = api.ok(Method::GET, &format!("/v1/machines/{}", agent.machine), ADMIN, None).await;
    assert_eq!(m.state, Some(Ev::Waiting));
    assert_eq!(m.liveliness, Liveliness::Alive);
    assert!(m.inventory.is_some());

    // A parked long-poll wakes the moment the allocation exists.
    let waiter = {
        let (base, cred) = (api.base.clone(), agent.credential.clone());
        tokio::spawn(async move {
            let t = Instant::now();
            let r =
                reqwest::Client::new().get(format!("{base}/v1/agent/wait?timeout_s=30")).bearer_auth(cred).send().await.unwrap();
            (r.status(), r.json::<InstallInstructions>().await.ok(), t.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await; // let the wait park
    let req = json!({"project": "p1", "partition": "lab", "size": "small", "image": "test-os", "hostname": "web-1",
                     "ssh_keys": ["ssh-ed25519 AAAA test"], "user_data": "{\"expect\":{}}", "idempotency_key": "k1"});
    let (s, v) = api.post("/v1/allocations", &cat.tenant1, req.clone()).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let alloc: Allocation = serde_json::from_value(v).unwrap();
    assert_eq!(alloc.machine, agent.machine);
    assert_eq!(alloc.image, "test-os-20261124");
    assert_eq!(alloc.layout, "default");
    let (status, instr, took) = tokio::time::timeout(Duration::from_secs(10), waiter).await.unwrap().unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(took < Duration::from_secs(10), "the wait returned only after {took:?}");
    let instr = instr.unwrap();
    assert_eq!(instr.allocation, alloc.id);
    assert_eq!(instr.hostname, "web-1");
    assert_eq!(instr.image.id, "test-os-20261124");
    assert_eq!(instr.layout.id, "default");
    assert_eq!(instr.phone_home.url, format!("{}/v1/agent/phone-home", api.base));
    assert_eq!(instr.phone_home.machine, agent.machine);

    // The same idempotency key gives the same allocation.
    let (s, v) = api.post("/v1/allocations", &cat.tenant1, req).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(serde_json::from_value::<Allocation>(v).unwrap().id, alloc.id);

    // Install.
    agent.events(&api, &[Ev::Installing]).await;
    let report = json!({"allocation": alloc.id, "success": true, "message": "ok",
        "boot": {"root_uuid": "1234", "kernel": "/boot/vmlinuz", "initrd": "", "cmdline": "console=ttyS0"}});
    assert_eq!(api.post("/v1/agent/install-report", &agent.credential, report).await.0, StatusCode::NO_CONTENT);
    agent.events(&api, &[Ev::BootingNewKernel]).await;
    // Not phoned home yet: a PXE boot now would still get metal-hammer.
    let d: BootDecision = api
        .ok(Method::POST, "/v1/boot/decide", &cat.pixie, Some(json!({"partition": "lab", "mac": agent.mac, "arch": "bios_x86"})))
        .await;
    assert!(matches!(d, BootDecision::Hammer { .. }), "{d:?}");

    // The installed OS phones home; from now on it boots from its disk.
    let ph = json!({"machine": agent.machine, "time_ms": metal_api::now_ms(), "message": "test-os up"});
    let (s, v) = api.post("/v1/agent/phone-home", &instr.phone_home.token, ph).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    let d: BootDecision = api
        .ok(
            Method::POST,
            "/v1/boot/decide",
            &cat.pixie,
            Some(json!({"partition": "lab", "mac": agent.mac, "uuid": agent.machine, "arch": "uefi_x64"})),
        )
        .await;
    assert_eq!(d, BootDecision::LocalDisk);
    let m: Machine = api.ok(Method::GET, &format!("/v1/machines/{}", agent.machine), &cat.tenant1, None).await;
    assert_eq!(m.state, Some(Ev::PhonedHome));
    assert_eq!(m.allocation.as_ref().map(|a| a.id), Some(alloc.id));
    assert_eq!(m.boot.as_ref().map(|b| b.root_uuid.as_str()), Some("1234"));

    // Free: Machine Reclaim, then the lab power-cycles it into metal-hammer.
    let m: Machine = api.ok(Method::DELETE, &format!("/v1/machines/{}/allocation", agent.machine), &cat.tenant1, None).await;
    assert_eq!(m.state, Some(Ev::MachineReclaim));
    assert!(m.allocation.is_none());
    let old_credential = agent.credential.clone();
    let d = agent.pxe_boot(&api, &cat.pixie).await;
    assert!(matches!(d, BootDecision::Hammer { .. }), "{d:?}");
    agent.register(&api, &d).await;
    assert_ne!(agent.credential, old_credential);
    let (s, _) = api.post("/v1/agent/events", &old_credential, json!({"events": []})).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "the old credential is replaced on re-register");
    agent.wipe(&api).await;
    agent.events(&api, &[Ev::Waiting]).await;
    assert_eq!(agent.wait(&api, 0).await, None);

    let events: Vec<MachineEvent> = api.ok(Method::GET, &format!("/v1/machines/{}/events", agent.machine), ADMIN, None).await;
    assert_eq!(
        event_names(&events),
        // The first PXE boot is no event: pixie's sighting of a MAC no machine has registered yet
        // creates nothing (anyone can send a DHCP request with any MAC).
        [
            "Preparing",
            "Registering",
            "Waiting",
            "Installing",
            "Booting New Kernel",
            "Phoned Home",
            "Machine Reclaim",
            "PXE Booting",
            "Preparing",
            "Registering",
            "Waiting"
        ]
    );
    assert!(events.iter().all(|e| !e.unexpected), "{events:?}");
    let m: Machine = api.ok(Method::GET, &format!("/v1/machines/{}", agent.machine), ADMIN, None).await;
    assert_eq!(m.state, Some(Ev::Waiting));
    assert!(!m.failed_reclaim && !m.crash_loop);

    // The freed allocation's phone-home token was deleted with it.
    let ph = json!({"machine": agent.machine, "time_ms": metal_api::now_ms()});
    let (s, v) = api.post("/v1/agent/phone-home", &instr.phone_home.token, ph).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");

    // A restart loses nothing.
    let before: Vec<Machine> = api.ok(Method::GET, "/v1/machines", ADMIN, None).await;
    let allocs_before: Vec<Allocation> = api.ok(Method::GET, "/v1/allocations", ADMIN, None).await;
    api.stop().await;
    let mut api = Api::start(db).await;
    let after: Vec<Machine> = api.ok(Method::GET, "/v1/machines", ADMIN, None).await;
    assert_eq!(before.len(), after.len());
    assert_eq!(before[0].state, after[0].state);
    assert_eq!(before[0].inventory, after[0].inventory);
    let allocs_after: Vec<Allocation> = api.ok(Method::GET, "/v1/allocations", ADMIN, None).await;
    assert_eq!(allocs_before, allocs_after);
    let events_after: Vec<MachineEvent> =
        api.ok(Method::GET, &format!("/v1/machines/{}/events", agent.machine), ADMIN, None).await;
    assert_eq!(events_after.len(), events.len(), "the stale phone home changed nothing");
    // Tokens survive: the tenant token still works, and so does the machine credential.
    let _: Vec<Machine> = api.ok(Method::GET, "/v1/machines", &cat.tenant1, None).await;
    assert_eq!(agent.wait(&api, 0).await, None);
    api.stop().await;
}

#[tokio::test]
async fn machine_lifecycle_sqlite() {
    machine_lifecycle(&Db::sqlite()).await;
}

#[tokio::test]
async fn machine_lifecycle_postgres() {
    let Some(db) = Db::postgres().await else { return };
    machine_lifecycle(&db).await;
    db.drop_pg().await;
}
