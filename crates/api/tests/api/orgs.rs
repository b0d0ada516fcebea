use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::{OrgFixture, TestApp};

#[tokio::test]
async fn organization_lifecycle() {
    let app = TestApp::spawn().await;
    let (owner, _) = app.signup("olga@example.com").await;
    let created = app
        .post("/api/v1/orgs", &owner, json!({"name": "  Acme  "}))
        .await;
    created.expect(201);
    assert_eq!(created.body["name"], "Acme");
    assert_eq!(created.body["role"], "owner");
    assert!(created.body["created_at"].is_string());
    let id = created.id();

    let list = app.get("/api/v1/orgs", &owner).await;
    list.expect(200);
    assert_eq!(list.body["data"].as_array().unwrap().len(), 1);
    assert_eq!(list.body["data"][0]["id"], id.as_str());
    assert_eq!(list.body["next_cursor"], Value::Null);

    app.get(&format!("/api/v1/orgs/{id}"), &owner)
        .await
        .expect(200);
    let renamed = app
        .patch(
            &format!("/api/v1/orgs/{id}"),
            &owner,
            json!({"name": "Acme Corp"}),
        )
        .await;
    renamed.expect(200);
    assert_eq!(renamed.body["name"], "Acme Corp");
    app.patch(&format!("/api/v1/orgs/{id}"), &owner, json!({"name": ""}))
        .await
        .expect(422);

    // A new user sees none of it.
    let (stranger, _) = app.signup("sam@example.com").await;
    assert_eq!(
        app.get("/api/v1/orgs", &stranger).await.body["data"],
        json!([])
    );

    app.delete(&format!("/api/v1/orgs/{id}"), &owner)
        .await
        .expect(204);
    app.get(&format!("/api/v1/orgs/{id}"), &owner)
        .await
        .expect(404);
    assert_eq!(
        app.get("/api/v1/orgs", &owner).await.body["data"],
        json!([])
    );
}

#[tokio::test]
async fn members_can_be_added_promoted_removed_and_can_leave() {
    let app = TestApp::spawn().await;
    let fx = OrgFixture::create(&app, "m").await;
    let org = &fx.id;

    let list = app
        .get(&format!("/api/v1/orgs/{org}/members"), &fx.member)
        .await;
    list.expect(200);
    let roles: Vec<(&str, &str)> = list.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["email"].as_str().unwrap(), m["role"].as_str().unwrap()))
        .collect();
    assert_eq!(
        roles,
        [
            ("owner@m.example.com", "owner"),
            ("admin@m.example.com", "admin"),
            ("member@m.example.com", "member")
        ]
    );

    // Inviting: an existing member is a conflict, a bad role a field error,
    // and the role defaults to member.
    let dup = app
        .invite(&fx.owner, org, "ADMIN@m.example.com", "member")
        .await;
    dup.expect(409);
    assert_eq!(dup.code(), "conflict");
    let bad_role = app.invite(&fx.owner, org, "new@example.com", "god").await;
    bad_role.expect(422);
    assert_eq!(bad_role.error_fields(), ["role"]);
    let (new, new_id) = app.signup("new@example.com").await;
    let invited = app
        .post(
            &format!("/api/v1/orgs/{org}/members"),
            &fx.owner,
            json!({"email": "new@example.com"}),
        )
        .await;
    invited.expect(201);
    assert_eq!(invited.body["role"], "member");
    app.post(
        &format!("/api/v1/me/invitations/{}/accept", invited.id()),
        &new,
        json!({"token": invited.body["token"]}),
    )
    .await
    .expect(200);
    let added = app
        .get(&format!("/api/v1/orgs/{org}/members"), &fx.member)
        .await;
    let added = added.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["user_id"] == new_id.as_str())
        .cloned()
        .expect("the invitee is a member");
    assert_eq!(added["role"], "member");
    assert_eq!(added["email"], "new@example.com");

    // The last owner can neither be demoted nor leave.
    let demote = app
        .patch(
            &format!("/api/v1/orgs/{org}/members/{}", fx.owner_id),
            &fx.owner,
            json!({"role": "admin"}),
        )
        .await;
    demote.expect(409);
    assert_eq!(demote.code(), "last_owner");
    app.delete(
        &format!("/api/v1/orgs/{org}/members/{}", fx.owner_id),
        &fx.owner,
    )
    .await
    .expect(409);

    // With a second owner, the first may step down.
    app.patch(
        &format!("/api/v1/orgs/{org}/members/{}", fx.admin_id),
        &fx.owner,
        json!({"role": "owner"}),
    )
    .await
    .expect(200);
    let stepped = app
        .patch(
            &format!("/api/v1/orgs/{org}/members/{}", fx.owner_id),
            &fx.owner,
            json!({"role": "member"}),
        )
        .await;
    stepped.expect(200);
    assert_eq!(stepped.body["role"], "member");
    // The former owner is now a member and cannot manage members.
    app.delete(&format!("/api/v1/orgs/{org}/members/{new_id}"), &fx.owner)
        .await
        .expect(403);

    // Owners remove others; anyone may leave.
    let removed = app
        .delete(&format!("/api/v1/orgs/{org}/members/{new_id}"), &fx.admin)
        .await;
    removed.expect(200);
    assert_eq!(
        removed.body,
        json!({"revoked_api_keys": 0, "transferred_api_keys": 0})
    );
    app.delete(
        &format!("/api/v1/orgs/{org}/members/{}", fx.member_id),
        &fx.member,
    )
    .await
    .expect(200);
    app.get(&format!("/api/v1/orgs/{org}"), &fx.member)
        .await
        .expect(404);
    app.delete(
        &format!("/api/v1/orgs/{org}/members/{}", fx.member_id),
        &fx.admin,
    )
    .await
    .expect(404);
}

/// Makes a request for route `route` that would succeed for a caller with
/// enough rights, creating throwaway resources so each call is independent.
async fn prepare(
    app: &TestApp,
    fx: &OrgFixture,
    route: &str,
    n: usize,
) -> (Method, String, Option<Value>) {
    let org = &fx.id;
    let base = format!("/api/v1/orgs/{org}");
    let letters = ["aa", "bb", "cc"][n];
    match route {
        "get_org" => (Method::GET, base, None),
        "rename_org" => (
            Method::PATCH,
            base,
            Some(json!({"name": format!("Renamed {n}")})),
        ),
        "delete_org" => (Method::DELETE, base, None),
        "list_members" => (Method::GET, format!("{base}/members"), None),
        "add_member" => (
            Method::POST,
            format!("{base}/members"),
            Some(json!({"email": format!("added{n}@example.com"), "role": "member"})),
        ),
        "set_role" => (
            Method::PATCH,
            format!("{base}/members/{}", fx.member_id),
            Some(json!({"role": "member"})),
        ),
        "remove_member" => {
            let email = format!("removable{n}@example.com");
            let (token, id) = app.signup(&email).await;
            app.join(&fx.owner, org, &email, "member", &token).await;
            (Method::DELETE, format!("{base}/members/{id}"), None)
        }
        "list_invitations" => (Method::GET, format!("{base}/invitations"), None),
        "get_invitation" | "delete_invitation" => {
            let id = app
                .invite(&fx.owner, org, &format!("{route}{n}@example.com"), "member")
                .await
                .expect(201)
                .id();
            let method = if route == "get_invitation" {
                Method::GET
            } else {
                Method::DELETE
            };
            (method, format!("{base}/invitations/{id}"), None)
        }
        "list_providers" => (Method::GET, format!("{base}/provider-keys"), None),
        "get_provider" => (
            Method::GET,
            format!("{base}/provider-keys/{}", fx.provider_id),
            None,
        ),
        "create_provider" => (
            Method::POST,
            format!("{base}/provider-keys"),
            Some(
                json!({"name": format!("new{letters}"), "base_url": "https://llm.example.com", "token": "sk-x"}),
            ),
        ),
        "update_provider" => (
            Method::PATCH,
            format!("{base}/provider-keys/{}", fx.provider_id),
            Some(json!({"status": "active"})),
        ),
        "delete_provider" => {
            let id = app
                .create_provider(
                    &fx.owner,
                    org,
                    &format!("gone{letters}"),
                    "https://llm.example.com",
                    "sk-y",
                )
                .await
                .expect(201)
                .id();
            (Method::DELETE, format!("{base}/provider-keys/{id}"), None)
        }
        "test_provider" => (
            Method::POST,
            format!("{base}/provider-keys/{}/test", fx.provider_id),
            None,
        ),
        "list_api_keys" => (Method::GET, format!("{base}/api-keys"), None),
        "create_api_key" => (
            Method::POST,
            format!("{base}/api-keys"),
            Some(json!({"name": "k"})),
        ),
        "revoke_api_key" => {
            let id = app
                .post(&format!("{base}/api-keys"), &fx.owner, json!({"name": "r"}))
                .await
                .expect(201)
                .id();
            (Method::DELETE, format!("{base}/api-keys/{id}"), None)
        }
        "logs" => (Method::GET, format!("{base}/logs"), None),
        "usage" => (Method::GET, format!("{base}/usage"), None),
        "audit_log" => (Method::GET, format!("{base}/audit-log"), None),
        other => panic!("unknown route {other}"),
    }
}

#[tokio::test]
async fn role_matrix() {
    let app = TestApp::spawn().await;
    let fx = OrgFixture::create(&app, "roles").await;
    // (route, least role, success status); delete_org last since it ends the fixture.
    let table = [
        ("get_org", "member", 200),
        ("rename_org", "admin", 200),
        ("list_members", "member", 200),
        ("add_member", "owner", 201),
        ("set_role", "owner", 200),
        ("remove_member", "owner", 200),
        ("list_invitations", "admin", 200),
        ("get_invitation", "admin", 200),
        ("delete_invitation", "owner", 204),
        ("list_providers", "member", 200),
        ("get_provider", "member", 200),
        ("create_provider", "admin", 201),
        ("update_provider", "admin", 200),
        ("delete_provider", "admin", 204),
        ("test_provider", "admin", 200),
        ("list_api_keys", "member", 200),
        ("create_api_key", "admin", 201),
        ("revoke_api_key", "admin", 200),
        ("logs", "member", 200),
        ("usage", "member", 200),
        ("audit_log", "admin", 200),
        ("delete_org", "owner", 204),
    ];
    let rank = |r: &str| {
        ["member", "admin", "owner"]
            .iter()
            .position(|x| *x == r)
            .unwrap()
    };
    for (route, least, ok) in table {
        for (n, role) in ["member", "admin", "owner"].into_iter().enumerate() {
            let (method, path, body) = prepare(&app, &fx, route, n).await;
            let r = app.call(method, &path, Some(fx.token(role)), body).await;
            if rank(role) >= rank(least) {
                assert_eq!(r.status, ok, "{role} on {route}: {}", r.text);
            } else {
                assert_eq!(r.status, 403, "{role} on {route}: {}", r.text);
                assert_eq!(r.code(), "forbidden");
            }
        }
    }
}
