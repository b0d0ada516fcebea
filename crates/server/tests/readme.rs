//! README.md's walk-through, run as written: the `sh` block under its marker
//! comment is taken from README.md at test time and run with bash against
//! the built `llmgw` and a plain-http upstream like llama.cpp's server, so
//! the README cannot drift from the product.

mod common;

use std::path::PathBuf;
use std::process::Output;

use common::Running;
use serde_json::{json, Value};
use testkit::{MockUpstream, TestDb};

const MARKER: &str =
    "<!-- walk-through: crates/server/tests/readme.rs runs this block as written -->";
const MODEL: &str = "llama-3.2-1b-instruct";

/// The `sh` block that follows the marker line.
fn walkthrough() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md");
    let readme = std::fs::read_to_string(path).expect("README.md");
    let mut lines = readme.lines().skip_while(|l| l.trim() != MARKER).skip(1);
    assert_eq!(
        lines.next().map(str::trim),
        Some("```sh"),
        "README.md: the line after the walk-through marker must open a ```sh block"
    );
    let block: Vec<&str> = lines.take_while(|l| l.trim() != "```").collect();
    assert!(
        block.len() > 10,
        "README.md: the walk-through block is missing"
    );
    block.join("\n") + "\n"
}

/// bash, curl and jq, which the walk-through uses; `false` (outside CI) when one is missing.
fn tools_present() -> bool {
    for tool in ["bash", "curl", "jq"] {
        let found = std::process::Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            testkit::skip_unless_ci(&format!(
                "`{tool}` is not installed; the README walk-through test needs bash, curl and jq \
                 (apt-get install -y bash curl jq; .ci/run installs them)"
            ));
            return false;
        }
    }
    true
}

/// `llmgw serve` on the test database, with or without the http opt-in.
async fn serve(t: &TestDb, allow_http: bool) -> Running {
    let mut cmd = common::llmgw();
    cmd.env("DATABASE_URL", t.url())
        .env("LLMGW_ENCRYPTION_KEYS", &t.keys)
        .env("LLMGW_UPSTREAM_ALLOW_PRIVATE", "true")
        .env("LLMGW_LOG_FLUSH_INTERVAL_MS", "50");
    if allow_http {
        cmd.env("LLMGW_UPSTREAM_ALLOW_HTTP", "true");
    }
    tokio::task::spawn_blocking(move || Running::start(cmd))
        .await
        .unwrap()
}

/// Runs the walk-through script with the addresses it reads from the environment.
async fn run(script: &PathBuf, running: &Running, upstream: &MockUpstream) -> Output {
    let mut cmd = tokio::process::Command::new("bash");
    cmd.arg(script)
        .env("API", format!("{}/api/v1", running.api))
        .env("GATEWAY", &running.gateway)
        .env("UPSTREAM", &upstream.base_url);
    // The script's other inputs take their README defaults.
    for var in ["UPSTREAM_TOKEN", "EMAIL", "PASSWORD", "TOKEN", "MODEL"] {
        cmd.env_remove(var);
    }
    cmd.output().await.expect("run bash")
}

/// GETs `url` with the session `bearer` and parses the JSON body.
async fn get_json(http: &reqwest::Client, url: &str, bearer: &str) -> Value {
    http.get(url)
        .bearer_auth(bearer)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The value of `NAME=` in the script's last line (`KEY=… MODEL=…`).
fn printed(out: &Output, name: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    last.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name}= in the last line: {last}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_walkthrough_ends_in_an_answer_and_runs_again() {
    if !tools_present() {
        return;
    }
    let script_text = walkthrough();
    let t = TestDb::new().await;
    let upstream = MockUpstream::start_plain_http().await;
    upstream.set_models(&[MODEL]);
    let script = std::env::temp_dir().join(format!(
        "llmgw-walkthrough-{}.sh",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::write(&script, &script_text).unwrap();

    let running = serve(&t, true).await;
    let mut key = String::new();
    for round in 1..=2 {
        let out = run(&script, &running, &upstream).await;
        let all = text(&out);
        eprintln!("walk-through, round {round}:\n{all}");
        assert!(out.status.success(), "round {round}: {all}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(&format!("mine/{MODEL} says: echo from {MODEL}")),
            "round {round}: no answer from the upstream: {all}"
        );
        assert!(
            stdout.contains(&format!("\"requested_model\": \"mine/{MODEL}\""))
                && stdout.contains("\"status_code\": 200"),
            "round {round}: the usage log does not show the request: {all}"
        );
        key = printed(&out, "KEY");
        assert!(key.starts_with("llmgw_"), "round {round}: {all}");
    }
    let chats = upstream
        .seen()
        .iter()
        .filter(|r| r.path == "/v1/chat/completions")
        .count();
    assert_eq!(chats, 2, "one chat request per round");
    let (status, _) = running.terminate();
    assert!(status.success());

    // The operator turns the opt-in off: the saved http provider is refused
    // when connecting, with the hint, by the gateway and by the test call.
    let running = serve(&t, false).await;
    let before = upstream.seen().len();
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{}/v1/chat/completions", running.gateway))
        .bearer_auth(&key)
        .json(&json!({"model": format!("mine/{MODEL}"), "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let body: Value = r.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("LLMGW_UPSTREAM_ALLOW_HTTP=true"), "{body}");

    let api = format!("{}/api/v1", running.api);
    let session: Value = http
        .post(format!("{api}/auth/login"))
        .json(&json!({"email": "me@example.com", "password": "correct horse battery"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let bearer = session["token"].as_str().expect("login").to_owned();
    let orgs: Value = get_json(&http, &format!("{api}/orgs"), &bearer).await;
    let org = orgs["data"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(
        orgs["data"].as_array().unwrap().len(),
        1,
        "re-runs reuse the org"
    );
    let providers: Value =
        get_json(&http, &format!("{api}/orgs/{org}/provider-keys"), &bearer).await;
    assert_eq!(providers["data"].as_array().unwrap().len(), 1);
    let id = providers["data"][0]["id"].as_str().unwrap();
    let report: Value = http
        .post(format!("{api}/orgs/{org}/provider-keys/{id}/test"))
        .bearer_auth(&bearer)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(report["reachable"], false, "{report}");
    assert!(
        report["error"]
            .as_str()
            .unwrap_or_default()
            .contains("LLMGW_UPSTREAM_ALLOW_HTTP=true"),
        "{report}"
    );
    assert_eq!(
        upstream.seen().len(),
        before,
        "a request went out in clear text after the opt-in was turned off"
    );

    // The walk-through itself now stops at the provider step, saying how to opt in.
    let out = run(&script, &running, &upstream).await;
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("LLMGW_UPSTREAM_ALLOW_HTTP=true"),
        "{}",
        text(&out)
    );
    assert_eq!(upstream.seen().len(), before);
    running.terminate();
    let _ = std::fs::remove_file(&script);
}
