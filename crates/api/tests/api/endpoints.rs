//! A provider's endpoints, static headers and timeouts through the API:
//! who may do what, the token rule, the save-time checks, the other org's
//! ids, and the secrets kept out of every answer, log and table.

use serde_json::{json, Value};

use crate::helpers::{OrgFixture, Resp, TestApp};

fn endpoints_of(fx: &OrgFixture) -> String {
    format!(
        "/api/v1/orgs/{}/provider-keys/{}/endpoints",
        fx.id, fx.provider_id
    )
}

fn provider_of(fx: &OrgFixture) -> String {
    format!("/api/v1/orgs/{}/provider-keys/{}", fx.id, fx.provider_id)
}

fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
    k.sort();
    k
}

/// Everything a member can read about the provider, to compare before and after.
async fn snapshot(app: &TestApp, fx: &OrgFixture) -> (Value, Value) {
    (
        app.get(&provider_of(fx), &fx.member)
            .await
            .expect(200)
            .body
            .clone(),
        app.get(&endpoints_of(fx), &fx.member)
            .await
            .expect(200)
            .body
            .clone(),
    )
}

#[tokio::test]
async fn endpoints_are_listed_added_changed_and_removed_by_admins() {
    let app = TestApp::spawn().await;
    let fx = OrgFixture::create(&app, "ep").await;
    let list = endpoints_of(&fx);
    let own_url = "https://llm.ep.example.com";

    // The provider's own base URL and token are its first endpoint.
    let r = app.get(&list, &fx.member).await;
    r.expect(200);
    assert_eq!(r.body["next_cursor"], Value::Null);
    let own = &r.body["data"][0];
    assert_eq!(r.body["data"].as_array().unwrap().len(), 1);
    assert_eq!(own["id"], fx.provider_id.as_str());
    assert_eq!(own["base_url"], own_url);
    assert_eq!(
        (&own["weight"], &own["health"]),
        (&json!(1), &json!("unknown"))
    );

    // Members read, admins write.
    let body = json!({"base_url": "https://gpu2.ep.example.com/", "token": "sk-second-endpoint-7777", "weight": 3});
    app.post(&list, &fx.member, body.clone()).await.expect(403);
    let created = app.post(&list, &fx.admin, body).await;
    created.expect(201);
    assert_eq!(
        keys(&created.body),
        ["base_url", "health", "id", "token_hint", "weight"]
    );
    assert_eq!(created.body["base_url"], "https://gpu2.ep.example.com");
    assert_eq!(created.body["token_hint"], "7777");
    assert_eq!(created.body["weight"], 3);
    assert_eq!(created.body["health"], "unknown");
    let second = created.id();
    let one = format!("{list}/{second}");
    // Weight defaults to 1.
    let third = app
        .post(
            &list,
            &fx.owner,
            json!({"base_url": "https://gpu3.ep.example.com", "token": "sk-third-endpoint-8888"}),
        )
        .await;
    third.expect(201);
    assert_eq!(third.body["weight"], 1);

    // The provider's answers carry the same objects, in order.
    let p = app.get(&provider_of(&fx), &fx.member).await;
    p.expect(200);
    let listed = app.get(&list, &fx.member).await;
    assert_eq!(p.body["endpoints"], listed.body["data"]);
    assert_eq!(p.body["endpoints"][1], created.body);
    assert_eq!(p.body["endpoints"].as_array().unwrap().len(), 3);
    let all = app
        .get(&format!("/api/v1/orgs/{}/provider-keys", fx.id), &fx.member)
        .await;
    assert_eq!(all.body["data"][0]["endpoints"], p.body["endpoints"]);

    // PATCH: weight alone; a new base URL needs its token.
    app.patch(&one, &fx.member, json!({"weight": 9}))
        .await
        .expect(403);
    let w = app.patch(&one, &fx.admin, json!({"weight": 9})).await;
    w.expect(200);
    assert_eq!(w.body["weight"], 9);
    let moved = app
        .patch(
            &one,
            &fx.admin,
            json!({"base_url": "https://gpu9.ep.example.com"}),
        )
        .await;
    moved.expect(422);
    assert_eq!(moved.error_fields(), ["token"]);
    assert!(
        moved
            .text
            .contains("token is required when base_url changes"),
        "{}",
        moved.text
    );
    let moved = app
        .patch(
            &one,
            &fx.admin,
            json!({"base_url": "https://gpu9.ep.example.com", "token": "sk-moved-endpoint-9999"}),
        )
        .await;
    moved.expect(200);
    assert_eq!(
        (
            &moved.body["base_url"],
            &moved.body["token_hint"],
            &moved.body["weight"]
        ),
        (
            &json!("https://gpu9.ep.example.com"),
            &json!("9999"),
            &json!(9)
        )
    );
    let stored = app
        .db
        .db
        .provider_key_with_token(fx.id.parse().unwrap(), fx.provider_id.parse().unwrap())
        .await
        .unwrap();
    assert_eq!(
        stored.endpoints[1].token.expose_secret(),
        "sk-moved-endpoint-9999"
    );

    // The provider's own endpoint is the provider's base URL and token.
    let own_path = format!("{list}/{}", fx.provider_id);
    let r = app
        .patch(
            &own_path,
            &fx.admin,
            json!({"base_url": "https://elsewhere.example.com"}),
        )
        .await;
    r.expect(422);
    assert_eq!(r.error_fields(), ["token"]);
    let r = app.patch(&own_path, &fx.admin, json!({"weight": 4})).await;
    r.expect(200);
    assert_eq!(
        (&r.body["id"], &r.body["weight"]),
        (&json!(fx.provider_id), &json!(4))
    );
    let p = app.get(&provider_of(&fx), &fx.member).await;
    assert_eq!(p.body["base_url"], own_url);
    assert_eq!(p.body["endpoints"][0]["weight"], 4);

    // DELETE: further endpoints go; the provider's own cannot.
    app.delete(&one, &fx.member).await.expect(403);
    app.delete(&one, &fx.admin).await.expect(204);
    app.delete(&one, &fx.admin).await.expect(404);
    app.patch(&one, &fx.admin, json!({"weight": 2}))
        .await
        .expect(404);
    let r = app.delete(&own_path, &fx.admin).await;
    r.expect(409);
    assert_eq!(r.code(), "own_endpoint");
    assert!(r.text.contains("provider's own endpoint"), "{}", r.text);
    let left = app.get(&list, &fx.member).await;
    let ids: Vec<&str> = left.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [fx.provider_id.as_str(), third.id().as_str()]);

    // Every change is in the audit log, under the endpoint's id.
    let audit = app
        .get(&format!("/api/v1/orgs/{}/audit-log", fx.id), &fx.admin)
        .await;
    audit.expect(200);
    let entries = audit.body["data"].as_array().unwrap();
    let find = |action: &str, target: &str| {
        entries
            .iter()
            .find(|e| e["action"] == action && e["target_id"] == target)
            .unwrap_or_else(|| panic!("no {action} for {target}: {}", audit.text))
    };
    let create = find("provider_endpoint.create", &second);
    assert_eq!(
        create["details"]["provider_key_id"],
        fx.provider_id.as_str()
    );
    assert_eq!(create["details"]["weight"], 3);
    let update = find("provider_endpoint.update", &second);
    assert!(update["details"].is_object());
    find("provider_endpoint.update", &fx.provider_id);
    find("provider_endpoint.delete", &second);
    // A provider deleted goes with its endpoints.
    app.delete(&provider_of(&fx), &fx.admin).await.expect(204);
    app.get(&list, &fx.member).await.expect(404);
}

#[tokio::test]
async fn headers_and_timeouts_are_saved_shown_by_name_and_replaced() {
    let app = TestApp::spawn().await;
    let (admin, _) = app.signup("hdr@example.com").await;
    let org = app.create_org(&admin, "H").await;
    let secret = "hdr-value-never-shown-31337";
    let created = app
        .post(
            &format!("/api/v1/orgs/{org}/provider-keys"),
            &admin,
            json!({"name": "mycompany", "base_url": "https://llm.h.example.com", "token": "sk-h-token-0001",
                   "headers": {"X-Tenant": "acme", "api-key": secret},
                   "timeouts": {"connect_ms": 2000, "total_ms": 120000}}),
        )
        .await;
    created.expect(201);
    assert_eq!(created.body["headers"], json!(["X-Tenant", "api-key"]));
    assert_eq!(
        created.body["timeouts"],
        json!({"connect_ms": 2000, "first_byte_ms": null, "total_ms": 120000})
    );
    let path = format!("/api/v1/orgs/{org}/provider-keys/{}", created.id());
    assert_eq!(app.get(&path, &admin).await.body, created.body);
    let routed = app
        .db
        .db
        .provider_by_name(org.parse().unwrap(), "mycompany")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        routed.headers.iter().collect::<Vec<_>>(),
        [("X-Tenant", "acme"), ("api-key", secret)]
    );
    assert_eq!(routed.provider.timeouts.total_ms, Some(120000));

    // Replaced as a whole; the timeouts too.
    let r = app
        .patch(
            &path,
            &admin,
            json!({"headers": {"OpenAI-Organization": "org-1"}, "timeouts": {"first_byte_ms": 30000}}),
        )
        .await;
    r.expect(200);
    assert_eq!(r.body["headers"], json!(["OpenAI-Organization"]));
    assert_eq!(
        r.body["timeouts"],
        json!({"connect_ms": null, "first_byte_ms": 30000, "total_ms": null})
    );
    // null removes them.
    let r = app
        .patch(&path, &admin, json!({"headers": null, "timeouts": null}))
        .await;
    r.expect(200);
    assert_eq!(r.body["headers"], json!([]));
    assert_eq!(
        r.body["timeouts"],
        json!({"connect_ms": null, "first_byte_ms": null, "total_ms": null})
    );
    let audit = app
        .get(&format!("/api/v1/orgs/{org}/audit-log"), &admin)
        .await;
    assert!(
        audit.text.contains("OpenAI-Organization"),
        "header names are audited"
    );
    app.assert_never_disclosed(secret);
}

/// Bad weights, headers and timeouts: 422 naming the field (and the
/// header), and nothing changes.
#[tokio::test]
async fn bad_weights_headers_and_timeouts_are_refused_and_change_nothing() {
    let app = TestApp::spawn().await;
    let fx = OrgFixture::create(&app, "bad").await;
    let list = endpoints_of(&fx);
    let second = app
        .post(
            &list,
            &fx.admin,
            json!({"base_url": "https://gpu2.bad.example.com", "token": "sk-bad-second"}),
        )
        .await;
    second.expect(201);
    let one = format!("{list}/{}", second.id());
    let before = snapshot(&app, &fx).await;

    let check = |r: Resp, fields: &[&str]| {
        r.expect(422);
        assert_eq!(r.code(), "validation_failed");
        assert_eq!(r.error_fields(), fields, "{}", r.text);
        r
    };
    let weight_only = |w: Value| json!({"base_url": "https://gpu5.bad.example.com", "token": "sk-bad-w", "weight": w});
    for w in [
        json!(0),
        json!(1001),
        json!(-3),
        json!(2.5),
        json!("5"),
        json!(null),
    ] {
        check(
            app.post(&list, &fx.admin, weight_only(w.clone())).await,
            &["weight"],
        );
        check(
            app.patch(&one, &fx.admin, json!({"weight": w})).await,
            &["weight"],
        );
        let r = check(
            app.patch(
                &format!("{list}/{}", fx.provider_id),
                &fx.admin,
                json!({"weight": w}),
            )
            .await,
            &["weight"],
        );
        assert!(r.text.contains("1 to 1000"), "{}", r.text);
    }
    check(app.patch(&one, &fx.admin, json!({})).await, &["body"]);
    check(
        app.post(
            &list,
            &fx.admin,
            json!({"base_url": "https://x.example.com"}),
        )
        .await,
        &["token"],
    );
    check(
        app.post(
            &list,
            &fx.admin,
            json!({"base_url": "https://x.example.com", "token": "sk-x", "extra": 1}),
        )
        .await,
        &["extra"],
    );
    check(
        app.post(
            &list,
            &fx.admin,
            json!({"base_url": "https://x.example.com/v1", "token": "sk-x"}),
        )
        .await,
        &["base_url"],
    );

    let provider = provider_of(&fx);
    for (name, reason) in [
        ("Authorization", "token"),
        ("Host", "base URL"),
        ("content-length", "frames"),
        ("Transfer-Encoding", "frames"),
        ("Connection", "hop-by-hop"),
        ("Keep-Alive", "hop-by-hop"),
        ("Proxy-Authorization", "Proxy-*"),
        ("TE", "hop-by-hop"),
        ("Trailer", "hop-by-hop"),
        ("Upgrade", "hop-by-hop"),
        ("X-Request-Id", "id"),
        ("traceparent", "trace"),
    ] {
        let r = check(
            app.patch(
                &provider,
                &fx.admin,
                json!({"headers": {"X-Fine": "ok", name: "sk-header-value-SECRET"}}),
            )
            .await,
            &["headers"],
        );
        let message = r.body["error"]["details"][0]["message"].as_str().unwrap();
        assert!(
            message.starts_with(&format!("{name} cannot be a static header")),
            "{message}"
        );
        assert!(message.contains(reason), "{message}");
        assert!(!r.text.contains("SECRET"), "{}", r.text);
    }
    for headers in [
        json!({"X A": "v"}),
        json!({"X-A": "line\r\nbreak"}),
        json!({"X-A": ""}),
        json!({"X-A": 5}),
        json!({"X-A": "v", "x-a": "w"}),
        json!({"X-A": "v".repeat(4097)}),
        json!(["X-A"]),
        json!("X-A: v"),
    ] {
        check(
            app.patch(&provider, &fx.admin, json!({"headers": headers}))
                .await,
            &["headers"],
        );
    }
    let many: serde_json::Map<String, Value> =
        (0..33).map(|i| (format!("x-h{i}"), json!("v"))).collect();
    check(
        app.patch(&provider, &fx.admin, json!({"headers": many}))
            .await,
        &["headers"],
    );
    for (timeouts, fields) in [
        (json!({"connect_ms": 0}), vec!["timeouts.connect_ms"]),
        (json!({"total_ms": 600001}), vec!["timeouts.total_ms"]),
        (
            json!({"first_byte_ms": "10"}),
            vec!["timeouts.first_byte_ms"],
        ),
        (
            json!({"first_byte_ms": 1.5}),
            vec!["timeouts.first_byte_ms"],
        ),
        (json!({"idle_ms": 10}), vec!["timeouts"]),
        (json!(30), vec!["timeouts"]),
        (
            json!({"connect_ms": 5000, "total_ms": 1000}),
            vec!["timeouts.connect_ms"],
        ),
    ] {
        check(
            app.patch(&provider, &fx.admin, json!({"timeouts": timeouts}))
                .await,
            &fields,
        );
    }
    // Creating with bad settings makes no provider.
    check(
        app.post(
            &format!("/api/v1/orgs/{}/provider-keys", fx.id),
            &fx.admin,
            json!({"name": "other", "base_url": "https://o.example.com", "token": "sk-o",
                   "headers": {"Host": "evil"}, "timeouts": {"total_ms": -1}}),
        )
        .await,
        &["headers", "timeouts.total_ms"],
    );
    let providers = app
        .get(&format!("/api/v1/orgs/{}/provider-keys", fx.id), &fx.member)
        .await;
    assert_eq!(providers.body["data"].as_array().unwrap().len(), 1);
    assert_eq!(snapshot(&app, &fx).await, before);
}

/// BOLA: another org's provider and endpoint ids answer 404 whoever asks,
/// and nothing of theirs changes.
#[tokio::test]
async fn another_orgs_provider_and_endpoint_ids_are_not_found() {
    let app = TestApp::spawn().await;
    let a = OrgFixture::create(&app, "a").await;
    let b = OrgFixture::create(&app, "b").await;
    let a_endpoint = app
        .post(
            &endpoints_of(&a),
            &a.admin,
            json!({"base_url": "https://gpu2.a.example.com", "token": "sk-a-second"}),
        )
        .await;
    a_endpoint.expect(201);
    let a_endpoint = a_endpoint.id();
    let b_endpoint = app
        .post(
            &endpoints_of(&b),
            &b.admin,
            json!({"base_url": "https://gpu2.b.example.com", "token": "sk-b-second"}),
        )
        .await;
    b_endpoint.expect(201);
    let b_endpoint = b_endpoint.id();
    let before = snapshot(&app, &a).await;

    let new = json!({"base_url": "https://attacker.example.net", "token": "sk-attacker"});
    let patch =
        json!({"weight": 1000, "base_url": "https://attacker.example.net", "token": "sk-attacker"});
    let paths = [
        // A's ids under B's org, where B's owner is at home.
        (
            format!(
                "/api/v1/orgs/{}/provider-keys/{}/endpoints",
                b.id, a.provider_id
            ),
            format!(
                "/api/v1/orgs/{}/provider-keys/{}/endpoints/{a_endpoint}",
                b.id, a.provider_id
            ),
        ),
        // A's endpoint under B's own provider.
        (
            format!(
                "/api/v1/orgs/{}/provider-keys/{}/endpoints",
                b.id, b.provider_id
            ),
            format!(
                "/api/v1/orgs/{}/provider-keys/{}/endpoints/{a_endpoint}",
                b.id, b.provider_id
            ),
        ),
        // A's provider's own endpoint under B's provider.
        (
            format!(
                "/api/v1/orgs/{}/provider-keys/{}/endpoints",
                b.id, b.provider_id
            ),
            format!(
                "/api/v1/orgs/{}/provider-keys/{}/endpoints/{}",
                b.id, b.provider_id, a.provider_id
            ),
        ),
        // A's org itself, where B is no member.
        (
            endpoints_of(&a),
            format!("{}/{a_endpoint}", endpoints_of(&a)),
        ),
        // B's endpoint under A's provider, from A's org: no such pair.
        (
            endpoints_of(&a),
            format!("{}/{b_endpoint}", endpoints_of(&a)),
        ),
    ];
    for (i, (collection, item)) in paths.iter().enumerate() {
        let who = if i == 4 { &a.admin } else { &b.owner };
        if i != 1 && i != 2 && i != 4 {
            let r = app.get(collection, who).await;
            r.expect(404);
            assert_eq!(r.code(), "not_found");
            app.post(collection, who, new.clone()).await.expect(404);
        }
        let r = app.patch(item, who, patch.clone()).await;
        r.expect(404);
        assert_eq!(r.code(), "not_found", "{item}");
        app.delete(item, who).await.expect(404);
    }
    assert_eq!(snapshot(&app, &a).await, before);
    let b_endpoints = app.get(&endpoints_of(&b), &b.member).await;
    assert_eq!(b_endpoints.body["data"].as_array().unwrap().len(), 2);
    assert!(
        !b_endpoints.text.contains("attacker"),
        "{}",
        b_endpoints.text
    );
}

/// A private address is refused for an endpoint exactly as for a provider.
#[tokio::test]
async fn a_private_endpoint_base_url_is_refused_like_a_providers() {
    let app = TestApp::spawn().await;
    let fx = OrgFixture::create(&app, "ssrf").await;
    let list = endpoints_of(&fx);
    let second = app
        .post(
            &list,
            &fx.admin,
            json!({"base_url": "https://gpu2.ssrf.example.com", "token": "sk-ssrf-second"}),
        )
        .await;
    second.expect(201);
    let one = format!("{list}/{}", second.id());
    let before = snapshot(&app, &fx).await;
    for url in [
        "https://127.0.0.1",
        "https://169.254.169.254",
        "https://[::ffff:127.0.0.1]",
        "https://2130706433",
        "https://10.0.0.1:8443",
        "https://localhost",
        "http://llm.ssrf.example.com",
    ] {
        let by_provider = app
            .create_provider(&fx.admin, &fx.id, "sneaky", url, "sk-sneaky")
            .await;
        by_provider.expect(422);
        for r in [
            app.post(
                &list,
                &fx.admin,
                json!({"base_url": url, "token": "sk-sneaky"}),
            )
            .await,
            app.patch(
                &one,
                &fx.admin,
                json!({"base_url": url, "token": "sk-sneaky"}),
            )
            .await,
            app.patch(
                &format!("{list}/{}", fx.provider_id),
                &fx.admin,
                json!({"base_url": url, "token": "sk-sneaky"}),
            )
            .await,
        ] {
            r.expect(422);
            assert_eq!(r.error_fields(), ["base_url"], "{url}");
            assert_eq!(
                r.body["error"]["details"], by_provider.body["error"]["details"],
                "{url}"
            );
        }
    }
    assert_eq!(snapshot(&app, &fx).await, before);
}

/// The provider's token, its endpoints' tokens and its header values never
/// leave the server: not in any answer, the audit log, the log output, or
/// the tables.
#[tokio::test]
async fn endpoint_tokens_and_header_values_are_never_disclosed() {
    let app = TestApp::spawn().await;
    let fx = OrgFixture::create(&app, "sec").await;
    let list = endpoints_of(&fx);
    let provider = provider_of(&fx);
    let endpoint_token = format!("sk-endpoint-{}", uuid::Uuid::new_v4().simple());
    let header_value = format!("hv-{}", uuid::Uuid::new_v4().simple());
    let rotated = format!("sk-rotated-{}", uuid::Uuid::new_v4().simple());
    app.patch(
        &provider,
        &fx.admin,
        json!({"headers": {"api-key": header_value}}),
    )
    .await
    .expect(200);
    let created = app
        .post(
            &list,
            &fx.admin,
            json!({"base_url": "https://gpu2.sec.example.com", "token": endpoint_token}),
        )
        .await;
    created.expect(201);
    let one = format!("{list}/{}", created.id());
    app.patch(&one, &fx.admin, json!({"token": rotated, "weight": 5}))
        .await
        .expect(200);
    // Refused input is not echoed either.
    app.patch(
        &one,
        &fx.admin,
        json!({"token": format!("{endpoint_token}\n")}),
    )
    .await
    .expect(422);
    app.patch(
        &provider,
        &fx.admin,
        json!({"headers": {"Authorization": header_value}}),
    )
    .await
    .expect(422);
    app.patch(
        &provider,
        &fx.admin,
        json!({"headers": {"X-Bad": format!("{header_value}\r\n")}}),
    )
    .await
    .expect(422);
    for token in [&fx.member, &fx.admin, &fx.owner] {
        app.get(&list, token).await.expect(200);
        app.get(&provider, token).await.expect(200);
        app.get(&format!("/api/v1/orgs/{}/provider-keys", fx.id), token)
            .await
            .expect(200);
    }
    app.post(&format!("{provider}/test"), &fx.admin, json!({}))
        .await
        .expect(200);
    let audit = app
        .get(&format!("/api/v1/orgs/{}/audit-log", fx.id), &fx.admin)
        .await;
    audit.expect(200);
    app.delete(&one, &fx.admin).await.expect(204);
    for secret in [&fx.provider_token, &endpoint_token, &rotated, &header_value] {
        app.assert_never_disclosed(secret);
        assert!(!audit.text.contains(secret.as_str()));
    }
    // A dump of the tables holds none of them in plain text.
    let dump: Vec<String> = sqlx::query_scalar(
        "SELECT row_to_json(t)::text FROM provider_keys t
         UNION ALL SELECT row_to_json(t)::text FROM provider_endpoints t
         UNION ALL SELECT row_to_json(t)::text FROM audit_log t",
    )
    .fetch_all(app.db.db.pool())
    .await
    .unwrap();
    let dump = dump.join("\n");
    assert!(dump.contains("api-key"), "the dump is of the right rows");
    for secret in [&fx.provider_token, &endpoint_token, &rotated, &header_value] {
        assert!(!dump.contains(secret.as_str()), "{secret} in a table");
    }
}

/// Health as the gateways report it on Redis: the worst fresh view of each
/// endpoint, in the endpoint list and in the provider's answers alike;
/// `unknown` where no replica reported; and when Redis is gone, `unknown`
/// at once rather than an error.
#[tokio::test]
async fn health_is_the_worst_view_the_gateways_report_and_unknown_when_redis_is_gone() {
    use std::time::{Duration, Instant};
    use storage::domain::routing::EndpointHealth::{Ejected, Healthy, Probing};
    use uuid::Uuid;

    let Some(mut redis) = testkit::RedisServer::start() else {
        return;
    };
    let urls = [redis.url()];
    let app = TestApp::spawn_with(crate::helpers::Opts {
        health: Some(limits::HealthViews::open(&urls, Duration::from_millis(50)).unwrap()),
        ..Default::default()
    })
    .await;
    let fx = OrgFixture::create(&app, "health").await;
    let list = endpoints_of(&fx);
    let mut ids = vec![fx.provider_id.clone()];
    for (n, token) in [
        (2, "sk-second-endpoint-1111"),
        (3, "sk-third-endpoint-2222"),
    ] {
        let body =
            json!({"base_url": format!("https://gpu{n}.health.example.com"), "token": token});
        ids.push(app.post(&list, &fx.admin, body).await.expect(201).id());
    }
    let [own, second, third] = [0, 1, 2].map(|i| Uuid::parse_str(&ids[i]).unwrap());
    let org = Uuid::parse_str(&fx.id).unwrap();

    // Two gateway replicas: one sees the second endpoint ejected, the other healthy.
    let gateways = limits::HealthViews::open(&urls, Duration::from_millis(500)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while gateways
        .report("replica-a", org, &[(own, Healthy), (second, Healthy)])
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "never reached Redis");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gateways
        .report("replica-b", org, &[(own, Probing), (second, Ejected)])
        .await
        .unwrap();
    let healths = |r: &Resp| -> Vec<String> {
        r.body["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["health"].as_str().unwrap().to_owned())
            .collect()
    };
    let want = ["probing", "ejected", "unknown"];
    // The API's own connection is made in the background.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = app.get(&list, &fx.member).await;
        r.expect(200);
        if healths(&r) == want {
            break;
        }
        assert!(Instant::now() < deadline, "{}", r.text);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let p = app.get(&provider_of(&fx), &fx.member).await;
    let shown: Vec<&str> = p.body["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["health"].as_str().unwrap())
        .collect();
    assert_eq!(shown, want);
    let all = app
        .get(&format!("/api/v1/orgs/{}/provider-keys", fx.id), &fx.member)
        .await;
    assert_eq!(all.body["data"][0]["endpoints"], p.body["endpoints"]);
    // A changed endpoint is answered with its health too.
    let patched = app
        .patch(
            &format!("{list}/{}", ids[1]),
            &fx.admin,
            json!({"weight": 2}),
        )
        .await;
    patched.expect(200);
    assert_eq!(patched.body["health"], "ejected");
    // Replica B's view recovers: healthy over healthy.
    gateways
        .report(
            "replica-b",
            org,
            &[(own, Healthy), (second, Healthy), (third, Healthy)],
        )
        .await
        .unwrap();
    assert_eq!(
        healths(&app.get(&list, &fx.member).await),
        ["healthy", "healthy", "healthy"]
    );

    // Redis gone: every endpoint unknown, quickly, never an error.
    redis.kill();
    for _ in 0..5 {
        let start = Instant::now();
        let r = app.get(&list, &fx.member).await;
        r.expect(200);
        assert_eq!(healths(&r), ["unknown", "unknown", "unknown"]);
        assert!(
            start.elapsed() < Duration::from_millis(500),
            "{:?}",
            start.elapsed()
        );
        app.get(&provider_of(&fx), &fx.member).await.expect(200);
    }
}
