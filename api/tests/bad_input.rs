//! Bad input of every kind gets a 4xx `ApiError` with a stable code and a message that says what
//! is wrong — never a 500, never axum's plain text — and changes nothing.

mod common;

use common::*;
use metal_types::ProvisioningEvent as Ev;
use metal_types::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// Asserts a 4xx `ApiError` with `code` whose message contains every `needle`.
fn expect_error(what: &str, got: (StatusCode, Value), status: StatusCode, code: &str, needles: &[&str]) {
    let (s, v) = got;
    assert_eq!(s, status, "{what}: {v}");
    let e: ApiError = serde_json::from_value(v.clone()).unwrap_or_else(|_| panic!("{what}: body is not an ApiError: {v}"));
    assert_eq!(e.code, code, "{what}: {}", e.message);
    for n in needles {
        assert!(e.message.contains(n), "{what}: message {:?} should mention {n:?}", e.message);
    }
}

async fn raw(
    api: &Api,
    method: Method,
    path: &str,
    token: Option<&str>,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> (StatusCode, Value) {
    let mut req = api.http.request(method, format!("{}{path}", api.base)).body(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    let r = req.send().await.unwrap();
    let s = r.status();
    let b = r.bytes().await.unwrap();
    (s, serde_json::from_slice(&b).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&b).into())))
}

/// Everything observable that bad requests must not change.
async fn snapshot(api: &Api, machine: MachineId) -> Value {
    let machines: Value = api.ok(Method::GET, "/v1/machines", ADMIN, None).await;
    let allocs: Value = api.ok(Method::GET, "/v1/allocations", ADMIN, None).await;
    let events: Value = api.ok(Method::GET, &format!("/v1/machines/{machine}/events"), ADMIN, None).await;
    let mut machines = machines;
    for m in machines.as_array_mut().unwrap() {
        m.as_object_mut().unwrap().remove("last_seen"); // heartbeats move on
    }
    json!({"machines": machines, "allocations": allocs, "events": events,
           "partitions": api.ok::<Value>(Method::GET, "/v1/partitions", ADMIN, None).await,
           "images": api.ok::<Value>(Method::GET, "/v1/images", ADMIN, None).await,
           "projects": api.ok::<Value>(Method::GET, "/v1/projects", ADMIN, None).await})
}

#[tokio::test]
async fn bad_input_is_refused_clearly_and_changes_nothing_sqlite() {
    bad_input(&Db::sqlite()).await;
}

#[tokio::test]
async fn bad_input_is_refused_clearly_and_changes_nothing_postgres() {
    let Some(db) = Db::postgres().await else { return };
    bad_input(&db).await;
    db.drop_pg().await;
}

async fn bad_input(db: &Db) {
    let mut api = Api::start(db).await;
    let cat = api.catalog().await;
    let mut agent = Agent::new(7);
    agent.join_pool(&api, &cat.pixie).await;
    let mut idle = Agent::new(8);
    idle.join_pool(&api, &cat.pixie).await;
    let alloc_req = json!({"project": "p1", "partition": "lab", "machine": agent.machine, "image": "test-os", "hostname": "h1"});
    let alloc: Allocation = api.ok(Method::POST, "/v1/allocations", &cat.tenant1, Some(alloc_req)).await;
    let before = snapshot(&api, agent.machine).await;
    let t1 = cat.tenant1.as_str();
    let t2 = cat.tenant2.as_str();
    let bad_req = StatusCode::BAD_REQUEST;

    // Malformed and strict JSON.
    let json_ct = Some("application/json");
    expect_error(
        "malformed JSON",
        raw(&api, Method::POST, "/v1/allocations", Some(t1), json_ct, b"{\"project\": ".to_vec()).await,
        bad_req,
        "bad_request",
        &["JSON"],
    );
    expect_error(
        "not JSON at all",
        raw(&api, Method::POST, "/v1/partitions", Some(ADMIN), json_ct, b"hello".to_vec()).await,
        bad_req,
        "bad_request",
        &["JSON"],
    );
    expect_error(
        "no content type",
        raw(&api, Method::POST, "/v1/partitions", Some(ADMIN), None, b"{}".to_vec()).await,
        bad_req,
        "bad_request",
        &["Content-Type"],
    );
    let unknown_field =
        json!({"project": "p1", "partition": "lab", "size": "small", "image": "test-os", "hostname": "h2", "colour": "red"});
    expect_error("unknown field", api.post("/v1/allocations", t1, unknown_field).await, bad_req, "bad_request", &["colour"]);
    expect_error(
        "missing field",
        api.post("/v1/allocations", t1, json!({"project": "p1"})).await,
        bad_req,
        "bad_request",
        &["partition"],
    );
    expect_error(
        "wrong type",
        api.post("/v1/sizes", ADMIN, json!({"id": "x", "constraints": "many"})).await,
        bad_req,
        "bad_request",
        &["constraints"],
    );
    let huge = vec![b' '; 2 * 1024 * 1024];
    expect_error(
        "oversized body",
        raw(&api, Method::POST, "/v1/agent/events", Some(&agent.credential), json_ct, huge).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        &["too large"],
    );

    // Bad UUIDs, in paths and bodies.
    expect_error(
        "bad uuid in path",
        api.get("/v1/machines/not-a-uuid", ADMIN).await,
        bad_req,
        "bad_request",
        &["not-a-uuid", "UUID"],
    );
    expect_error("bad uuid in free", api.delete("/v1/machines/1234/allocation", ADMIN).await, bad_req, "bad_request", &["UUID"]);
    expect_error(
        "bad uuid in body",
        api.post(
            "/v1/boot/pxe-event",
            &cat.pixie,
            json!({"partition": "lab", "mac": "52:54:00:00:00:01", "uuid": "zzz", "arch": "bios_x86"}),
        )
        .await,
        bad_req,
        "bad_request",
        &["uuid"],
    );
    expect_error(
        "bad query",
        api.get("/v1/agent/wait?timeout_s=soon", &agent.credential).await,
        bad_req,
        "bad_request",
        &["timeout_s"],
    );

    // Credentials: missing, wrong, the wrong kind.
    expect_error(
        "no token",
        api.call(Method::GET, "/v1/machines", None, None).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        &["Authorization: Bearer"],
    );
    expect_error(
        "wrong token",
        api.get("/v1/machines", "adm_0000").await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        &["not valid"],
    );
    let basic =
        api.http.get(format!("{}/v1/machines", api.base)).header("authorization", "Basic Zm9vOmJhcg==").send().await.unwrap();
    assert_eq!(basic.status(), StatusCode::UNAUTHORIZED);
    expect_error(
        "tenant on admin route",
        api.post("/v1/projects", t1, json!({"id": "p3"})).await,
        StatusCode::FORBIDDEN,
        "forbidden",
        &["admin token", "tenant token of project p1"],
    );
    expect_error(
        "tenant makes tokens",
        api.post("/v1/tokens", t1, json!({"role": "admin"})).await,
        StatusCode::FORBIDDEN,
        "forbidden",
        &["admin token"],
    );
    expect_error(
        "machine credential on admin route",
        api.get("/v1/machines", &agent.credential).await,
        StatusCode::FORBIDDEN,
        "forbidden",
        &["admin or tenant"],
    );
    expect_error(
        "admin on agent route",
        api.get("/v1/agent/wait?timeout_s=0", ADMIN).await,
        StatusCode::FORBIDDEN,
        "forbidden",
        &["machine credential"],
    );
    expect_error(
        "tenant as pixie",
        api.post("/v1/boot/decide", t1, json!({"partition": "lab", "mac": "52:54:00:00:00:01", "arch": "bios_x86"})).await,
        StatusCode::FORBIDDEN,
        "forbidden",
        &["pixie"],
    );
    expect_error(
        "machine credential registers",
        api.post(
            "/v1/agent/register",
            &agent.credential,
            json!({"partition": "lab", "inventory": inventory(agent.machine, &agent.mac)}),
        )
        .await,
        StatusCode::FORBIDDEN,
        "forbidden",
        &["enrolment token"],
    );
    expect_error(
        "machine credential phones home",
        api.post("/v1/agent/phone-home", &agent.credential, json!({"machine": agent.machine, "time_ms": 1})).await,
        StatusCode::FORBIDDEN,
        "forbidden",
        &["phone-home token"],
    );
    // A machine reports only for itself: the idle machine's credential cannot touch the allocation.
    expect_error(
        "other machine's install report",
        api.post("/v1/agent/install-report", &idle.credential, json!({"allocation": alloc.id, "success": true})).await,
        StatusCode::CONFLICT,
        "conflict",
        &["not this machine's"],
    );

    // Another project's things look like they do not exist.
    let path = format!("/v1/machines/{}", agent.machine);
    expect_error("other project's machine", api.get(&path, t2).await, StatusCode::NOT_FOUND, "not_found", &["not found"]);
    expect_error("other project's events", api.get(&format!("{path}/events"), t2).await, StatusCode::NOT_FOUND, "not_found", &[]);
    expect_error(
        "other project's free",
        api.delete(&format!("{path}/allocation"), t2).await,
        StatusCode::NOT_FOUND,
        "not_found",
        &[],
    );
    expect_error(
        "allocate in other project",
        api.post(
            "/v1/allocations",
            t2,
            json!({"project": "p1", "partition": "lab", "size": "small", "image": "test-os", "hostname": "h3"}),
        )
        .await,
        StatusCode::NOT_FOUND,
        "not_found",
        &["project p1", "p2"],
    );
    expect_error("other project", api.get("/v1/projects/p1", t2).await, StatusCode::NOT_FOUND, "not_found", &[]);
    let visible: Vec<Machine> = api.ok(Method::GET, "/v1/machines", t2, None).await;
    assert!(visible.is_empty(), "tenant p2 sees no machines");
    let visible: Vec<Allocation> = api.ok(Method::GET, "/v1/allocations", t2, None).await;
    assert!(visible.is_empty());
    let visible: Vec<Machine> = api.ok(Method::GET, "/v1/machines", t1, None).await;
    assert_eq!(visible.len(), 1, "tenant p1 sees only its allocated machine");

    // Semantically wrong requests.
    let base = json!({"project": "p1", "partition": "lab", "size": "small", "image": "test-os", "hostname": "ok"});
    let with = |k: &str, v: Value| {
        let mut b = base.clone();
        b[k] = v;
        b
    };
    expect_error(
        "unknown image",
        api.post("/v1/allocations", t1, with("image", json!("windows"))).await,
        StatusCode::NOT_FOUND,
        "not_found",
        &["image windows"],
    );
    expect_error(
        "unknown size",
        api.post("/v1/allocations", t1, with("size", json!("huge"))).await,
        StatusCode::NOT_FOUND,
        "not_found",
        &["size huge"],
    );
    expect_error(
        "unknown partition",
        api.post("/v1/allocations", t1, with("partition", json!("mars"))).await,
        StatusCode::NOT_FOUND,
        "not_found",
        &["partition mars"],
    );
    expect_error(
        "bad hostname",
        api.post("/v1/allocations", t1, with("hostname", json!("no spaces please"))).await,
        bad_req,
        "bad_request",
        &["hostname"],
    );
    expect_error(
        "unknown layout",
        api.post("/v1/allocations", t1, with("layout", json!("nope"))).await,
        StatusCode::NOT_FOUND,
        "not_found",
        &["layout nope"],
    );
    let mut no_size = base.clone();
    no_size.as_object_mut().unwrap().remove("size");
    expect_error("neither size nor machine", api.post("/v1/allocations", t1, no_size).await, bad_req, "bad_request", &["size"]);
    expect_error(
        "allocated machine",
        api.post("/v1/allocations", t1, with("machine", json!(agent.machine))).await,
        StatusCode::CONFLICT,
        "no_machine_available",
        &["already allocated"],
    );
    expect_error(
        "unknown machine",
        api.post("/v1/allocations", t1, with("machine", json!(MachineId::new_random()))).await,
        StatusCode::NOT_FOUND,
        "not_found",
        &[],
    );
    expect_error(
        "free a free machine",
        api.delete(&format!("/v1/machines/{}/allocation", idle.machine), ADMIN).await,
        StatusCode::CONFLICT,
        "conflict",
        &["not allocated"],
    );
    expect_error(
        "unknown partition decide",
        api.post("/v1/boot/decide", &cat.pixie, json!({"partition": "mars", "mac": "52:54:00:00:00:01", "arch": "bios_x86"}))
            .await,
        StatusCode::NOT_FOUND,
        "not_found",
        &["partition mars"],
    );
    expect_error(
        "changed partition",
        api.post(
            "/v1/partitions",
            ADMIN,
            json!({"id": "lab", "boot": {"kernel_url": "http://x/k", "initrd_url": "http://x/i", "api_url": "http://x"}}),
        )
        .await,
        StatusCode::CONFLICT,
        "conflict",
        &["different content"],
    );
    expect_error(
        "bad partition url",
        api.post(
            "/v1/partitions",
            ADMIN,
            json!({"id": "p9", "boot": {"kernel_url": "ftp://x/k", "initrd_url": "http://x/i", "api_url": "http://x"}}),
        )
        .await,
        bad_req,
        "bad_request",
        &["kernel_url"],
    );
    expect_error(
        "bad size",
        api.post("/v1/sizes", ADMIN, json!({"id": "inv", "constraints": [{"kind": "cores", "min": 4, "max": 2}]})).await,
        bad_req,
        "bad_request",
        &["min"],
    );
    expect_error("bad id", api.post("/v1/projects", ADMIN, json!({"id": "Bad Id"})).await, bad_req, "bad_request", &["id"]);
    let img = json!({"url": "http://x/i.tar.zst", "name": "deb", "version": "1", "format": "tar.zst", "compressed_size": 1,
                     "uncompressed_size": 1, "sha256": "nothex", "kernel": "boot/vmlinuz"});
    expect_error("bad sha256", api.post("/v1/images", ADMIN, img.clone()).await, bad_req, "bad_request", &["sha256"]);
    let mut img2 = img.clone();
    img2["sha256"] = json!("b".repeat(64));
    img2["id"] = json!("something-else");
    expect_error("image id mismatch", api.post("/v1/images", ADMIN, img2).await, bad_req, "bad_request", &["deb-1"]);
    let mut img3 = img.clone();
    img3["sha256"] = json!("b".repeat(64));
    img3["format"] = json!("zip");
    expect_error("bad image format", api.post("/v1/images", ADMIN, img3).await, bad_req, "bad_request", &["zip", "tar.zst"]);
    expect_error(
        "tenant token without project",
        api.post("/v1/tokens", ADMIN, json!({"role": "tenant"})).await,
        bad_req,
        "bad_request",
        &["project"],
    );
    expect_error(
        "tenant token for unknown project",
        api.post("/v1/tokens", ADMIN, json!({"role": "tenant", "project": "ghost"})).await,
        StatusCode::NOT_FOUND,
        "not_found",
        &["ghost"],
    );
    expect_error(
        "delete project in use",
        api.delete("/v1/projects/p1", ADMIN).await,
        StatusCode::CONFLICT,
        "conflict",
        &["active allocations"],
    );

    // Unknown routes and methods are JSON too.
    expect_error("unknown route", api.get("/v1/nothing", ADMIN).await, StatusCode::NOT_FOUND, "not_found", &["openapi.json"]);
    expect_error(
        "wrong method",
        api.call(Method::PUT, "/v1/machines", Some(ADMIN), None).await,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        &[],
    );

    assert_eq!(snapshot(&api, agent.machine).await, before, "bad requests changed something");
    api.stop().await;
}

#[tokio::test]
async fn expired_or_foreign_enrolment_tokens_do_not_register() {
    let db = Db::sqlite();
    let mut api = Api::start_with(&db, |c| c.enrolment_ttl_s = 0).await;
    let cat = api.catalog().await;
    let mut agent = Agent::new(9);
    let d = agent.pxe_boot(&api, &cat.pixie).await;
    let BootDecision::Hammer { cmdline, .. } = &d else { panic!() };
    let params = metal_types::cmdline::HammerParams::parse(cmdline).unwrap();
    let body = json!({"partition": "lab", "inventory": inventory(agent.machine, &agent.mac)});
    expect_error(
        "expired enrolment",
        api.post("/v1/agent/register", &params.enrolment_token, body).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        &["expired"],
    );
    api.stop().await;

    // A token for partition lab does not register into another partition.
    let db = Db::sqlite();
    let mut api = Api::start(&db).await;
    let cat = api.catalog().await;
    let p2 = json!({"id": "lab2", "boot": {"kernel_url": "http://x/k", "initrd_url": "http://x/i", "api_url": api.base}});
    assert_eq!(api.post("/v1/partitions", ADMIN, p2).await.0, StatusCode::CREATED);
    let d = agent.pxe_boot(&api, &cat.pixie).await;
    let BootDecision::Hammer { cmdline, .. } = &d else { panic!() };
    let params = metal_types::cmdline::HammerParams::parse(cmdline).unwrap();
    let body = json!({"partition": "lab2", "inventory": inventory(agent.machine, &agent.mac)});
    expect_error(
        "foreign partition",
        api.post("/v1/agent/register", &params.enrolment_token, body).await,
        StatusCode::FORBIDDEN,
        "forbidden",
        &["partition lab"],
    );
    // A token is good only for the machine that PXE booted with it (its MAC).
    let other = Agent::new(11);
    let body = json!({"partition": "lab", "inventory": inventory(other.machine, &other.mac)});
    expect_error(
        "another machine's token",
        api.post("/v1/agent/register", &params.enrolment_token, body).await,
        StatusCode::FORBIDDEN,
        "forbidden",
        &["MAC", &agent.mac],
    );
    // The right partition and machine work, with the same token.
    agent.register(&api, &d).await;
    api.stop().await;
}

#[tokio::test]
async fn unexpected_events_are_kept_and_flagged() {
    let db = Db::sqlite();
    let mut api = Api::start(&db).await;
    let cat = api.catalog().await;
    let mut agent = Agent::new(10);
    agent.join_pool(&api, &cat.pixie).await;
    // Booting New Kernel without Installing, then Alive (a heartbeat) and an unknown event name.
    agent.events(&api, &[Ev::BootingNewKernel, Ev::Alive]).await;
    let (s, v) = api.post("/v1/agent/events", &agent.credential, json!({"events": [{"event": "Exploded", "time_ms": 1}]})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let events: Vec<MachineEvent> = api.ok(Method::GET, &format!("/v1/machines/{}/events", agent.machine), ADMIN, None).await;
    assert_eq!(event_names(&events), ["Preparing", "Registering", "Waiting", "Booting New Kernel"]);
    assert!(events[3].unexpected && !events[2].unexpected);
    let m: Machine = api.ok(Method::GET, &format!("/v1/machines/{}", agent.machine), ADMIN, None).await;
    assert_eq!(m.state, Some(Ev::BootingNewKernel));
    // It is no longer Waiting, so it is not picked.
    let (s, v) = api
        .post(
            "/v1/allocations",
            &cat.tenant1,
            json!({"project": "p1", "partition": "lab", "size": "small", "image": "test-os", "hostname": "x"}),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert_eq!(v["code"], "no_machine_available");
    api.stop().await;
}
