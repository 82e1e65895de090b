//! Operations and the state machine through the API: /healthz, /metrics, crash-loop and
//! failed-reclaim detection, liveliness, images by name.

mod common;

use common::*;
use metal_types::ProvisioningEvent as Ev;
use metal_types::*;
use reqwest::{Method, StatusCode};
use serde_json::json;

fn alloc_body(hostname: &str) -> serde_json::Value {
    json!({"project": "p1", "partition": "lab", "size": "small", "image": "test-os", "hostname": hostname})
}

#[tokio::test]
async fn healthz_and_metrics() {
    let db = Db::sqlite();
    let mut api = Api::start(&db).await;
    let (s, v) = api.call(Method::GET, "/healthz", None, None).await;
    assert_eq!((s, v["status"].as_str()), (StatusCode::OK, Some("ok")));
    let cat = api.catalog().await;
    for i in 0..3 {
        Agent::new(20 + i).join_pool(&api, &cat.pixie).await;
    }
    let _: Allocation = api.ok(Method::POST, "/v1/allocations", &cat.tenant1, Some(alloc_body("m1"))).await;
    let text = api.http.get(format!("{}/metrics", api.base)).send().await.unwrap().text().await.unwrap();
    assert!(text.contains("metal_machines{state=\"Waiting\"} 3"), "{text}");
    assert!(text.contains("metal_allocations_total 1"), "{text}");
    assert!(text.contains("metal_allocations_active 1"), "{text}");
    assert!(text.contains("metal_http_request_duration_seconds_count{method=\"POST\",route=\"/v1/allocations\"} 1"), "{text}");
    assert!(text.contains("metal_http_requests_total{method=\"POST\",route=\"/v1/agent/register\",status=\"200\"} 3"), "{text}");
    api.stop().await;
}

#[tokio::test]
async fn crash_loop_is_detected_and_a_reclaim_resets_it() {
    let db = Db::sqlite();
    let mut api = Api::start(&db).await;
    let cat = api.catalog().await;
    let mut agent = Agent::new(30);
    agent.join_pool(&api, &cat.pixie).await;
    let a: Allocation = api.ok(Method::POST, "/v1/allocations", &cat.tenant1, Some(alloc_body("cl"))).await;
    for attempt in 1..=metal_api::fsm::CRASH_LOOP_THRESHOLD {
        // The agent comes back after a crash, still allocated: the first wait returns the same install.
        let instr = agent.wait(&api, 0).await.expect("still allocated");
        assert_eq!(instr.allocation, a.id);
        agent.events(&api, &[Ev::Installing]).await;
        // The machine dies mid-install and PXE boots again; pixie's sighting alone is no crash.
        let d = agent.pxe_boot(&api, &cat.pixie).await;
        assert!(matches!(d, BootDecision::Hammer { .. }));
        let m: Machine = api.ok(Method::GET, &format!("/v1/machines/{}", agent.machine), ADMIN, None).await;
        assert_eq!(m.state, Some(Ev::Installing));
        assert_eq!(m.crash_loop, attempt > metal_api::fsm::CRASH_LOOP_THRESHOLD, "attempt {attempt}");
        // metal-hammer starting again is.
        agent.register(&api, &d).await;
        let m: Machine = api.ok(Method::GET, &format!("/v1/machines/{}", agent.machine), ADMIN, None).await;
        assert_eq!(m.crash_loop, attempt >= metal_api::fsm::CRASH_LOOP_THRESHOLD, "attempt {attempt}");
        agent.events(&api, &[Ev::Waiting]).await;
    }
    // (A crash-looping machine is never picked: see policy::tests.) A reclaim starts over.
    let m: Machine = api.ok(Method::DELETE, &format!("/v1/machines/{}/allocation", agent.machine), ADMIN, None).await;
    assert!(!m.crash_loop, "a reclaim starts over");
    api.stop().await;
}

#[tokio::test]
async fn failed_reclaim_when_waiting_does_not_come_in_time() {
    let db = Db::sqlite();
    let mut api = Api::start_with(&db, |c| c.reclaim_timeout_s = 1).await;
    let cat = api.catalog().await;
    let mut agent = Agent::new(40);
    agent.join_pool(&api, &cat.pixie).await;
    let a: Allocation = api.ok(Method::POST, "/v1/allocations", &cat.tenant1, Some(alloc_body("fr"))).await;
    let instr = agent.wait(&api, 0).await.unwrap();
    agent.events(&api, &[Ev::Installing]).await;
    let report = json!({"allocation": a.id, "success": true});
    assert_eq!(api.post("/v1/agent/install-report", &agent.credential, report).await.0, StatusCode::NO_CONTENT);
    agent.events(&api, &[Ev::BootingNewKernel]).await;
    let ph = json!({"machine": agent.machine, "time_ms": 1});
    assert_eq!(api.post("/v1/agent/phone-home", &instr.phone_home.token, ph.clone()).await.0, StatusCode::NO_CONTENT);
    let m: Machine = api.ok(Method::DELETE, &format!("/v1/machines/{}/allocation", agent.machine), &cat.tenant1, None).await;
    assert!(!m.failed_reclaim);
    // The power cycle did not reach metal-hammer: the old OS booted and phones home. Its token
    // died with the allocation, so that changes nothing; the reclaim deadline tells.
    let (s, v) = api.post("/v1/agent/phone-home", &instr.phone_home.token, ph).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
    let m: Machine = api.ok(Method::GET, &format!("/v1/machines/{}", agent.machine), ADMIN, None).await;
    assert_eq!(m.state, Some(Ev::MachineReclaim));
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let m: Machine = api.ok(Method::GET, &format!("/v1/machines/{}", agent.machine), ADMIN, None).await;
    assert!(m.failed_reclaim, "no Waiting within the reclaim timeout");
    // The freed machine boots metal-hammer, not its disk, and a good reclaim clears the flag.
    let d = agent.pxe_boot(&api, &cat.pixie).await;
    assert!(matches!(d, BootDecision::Hammer { .. }));
    agent.register(&api, &d).await;
    agent.events(&api, &[Ev::Waiting]).await;
    let m: Machine = api.ok(Method::GET, &format!("/v1/machines/{}", agent.machine), ADMIN, None).await;
    assert!(!m.failed_reclaim);
    api.stop().await;
}

#[tokio::test]
async fn dead_machines_are_not_allocated() {
    let db = Db::sqlite();
    // Dead after 2 s; a parked wait beats every second, so a beat may lag up to a second under
    // load before the assertion during the poll could see Dead.
    let mut api = Api::start_with(&db, |c| c.dead_after_s = 2).await;
    let cat = api.catalog().await;
    let mut agent = Agent::new(50);
    agent.join_pool(&api, &cat.pixie).await;
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await; // let the heartbeat age
    let m: Machine = api.ok(Method::GET, &format!("/v1/machines/{}", agent.machine), ADMIN, None).await;
    assert_eq!(m.liveliness, Liveliness::Dead);
    let (s, v) = api.post("/v1/allocations", &cat.tenant1, alloc_body("d")).await;
    assert_eq!((s, v["code"].as_str()), (StatusCode::CONFLICT, Some("no_machine_available")), "{v}");
    // A parked wait keeps beating: the machine stays alive through a long poll.
    let (base, cred) = (api.base.clone(), agent.credential.clone());
    let poll = tokio::spawn(async move {
        reqwest::Client::new().get(format!("{base}/v1/agent/wait?timeout_s=5")).bearer_auth(cred).send().await.unwrap().status()
    });
    tokio::time::sleep(std::time::Duration::from_millis(3000)).await;
    let m: Machine = api.ok(Method::GET, &format!("/v1/machines/{}", agent.machine), ADMIN, None).await;
    assert_eq!(m.liveliness, Liveliness::Alive, "during a long poll");
    assert_eq!(poll.await.unwrap(), StatusCode::NO_CONTENT);
    // One heartbeat (a wait) and it is alive and allocatable again.
    assert_eq!(agent.wait(&api, 0).await, None);
    let (s, v) = api.post("/v1/allocations", &cat.tenant1, alloc_body("d")).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    api.stop().await;
}

#[tokio::test]
async fn heartbeats_are_seen_at_once_written_within_a_second_and_not_lost_on_shutdown() {
    let db = Db::sqlite();
    let mut api = Api::start(&db).await;
    let cat = api.catalog().await;
    let mut agent = Agent::new(51);
    agent.join_pool(&api, &cat.pixie).await;
    let stored = format!("SELECT last_seen_ms FROM machines WHERE id = '{}'", agent.machine);
    let last_seen = |m: &Machine| metal_api::parse_rfc3339(m.last_seen.as_deref().expect("last_seen")).expect("RFC 3339");

    // A beat shows in the API at once, and reaches the database within the flush interval.
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let before = metal_api::now_ms();
    assert_eq!(agent.wait(&api, 0).await, None);
    let m: Machine = api.ok(Method::GET, &format!("/v1/machines/{}", agent.machine), ADMIN, None).await;
    assert!(last_seen(&m) >= before, "the API shows the beat it was just sent");
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert!(sql_i64(&db, &stored).await >= before, "written by the flusher within its interval");

    // The allocator sees a beat not yet flushed (SQLite writes pending beats with the batch).
    let before = metal_api::now_ms();
    assert_eq!(agent.wait(&api, 0).await, None);
    let (s, v) = api.post("/v1/allocations", &cat.tenant1, alloc_body("hb")).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert!(sql_i64(&db, &stored).await >= before, "written with the allocation");

    // A beat just before a shutdown is written by the shutdown.
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let before = metal_api::now_ms();
    agent.wait(&api, 0).await.expect("instructions of the allocation");
    api.stop().await;
    assert!(sql_i64(&db, &stored).await >= before, "the last beat is not lost on shutdown");
}

#[tokio::test]
async fn image_names_resolve_to_the_newest_unexpired_version() {
    let db = Db::sqlite();
    let mut api = Api::start(&db).await;
    api.catalog().await; // test-os-20261124
    let image = |version: &str, expires: Option<&str>| {
        json!({"url": format!("http://x/test-os-{version}.tar.zst"), "name": "test-os", "version": version,
               "format": "tar.zst", "compressed_size": 1, "uncompressed_size": 2, "sha256": "c".repeat(64),
               "kernel": "boot/vmlinuz", "expires_at": expires})
    };
    let (s, _) = api.post("/v1/images", ADMIN, image("20261124.1", None)).await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, _) = api.post("/v1/images", ADMIN, image("20261124.1", None)).await;
    assert_eq!(s, StatusCode::OK, "posting the identical image again is idempotent");
    let (s, _) = api.post("/v1/images", ADMIN, image("20270101", Some("2020-01-01T00:00:00Z"))).await;
    assert_eq!(s, StatusCode::CREATED);
    let i: Image = api.ok(Method::GET, "/v1/images/test-os", ADMIN, None).await;
    assert_eq!(i.id, "test-os-20261124.1", "the expired 20270101 is skipped");
    let i: Image = api.ok(Method::GET, "/v1/images/test-os-20270101", ADMIN, None).await;
    assert_eq!(i.id, "test-os-20270101", "an exact id still resolves");
    let (s, _) = api.delete("/v1/images/test-os-20261124.1", ADMIN).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let i: Image = api.ok(Method::GET, "/v1/images/test-os", ADMIN, None).await;
    assert_eq!(i.id, "test-os-20261124");
    api.stop().await;
}

#[tokio::test]
async fn shutdown_ends_parked_waits_at_once() {
    let db = Db::sqlite();
    let mut api = Api::start(&db).await;
    let cat = api.catalog().await;
    let mut agent = Agent::new(60);
    agent.join_pool(&api, &cat.pixie).await;
    let (base, cred) = (api.base.clone(), agent.credential.clone());
    let poll = tokio::spawn(async move {
        let t = std::time::Instant::now();
        let r = reqwest::Client::new().get(format!("{base}/v1/agent/wait?timeout_s=60")).bearer_auth(cred).send().await.unwrap();
        (r.status(), t.elapsed())
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await; // let the wait park
    tokio::time::timeout(std::time::Duration::from_secs(10), api.stop()).await.expect("stop does not wait for long polls");
    let (status, took) = poll.await.unwrap();
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(took < std::time::Duration::from_secs(10), "{took:?}");
}

/// Finding 10 of issue 11: `/metrics` was keyed by the raw HTTP method, so requests with
/// invented methods grew it without bound (3,000 of them made it 15 MB). Every label is bounded.
#[tokio::test]
async fn metrics_labels_are_bounded() {
    let db = Db::sqlite();
    let mut api = Api::start(&db).await;
    for i in 0..300 {
        let method = Method::from_bytes(format!("BREW{i}").as_bytes()).unwrap();
        let (s, _) = api.call(method, &format!("/v1/no/such/route/{i}"), None, None).await;
        assert!(s.is_client_error(), "{s}");
    }
    let text = api.http.get(format!("{}/metrics", api.base)).send().await.unwrap().text().await.unwrap();
    assert!(!text.contains("BREW"), "a raw method became a label");
    assert!(!text.contains("/v1/no/such"), "a raw path became a label");
    assert!(text.contains("method=\"OTHER\""), "{text}");
    assert!(text.len() < 64 * 1024, "{} bytes after 300 odd requests", text.len());
    // What an operator expects from any service: who it is and what it costs.
    assert!(text.contains("metal_build_info{component=\"metal-api\""), "{text}");
    for m in ["process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds"] {
        assert!(text.contains(m), "{m} missing");
    }
    api.stop().await;
}
