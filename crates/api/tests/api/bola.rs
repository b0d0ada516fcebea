//! Another organization's ids must look exactly like missing ones, and
//! nothing may change through them.

use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{OrgFixture, TestApp};

/// Everything an org owns, as the database sees it.
async fn snapshot(app: &TestApp, fx: &OrgFixture) -> Value {
    let db = &app.db.db;
    let org: Uuid = fx.id.parse().unwrap();
    let owner: Uuid = fx.owner_id.parse().unwrap();
    let providers = db.list_provider_keys(org).await.unwrap();
    let keys = db.list_api_keys(org, None, 200).await.unwrap().data;
    let members = db.list_members(org).await.unwrap();
    let invitations = db.list_invitations(org).await.unwrap();
    let audit = db.list_audit(org, None, 200).await.unwrap().data.len();
    let name = db.org_for_member(org, owner).await.unwrap().name;
    let tokens: Vec<String> = {
        let mut t = Vec::new();
        for p in &providers {
            t.push(
                db.provider_key_with_token(org, p.id)
                    .await
                    .unwrap()
                    .token
                    .expose_secret()
                    .to_owned(),
            );
        }
        t
    };
    json!({"providers": providers, "keys": keys, "members": members, "invitations": invitations,
           "audit": audit, "name": name, "tokens": tokens})
}

/// Every org-scoped route, with `{org}`, `{provider}`, `{key}`, `{user}`, `{inv}` to fill in.
const ROUTES: &[(&str, &str, Option<&str>)] = &[
    ("GET", "/api/v1/orgs/{org}", None),
    ("PATCH", "/api/v1/orgs/{org}", Some(r#"{"name":"pwned"}"#)),
    ("DELETE", "/api/v1/orgs/{org}", None),
    ("GET", "/api/v1/orgs/{org}/members", None),
    (
        "POST",
        "/api/v1/orgs/{org}/members",
        Some(r#"{"email":"intruder@x.example.com","role":"owner"}"#),
    ),
    (
        "PATCH",
        "/api/v1/orgs/{org}/members/{user}",
        Some(r#"{"role":"owner"}"#),
    ),
    ("DELETE", "/api/v1/orgs/{org}/members/{user}", None),
    ("GET", "/api/v1/orgs/{org}/invitations", None),
    ("GET", "/api/v1/orgs/{org}/invitations/{inv}", None),
    ("DELETE", "/api/v1/orgs/{org}/invitations/{inv}", None),
    ("GET", "/api/v1/orgs/{org}/provider-keys", None),
    (
        "POST",
        "/api/v1/orgs/{org}/provider-keys",
        Some(r#"{"name":"evil","base_url":"https://evil.example.com","token":"sk-evil"}"#),
    ),
    ("GET", "/api/v1/orgs/{org}/provider-keys/{provider}", None),
    (
        "PATCH",
        "/api/v1/orgs/{org}/provider-keys/{provider}",
        Some(r#"{"base_url":"https://evil.example.com","token":"sk-evil"}"#),
    ),
    (
        "DELETE",
        "/api/v1/orgs/{org}/provider-keys/{provider}",
        None,
    ),
    (
        "POST",
        "/api/v1/orgs/{org}/provider-keys/{provider}/test",
        None,
    ),
    ("GET", "/api/v1/orgs/{org}/api-keys", None),
    (
        "POST",
        "/api/v1/orgs/{org}/api-keys",
        Some(r#"{"name":"evil"}"#),
    ),
    ("DELETE", "/api/v1/orgs/{org}/api-keys/{key}", None),
    ("GET", "/api/v1/orgs/{org}/logs", None),
    ("GET", "/api/v1/orgs/{org}/usage", None),
    ("GET", "/api/v1/orgs/{org}/audit-log", None),
];

/// The ids of one org's resources, to put into a route.
struct Ids<'a> {
    org: &'a str,
    provider: &'a str,
    key: &'a str,
    user: &'a str,
    inv: &'a str,
}

fn fill(path: &str, ids: &Ids) -> String {
    path.replace("{org}", ids.org)
        .replace("{provider}", ids.provider)
        .replace("{key}", ids.key)
        .replace("{user}", ids.user)
        .replace("{inv}", ids.inv)
}

async fn call(
    app: &TestApp,
    method: &str,
    path: &str,
    token: &str,
    body: Option<&str>,
) -> crate::helpers::Resp {
    let mut req = app.request(
        Method::from_bytes(method.as_bytes()).unwrap(),
        path,
        Some(token),
    );
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_owned());
    }
    app.send(req).await
}

#[tokio::test]
async fn other_orgs_ids_look_missing_and_change_nothing() {
    let app = TestApp::spawn().await;
    let a = OrgFixture::create(&app, "alpha").await;
    let b = OrgFixture::create(&app, "beta").await;
    app.signup("intruder@x.example.com").await;
    let a_inv = app
        .invite(&a.owner, &a.id, "invitee@alpha.example.com", "admin")
        .await
        .expect(201)
        .id();
    let b_inv = app
        .invite(&b.owner, &b.id, "invitee@beta.example.com", "admin")
        .await
        .expect(201)
        .id();
    let before_a = snapshot(&app, &a).await;
    let before_b = snapshot(&app, &b).await;
    let a_ids = Ids {
        org: &a.id,
        provider: &a.provider_id,
        key: &a.api_key_id,
        user: &a.member_id,
        inv: &a_inv,
    };
    // Org A's route, org B's resources.
    let crossed = Ids {
        org: &a.id,
        provider: &b.provider_id,
        key: &b.api_key_id,
        user: &b.member_id,
        inv: &b_inv,
    };

    // What a truly missing org answers, for comparison.
    let missing = app
        .get(&format!("/api/v1/orgs/{}", Uuid::new_v4()), &b.owner)
        .await;
    missing.expect(404);
    assert_eq!(missing.code(), "not_found");

    for &(method, path, body) in ROUTES {
        // 1. Org B's users (every role) on org A's routes with org A's ids.
        for token in [&b.owner, &b.admin, &b.member] {
            let url = fill(path, &a_ids);
            let r = call(&app, method, &url, token, body).await;
            assert_eq!(r.status, 404, "{method} {url}: {}", r.text);
            assert_eq!(r.body, missing.body, "{method} {url}");
        }
        // 2. Org A's owner on org A's routes with org B's resource ids.
        if ["{provider}", "{key}", "{user}", "{inv}"]
            .iter()
            .any(|p| path.contains(p))
        {
            let url = fill(path, &crossed);
            let r = call(&app, method, &url, &a.owner, body).await;
            assert_eq!(r.status, 404, "{method} {url}: {}", r.text);
            assert_eq!(r.body, missing.body, "{method} {url}");
        }
        // 3. Malformed and unknown ids answer the same.
        for bad in ["not-a-uuid", &Uuid::new_v4().to_string()] {
            let ids = Ids {
                org: bad,
                provider: bad,
                key: bad,
                user: bad,
                inv: bad,
            };
            let url = fill(path, &ids);
            let r = call(&app, method, &url, &a.owner, body).await;
            assert_eq!(r.status, 404, "{method} {url}: {}", r.text);
            assert_eq!(r.body, missing.body);
        }
    }
    assert_eq!(snapshot(&app, &a).await, before_a, "org A changed");
    assert_eq!(snapshot(&app, &b).await, before_b, "org B changed");
    // B's provider token never reached anyone.
    app.assert_never_disclosed(&a.provider_token);
    app.assert_never_disclosed(&b.provider_token);
}

#[tokio::test]
async fn logs_and_usage_never_mix_orgs() {
    let app = TestApp::spawn().await;
    let a = OrgFixture::create(&app, "la").await;
    let b = OrgFixture::create(&app, "lb").await;
    let b_key: Uuid = b.api_key_id.parse().unwrap();
    let row = storage::logs::RequestLog {
        id: Uuid::new_v4(),
        request_id: "req-b".into(),
        org_id: b.id.parse().unwrap(),
        api_key_id: Some(b_key),
        provider_key_id: None,
        provider_name: Some("mycompany".into()),
        requested_model: Some("mycompany/m".into()),
        upstream_model: Some("m".into()),
        status_code: 200,
        streamed: false,
        canceled: false,
        prompt_tokens: Some(1),
        completion_tokens: Some(1),
        total_tokens: Some(2),
        latency_ms: 5,
        ttfb_ms: None,
        error_class: None,
        created_at: chrono::Utc::now(),
        endpoint_id: None,
        attempts: None,
    };
    app.db.db.insert_request_logs(&[row]).await.unwrap();
    // Filtering org A's logs by org B's key finds nothing.
    let r = app
        .get(
            &format!("/api/v1/orgs/{}/logs?api_key_id={b_key}", a.id),
            &a.owner,
        )
        .await;
    r.expect(200);
    assert_eq!(r.body["data"], json!([]));
    let u = app
        .get(&format!("/api/v1/orgs/{}/usage", a.id), &a.owner)
        .await;
    assert_eq!(u.body["data"], json!([]));
    let mine = app
        .get(&format!("/api/v1/orgs/{}/logs", b.id), &b.member)
        .await;
    assert_eq!(mine.body["data"][0]["request_id"], "req-b");
}
