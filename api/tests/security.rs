//! The API under a hostile provisioning network (issue 11): each test reproduces one way an
//! attacker on that network, or a tenant, got at what is not theirs, and asserts it is refused
//! and changes nothing.

mod common;

use common::*;
use metal_types::cmdline::HammerParams;
use metal_types::ProvisioningEvent as Ev;
use metal_types::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

fn alloc_body(hostname: &str) -> Value {
    json!({"project": "p1", "partition": "lab", "size": "small", "image": "test-os", "hostname": hostname,
           "ssh_keys": ["ssh-ed25519 AAAA tenant"], "user_data": "secret user data"})
}

/// What `GET /ipxe?mac=…[&uuid=…]` on pixie hands anyone: a boot decision for that MAC.
async fn decide(api: &Api, pixie: &str, mac: &str, uuid: Option<MachineId>) -> BootDecision {
    api.ok(
        Method::POST,
        "/v1/boot/decide",
        pixie,
        Some(json!({"partition": "lab", "mac": mac, "uuid": uuid, "arch": "bios_x86"})),
    )
    .await
}

fn enrolment_token(d: &BootDecision) -> String {
    let BootDecision::Hammer { cmdline, .. } = d else { panic!("expected a hammer boot, got {d:?}") };
    HammerParams::parse(cmdline).unwrap().enrolment_token
}

async fn machine(api: &Api, id: MachineId) -> Machine {
    api.ok(Method::GET, &format!("/v1/machines/{id}"), ADMIN, None).await
}

async fn events(api: &Api, id: MachineId, token: &str) -> Vec<MachineEvent> {
    api.ok(Method::GET, &format!("/v1/machines/{id}/events"), token, None).await
}

/// A victim machine in the pool, allocated to p1 and installed, phoned home.
async fn installed_victim(api: &Api, cat: &Catalog, n: u32) -> (Agent, Allocation, InstallInstructions) {
    let mut victim = Agent::new(n);
    victim.join_pool(api, &cat.pixie).await;
    let a: Allocation = api.ok(Method::POST, "/v1/allocations", &cat.tenant1, Some(alloc_body("victim"))).await;
    let instr = victim.wait(api, 5).await.expect("instructions");
    victim.events(api, &[Ev::Installing]).await;
    let report = json!({"allocation": a.id, "success": true});
    assert_eq!(api.post("/v1/agent/install-report", &victim.credential, report).await.0, StatusCode::NO_CONTENT);
    victim.events(api, &[Ev::BootingNewKernel]).await;
    let ph = json!({"machine": victim.machine, "time_ms": metal_api::now_ms()});
    assert_eq!(api.post("/v1/agent/phone-home", &instr.phone_home.token, ph).await.0, StatusCode::NO_CONTENT);
    (victim, a, instr)
}

/// Finding 1: a token for the attacker's own MAC, an inventory naming the victim's UUID.
#[tokio::test]
async fn registering_as_another_machine_is_refused() {
    let db = Db::sqlite();
    let mut api = Api::start(&db).await;
    let cat = api.catalog().await;
    let mut victim = Agent::new(1);
    victim.join_pool(&api, &cat.pixie).await;
    let before = machine(&api, victim.machine).await;

    // The attacker's own NIC, the victim's UUID.
    let attacker_mac = "52:54:00:aa:aa:aa";
    let token = enrolment_token(&decide(&api, &cat.pixie, attacker_mac, None).await);
    let body = json!({"partition": "lab", "inventory": inventory(victim.machine, attacker_mac)});
    let (s, v) = api.post("/v1/agent/register", &token, body).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert!(v["message"].as_str().unwrap().contains("MAC"), "{v}");

    // Both of the attacker's NICs: one of them the victim's does not make the token's MAC the
    // victim's.
    let mut inv = inventory(victim.machine, attacker_mac);
    inv.nics.push(Nic {
        name: "eth1".into(),
        mac: victim.mac.clone(),
        driver: "virtio_net".into(),
        speed_mbps: None,
        carrier: true,
    });
    let (s, v) = api.post("/v1/agent/register", &token, json!({"partition": "lab", "inventory": inv})).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");

    // A token issued for the UUID a boot request named is good for that UUID only.
    let named = MachineId(uuid::Uuid::from_u128(0xdead_beef));
    let token = enrolment_token(&decide(&api, &cat.pixie, "52:54:00:bb:bb:bb", Some(named)).await);
    let other = MachineId(uuid::Uuid::from_u128(0xfeed));
    let body = json!({"partition": "lab", "inventory": inventory(other, "52:54:00:bb:bb:bb")});
    let (s, v) = api.post("/v1/agent/register", &token, body).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert!(v["message"].as_str().unwrap().contains("UUID"), "{v}");

    // Nothing changed: the victim's credential works, its inventory and MACs are its own.
    assert_eq!(victim.wait(&api, 0).await, None, "the victim's credential still works");
    let after = machine(&api, victim.machine).await;
    assert_eq!(after.inventory, before.inventory);
    assert_eq!(after.state, Some(Ev::Waiting));

    // The firmware's byte-swapped form of the machine's own UUID is the same machine.
    let swapped = MachineId(uuid::Uuid::from_bytes(swap_smbios(victim.machine.0.into_bytes())));
    let token = enrolment_token(&decide(&api, &cat.pixie, &victim.mac, Some(swapped)).await);
    let body = json!({"partition": "lab", "inventory": inventory(victim.machine, &victim.mac)});
    let (s, v) = api.post("/v1/agent/register", &token, body).await;
    assert_eq!(s, StatusCode::OK, "{v}");

    // A UUID never seen before is enrolled.
    let mut fresh = Agent::new(2);
    let d = fresh.pxe_boot(&api, &cat.pixie).await;
    fresh.register(&api, &d).await;
    api.stop().await;
}

fn swap_smbios(b: [u8; 16]) -> [u8; 16] {
    let mut s = b;
    s[0..4].reverse();
    s[4..6].reverse();
    s[6..8].reverse();
    s
}

/// Finding 1, second half: a machine whose allocation phoned home is running the tenant's OS;
/// no registration gets that allocation's secrets, not even with the machine's own old token.
#[tokio::test]
async fn a_phoned_home_allocation_never_reaches_a_new_credential() {
    let db = Db::sqlite();
    let mut api = Api::start(&db).await;
    let cat = api.catalog().await;
    // The victim's own enrolment token from its first boot, as sniffed off the plain-HTTP iPXE
    // script; still within its hour.
    let mut victim = Agent::new(3);
    let first = victim.pxe_boot(&api, &cat.pixie).await;
    victim.register(&api, &first).await;
    victim.wipe(&api).await;
    victim.events(&api, &[Ev::Waiting]).await;
    let a: Allocation = api.ok(Method::POST, "/v1/allocations", &cat.tenant1, Some(alloc_body("victim"))).await;
    let instr = victim.wait(&api, 5).await.unwrap();
    victim.events(&api, &[Ev::Installing, Ev::BootingNewKernel]).await;
    let ph = json!({"machine": victim.machine, "time_ms": metal_api::now_ms()});
    assert_eq!(api.post("/v1/agent/phone-home", &instr.phone_home.token, ph).await.0, StatusCode::NO_CONTENT);

    // Any boot request for its MAC, with or without an invented UUID, boots the local disk.
    for uuid in [None, Some(MachineId(uuid::Uuid::from_u128(7)))] {
        assert_eq!(decide(&api, &cat.pixie, &victim.mac, uuid).await, BootDecision::LocalDisk, "uuid {uuid:?}");
    }
    // The old token is refused for a machine running its installed OS.
    let body = json!({"partition": "lab", "inventory": inventory(victim.machine, &victim.mac)});
    let (s, v) = api.post("/v1/agent/register", &enrolment_token(&first), body).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    // Even an admin-made credential minted now gets no secrets from wait.
    let body = json!({"partition": "lab", "inventory": inventory(victim.machine, &victim.mac)});
    let (s, v) = api.post("/v1/agent/register", ADMIN, body).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    let m = machine(&api, victim.machine).await;
    assert_eq!(m.allocation.map(|x| x.id), Some(a.id));
    assert_eq!(m.state, Some(Ev::PhonedHome));
    api.stop().await;
}

/// Finding 2: one phone-home token per allocation, gone when the allocation is freed; a stale
/// one changes nothing.
#[tokio::test]
async fn phone_home_tokens_are_per_allocation_and_die_with_it() {
    let db = Db::sqlite();
    let mut api = Api::start(&db).await;
    let cat = api.catalog().await;
    let mut agent = Agent::new(4);
    agent.join_pool(&api, &cat.pixie).await;
    let _a: Allocation = api.ok(Method::POST, "/v1/allocations", &cat.tenant1, Some(alloc_body("ph"))).await;
    let first = agent.wait(&api, 5).await.unwrap();
    let second = agent.wait(&api, 5).await.unwrap();
    assert_eq!(first.phone_home.token, second.phone_home.token, "one token per allocation, not per wait answer");
    let n = sql_count(&db, "SELECT COUNT(*) FROM tokens WHERE role = 'phone_home'").await;
    assert_eq!(n, 1);
    // Free before it phoned home (the tenant changed its mind); the machine comes back to the pool.
    let _: Machine = api.ok(Method::DELETE, &format!("/v1/machines/{}/allocation", agent.machine), &cat.tenant1, None).await;
    assert_eq!(sql_count(&db, "SELECT COUNT(*) FROM tokens WHERE role = 'phone_home'").await, 0, "deleted on free");
    let d = agent.pxe_boot(&api, &cat.pixie).await;
    agent.register(&api, &d).await;
    agent.events(&api, &[Ev::Waiting]).await;
    let events_before = events(&api, agent.machine, ADMIN).await.len();
    // The old OS (or whoever kept the file) phones home with the stale token: refused, nothing recorded.
    let ph = json!({"machine": agent.machine, "time_ms": metal_api::now_ms()});
    let (s, v) = api.post("/v1/agent/phone-home", &first.phone_home.token, ph).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
    let m = machine(&api, agent.machine).await;
    assert_eq!(m.state, Some(Ev::Waiting), "still in the pool");
    assert_eq!(events(&api, agent.machine, ADMIN).await.len(), events_before);
    let (s, v) = api
        .post(
            "/v1/allocations",
            &cat.tenant2,
            json!({"project": "p2", "partition": "lab", "size": "small", "image": "test-os", "hostname": "next"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "the machine is still allocatable: {v}");
    api.stop().await;
}

#[tokio::test]
async fn phone_home_tokens_expire() {
    let db = Db::sqlite();
    let mut api = Api::start_with(&db, |c| c.phone_home_ttl_s = 1).await;
    let cat = api.catalog().await;
    let mut agent = Agent::new(5);
    agent.join_pool(&api, &cat.pixie).await;
    let _a: Allocation = api.ok(Method::POST, "/v1/allocations", &cat.tenant1, Some(alloc_body("exp"))).await;
    let instr = agent.wait(&api, 5).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let ph = json!({"machine": agent.machine, "time_ms": metal_api::now_ms()});
    let (s, v) = api.post("/v1/agent/phone-home", &instr.phone_home.token, ph).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
    assert!(v["message"].as_str().unwrap().contains("expired"), "{v}");
    assert_ne!(machine(&api, agent.machine).await.state, Some(Ev::PhonedHome));
    api.stop().await;
}

#[tokio::test]
async fn event_messages_are_bounded() {
    let db = Db::sqlite();
    let mut api = Api::start(&db).await;
    let cat = api.catalog().await;
    let mut agent = Agent::new(6);
    agent.join_pool(&api, &cat.pixie).await;
    let long = "x".repeat(500_000);
    let (s, v) = api
        .post("/v1/agent/events", &agent.credential, json!({"events": [{"event": "Alive", "time_ms": 1, "message": long}, {"event": "Waiting", "time_ms": 1, "message": long}]}))
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    let evs = events(&api, agent.machine, ADMIN).await;
    let last = evs.last().unwrap();
    assert!(last.message.len() <= metal_types::MAX_EVENT_MESSAGE + 32, "{} bytes kept", last.message.len());
    assert!(last.message.ends_with("[truncated]"), "{}", &last.message[last.message.len() - 40..]);
    api.stop().await;
}

async fn sql_count(db: &Db, query: &str) -> i64 {
    use sqlx::{Connection, Row};
    let mut c = sqlx::AnyConnection::connect(&db.url).await.unwrap();
    let n: i64 = sqlx::query(query).fetch_one(&mut c).await.unwrap().try_get(0).unwrap();
    c.close().await.ok();
    n
}

/// Finding 3: PXE Booting events are what pixie saw on the wire, and anyone can send a DISCOVER
/// with any MAC and UUID.
#[tokio::test]
async fn spoofed_pxe_events_create_nothing_and_move_nothing() {
    let db = Db::sqlite();
    let mut api = Api::start(&db).await;
    let cat = api.catalog().await;
    // Unknown UUIDs and MACs create no machine.
    for i in 0..5u128 {
        let ev = json!({"partition": "lab", "mac": format!("52:54:00:ff:00:{i:02x}"), "uuid": uuid::Uuid::from_u128(0x1000 + i), "arch": "bios_x86"});
        assert_eq!(api.post("/v1/boot/pxe-event", &cat.pixie, ev).await.0, StatusCode::NO_CONTENT);
    }
    assert_eq!(sql_count(&db, "SELECT COUNT(*) FROM machines").await, 0, "a PXE event never creates a machine row");

    // A machine Waiting and long-polling stays in the pool.
    let mut agent = Agent::new(7);
    agent.join_pool(&api, &cat.pixie).await;
    let _ = agent.wait(&api, 0).await;
    for _ in 0..3 {
        let ev = json!({"partition": "lab", "mac": agent.mac, "uuid": agent.machine, "arch": "bios_x86"});
        assert_eq!(api.post("/v1/boot/pxe-event", &cat.pixie, ev).await.0, StatusCode::NO_CONTENT);
    }
    assert_eq!(machine(&api, agent.machine).await.state, Some(Ev::Waiting));
    let evs = events(&api, agent.machine, ADMIN).await;
    let last = evs.last().unwrap();
    assert_eq!(last.event, Ev::PxeBooting, "the sighting is kept in the timeline");
    assert!(last.ignored, "…but marked as not changing the state: {last:?}");
    let a: Allocation = api.ok(Method::POST, "/v1/allocations", &cat.tenant1, Some(alloc_body("pool"))).await;
    assert_eq!(a.machine, agent.machine);

    // Three spoofed PXE events during the install do not make a crash loop.
    let _ = agent.wait(&api, 5).await.unwrap();
    agent.events(&api, &[Ev::Installing]).await;
    for _ in 0..3 {
        let ev = json!({"partition": "lab", "mac": agent.mac, "arch": "bios_x86"});
        assert_eq!(api.post("/v1/boot/pxe-event", &cat.pixie, ev).await.0, StatusCode::NO_CONTENT);
    }
    let m = machine(&api, agent.machine).await;
    assert!(!m.crash_loop);
    assert_eq!(m.state, Some(Ev::Installing));
    agent.events(&api, &[Ev::BootingNewKernel]).await;
    let evs = events(&api, agent.machine, ADMIN).await;
    assert!(!evs.last().unwrap().unexpected, "Installing → Booting New Kernel stays an expected step");
    api.stop().await;
}

/// Finding 4: a tenant sees its own allocation's timeline, not the previous tenant's, and every
/// question about a machine it cannot see is a 404.
#[tokio::test]
async fn tenants_see_only_their_own() {
    let db = Db::sqlite();
    let mut api = Api::start(&db).await;
    let cat = api.catalog().await;
    let (victim, a, _) = installed_victim(&api, &cat, 8).await;
    // p2 cannot see it, and asking for it by id says only "not found".
    for path in [format!("/v1/machines/{}", victim.machine), format!("/v1/machines/{}/events", victim.machine)] {
        assert_eq!(api.get(&path, &cat.tenant2).await.0, StatusCode::NOT_FOUND, "{path}");
    }
    let by_id = json!({"project": "p2", "partition": "lab", "machine": victim.machine, "image": "test-os", "hostname": "steal"});
    let (s, v) = api.post("/v1/allocations", &cat.tenant2, by_id).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "allocate-by-id of another project's machine: {v}");
    assert!(!v["message"].as_str().unwrap().contains("allocated"), "no hint about its state: {v}");
    // p1 frees it, p2 gets it: p2's timeline starts at its own allocation.
    let _: Machine = api.ok(Method::DELETE, &format!("/v1/machines/{}/allocation", victim.machine), &cat.tenant1, None).await;
    let mut again = Agent { credential: String::new(), ..Agent::new(8) };
    let d = again.pxe_boot(&api, &cat.pixie).await;
    again.register(&api, &d).await;
    again.events(&api, &[Ev::Waiting]).await;
    let b: Allocation = api
        .ok(
            Method::POST,
            "/v1/allocations",
            &cat.tenant2,
            Some(json!({"project": "p2", "partition": "lab", "size": "small", "image": "test-os", "hostname": "next"})),
        )
        .await;
    assert_eq!(b.machine, victim.machine);
    assert_ne!(b.id, a.id);
    let mine = events(&api, victim.machine, &cat.tenant2).await;
    let all = events(&api, victim.machine, ADMIN).await;
    assert!(mine.len() < all.len());
    assert!(!mine.iter().any(|e| e.event == Ev::PhonedHome || e.event == Ev::MachineReclaim), "p1's timeline leaked: {mine:?}");
    api.stop().await;
}

#[tokio::test]
async fn deleting_a_project_revokes_its_tokens_for_good() {
    let db = Db::sqlite();
    let mut api = Api::start(&db).await;
    let cat = api.catalog().await;
    assert_eq!(api.get("/v1/allocations", &cat.tenant2).await.0, StatusCode::OK);
    assert_eq!(api.delete("/v1/projects/p2", ADMIN).await.0, StatusCode::NO_CONTENT);
    assert_eq!(api.get("/v1/allocations", &cat.tenant2).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(api.post("/v1/projects", ADMIN, json!({"id": "p2"})).await.0, StatusCode::CREATED);
    assert_eq!(
        api.get("/v1/allocations", &cat.tenant2).await.0,
        StatusCode::UNAUTHORIZED,
        "a re-created project does not revive old tokens"
    );
    assert_eq!(api.get("/v1/allocations", &cat.tenant1).await.0, StatusCode::OK, "other projects' tokens are untouched");
    api.stop().await;
}

/// Finding 5: tokens can be listed, revoked and made to expire.
#[tokio::test]
async fn token_lifecycle() {
    let db = Db::sqlite();
    let mut api = Api::start(&db).await;
    let _cat = api.catalog().await;
    let t: TokenResponse = api
        .ok(
            Method::POST,
            "/v1/tokens",
            ADMIN,
            Some(json!({"role": "tenant", "project": "p1", "description": "ci", "expires_in_s": 1})),
        )
        .await;
    assert!(t.expires_at.is_some());
    let list: Vec<TokenInfo> = api.ok(Method::GET, "/v1/tokens", ADMIN, None).await;
    let row = list.iter().find(|i| i.id == t.id).expect("listed");
    assert_eq!(row.role, TokenRole::Tenant);
    assert_eq!(row.project.as_deref(), Some("p1"));
    assert_eq!(row.description, "ci");
    let text = serde_json::to_string(&list).unwrap();
    assert!(!text.contains(&t.token) && !text.contains(&t.token[4..]), "a listing never shows a token");
    assert!(
        list.iter().all(|i| matches!(i.role, TokenRole::Admin | TokenRole::Tenant | TokenRole::Pixie)),
        "machine credentials are not listed"
    );
    assert_eq!(api.get("/v1/tokens", &t.token).await.0, StatusCode::FORBIDDEN, "tenants do not list tokens");
    assert_eq!(api.get("/v1/allocations", &t.token).await.0, StatusCode::OK);
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    let (s, v) = api.get("/v1/allocations", &t.token).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "expired: {v}");

    let t: TokenResponse = api.ok(Method::POST, "/v1/tokens", ADMIN, Some(json!({"role": "pixie"}))).await;
    assert_eq!(
        api.post("/v1/boot/decide", &t.token, json!({"partition": "lab", "mac": "52:54:00:00:00:01", "arch": "bios_x86"}))
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(api.delete(&format!("/v1/tokens/{}", t.id), ADMIN).await.0, StatusCode::NO_CONTENT);
    assert_eq!(
        api.post("/v1/boot/decide", &t.token, json!({"partition": "lab", "mac": "52:54:00:00:00:01", "arch": "bios_x86"}))
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(api.delete(&format!("/v1/tokens/{}", t.id), ADMIN).await.0, StatusCode::NOT_FOUND);

    // The last admin token is not revoked: nobody could administer the API any more.
    let list: Vec<TokenInfo> = api.ok(Method::GET, "/v1/tokens", ADMIN, None).await;
    let admins: Vec<_> = list.iter().filter(|i| i.role == TokenRole::Admin).collect();
    assert_eq!(admins.len(), 1);
    let (s, v) = api.delete(&format!("/v1/tokens/{}", admins[0].id), ADMIN).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    api.stop().await;
}

#[tokio::test]
async fn a_weak_bootstrap_admin_token_is_refused() {
    let db = Db::sqlite();
    for weak in ["test-admin-token", "changeme", &"a".repeat(64), "0123456789abcdef"] {
        let config = metal_api::Config { db: db.url.clone(), admin_token: Some(weak.to_string()), ..Default::default() };
        let err = metal_api::start(config, "127.0.0.1:0").await.err().unwrap_or_else(|| panic!("{weak:?} was accepted"));
        let chain = format!("{:#}", anyhow::Error::from(err));
        assert!(chain.contains("128 bits"), "{weak:?}: {chain}");
    }
    let strong = metal_api::Config { db: db.url.clone(), admin_token: Some(ADMIN.into()), ..Default::default() };
    metal_api::start(strong, "127.0.0.1:0").await.expect("a strong token").stop().await;
}

/// Finding 12 (PostgreSQL): concurrent event batches of one machine must not overwrite each
/// other's state. Each batch is one crash (Installing, then a fresh agent's Preparing); 64 of
/// them at once must count 64 crashes.
async fn concurrent_events_lose_nothing(db: &Db) {
    let mut api = Api::start(db).await;
    let cat = api.catalog().await;
    let mut agent = Agent::new(9);
    agent.join_pool(&api, &cat.pixie).await;
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (base, cred) = (api.base.clone(), agent.credential.clone());
        tasks.push(tokio::spawn(async move {
            let body = json!({"events": [{"event": "Installing", "time_ms": 1}, {"event": "Preparing", "time_ms": 2}]});
            reqwest::Client::new()
                .post(format!("{base}/v1/agent/events"))
                .bearer_auth(cred)
                .json(&body)
                .send()
                .await
                .unwrap()
                .status()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::NO_CONTENT);
    }
    let crashes = sql_count(db, &format!("SELECT crash_count FROM machines WHERE id = '{}'", agent.machine)).await;
    assert_eq!(crashes, 64, "every batch counted");
    let evs = events(&api, agent.machine, ADMIN).await;
    assert_eq!(evs.iter().filter(|e| e.event == Ev::Installing).count(), 64);
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_events_lose_nothing_sqlite() {
    concurrent_events_lose_nothing(&Db::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_events_lose_nothing_postgres() {
    let Some(db) = Db::postgres().await else { return };
    concurrent_events_lose_nothing(&db).await;
}
