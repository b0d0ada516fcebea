//! The `llmgw` binary end to end: configuration errors, the embedded
//! default, migrations, key rotation, user creation, graceful shutdown and
//! revocation across processes (the official OpenAI SDKs are in sdk.rs).

mod common;

use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use storage::Keyring;
use testkit::{MockUpstream, TestDb};

use common::{llmgw, Running};

#[test]
fn bad_configuration_exits_with_one_line_naming_the_variable() {
    for (var, value) in [
        ("LLMGW_GATEWAY_ADDR", "not-an-address"),
        ("LLMGW_MAX_BODY_BYTES", "lots"),
        ("LLMGW_UPSTREAM_ALLOW_PRIVATE", "perhaps"),
    ] {
        let out = llmgw().arg("serve").env(var, value).output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(var), "{err}");
    }
    let out = llmgw()
        .arg("migrate")
        .env(
            "DATABASE_URL",
            "postgres://postgres@127.0.0.1:5432/postgres",
        )
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("LLMGW_ENCRYPTION_KEYS"));
}

#[test]
fn keys_generate_prints_a_usable_key() {
    let out = llmgw().args(["keys", "generate"]).output().unwrap();
    assert!(out.status.success());
    let key = String::from_utf8(out.stdout).unwrap();
    assert!(Keyring::parse(&format!("1:{}", key.trim())).is_ok());
}

#[test]
fn embedded_default_serves_both_listeners_and_stops_cleanly() {
    if storage::embedded::find_binaries().is_none() {
        eprintln!("skipped: no PostgreSQL binaries on this machine");
        return;
    }
    let dir = std::env::temp_dir().join(format!("llmgw-e2e-{}", uuid::Uuid::new_v4().simple()));
    let mut cmd = llmgw();
    cmd.env("LLMGW_DATA_DIR", &dir);
    let running = Running::start(cmd);
    let client = reqwest::blocking::Client::new();
    for base in [&running.gateway, &running.api] {
        assert_eq!(
            client
                .get(format!("{base}/healthz"))
                .send()
                .unwrap()
                .status(),
            200
        );
        assert_eq!(
            client
                .get(format!("{base}/readyz"))
                .send()
                .unwrap()
                .status(),
            200
        );
    }
    let key_file = dir.join("encryption.key");
    assert!(key_file.exists());
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    let (status, logs) = running.terminate();
    assert!(status.success(), "exit {status:?}\n{logs}");
    assert!(logs.contains("local use"), "{logs}");
    // The cluster was stopped with the process.
    let pid = dir.join("pgdata").join("postmaster.pid");
    assert!(!pid.exists(), "embedded PostgreSQL still running\n{logs}");
    std::fs::remove_dir_all(&dir).ok();
}

/// An org with providers `alpha`, `beta`, `gamma` (token `sk-{name}-token`),
/// their ids in that order.
async fn three_providers(t: &TestDb) -> (uuid::Uuid, Vec<uuid::Uuid>) {
    let owner =
        t.db.create_user(
            &storage::domain::Email::parse(&format!("{}@example.com", uuid::Uuid::new_v4()))
                .unwrap(),
            "$argon2id$not-a-real-hash",
        )
        .await
        .unwrap();
    let org = t.db.create_org("Acme", owner.id).await.unwrap();
    let mut ids = Vec::new();
    for name in ["alpha", "beta", "gamma"] {
        let p =
            t.db.create_provider_key(
                org.id,
                storage::Actor(None),
                &storage::domain::ProviderName::parse(name).unwrap(),
                &storage::domain::BaseUrl::parse("https://llm.example.com").unwrap(),
                &storage::secrets::ProviderToken::parse(&format!("sk-{name}-token")).unwrap(),
            )
            .await
            .unwrap();
        ids.push(p.id);
    }
    (org.id, ids)
}

#[tokio::test]
async fn keys_rotate_reencrypts_a_populated_database() {
    let t = TestDb::new().await;
    let (key1, key2) = (
        t.keys.clone(),
        format!("2:{}", Keyring::generate_key_material()),
    );
    let (org, _) = three_providers(&t).await;
    let both = format!("{key1},{key2}");
    let run = || {
        llmgw()
            .args(["keys", "rotate"])
            .env("DATABASE_URL", t.url())
            .env("LLMGW_ENCRYPTION_KEYS", &both)
            .output()
            .unwrap()
    };
    let out = run();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("re-encrypted 3 token(s) under key id 2"));
    let out = run();
    assert!(String::from_utf8_lossy(&out.stdout).contains("re-encrypted 0 token(s)"));
    // Only key 2 is needed now.
    let db2 = t.reopen(&key2).await;
    for p in db2.active_providers(org).await.unwrap() {
        assert_eq!(
            p.token.expose_secret(),
            format!("sk-{}-token", p.provider.name)
        );
    }
}

#[tokio::test]
async fn keys_rotate_skips_a_row_it_cannot_decrypt_and_exits_non_zero() {
    let t = TestDb::new().await;
    let (org, ids) = three_providers(&t).await;
    let bad = ids[1];
    sqlx::query("UPDATE provider_keys SET token_ciphertext = set_byte(token_ciphertext, 0, get_byte(token_ciphertext, 0) # 1) WHERE id = $1")
        .bind(bad)
        .execute(t.db.pool())
        .await
        .unwrap();
    let both = format!("{},2:{}", t.keys, Keyring::generate_key_material());
    let out = llmgw()
        .args(["keys", "rotate"])
        .env("DATABASE_URL", t.url())
        .env("LLMGW_ENCRYPTION_KEYS", &both)
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("re-encrypted 2 token(s) under key id 2"),
        "{stdout}"
    );
    assert!(
        stderr.contains(&format!("skipped provider key {bad} (org {org})")),
        "{stderr}"
    );
    assert!(stderr.contains("failed authentication"), "{stderr}");
    assert!(
        stderr.contains("rotation incomplete: 1 token(s) skipped"),
        "{stderr}"
    );
    for id in [ids[0], ids[2]] {
        assert!(!stderr.contains(&id.to_string()), "{stderr}");
    }
    for name in ["alpha", "beta", "gamma"] {
        let token = format!("sk-{name}-token");
        assert!(!stdout.contains(&token) && !stderr.contains(&token));
    }
    let db2 = t.reopen(&both).await;
    let names: Vec<String> = db2
        .active_providers(org)
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.provider.name.as_str().to_owned())
        .collect();
    assert_eq!(names, ["alpha", "gamma"]);
    let key_ids: Vec<i32> = sqlx::query_scalar("SELECT key_id FROM provider_keys ORDER BY name")
        .fetch_all(t.db.pool())
        .await
        .unwrap();
    assert_eq!(key_ids, [2, 1, 2]);
}

#[tokio::test]
async fn start_up_reseals_legacy_tokens_to_bind_their_base_url() {
    let t = TestDb::new().await;
    let (org, ids) = three_providers(&t).await;
    for (id, name) in ids.iter().zip(["alpha", "beta", "gamma"]) {
        t.make_legacy_token(org, *id, &format!("sk-{name}-token"))
            .await;
    }
    // One legacy row does not open at all: start-up goes on without it.
    sqlx::query("UPDATE provider_keys SET token_ciphertext = set_byte(token_ciphertext, 0, get_byte(token_ciphertext, 0) # 1) WHERE id = $1")
        .bind(ids[2])
        .execute(t.db.pool())
        .await
        .unwrap();
    assert!(t.db.active_providers(org).await.unwrap().is_empty());
    let out = llmgw()
        .arg("migrate")
        .env("DATABASE_URL", t.url())
        .env("LLMGW_ENCRYPTION_KEYS", &t.keys)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("re-sealed provider tokens"), "{stderr}");
    assert!(stderr.contains(&ids[2].to_string()), "{stderr}");
    let versions: Vec<i16> =
        sqlx::query_scalar("SELECT aad_version FROM provider_keys ORDER BY name")
            .fetch_all(t.db.pool())
            .await
            .unwrap();
    assert_eq!(versions, [2, 2, 1]);
    let names: Vec<String> =
        t.db.active_providers(org)
            .await
            .unwrap()
            .into_iter()
            .map(|p| {
                assert_eq!(
                    p.token.expose_secret(),
                    format!("sk-{}-token", p.provider.name)
                );
                p.provider.name.as_str().to_owned()
            })
            .collect();
    assert_eq!(names, ["alpha", "beta"]);
    // Bound now: the same token no longer follows an edited URL.
    sqlx::query("UPDATE provider_keys SET base_url = 'https://attacker.example.net' WHERE id = $1")
        .bind(ids[0])
        .execute(t.db.pool())
        .await
        .unwrap();
    assert!(t.db.provider_key_with_token(org, ids[0]).await.is_err());
}

#[tokio::test]
async fn user_create_reads_the_password_from_stdin() {
    let t = TestDb::new().await;
    let mut child = llmgw()
        .args([
            "user",
            "create",
            "--email",
            "admin@example.com",
            "--password-stdin",
            "--org",
            "Acme",
        ])
        .env("DATABASE_URL", t.url())
        .env("LLMGW_ENCRYPTION_KEYS", &t.keys)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"a long password\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["org"]["role"], "owner");
    let creds =
        t.db.user_credentials(&storage::domain::Email::parse("admin@example.com").unwrap())
            .await
            .unwrap()
            .unwrap();
    assert!(storage::secrets::verify_password(
        Some(&creds.password_hash),
        &"a long password".to_owned().into()
    ));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("a long password"));
}

/// A key revoked through the settings API stops working on every running
/// gateway within a second: here a full `llmgw serve` and a second process
/// running `--only gateway` against the same database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_through_the_api_reaches_two_gateway_processes_within_a_second() {
    let t = TestDb::new().await;
    let upstream = MockUpstream::start().await;
    let a = common::llmgw_against(&t, &upstream);
    let b = common::llmgw_against(&t, &upstream);
    let full = tokio::task::spawn_blocking(move || Running::start(a))
        .await
        .unwrap();
    let second = tokio::task::spawn_blocking(move || Running::start_gateway_only(b))
        .await
        .unwrap();
    let tenant = common::provision(&full.api, &upstream.base_url, "sk-revocation-token-1").await;
    let http = reqwest::Client::new();
    let chat = |base: String| {
        let req = http
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(&tenant.api_key)
            .json(
                &json!({"model": "mycompany/m", "messages": [{"role": "user", "content": "hi"}]}),
            );
        async move { req.send().await.unwrap().status().as_u16() }
    };
    // Both gateways know (and cache) the key.
    for g in [&full.gateway, &second.gateway] {
        assert_eq!(chat(g.clone()).await, 200);
    }
    // The API-key list gives the key's id; revoke it through the API.
    let keys: Value = http
        .get(format!(
            "{}/api/v1/orgs/{}/api-keys",
            full.api, tenant.org_id
        ))
        .header("authorization", &tenant.bearer)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key_id = keys["data"][0]["id"].as_str().unwrap().to_owned();
    let revoked_at = Instant::now();
    let r = http
        .delete(format!(
            "{}/api/v1/orgs/{}/api-keys/{key_id}",
            full.api, tenant.org_id
        ))
        .header("authorization", &tenant.bearer)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    for g in [&full.gateway, &second.gateway] {
        loop {
            let status = chat(g.clone()).await;
            if status == 401 {
                break;
            }
            assert_eq!(status, 200);
            assert!(
                revoked_at.elapsed() < Duration::from_secs(1),
                "{g} still accepts a revoked key"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert!(revoked_at.elapsed() < Duration::from_secs(1));
}

/// The embedded-cluster tests need the machine's PostgreSQL binaries; under
/// `CI=true` their absence is a failure, not a skip.
fn have_postgres_binaries() -> bool {
    if storage::embedded::find_binaries().is_some() {
        return true;
    }
    assert!(
        std::env::var("CI").map_or(true, |v| v != "true"),
        "CI=true but no PostgreSQL binaries (initdb, pg_ctl) are installed"
    );
    eprintln!("skipped: no PostgreSQL binaries on this machine");
    false
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("llmgw-{tag}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Processes whose command line mentions `dir` (a postgres of a cluster under it).
fn processes_under(dir: &std::path::Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if !entry
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&needle) {
            found.push(cmdline);
        }
    }
    found
}

#[test]
fn dotenv_in_the_working_directory_is_read_and_the_environment_wins() {
    let dir = temp_dir("dotenv");
    std::fs::write(
        dir.join(".env"),
        "# local settings\nLLMGW_LOG_FORMAT=xml\nLLMGW_MAX_BODY_BYTES=lots\n",
    )
    .unwrap();
    // Only the file sets LLMGW_LOG_FORMAT: its bad value is reported.
    let out = llmgw().arg("serve").current_dir(&dir).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("LLMGW_LOG_FORMAT"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // The environment's value wins over the file's; the file's next bad value shows it was read.
    let out = llmgw()
        .arg("serve")
        .current_dir(&dir)
        .env("LLMGW_LOG_FORMAT", "json")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("LLMGW_MAX_BODY_BYTES") && !err.contains("LLMGW_LOG_FORMAT"),
        "{err}"
    );
    // A line that is not NAME=value is reported with the file's name.
    std::fs::write(dir.join(".env"), "LLMGW_LOG_FORMAT json\n").unwrap();
    let out = llmgw().arg("serve").current_dir(&dir).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("llmgw: .env: "), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn serve_help_lists_the_settings_with_their_defaults() {
    let out = llmgw().args(["serve", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "DATABASE_URL",
        "LLMGW_GATEWAY_ADDR [default: 127.0.0.1:8080]",
        "LLMGW_UPSTREAM_CA_FILE",
        "LLMGW_LOG_FORMAT [default: pretty]",
        ".env",
    ] {
        assert!(help.contains(needle), "{needle} missing:\n{help}");
    }
}

#[test]
fn bad_ca_file_is_refused_before_the_embedded_cluster_starts() {
    if !have_postgres_binaries() {
        return;
    }
    let dir = temp_dir("badca");
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, "this is not a certificate\n").unwrap();
    let data = dir.join("data");
    let out = llmgw()
        .arg("serve")
        .env("LLMGW_DATA_DIR", &data)
        .env("LLMGW_UPSTREAM_CA_FILE", &ca)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("LLMGW_UPSTREAM_CA_FILE"), "{err}");
    assert!(
        !data.join("pgdata").exists(),
        "the cluster was started: {err}"
    );
    assert_eq!(processes_under(&dir), Vec::<String>::new());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_start_that_fails_after_the_embedded_cluster_started_stops_it() {
    if !have_postgres_binaries() {
        return;
    }
    let dir = temp_dir("busyport");
    // The gateway's port is taken: the cluster is up and migrated before binding fails.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let out = llmgw()
        .arg("serve")
        .env("LLMGW_DATA_DIR", &dir)
        .env("LLMGW_GATEWAY_ADDR", format!("127.0.0.1:{port}"))
        .env(
            "LLMGW_API_ADDR",
            format!("127.0.0.1:{}", common::free_port()),
        )
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{err}"
    );
    assert!(
        dir.join("pgdata").exists(),
        "the cluster never started: {err}"
    );
    assert!(!dir.join("pgdata").join("postmaster.pid").exists(), "{err}");
    assert_eq!(processes_under(&dir), Vec::<String>::new(), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Listeners given as `localhost:PORT`; the logs (stderr is a pipe, not a
/// terminal) carry no colour escapes and no PostgreSQL notice of the
/// migrations table that already exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn localhost_listeners_and_plain_logs() {
    let t = TestDb::new().await;
    let upstream = MockUpstream::start().await;
    let cmd = common::llmgw_against(&t, &upstream);
    let running = tokio::task::spawn_blocking(move || Running::start_on_host(cmd, "localhost"))
        .await
        .unwrap();
    assert!(running.gateway.starts_with("http://localhost:"));
    let r = reqwest::get(format!("{}/readyz", running.api))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (status, logs) = tokio::task::spawn_blocking(move || running.terminate())
        .await
        .unwrap();
    assert!(status.success(), "{logs}");
    assert!(logs.contains("listening"), "{logs}");
    assert!(
        !logs.contains("\x1b["),
        "ANSI escapes in piped logs:\n{logs}"
    );
    assert!(!logs.contains("already exists"), "{logs}");
}
