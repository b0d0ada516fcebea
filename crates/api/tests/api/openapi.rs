//! The OpenAPI document states the rules the server enforces, so a client
//! generated from it does not send what the server refuses; and the server
//! answers what the document says (405 with `Allow`, 422 for the rules a
//! schema cannot express).

use regex::Regex;
use reqwest::Method;
use serde_json::{json, Value};
use storage::domain::{parse_label, BaseUrl, ProviderName};
use storage::secrets::ProviderToken;

use crate::helpers::{OrgFixture, TestApp};

async fn document(app: &TestApp) -> Value {
    let r = app.call(Method::GET, "/api/openapi.json", None, None).await;
    r.expect(200);
    serde_json::from_str(&r.text).expect("the document is JSON")
}

fn schema<'a>(doc: &'a Value, name: &str) -> &'a Value {
    let s = &doc["components"]["schemas"][name];
    assert!(s.is_object(), "no schema {name}");
    s
}

fn query_param<'a>(doc: &'a Value, path: &str, name: &str) -> &'a Value {
    doc["paths"][path]["get"]["parameters"]
        .as_array()
        .unwrap_or_else(|| panic!("no parameters on GET {path}"))
        .iter()
        .find(|p| p["name"] == name && p["in"] == "query")
        .map(|p| &p["schema"])
        .unwrap_or_else(|| panic!("GET {path} has no query parameter {name}"))
}

fn pattern(s: &Value) -> Regex {
    Regex::new(s["pattern"].as_str().expect("a pattern")).expect("the pattern compiles")
}

#[tokio::test]
async fn document_states_the_validators_rules() {
    let app = TestApp::spawn().await;
    let doc = document(&app).await;

    // Provider names: on both bodies and on the `provider` filter of the logs.
    let logs = "/api/v1/orgs/{org_id}/logs";
    for name in [
        &schema(&doc, "ProviderKeyCreate")["properties"]["name"],
        &schema(&doc, "ProviderKeyPatch")["properties"]["name"],
        query_param(&doc, logs, "provider"),
    ] {
        assert_eq!(name["pattern"], "^[a-z]+$");
        assert_eq!(name["maxLength"], 64);
    }
    let create = schema(&doc, "ProviderKeyCreate");
    assert_eq!(create["additionalProperties"], false);
    assert_eq!(
        create["required"],
        json!(["name", "base_url", "token"]),
        "{create}"
    );
    let patch = schema(&doc, "ProviderKeyPatch");
    assert_eq!(patch["additionalProperties"], false);
    assert_eq!(patch["minProperties"], 1);
    assert_eq!(
        patch["properties"]["status"]["enum"],
        json!(["active", "inactive"])
    );
    let token = &create["properties"]["token"];
    assert_eq!(token["minLength"], 1);
    assert_eq!(token["maxLength"], 4096);
    assert!(token["pattern"].is_string() && token["writeOnly"] == true);
    let base_url = &create["properties"]["base_url"];
    assert!(base_url["pattern"]
        .as_str()
        .unwrap()
        .starts_with("^https://"));
    assert_eq!(base_url["maxLength"], 2048);

    // Accounts.
    let signup = &schema(&doc, "Signup")["properties"];
    assert_eq!(signup["password"]["minLength"], 8);
    assert_eq!(signup["password"]["maxLength"], 1024);
    assert_eq!(signup["email"]["format"], "email");
    assert_eq!(signup["email"]["maxLength"], 320);
    assert_eq!(
        schema(&doc, "Login")["properties"]["password"]["maxLength"],
        4096
    );

    // Names, roles and expiry.
    for label in [
        &schema(&doc, "OrgInput")["properties"]["name"],
        &schema(&doc, "ApiKeyCreate")["properties"]["name"],
    ] {
        assert_eq!(label["minLength"], 1);
        assert_eq!(label["maxLength"], 200);
        assert!(label["pattern"].is_string());
    }
    let roles = json!(["owner", "admin", "member"]);
    assert_eq!(
        schema(&doc, "MemberPatch")["properties"]["role"]["enum"],
        roles
    );
    assert_eq!(schema(&doc, "Invite")["properties"]["role"]["enum"], roles);
    assert_eq!(schema(&doc, "Org")["properties"]["role"]["enum"], roles);
    let expires = &schema(&doc, "ApiKeyCreate")["properties"]["expires_at"];
    assert_eq!(expires["format"], "date-time");
    assert!(expires["description"].as_str().unwrap().contains("future"));

    // Query parameters: cursors, page sizes, ranges, windows, enums.
    for (path, max) in [
        ("/api/v1/orgs/{org_id}/api-keys", 200),
        ("/api/v1/orgs/{org_id}/audit-log", 200),
        (logs, 500),
    ] {
        assert_eq!(query_param(&doc, path, "cursor")["minLength"], 1);
        let limit = query_param(&doc, path, "limit");
        assert_eq!(
            (&limit["minimum"], &limit["maximum"]),
            (&json!(1), &json!(max))
        );
    }
    let status = query_param(&doc, logs, "status");
    assert_eq!(
        (&status["minimum"], &status["maximum"]),
        (&json!(100), &json!(599))
    );
    let usage = "/api/v1/orgs/{org_id}/usage";
    assert_eq!(
        query_param(&doc, usage, "group_by")["enum"],
        json!(["day", "model", "provider", "api_key", "endpoint"])
    );
    for path in [usage, logs] {
        let from = doc["paths"][path]["get"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "from")
            .unwrap();
        assert!(from["description"].as_str().unwrap().contains("422"));
        assert!(doc["paths"][path]["get"]["responses"]["422"].is_object());
    }
}

#[tokio::test]
async fn documented_patterns_accept_only_what_the_validators_accept() {
    let app = TestApp::spawn().await;
    let doc = document(&app).await;
    let create = &schema(&doc, "ProviderKeyCreate")["properties"];

    // Exact: the pattern and the parser agree both ways.
    let name = pattern(&create["name"]);
    for s in [
        "mycompany",
        "a",
        "MyCompany",
        "my-company",
        "my_company",
        "123test",
        "",
        "caf\u{e9}",
        "abc\n",
        "a b",
    ] {
        assert_eq!(
            name.is_match(s),
            ProviderName::parse(s).is_ok(),
            "name {s:?}"
        );
    }
    let token = pattern(&create["token"]);
    for s in [
        "sk-abc",
        "a",
        "with inner space",
        " lead",
        "trail ",
        "tab\there",
        "caf\u{e9}",
        "nl\n",
        "~!@#$%^&*()",
        "",
    ] {
        assert_eq!(
            token.is_match(s),
            ProviderToken::parse(s).is_ok(),
            "token {s:?}"
        );
    }
    // Labels: the parser also takes control characters it trims away.
    let label = pattern(&schema(&doc, "OrgInput")["properties"]["name"]);
    for s in ["Acme", " padded ", "\u{3000}x", "é", "a\u{feff}"] {
        assert!(
            label.is_match(s) && parse_label("name", s).is_ok(),
            "label {s:?}"
        );
    }
    for s in ["   ", "", "tab\tin", "bell\u{7}", "c1\u{85}x", "\u{2028}"] {
        assert!(
            !label.is_match(s) && parse_label("name", s).is_err(),
            "label {s:?}"
        );
    }

    // Base URL: whatever the pattern allows, the parser accepts; the classic
    // mistakes are refused by both.
    let base_url = pattern(&create["base_url"]);
    for ok in [
        "https://api.example.com",
        "https://api.example.com/",
        "https://h.example.com:8443/openai/",
        "https://1.2.3.4",
        "https://h.example.com/v1/x",
        "https://h.example.com/v2",
        "https://h.example.com/V",
        "https://h.example.com/v1x",
        "https://h.example.com/a//b/...",
        "https://v1/",
        "https://h.example.com/~u/(x);a=b,c@d:e",
    ] {
        assert!(base_url.is_match(ok), "{ok} not matched");
        assert!(BaseUrl::parse(ok).is_ok(), "{ok} matched but refused");
    }
    for bad in [
        "http://api.example.com",
        "https://user:pw@api.example.com",
        "https://api.example.com?x=1",
        "https://api.example.com#frag",
        "https://api.example.com/v1",
        "https://api.example.com/V1//",
        "https://api.example.com/v1/.",
        "https://api.example.com/a/../v1",
        "https://api.example.com\\v1",
        "https://1.2.3.4.5",
        "https://api.example.com:65536",
        "https://",
        "not a url",
    ] {
        assert!(!base_url.is_match(bad), "{bad} matched");
    }
    // And generated-looking edge cases the pattern allows all parse.
    for host in [
        "a",
        "a-b.c",
        "x.y.z9",
        "0.0.0.0",
        "255.255.255.255",
        "a.b-c.d",
    ] {
        for path in ["", "/", "/.../", "/a.b/c.", "/v1/v1.", "/!$&'()*+,;=:@-_~"] {
            let url = format!("https://{host}:443{path}");
            assert!(base_url.is_match(&url), "{url} not matched");
            assert!(BaseUrl::parse(&url).is_ok(), "{url} matched but refused");
        }
    }
}

#[tokio::test]
async fn wrong_method_answers_405_with_the_documented_methods_in_allow() {
    let app = TestApp::spawn().await;
    let doc = document(&app).await;
    let id = uuid::Uuid::new_v4().to_string();
    for (path, item) in doc["paths"].as_object().unwrap() {
        let mut documented: Vec<String> = item
            .as_object()
            .unwrap()
            .keys()
            .map(|m| m.to_uppercase())
            .collect();
        documented.sort();
        let wrong = ["PUT", "PATCH", "DELETE", "POST", "GET"]
            .into_iter()
            .find(|m| !documented.iter().any(|d| d == m))
            .expect("a path that takes every method");
        let url = path
            .replace("{org_id}", &id)
            .replace("{user_id}", &id)
            .replace("{endpoint_id}", &id)
            .replace("{id}", &id);
        let r = app
            .call(
                Method::from_bytes(wrong.as_bytes()).unwrap(),
                &url,
                None,
                None,
            )
            .await;
        r.expect(405);
        assert_eq!(r.code(), "method_not_allowed");
        assert!(r.error_fields().is_empty());
        let allow = r.headers["allow"].to_str().unwrap();
        let mut allowed: Vec<String> = allow.split(", ").map(str::to_owned).collect();
        allowed.sort();
        assert_eq!(allowed, documented, "{wrong} {path}: Allow {allow}");
    }
}

#[tokio::test]
async fn rules_no_schema_can_state_answer_their_documented_422() {
    let app = TestApp::spawn().await;
    let (token, _) = app.signup("rules@example.com").await;
    let org = app.create_org(&token, "Rules").await;

    let past = app
        .post(
            &format!("/api/v1/orgs/{org}/api-keys"),
            &token,
            json!({"name": "old", "expires_at": "2020-01-01T00:00:00Z"}),
        )
        .await;
    past.expect(422);
    assert_eq!(past.error_fields(), ["expires_at"]);

    for path in ["usage", "logs"] {
        let base = format!("/api/v1/orgs/{org}/{path}");
        let reversed = app
            .get(
                &format!("{base}?from=2025-02-01T00:00:00Z&to=2025-01-01T00:00:00Z"),
                &token,
            )
            .await;
        reversed.expect(422);
        assert_eq!(reversed.error_fields(), ["from"]);
        // An empty window is no error: from <= to.
        app.get(
            &format!("{base}?from=2025-01-01T00:00:00Z&to=2025-01-01T00:00:00Z"),
            &token,
        )
        .await
        .expect(200);
    }
    for path in ["logs?cursor=", "api-keys?cursor=", "audit-log?cursor=x"] {
        let r = app.get(&format!("/api/v1/orgs/{org}/{path}"), &token).await;
        r.expect(422);
        assert_eq!(r.error_fields(), ["cursor"]);
    }

    // Login counts characters, as the document's maxLength does: 3000
    // two-byte characters are a wrong password, not a malformed one.
    let long = app
        .call(
            Method::POST,
            "/api/v1/auth/login",
            None,
            Some(json!({"email": "rules@example.com", "password": "é".repeat(3000)})),
        )
        .await;
    long.expect(401);
    assert_eq!(long.code(), "invalid_credentials");
}

/// The provider and endpoint answers carry exactly the fields their schemas
/// name, all of them required, and the write schemas state the rules.
#[tokio::test]
async fn provider_and_endpoint_answers_are_what_the_document_says() {
    let app = TestApp::spawn().await;
    let doc = document(&app).await;
    let fx = OrgFixture::create(&app, "doc").await;
    let endpoints = format!(
        "/api/v1/orgs/{}/provider-keys/{}/endpoints",
        fx.id, fx.provider_id
    );
    let endpoint = app
        .post(
            &endpoints,
            &fx.admin,
            json!({"base_url": "https://gpu2.doc.example.com", "token": "sk-doc-second", "weight": 2}),
        )
        .await;
    endpoint.expect(201);
    app.patch(
        &format!("/api/v1/orgs/{}/provider-keys/{}", fx.id, fx.provider_id),
        &fx.admin,
        json!({"headers": {"X-Doc": "v"}, "timeouts": {"total_ms": 1000}}),
    )
    .await
    .expect(200);
    let provider = app
        .get(
            &format!("/api/v1/orgs/{}/provider-keys/{}", fx.id, fx.provider_id),
            &fx.member,
        )
        .await;
    provider.expect(200);
    let sorted = |v: &Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    for (name, answer) in [
        ("ProviderKey", &provider.body),
        ("ProviderEndpoint", &endpoint.body),
        ("ProviderEndpoint", &provider.body["endpoints"][0]),
    ] {
        let s = schema(&doc, name);
        let mut required: Vec<String> = s["required"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect();
        required.sort();
        assert_eq!(sorted(&s["properties"]), sorted(answer), "{name}");
        assert_eq!(required, sorted(answer), "{name}");
    }
    let timeouts = &schema(&doc, "ProviderKey")["properties"]["timeouts"];
    assert_eq!(
        sorted(&timeouts["properties"]),
        sorted(&provider.body["timeouts"])
    );
    let e = &schema(&doc, "ProviderEndpoint")["properties"];
    assert_eq!(
        e["health"]["enum"],
        json!(["healthy", "ejected", "probing", "unknown"])
    );
    assert_eq!(
        (&e["weight"]["minimum"], &e["weight"]["maximum"]),
        (&json!(1), &json!(1000))
    );
    let create = schema(&doc, "ProviderEndpointCreate");
    assert_eq!(create["required"], json!(["base_url", "token"]));
    assert_eq!(create["additionalProperties"], false);
    let patch = schema(&doc, "ProviderEndpointPatch");
    assert_eq!(patch["minProperties"], 1);
    assert!(patch["description"].as_str().unwrap().contains("token"));
    let headers = &schema(&doc, "ProviderKeyPatch")["properties"]["headers"];
    assert_eq!(headers["maxProperties"], 32);
    assert_eq!(headers["writeOnly"], true);
    let description = headers["description"].as_str().unwrap();
    for reserved in [
        "authorization",
        "host",
        "x-request-id",
        "traceparent",
        "proxy-*",
    ] {
        assert!(description.contains(reserved), "{reserved}: {description}");
    }
    let delete =
        &doc["paths"]["/api/v1/orgs/{org_id}/provider-keys/{id}/endpoints/{endpoint_id}"]["delete"];
    assert!(delete["responses"]["409"]["description"]
        .as_str()
        .unwrap()
        .contains("own_endpoint"));
    let log = &schema(&doc, "RequestLog")["properties"];
    assert_eq!(log["endpoint_id"]["format"], "uuid");
    assert_eq!(log["attempts"]["minimum"], 1);
}
