//! Invitations (the only way in), member removal and its API keys, and
//! deleting an organization while its providers change.

use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{OrgFixture, Resp, TestApp};

fn accept_path(id: &str) -> String {
    format!("/api/v1/me/invitations/{id}/accept")
}

async fn member_count(app: &TestApp, fx: &OrgFixture) -> usize {
    app.get(&format!("/api/v1/orgs/{}/members", fx.id), &fx.member)
        .await
        .expect(200)
        .body["data"]
        .as_array()
        .unwrap()
        .len()
}

#[tokio::test]
async fn an_invitation_is_accepted_only_with_its_token_and_only_once() {
    let app = TestApp::spawn().await;
    let fx = OrgFixture::create(&app, "inv").await;
    let (dana, dana_id) = app.signup("dana@example.com").await;

    let inv = app
        .invite(&fx.owner, &fx.id, "Dana@Example.com", "admin")
        .await;
    inv.expect(201);
    let keys: Vec<&str> = inv
        .body
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        [
            "created_at",
            "email",
            "expires_at",
            "id",
            "invited_by",
            "org_id",
            "role",
            "token"
        ]
    );
    assert_eq!(inv.body["org_id"], fx.id.as_str());
    assert_eq!(inv.body["invited_by"], fx.owner_id.as_str());
    assert_eq!(inv.body["role"], "admin");
    let token = inv.body["token"].as_str().unwrap().to_owned();
    assert!(token.len() >= 43, "token too short: {token}");
    let id = inv.id();

    // The invitee sees it (never the token); the org's admins see it too.
    let mine = app.get("/api/v1/me/invitations", &dana).await;
    mine.expect(200);
    assert_eq!(mine.body["data"].as_array().unwrap().len(), 1);
    assert_eq!(mine.body["data"][0]["id"], id.as_str());
    assert_eq!(mine.body["data"][0]["org_id"], fx.id.as_str());
    assert!(mine.body["data"][0].get("token").is_none());
    let listed = app
        .get(&format!("/api/v1/orgs/{}/invitations", fx.id), &fx.admin)
        .await;
    listed.expect(200);
    assert_eq!(listed.body["data"][0]["id"], id.as_str());
    assert!(!listed.text.contains(&token));
    let one = app
        .get(
            &format!("/api/v1/orgs/{}/invitations/{id}", fx.id),
            &fx.admin,
        )
        .await;
    one.expect(200);
    assert!(one.body.get("token").is_none());

    // Without the token, or with a wrong one: refused, nothing created.
    let missing = app.post(&accept_path(&id), &dana, json!({})).await;
    missing.expect(422);
    assert_eq!(missing.error_fields(), ["token"]);
    let wrong = app
        .post(
            &accept_path(&id),
            &dana,
            json!({"token": format!("{token}x")}),
        )
        .await;
    wrong.expect(404);
    let unknown = app
        .post(
            &accept_path(&Uuid::new_v4().to_string()),
            &dana,
            json!({"token": token}),
        )
        .await;
    assert_eq!(
        (wrong.status, &wrong.body),
        (unknown.status, &unknown.body),
        "a wrong token must look like an unknown invitation"
    );
    assert_eq!(member_count(&app, &fx).await, 3);
    app.get(&format!("/api/v1/orgs/{}", fx.id), &dana)
        .await
        .expect(404);

    // With it: a member with the invited role, and the org shape.
    let joined = app
        .post(&accept_path(&id), &dana, json!({"token": token}))
        .await;
    joined.expect(200);
    assert_eq!(joined.body["id"], fx.id.as_str());
    assert_eq!(joined.body["role"], "admin");
    assert_eq!(joined.body["name"], "Org inv");
    let members = app
        .get(&format!("/api/v1/orgs/{}/members", fx.id), &fx.member)
        .await;
    assert!(members.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["user_id"] == dana_id.as_str() && m["role"] == "admin"));

    // Used: gone everywhere, and a second accept is the same 404.
    let again = app
        .post(&accept_path(&id), &dana, json!({"token": token}))
        .await;
    assert_eq!((again.status, &again.body), (404, &unknown.body));
    assert_eq!(
        app.get("/api/v1/me/invitations", &dana).await.body["data"],
        json!([])
    );
    assert_eq!(
        app.get(&format!("/api/v1/orgs/{}/invitations", fx.id), &fx.admin)
            .await
            .body["data"],
        json!([])
    );
    // Inviting a member again is a conflict; so is a second pending invitation.
    app.invite(&fx.owner, &fx.id, "dana@example.com", "member")
        .await
        .expect(409);
    app.invite(&fx.owner, &fx.id, "erin@example.com", "member")
        .await
        .expect(201);
    app.invite(&fx.owner, &fx.id, "ERIN@example.com", "admin")
        .await
        .expect(409);
    let audit = app
        .get(&format!("/api/v1/orgs/{}/audit-log", fx.id), &fx.owner)
        .await;
    let actions: Vec<&str> = audit.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert!(actions.contains(&"invitation.create") && actions.contains(&"member.add"));
    // The token was in the creation answer and nowhere else.
    for r in [&mine, &listed, &one, &joined, &audit] {
        assert!(!r.text.contains(&token), "token disclosed: {}", r.text);
    }
    assert!(!crate::helpers::captured_logs().contains(&token));
}

#[tokio::test]
async fn someone_with_another_email_cannot_accept_even_with_the_token() {
    let app = TestApp::spawn().await;
    let fx = OrgFixture::create(&app, "other").await;
    let (eve, _) = app.signup("eve@example.com").await;
    let (dana, _) = app.signup("dana@example.com").await;
    let inv = app
        .invite(&fx.owner, &fx.id, "dana@example.com", "owner")
        .await;
    inv.expect(201);
    let token = inv.body["token"].clone();
    // Eve got hold of the token: it does not work for her account.
    assert_eq!(
        app.get("/api/v1/me/invitations", &eve).await.body["data"],
        json!([])
    );
    let stolen = app
        .post(&accept_path(&inv.id()), &eve, json!({"token": token}))
        .await;
    stolen.expect(404);
    assert_eq!(stolen.code(), "not_found");
    app.get(&format!("/api/v1/orgs/{}", fx.id), &eve)
        .await
        .expect(404);
    assert_eq!(member_count(&app, &fx).await, 3);
    // Nor do existing members, whatever their role.
    for t in [&fx.owner, &fx.admin, &fx.member] {
        app.post(&accept_path(&inv.id()), t, json!({"token": token}))
            .await
            .expect(404);
    }
    // Dana still can.
    app.post(&accept_path(&inv.id()), &dana, json!({"token": token}))
        .await
        .expect(200);
}

#[tokio::test]
async fn invitations_are_managed_by_their_own_org_only() {
    let app = TestApp::spawn().await;
    let a = OrgFixture::create(&app, "ia").await;
    let b = OrgFixture::create(&app, "ib").await;
    let b_invitation = app
        .invite(&b.owner, &b.id, "zoe@example.com", "member")
        .await;
    b_invitation.expect(201);
    let b_inv = b_invitation.id();
    let missing = app
        .get(
            &format!("/api/v1/orgs/{}/invitations/{}", a.id, Uuid::new_v4()),
            &a.owner,
        )
        .await;
    missing.expect(404);
    for r in [
        app.get(
            &format!("/api/v1/orgs/{}/invitations/{b_inv}", a.id),
            &a.owner,
        )
        .await,
        app.delete(
            &format!("/api/v1/orgs/{}/invitations/{b_inv}", a.id),
            &a.owner,
        )
        .await,
    ] {
        assert_eq!((r.status, &r.body), (404, &missing.body));
    }
    assert_eq!(
        app.get(&format!("/api/v1/orgs/{}/invitations", a.id), &a.owner)
            .await
            .body["data"],
        json!([])
    );
    // B's owner cancels it; its token then stops working.
    let (zoe, _) = app.signup("zoe@example.com").await;
    assert_eq!(
        app.get("/api/v1/me/invitations", &zoe).await.body["data"][0]["id"],
        b_inv.as_str()
    );
    app.delete(
        &format!("/api/v1/orgs/{}/invitations/{b_inv}", b.id),
        &b.owner,
    )
    .await
    .expect(204);
    assert_eq!(
        app.get("/api/v1/me/invitations", &zoe).await.body["data"],
        json!([])
    );
    app.post(
        &accept_path(&b_inv),
        &zoe,
        json!({"token": b_invitation.body["token"]}),
    )
    .await
    .expect(404);
    app.get(
        &format!("/api/v1/orgs/{}/invitations/{b_inv}", b.id),
        &b.owner,
    )
    .await
    .expect(404);
    // Only owners invite (admins may not hand out any role, owner least of all).
    let r = app.invite(&b.admin, &b.id, "x@example.com", "owner").await;
    r.expect(403);
    assert_eq!(r.code(), "forbidden");
}

/// Everything of an invitation answer except what is unique to each one.
fn shape(r: &Resp) -> Value {
    let mut v = r.body.clone();
    for k in ["id", "created_at", "expires_at", "token", "email"] {
        v[k] = json!(v[k].is_string());
    }
    json!({"status": r.status, "body": v})
}

#[tokio::test]
async fn inviting_tells_nothing_about_which_emails_have_accounts() {
    let app = TestApp::spawn().await;
    let fx = OrgFixture::create(&app, "enum").await;
    app.signup("registered@example.com").await;
    let registered = app
        .invite(&fx.owner, &fx.id, "registered@example.com", "member")
        .await;
    let unregistered = app
        .invite(&fx.owner, &fx.id, "nobody@example.com", "member")
        .await;
    registered.expect(201);
    assert_eq!(shape(&registered), shape(&unregistered));
    assert_eq!(
        registered.headers.keys().collect::<Vec<_>>(),
        unregistered.headers.keys().collect::<Vec<_>>()
    );
    // The unregistered address can sign up later and accept.
    let (nobody, _) = app.signup("nobody@example.com").await;
    app.post(
        &accept_path(&unregistered.id()),
        &nobody,
        json!({"token": unregistered.body["token"]}),
    )
    .await
    .expect(200);
}

#[tokio::test]
async fn removing_a_member_revokes_their_api_keys_unless_transferred() {
    let app = TestApp::spawn().await;
    let fx = OrgFixture::create(&app, "rm").await;
    let org = &fx.id;
    let keys = format!("/api/v1/orgs/{org}/api-keys");
    // The fixture's key was made by the admin; make one more, and one by the owner.
    let second = app
        .post(&keys, &fx.admin, json!({"name": "second"}))
        .await
        .expect(201)
        .id();
    let owners = app
        .post(&keys, &fx.owner, json!({"name": "owner's"}))
        .await
        .expect(201)
        .id();
    let remove = |user: &str, q: &str| format!("/api/v1/orgs/{org}/members/{user}{q}");

    // A transfer target that is not a remaining member: 422, nothing changes.
    for bad in [
        fx.admin_id.clone(),
        Uuid::new_v4().to_string(),
        "not-a-uuid".to_owned(),
    ] {
        let r = app
            .delete(
                &remove(&fx.admin_id, &format!("?transfer_api_keys_to={bad}")),
                &fx.owner,
            )
            .await;
        r.expect(422);
        assert_eq!(r.error_fields(), ["transfer_api_keys_to"]);
    }
    assert_eq!(member_count(&app, &fx).await, 3);

    let removed = app.delete(&remove(&fx.admin_id, ""), &fx.owner).await;
    removed.expect(200);
    assert_eq!(removed.body["revoked_api_keys"], 2);
    let list = app.get(&keys, &fx.owner).await;
    for k in list.body["data"].as_array().unwrap() {
        let revoked = !k["revoked_at"].is_null();
        let expect = k["id"] == fx.api_key_id.as_str() || k["id"] == second.as_str();
        assert_eq!(revoked, expect, "{k}");
    }
    assert_eq!(
        list.body["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|k| k["id"] == owners.as_str() && k["revoked_at"].is_null())
            .count(),
        1
    );
    let audit = app
        .get(&format!("/api/v1/orgs/{org}/audit-log"), &fx.owner)
        .await;
    let entry = audit.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "member.remove")
        .cloned()
        .unwrap();
    assert_eq!(entry["target_id"], fx.admin_id.as_str());
    assert_eq!(entry["details"]["api_keys"]["revoked"], 2);

    // A member who leaves hands their keys over: they stay active.
    let (carol, carol_id) = app.signup("carol@example.com").await;
    app.join(&fx.owner, org, "carol@example.com", "admin", &carol)
        .await;
    let kept = app
        .post(&keys, &carol, json!({"name": "kept"}))
        .await
        .expect(201)
        .id();
    let left = app
        .delete(
            &remove(&carol_id, &format!("?transfer_api_keys_to={}", fx.owner_id)),
            &carol,
        )
        .await;
    left.expect(200);
    assert_eq!(
        left.body,
        json!({"revoked_api_keys": 0, "transferred_api_keys": 1})
    );
    let k = app.get(&keys, &fx.owner).await;
    let k = k.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == kept.as_str())
        .cloned()
        .unwrap();
    assert!(k["revoked_at"].is_null());
    let audit = app
        .get(&format!("/api/v1/orgs/{org}/audit-log"), &fx.owner)
        .await;
    let entry = &audit.body["data"][0];
    assert_eq!(entry["action"], "member.remove");
    assert_eq!(entry["details"]["api_keys"]["to"], fx.owner_id.as_str());
    assert_eq!(entry["details"]["api_keys"]["transferred"], 1);
}

#[tokio::test]
async fn deleting_an_org_while_its_providers_change_never_fails() {
    let app = TestApp::spawn().await;
    let (owner, _) = app.signup("racer@example.com").await;
    for round in 0..25 {
        let org = app.create_org(&owner, &format!("Race {round}")).await;
        let provider = app
            .create_provider(
                &owner,
                &org,
                "alpha",
                "https://llm.race.example.com",
                "sk-a",
            )
            .await
            .expect(201)
            .id();
        let doomed = app
            .create_provider(
                &owner,
                &org,
                "delta",
                "https://llm.race.example.com",
                "sk-d",
            )
            .await
            .expect(201)
            .id();
        let base = format!("/api/v1/orgs/{org}");
        let provider_path = format!("{base}/provider-keys/{provider}");
        let doomed_path = format!("{base}/provider-keys/{doomed}");
        let keys_path = format!("{base}/api-keys");
        let old_key = app
            .post(&keys_path, &owner, json!({"name": "old"}))
            .await
            .expect(201)
            .id();
        let old_key_path = format!("{keys_path}/{old_key}");
        let (deleted, patched, created, key, revoked, dropped) = tokio::join!(
            app.delete(&base, &owner),
            app.patch(
                &provider_path,
                &owner,
                json!({"name": "beta", "status": "inactive"}),
            ),
            app.create_provider(
                &owner,
                &org,
                "gamma",
                "https://llm.race.example.com",
                "sk-g"
            ),
            app.post(&keys_path, &owner, json!({"name": "k"})),
            app.delete(&old_key_path, &owner),
            app.delete(&doomed_path, &owner),
        );
        assert_eq!(deleted.status, 204, "round {round}: {}", deleted.text);
        for (what, r, ok) in [
            ("patch", &patched, 200),
            ("create", &created, 201),
            ("api key", &key, 201),
            ("revoke", &revoked, 200),
            ("provider delete", &dropped, 204),
        ] {
            assert!(
                r.status == ok || r.status == 404,
                "round {round}: {what} answered {}: {}",
                r.status,
                r.text
            );
        }
        app.get(&base, &owner).await.expect(404);
    }
    // Not even a deadlock that a retry hid.
    assert!(!crate::helpers::captured_logs().contains("lost a lock conflict"));
}

#[tokio::test]
async fn a_key_created_while_its_creator_is_removed_does_not_survive() {
    let app = TestApp::spawn().await;
    let fx = OrgFixture::create(&app, "race").await;
    let org = &fx.id;
    let (carol, carol_id) = app.signup("carol@example.com").await;
    let keys = format!("/api/v1/orgs/{org}/api-keys");
    let member = format!("/api/v1/orgs/{org}/members/{carol_id}");
    let mut created = 0;
    for round in 0..20 {
        app.join(&fx.owner, org, "carol@example.com", "admin", &carol)
            .await;
        let (a, b, removed) = tokio::join!(
            app.post(&keys, &carol, json!({"name": "a"})),
            app.post(&keys, &carol, json!({"name": "b"})),
            app.delete(&member, &fx.owner),
        );
        removed.expect(200);
        for r in [&a, &b] {
            assert!(
                r.status == 201 || r.status == 404,
                "round {round}: {}",
                r.text
            );
            created += usize::from(r.status == 201);
        }
        // Only Carol makes keys named "a" and "b": none may be active.
        let list = app.get(&format!("{keys}?limit=200"), &fx.owner).await;
        let survivors = list.body["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|k| (k["name"] == "a" || k["name"] == "b") && k["revoked_at"].is_null())
            .count();
        assert_eq!(
            survivors, 0,
            "round {round}: a removed member's key is active"
        );
    }
    assert!(created > 0, "no key creation ever ran before the removal");
}
