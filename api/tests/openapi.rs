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
