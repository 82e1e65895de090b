//! The OpenAPI document is generated from code and checked in at `api/openapi.json`.
//! This test fails when the two drift; `UPDATE_OPENAPI=1 cargo test -p metal-api --test openapi`
//! rewrites the file. It also checks that the server serves the same document and that every
//! documented operation is a real route.

mod common;

use common::*;
use reqwest::{Method, StatusCode};

const CHECKED_IN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json");

#[test]
fn checked_in_document_is_current() {
    let generated = metal_api::openapi::document_json();
    if std::env::var("UPDATE_OPENAPI").is_ok_and(|v| v == "1") {
        std::fs::write(CHECKED_IN, &generated).unwrap();
        return;
    }
    let checked_in = std::fs::read_to_string(CHECKED_IN).unwrap_or_default();
    assert!(
        checked_in == generated,
        "api/openapi.json is out of date with the code; run `UPDATE_OPENAPI=1 cargo test -p metal-api --test openapi` and commit it"
    );
}

#[tokio::test]
async fn served_document_matches_and_every_operation_is_routed() {
    let db = Db::sqlite();
    let mut api = Api::start(&db).await;
    let (s, served) = api.call(Method::GET, "/openapi.json", None, None).await;
    assert_eq!(s, StatusCode::OK);
    let doc = serde_json::to_value(metal_api::openapi::document()).unwrap();
    assert_eq!(served, doc);
    let (s, _) = api.call(Method::GET, "/swagger-ui/", None, None).await;
    assert_eq!(s, StatusCode::OK, "Swagger UI is served");

    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 20);
    for (path, item) in paths {
        for method in item.as_object().unwrap().keys() {
            let m: Method = method.to_uppercase().parse().unwrap();
            let p = path.replace("{id}", "x");
            // No token and no body: a routed operation answers 200/401/…, never 404/405.
            let (s, v) = api.call(m.clone(), &p, None, None).await;
            assert!(s != StatusCode::NOT_FOUND && s != StatusCode::METHOD_NOT_ALLOWED, "{m} {p}: {s} {v}");
        }
    }
    api.stop().await;
}

/// The typed client (`metal_client::api`) is written by hand, so this holds it to the document:
/// every documented operation is called once through it against a real API, and the API's own
/// request metrics (labelled by matched route) must then list exactly the documented operations.
#[tokio::test]
async fn the_typed_client_calls_every_documented_operation() {
    use metal_client::api::Client;
    use metal_client::sim::SimAgent;
    use metal_types::*;

    let db = Db::sqlite();
    let mut api = Api::start(&db).await;
    let admin = api.client(Some(ADMIN));
    let partition: Partition = serde_json::from_value(serde_json::json!({"id": "lab", "boot": {
        "kernel_url": "http://10.99.0.1:8081/hammer/vmlinuz", "initrd_url": "http://10.99.0.1:8081/hammer/initrd.img",
        "cmdline": "console=ttyS0", "api_url": api.base}}))
    .unwrap();
    let size: Size =
        serde_json::from_value(serde_json::json!({"id": "small", "constraints": [{"kind": "cores", "min": 1, "max": 4}]}))
            .unwrap();
    let layout: FilesystemLayout = serde_json::from_value(serde_json::json!({"id": "default",
        "disks": [{"device": "first", "partitions": [{"number": 1, "label": "root", "size_mib": 0, "type": "linux"}]}],
        "filesystems": [{"source": "first:1", "kind": "ext4", "mount": "/"}]}))
    .unwrap();
    let image: Image = serde_json::from_value(serde_json::json!({
        "url": "http://10.99.0.1:8081/images/test-os-1.tar.zst", "name": "test-os", "version": "1", "format": "tar.zst",
        "compressed_size": 1, "uncompressed_size": 1, "sha256": "a".repeat(64), "kernel": "boot/vmlinuz"}))
    .unwrap();
    let project = Project { id: "p1".into(), description: String::new() };

    assert_eq!(admin.health().await.unwrap(), r#"{"status":"ok"}"#);
    let token_request = |role, project: Option<&str>| TokenRequest {
        role,
        project: project.map(Into::into),
        description: String::new(),
        expires_in_s: None,
    };
    async fn crud<K: CatalogObject + std::fmt::Debug + PartialEq>(c: &Client, k: &K) {
        let (stored, created) = c.create(k).await.unwrap();
        assert!(created);
        assert!(c.list::<K>().await.unwrap().iter().any(|x| x.id() == stored.id()));
        assert_eq!(c.describe::<K>(stored.id()).await.unwrap().id(), stored.id());
    }
    crud(&admin, &partition).await;
    crud(&admin, &size).await;
    crud(&admin, &layout).await;
    crud(&admin, &project).await;
    crud(&admin, &image).await;

    let pixie = admin.create_token(&token_request(TokenRole::Pixie, None)).await.unwrap();
    let tenant = admin.create_token(&token_request(TokenRole::Tenant, Some("p1"))).await.unwrap();
    let spare = admin.create_token(&token_request(TokenRole::Pixie, None)).await.unwrap();
    assert!(admin.tokens().await.unwrap().len() >= 3);
    admin.revoke_token(&spare.id).await.unwrap();

    let pixie = admin.with_token(pixie.token);
    let tenant = admin.with_token(tenant.token);
    let mut sim = SimAgent::new(&admin, "lab", 1);
    sim.join_pool(&pixie).await.unwrap();
    let req = AllocationRequest {
        project: "p1".into(),
        partition: "lab".into(),
        size: Some("small".into()),
        machine: None,
        image: "test-os".into(),
        hostname: "h1".into(),
        layout: None,
        ssh_keys: vec![],
        user_data: String::new(),
        idempotency_key: None,
    };
    let a = tenant.allocate(&req).await.unwrap();
    assert!(a.created);
    assert_eq!(tenant.allocations().await.unwrap().len(), 1);
    assert_eq!(tenant.machines().await.unwrap().len(), 1);
    assert_eq!(tenant.machine(sim.id()).await.unwrap().id, sim.id());
    assert!(!admin.machine_events(sim.id()).await.unwrap().is_empty());
    let ins = sim.wait_for_allocation(std::time::Duration::from_secs(10)).await.unwrap();
    sim.install_and_phone_home(&ins).await.unwrap();
    tenant.free_machine(sim.id()).await.unwrap();
    admin.delete::<Image>(&image.manifest.id()).await.unwrap();
    admin.delete::<FilesystemLayout>("default").await.unwrap();
    admin.delete::<Size>("small").await.unwrap();
    admin.delete::<Project>("p1").await.unwrap();
    admin.delete::<Partition>("lab").await.unwrap();

    let called: std::collections::BTreeSet<(String, String)> = admin
        .metrics()
        .await
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("metal_http_requests_total{"))
        .filter_map(|l| {
            let label = |k: &str| l.split(&format!("{k}=\"")).nth(1)?.split('"').next().map(str::to_string);
            Some((label("method")?.to_lowercase(), label("route")?))
        })
        .chain([("get".to_string(), "/metrics".to_string())]) // this very request
        .collect();
    let doc = serde_json::to_value(metal_api::openapi::document()).unwrap();
    let documented: std::collections::BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| item.as_object().unwrap().keys().map(move |m| (m.clone(), path.clone())))
        .collect();
    let missing: Vec<_> = documented.difference(&called).collect();
    let undocumented: Vec<_> = called.difference(&documented).collect();
    assert!(missing.is_empty(), "documented operations the typed client did not call: {missing:?}");
    assert!(undocumented.is_empty(), "operations the typed client called that the document lacks: {undocumented:?}");
    api.stop().await;
}
