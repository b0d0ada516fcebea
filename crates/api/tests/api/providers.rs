use serde_json::json;
use testkit::MockUpstream;

use crate::helpers::{Opts, OrgFixture, TestApp};

#[tokio::test]
async fn provider_key_lifecycle() {
    let app = TestApp::spawn().await;
    let (admin, _) = app.signup("pat@example.com").await;
    let org = app.create_org(&admin, "P").await;
    let secret = "sk-lifecycle-0123456789-WXYZ";
    let created = app
        .create_provider(
            &admin,
            &org,
            "mycompany",
            "https://api.example.com/",
            secret,
        )
        .await;
    created.expect(201);
    let b = &created.body;
    assert_eq!(b["name"], "mycompany");
    assert_eq!(
        b["base_url"], "https://api.example.com",
        "trailing / dropped"
    );
    assert_eq!(b["token_hint"], "WXYZ");
    assert_eq!(b["status"], "active");
    let mut keys: Vec<_> = b.as_object().unwrap().keys().cloned().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "base_url",
            "created_at",
            "endpoints",
            "headers",
            "id",
            "name",
            "prices",
            "status",
            "timeouts",
            "token_hint",
            "updated_at"
        ]
    );
    let id = created.id();
    // Its base URL and token are its first endpoint; no headers, the gateway's timeouts.
    assert_eq!(
        b["endpoints"],
        json!([{"id": id, "base_url": "https://api.example.com", "token_hint": "WXYZ", "weight": 1, "health": "unknown"}])
    );
    assert_eq!(b["headers"], json!([]));
    assert_eq!(
        b["timeouts"],
        json!({"connect_ms": null, "first_byte_ms": null, "total_ms": null})
    );
    let path = format!("/api/v1/orgs/{org}/provider-keys/{id}");

    let list = app
        .get(&format!("/api/v1/orgs/{org}/provider-keys"), &admin)
        .await;
    list.expect(200);
    assert_eq!(list.body["data"][0], *b);
    assert_eq!(app.get(&path, &admin).await.expect(200).body, *b);

    let patched = app
        .patch(
            &path,
            &admin,
            json!({"name": "internal", "base_url": "https://llm.internal.example.com/openai", "token": "sk-new-token-ABCD", "status": "inactive"}),
        )
        .await;
    patched.expect(200);
    assert_eq!(patched.body["name"], "internal");
    assert_eq!(
        patched.body["base_url"],
        "https://llm.internal.example.com/openai"
    );
    assert_eq!(patched.body["token_hint"], "ABCD");
    assert_eq!(patched.body["status"], "inactive");
    let stored = app
        .db
        .db
        .provider_key_with_token(org.parse().unwrap(), id.parse().unwrap())
        .await
        .unwrap();
    assert_eq!(stored.token.expose_secret(), "sk-new-token-ABCD");

    let bad = app.patch(&path, &admin, json!({"status": "paused"})).await;
    bad.expect(422);
    assert_eq!(bad.error_fields(), ["status"]);
    let empty = app.patch(&path, &admin, json!({})).await;
    empty.expect(422);
    let typo = app
        .patch(&path, &admin, json!({"baseurl": "https://x.example.com"}))
        .await;
    typo.expect(422);
    assert_eq!(typo.error_fields(), ["body", "baseurl"]);

    app.delete(&path, &admin).await.expect(204);
    app.get(&path, &admin).await.expect(404);
    app.delete(&path, &admin).await.expect(404);
    app.assert_never_disclosed(secret);
    app.assert_never_disclosed("sk-new-token-ABCD");
}

#[tokio::test]
async fn provider_names_follow_the_rule() {
    let app = TestApp::spawn().await;
    let (admin, _) = app.signup("nina@example.com").await;
    let org = app.create_org(&admin, "N").await;
    for name in ["mycompany", "internal", "testing"] {
        app.create_provider(&admin, &org, name, "https://llm.example.com", "sk-1")
            .await
            .expect(201);
    }
    let long = "a".repeat(65);
    for name in [
        "MyCompany",
        "my-company",
        "my_company",
        "123test",
        "",
        "my company",
        long.as_str(),
    ] {
        let r = app
            .create_provider(&admin, &org, name, "https://llm.example.com", "sk-1")
            .await;
        r.expect(422);
        assert_eq!(r.error_fields(), ["name"], "{name}");
        let message = r.body["error"]["details"][0]["message"].as_str().unwrap();
        assert!(message.contains("^[a-z]+$"), "{name}: {message}");
    }
    // PATCH applies the same rule.
    let id = app
        .get(&format!("/api/v1/orgs/{org}/provider-keys"), &admin)
        .await
        .body["data"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = app
        .patch(
            &format!("/api/v1/orgs/{org}/provider-keys/{id}"),
            &admin,
            json!({"name": "Bad-Name"}),
        )
        .await;
    r.expect(422);
    assert!(r.text.contains("^[a-z]+$"));
    // Missing fields and wrong types are named too.
    let r = app
        .post(
            &format!("/api/v1/orgs/{org}/provider-keys"),
            &admin,
            json!({"name": 7}),
        )
        .await;
    r.expect(422);
    assert_eq!(r.error_fields(), ["name", "base_url", "token"]);
}

#[tokio::test]
async fn base_urls_are_checked_on_create_and_patch() {
    let app = TestApp::spawn().await;
    let (admin, _) = app.signup("uma@example.com").await;
    let org = app.create_org(&admin, "U").await;
    let refused = [
        ("http://api.example.com", "https"),
        ("ftp://api.example.com", "https"),
        ("https://user:pw@api.example.com", "credentials"),
        ("https://api.example.com?x=1", "query"),
        ("https://api.example.com#frag", "fragment"),
        ("https://api.example.com/v1", "/v1/chat/completions"),
        ("https://api.example.com/v1/", "/v1/chat/completions"),
        ("https://127.0.0.1", "LLMGW_UPSTREAM_ALLOW_PRIVATE"),
        ("https://169.254.169.254", "LLMGW_UPSTREAM_ALLOW_PRIVATE"),
        ("https://[::1]", "LLMGW_UPSTREAM_ALLOW_PRIVATE"),
        ("https://10.0.0.1", "LLMGW_UPSTREAM_ALLOW_PRIVATE"),
        ("https://localhost", "LLMGW_UPSTREAM_ALLOW_PRIVATE"),
        ("https://2130706433", "LLMGW_UPSTREAM_ALLOW_PRIVATE"),
        ("https://[::ffff:127.0.0.1]", "LLMGW_UPSTREAM_ALLOW_PRIVATE"),
        ("https://100.64.0.1", "LLMGW_UPSTREAM_ALLOW_PRIVATE"),
        ("not a url", "valid URL"),
    ];
    for (url, hint) in refused {
        let r = app
            .create_provider(&admin, &org, "refused", url, "sk-1")
            .await;
        r.expect(422);
        assert_eq!(r.error_fields(), ["base_url"], "{url}");
        assert!(
            r.body["error"]["details"][0]["message"]
                .as_str()
                .unwrap()
                .contains(hint),
            "{url}: {}",
            r.text
        );
    }
    assert_eq!(
        app.get(&format!("/api/v1/orgs/{org}/provider-keys"), &admin)
            .await
            .body["data"],
        json!([])
    );

    // A path is allowed; a name that does not resolve is left to the connect-time check.
    let ok = app
        .create_provider(
            &admin,
            &org,
            "pathy",
            "https://gw.example.com/team/openai/",
            "sk-1",
        )
        .await;
    ok.expect(201);
    assert_eq!(ok.body["base_url"], "https://gw.example.com/team/openai");
    let id = ok.id();
    let path = format!("/api/v1/orgs/{org}/provider-keys/{id}");
    for url in [
        "https://127.0.0.1",
        "https://localhost",
        "http://gw.example.com",
        "https://gw.example.com/v1",
    ] {
        app.patch(&path, &admin, json!({"base_url": url}))
            .await
            .expect(422);
    }
    assert_eq!(
        app.get(&path, &admin).await.body["base_url"],
        "https://gw.example.com/team/openai"
    );
}

#[tokio::test]
async fn duplicate_names_conflict_even_when_concurrent() {
    let app = TestApp::spawn().await;
    let fx = OrgFixture::create(&app, "dup").await;
    let org = &fx.id;
    let r = app
        .create_provider(
            &fx.admin,
            org,
            "mycompany",
            "https://other.example.com",
            "sk-2",
        )
        .await;
    r.expect(409);
    assert_eq!(r.code(), "conflict");

    let (a, b) = tokio::join!(
        app.create_provider(&fx.admin, org, "racing", "https://a.example.com", "sk-a"),
        app.create_provider(&fx.owner, org, "racing", "https://b.example.com", "sk-b"),
    );
    let mut statuses = [a.status, b.status];
    statuses.sort_unstable();
    assert_eq!(statuses, [201, 409], "{} / {}", a.text, b.text);

    // Renaming onto a taken name conflicts too; other orgs may reuse the name.
    let other = app
        .create_provider(&fx.admin, org, "other", "https://c.example.com", "sk-c")
        .await
        .id();
    app.patch(
        &format!("/api/v1/orgs/{org}/provider-keys/{other}"),
        &fx.admin,
        json!({"name": "racing"}),
    )
    .await
    .expect(409);
    let (stranger, _) = app.signup("x@example.com").await;
    let org2 = app.create_org(&stranger, "X").await;
    app.create_provider(&stranger, &org2, "racing", "https://a.example.com", "sk-d")
        .await
        .expect(201);
}

#[tokio::test]
async fn private_upstreams_are_accepted_when_allowed_and_tested() {
    let upstream = MockUpstream::start().await;
    let app = spawn_trusting(&upstream).await;
    let (admin, _) = app.signup("ivy@example.com").await;
    let org = app.create_org(&admin, "I").await;
    let secret = "sk-upstream-secret-9876";
    let created = app
        .create_provider(&admin, &org, "selfhosted", &upstream.base_url, secret)
        .await;
    created.expect(201);
    let id = created.id();

    let report = app
        .post(
            &format!("/api/v1/orgs/{org}/provider-keys/{id}/test"),
            &admin,
            json!({}),
        )
        .await;
    report.expect(200);
    assert_eq!(report.body["reachable"], true, "{}", report.text);
    assert_eq!(report.body["status"], 200);
    assert_eq!(report.body["model_count"], 2);
    assert_eq!(report.body["models"], json!(["model-a", "model-b"]));
    assert!(report.body["latency_ms"].as_u64().is_some());
    assert_eq!(report.body["error"], json!(null));
    let seen = upstream.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].method, "GET");
    assert_eq!(seen[0].path, "/v1/models");
    assert_eq!(
        seen[0].header("authorization"),
        Some(format!("Bearer {secret}").as_str())
    );
    app.assert_never_disclosed(secret);
}

/// The test reads the list through the same bounded probe as the gateway:
/// a list over its cap, or an answer that is not a list, is reported as such.
#[tokio::test]
async fn test_reports_a_list_too_large_or_not_a_list() {
    let upstream = MockUpstream::start().await;
    let app = spawn_trusting(&upstream).await;
    let (admin, _) = app.signup("lists@example.com").await;
    let org = app.create_org(&admin, "L").await;
    for (name, segment, error) in [
        ("huge", "huge", "larger than 4 MiB"),
        ("garbage", "garbage", "has no `data` array"),
    ] {
        let created = app
            .create_provider(
                &admin,
                &org,
                name,
                &format!("{}/{segment}", upstream.base_url),
                "sk-lists-1234",
            )
            .await;
        created.expect(201);
        let report = run_test(&app, &admin, &org, &created.id()).await;
        assert_eq!(report["reachable"], true, "{report}");
        assert_eq!(report["status"], 200);
        assert_eq!(report["model_count"], json!(null));
        assert_eq!(report["models"], json!([]));
        assert!(
            report["error"].as_str().unwrap().contains(error),
            "{name}: {report}"
        );
    }
}

#[tokio::test]
async fn test_reports_unreachable_and_refuses_private_addresses_at_connect_time() {
    let upstream = MockUpstream::start().await;
    let app = TestApp::spawn_with(Opts {
        ca_file: Some(upstream.ca.ca_file.clone()),
        ..Opts::default()
    })
    .await;
    let (admin, _) = app.signup("zed@example.com").await;
    let org = app.create_org(&admin, "Z").await;
    let created = app
        .create_provider(
            &admin,
            &org,
            "nowhere",
            "https://llm.does-not-exist.invalid",
            "sk-1",
        )
        .await;
    let r = app
        .post(
            &format!("/api/v1/orgs/{org}/provider-keys/{}/test", created.id()),
            &admin,
            json!({}),
        )
        .await;
    r.expect(200);
    assert_eq!(r.body["reachable"], false);
    assert_eq!(r.body["status"], json!(null));
    assert!(r.body["error"].is_string());

    // A row that points at loopback (saved before the policy changed, say) is
    // still refused when the test connects.
    let p = app
        .db
        .db
        .create_provider_key(
            org.parse().unwrap(),
            storage::Actor(None),
            &storage::domain::ProviderName::parse("sneaky").unwrap(),
            &storage::domain::BaseUrl::parse(&upstream.base_url).unwrap(),
            &storage::secrets::ProviderToken::parse("sk-sneaky").unwrap(),
        )
        .await
        .unwrap();
    let r = app
        .post(
            &format!("/api/v1/orgs/{org}/provider-keys/{}/test", p.id),
            &admin,
            json!({}),
        )
        .await;
    r.expect(200);
    assert_eq!(r.body["reachable"], false);
    assert!(
        r.body["error"].as_str().unwrap().contains("not allowed"),
        "{}",
        r.text
    );
    assert!(
        upstream.seen().is_empty(),
        "the loopback upstream was contacted"
    );
}

/// Saves a provider straight through storage, as one saved under an earlier
/// policy (the opt-in on, private upstreams allowed) would be.
async fn stored_provider(app: &TestApp, org: &str, name: &str, base_url: &str) -> String {
    app.db
        .db
        .create_provider_key(
            org.parse().unwrap(),
            storage::Actor(None),
            &storage::domain::ProviderName::parse(name).unwrap(),
            &storage::domain::BaseUrl::parse(base_url).unwrap(),
            &storage::secrets::ProviderToken::parse("sk-stored").unwrap(),
        )
        .await
        .unwrap()
        .id
        .to_string()
}

async fn run_test(app: &TestApp, admin: &str, org: &str, id: &str) -> serde_json::Value {
    let r = app
        .post(
            &format!("/api/v1/orgs/{org}/provider-keys/{id}/test"),
            admin,
            json!({}),
        )
        .await;
    r.expect(200);
    r.body.clone()
}

#[tokio::test]
async fn plain_http_base_urls_are_refused_by_default_with_the_opt_in_hint() {
    let app = TestApp::spawn_with(Opts {
        allow_private: true,
        ..Opts::default()
    })
    .await;
    let (admin, _) = app.signup("hal@example.com").await;
    let org = app.create_org(&admin, "H").await;
    let r = app
        .create_provider(&admin, &org, "local", "http://127.0.0.1:8000", "none")
        .await;
    r.expect(422);
    assert_eq!(r.error_fields(), ["base_url"]);
    let message = r.body["error"]["details"][0]["message"].as_str().unwrap();
    assert!(
        message.contains("LLMGW_UPSTREAM_ALLOW_HTTP=true") && message.contains("https://"),
        "{message}"
    );

    let ok = app
        .create_provider(&admin, &org, "secure", "https://llm.example.com", "sk-1")
        .await;
    ok.expect(201);
    let path = format!("/api/v1/orgs/{org}/provider-keys/{}", ok.id());
    let r = app
        .patch(&path, &admin, json!({"base_url": "http://llm.example.com"}))
        .await;
    r.expect(422);
    assert!(
        r.text.contains("LLMGW_UPSTREAM_ALLOW_HTTP=true"),
        "{}",
        r.text
    );
    assert_eq!(
        app.get(&path, &admin).await.body["base_url"],
        "https://llm.example.com"
    );
}

#[tokio::test]
async fn plain_http_upstream_is_saved_and_reached_with_the_opt_in() {
    let upstream = MockUpstream::start_plain_http().await;
    let app = TestApp::spawn_with(Opts {
        allow_http: true,
        allow_private: true,
        ..Opts::default()
    })
    .await;
    let (admin, _) = app.signup("ivy@example.com").await;
    let org = app.create_org(&admin, "I").await;
    let created = app
        .create_provider(&admin, &org, "local", &upstream.base_url, "none")
        .await;
    created.expect(201);
    // The answer shows the provider is plain http: its base URL says so.
    assert_eq!(created.body["base_url"], upstream.base_url);
    assert!(upstream.base_url.starts_with("http://"));
    let report = run_test(&app, &admin, &org, &created.id()).await;
    assert_eq!(report["reachable"], true, "{report}");
    assert_eq!(report["status"], 200);
    assert_eq!(report["model_count"], 2);
    assert_eq!(upstream.seen().len(), 1);
    assert_eq!(upstream.seen()[0].path, "/v1/models");
}

#[tokio::test]
async fn plain_http_upstreams_still_pass_the_ssrf_guard() {
    let upstream = MockUpstream::start_plain_http().await;
    let app = TestApp::spawn_with(Opts {
        allow_http: true,
        ..Opts::default()
    })
    .await;
    let (admin, _) = app.signup("jon@example.com").await;
    let org = app.create_org(&admin, "J").await;
    for url in [
        upstream.base_url.clone(),
        "http://169.254.169.254".to_owned(),
        "http://[::ffff:127.0.0.1]:8000".to_owned(),
        "http://localhost:8000".to_owned(),
        "http://10.0.0.1".to_owned(),
    ] {
        let r = app
            .create_provider(&admin, &org, "sneaky", &url, "none")
            .await;
        r.expect(422);
        assert!(
            r.text.contains("LLMGW_UPSTREAM_ALLOW_PRIVATE"),
            "{url}: {}",
            r.text
        );
    }
    // Rows saved while private upstreams were allowed are refused when
    // connecting: the literal by the client's check, the name by its resolver.
    let port = upstream.port;
    for (name, url) in [
        ("literal", format!("http://127.0.0.1:{port}")),
        ("named", format!("http://localhost:{port}")),
    ] {
        let id = stored_provider(&app, &org, name, &url).await;
        let report = run_test(&app, &admin, &org, &id).await;
        assert_eq!(report["reachable"], false, "{url}: {report}");
        assert!(
            report["error"].as_str().unwrap().contains("not allowed"),
            "{url}: {report}"
        );
    }
    assert!(
        upstream.seen().is_empty(),
        "the loopback upstream was contacted"
    );
}

#[tokio::test]
async fn plain_http_provider_is_refused_at_connect_time_once_the_opt_in_is_off() {
    let upstream = MockUpstream::start_plain_http().await;
    let app = TestApp::spawn_with(Opts {
        allow_private: true,
        ..Opts::default()
    })
    .await;
    let (admin, _) = app.signup("kim@example.com").await;
    let org = app.create_org(&admin, "K").await;
    // Saved while LLMGW_UPSTREAM_ALLOW_HTTP was on; this server runs without it.
    let id = stored_provider(&app, &org, "local", &upstream.base_url).await;
    let listed = app
        .get(&format!("/api/v1/orgs/{org}/provider-keys/{id}"), &admin)
        .await;
    listed.expect(200);
    assert_eq!(listed.body["base_url"], upstream.base_url);
    let report = run_test(&app, &admin, &org, &id).await;
    assert_eq!(report["reachable"], false, "{report}");
    assert!(
        report["error"]
            .as_str()
            .unwrap()
            .contains("LLMGW_UPSTREAM_ALLOW_HTTP=true"),
        "{report}"
    );
    assert!(upstream.seen().is_empty(), "a plain-http request went out");
}

/// The attack: map the internal network through the settings API's error texts.
#[tokio::test]
async fn ssrf_refusals_and_test_failures_name_no_address_and_no_cause_chain() {
    let app = TestApp::spawn().await;
    let (admin, _) = app.signup("oracle@example.com").await;
    let org = app.create_org(&admin, "O").await;
    for url in ["https://10.9.8.7", "https://localhost:8443/llm"] {
        let r = app
            .create_provider(&admin, &org, "probe", url, "sk-1")
            .await;
        r.expect(422);
        let message = r.body["error"]["details"][0]["message"].as_str().unwrap();
        assert_eq!(
            message,
            "base_url is refused: address not allowed — set LLMGW_UPSTREAM_ALLOW_PRIVATE=true to allow private and loopback upstreams (self-hosted deployments)",
            "{url}"
        );
        for leak in ["10.9.8.7", "127.0.0.1", "::1"] {
            assert!(!r.text.contains(leak), "{url}: {}", r.text);
        }
    }

    // An upstream whose certificate comes from a CA the server was not given.
    let upstream = MockUpstream::start().await;
    let app = TestApp::spawn_with(Opts {
        allow_private: true,
        ..Opts::default()
    })
    .await;
    let (admin, _) = app.signup("tls@example.com").await;
    let org = app.create_org(&admin, "T").await;
    let created = app
        .create_provider(&admin, &org, "internal", &upstream.base_url, "sk-1")
        .await;
    created.expect(201);
    let r = app
        .post(
            &format!("/api/v1/orgs/{org}/provider-keys/{}/test", created.id()),
            &admin,
            json!({}),
        )
        .await;
    r.expect(200);
    assert_eq!(r.body["reachable"], false);
    assert_eq!(
        r.body["error"],
        "TLS failure: certificate not trusted — set LLMGW_UPSTREAM_CA_FILE for an internal CA",
        "{}",
        r.text
    );
    assert!(!r.text.contains("127.0.0.1"), "{}", r.text);
    assert!(upstream.seen().is_empty());
}

/// The exfiltration attempt: an admin points the provider at a host they
/// control and asks for a connectivity test, hoping the stored token follows.
#[tokio::test]
async fn base_url_cannot_be_redirected_without_the_token() {
    let (legit, attacker, app) = legit_and_attacker().await;
    let (admin, _) = app.signup("mallory@example.com").await;
    let org = app.create_org(&admin, "M").await;
    let secret = "sk-write-only-provider-token-5150";
    let id = app
        .create_provider(&admin, &org, "mycompany", &legit.base_url, secret)
        .await
        .expect(201)
        .id();
    let path = format!("/api/v1/orgs/{org}/provider-keys/{id}");
    let test_path = format!("{path}/test");
    let test = || app.post(&test_path, &admin, json!({}));

    for body in [
        json!({"base_url": attacker.base_url}),
        json!({"base_url": format!("{}/", attacker.base_url), "name": "renamed", "status": "inactive"}),
        json!({"base_url": attacker.base_url, "token": null}),
    ] {
        let r = app.patch(&path, &admin, body).await;
        r.expect(422);
        assert_eq!(r.error_fields(), ["token"], "{}", r.text);
        let message = r.body["error"]["details"][0]["message"].as_str().unwrap();
        assert!(
            message.contains("token is required when base_url changes"),
            "{message}"
        );
    }
    let kept = app.get(&path, &admin).await;
    assert_eq!(kept.body["base_url"], legit.base_url.as_str());
    assert_eq!(kept.body["name"], "mycompany");
    assert_eq!(kept.body["status"], "active");
    assert_eq!(test().await.expect(200).body["reachable"], true);
    assert!(attacker.seen().is_empty(), "the attacker was contacted");
    assert_eq!(
        legit.seen()[0].header("authorization"),
        Some(format!("Bearer {secret}").as_str())
    );

    // Re-sending the current URL (in another spelling) is no change.
    app.patch(
        &path,
        &admin,
        json!({"base_url": format!("{}/", legit.base_url), "name": "internal"}),
    )
    .await
    .expect(200);

    // With a token of their own the admin may move the provider: only that
    // token ever reaches the new host.
    let own = "sk-admin-chosen-token-0001";
    let moved = app
        .patch(
            &path,
            &admin,
            json!({"base_url": attacker.base_url, "token": own}),
        )
        .await;
    moved.expect(200);
    assert_eq!(moved.body["base_url"], attacker.base_url.as_str());
    assert_eq!(test().await.expect(200).body["reachable"], true);
    let seen = attacker.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].header("authorization"),
        Some(format!("Bearer {own}").as_str())
    );
    assert!(seen
        .iter()
        .all(|s| s.headers.iter().all(|(_, v)| !v.contains(secret))));
    app.assert_never_disclosed(secret);
    app.assert_never_disclosed(own);
}

/// Someone with SQL access rewrites the base URL: the token no longer opens,
/// so the connectivity test sends nothing anywhere.
#[tokio::test]
async fn base_url_rewritten_in_sql_fails_closed_in_the_test() {
    let (legit, attacker, app) = legit_and_attacker().await;
    let (admin, _) = app.signup("eve@example.com").await;
    let org = app.create_org(&admin, "E").await;
    let secret = "sk-sql-rewrite-target-token-77";
    let id = app
        .create_provider(&admin, &org, "mycompany", &legit.base_url, secret)
        .await
        .expect(201)
        .id();
    sqlx::query("UPDATE provider_keys SET base_url = $1 WHERE id = $2::uuid")
        .bind(&attacker.base_url)
        .bind(&id)
        .execute(app.db.db.pool())
        .await
        .unwrap();
    let r = app
        .post(
            &format!("/api/v1/orgs/{org}/provider-keys/{id}/test"),
            &admin,
            json!({}),
        )
        .await;
    r.expect(200);
    assert_eq!(r.body["reachable"], false, "{}", r.text);
    assert_eq!(r.body["status"], json!(null));
    assert!(
        r.body["error"]
            .as_str()
            .unwrap()
            .contains("cannot be decrypted"),
        "{}",
        r.text
    );
    assert!(attacker.seen().is_empty(), "the attacker was contacted");
    assert!(legit.seen().is_empty());
    // Relabelled as the legacy format (which did not bind the URL), and
    // re-sealed as a restart would: still nothing opens, nothing is sent.
    sqlx::query("UPDATE provider_keys SET aad_version = 1 WHERE id = $1::uuid")
        .bind(&id)
        .execute(app.db.db.pool())
        .await
        .unwrap();
    let resealed = app.db.db.upgrade_legacy_tokens().await.unwrap();
    assert_eq!((resealed.rewritten, resealed.skipped.len()), (0, 1));
    let r = app
        .post(
            &format!("/api/v1/orgs/{org}/provider-keys/{id}/test"),
            &admin,
            json!({}),
        )
        .await;
    assert_eq!(r.expect(200).body["reachable"], false, "{}", r.text);
    assert!(attacker.seen().is_empty(), "the attacker was contacted");
    // Saving the token again (an admin's act) makes it usable at the new URL.
    app.patch(
        &format!("/api/v1/orgs/{org}/provider-keys/{id}"),
        &admin,
        json!({"token": "sk-fresh-token-after-repair"}),
    )
    .await
    .expect(200);
    assert_eq!(attacker.seen().len(), 0, "saving contacts nobody");
    app.assert_never_disclosed(secret);
}

/// An app that accepts private upstreams and trusts `upstream`'s CA.
async fn spawn_trusting(upstream: &MockUpstream) -> TestApp {
    TestApp::spawn_with(Opts {
        allow_private: true,
        ca_file: Some(upstream.ca.ca_file.clone()),
        ..Opts::default()
    })
    .await
}

/// A legitimate upstream, an attacker's upstream under the same CA, and an
/// app that trusts both.
async fn legit_and_attacker() -> (MockUpstream, MockUpstream, TestApp) {
    let legit = MockUpstream::start().await;
    let attacker = MockUpstream::start_with_ca(legit.ca.clone()).await;
    let app = spawn_trusting(&legit).await;
    (legit, attacker, app)
}
