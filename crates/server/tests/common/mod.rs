//! Helpers shared by the binary's end-to-end tests: spawning `llmgw`,
//! waiting for it, signalling it, and provisioning a tenant through the
//! settings API.

// Each test binary uses a different subset.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub const BIN: &str = env!("CARGO_BIN_EXE_llmgw");

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `Command` for the binary with a clean `LLMGW_*`/`DATABASE_URL` environment.
pub fn llmgw() -> Command {
    binary(BIN)
}

/// A `Command` for the `llmgw` binary at `path` (this build's, or another
/// release's) with a clean `LLMGW_*`/`DATABASE_URL` environment.
pub fn binary(path: &str) -> Command {
    let mut c = Command::new(path);
    for (k, _) in std::env::vars() {
        if k.starts_with("LLMGW_") || k == "DATABASE_URL" {
            c.env_remove(k);
        }
    }
    c.env("RUST_LOG", "info");
    c
}

/// A running `llmgw serve` whose stderr is captured.
/// `llmgw` on a test database, trusting (and allowed to reach) a local mock upstream.
pub fn llmgw_against(t: &testkit::TestDb, upstream: &testkit::MockUpstream) -> Command {
    against(llmgw(), t, upstream)
}

/// `c` (a [`binary`]) on a test database, trusting and allowed to reach a local mock upstream.
pub fn against(mut c: Command, t: &testkit::TestDb, upstream: &testkit::MockUpstream) -> Command {
    c.env("DATABASE_URL", t.url())
        .env("LLMGW_ENCRYPTION_KEYS", &t.keys)
        .env("LLMGW_UPSTREAM_ALLOW_PRIVATE", "true")
        .env("LLMGW_UPSTREAM_CA_FILE", &upstream.ca.ca_file);
    c
}

pub struct Running {
    child: Child,
    logs: Arc<Mutex<String>>,
    pub gateway: String,
    pub api: String,
}

impl Running {
    pub fn start(cmd: Command) -> Self {
        Self::spawn(cmd, &["serve"])
    }

    /// `llmgw serve --only gateway` (its `api` address is not served).
    pub fn start_gateway_only(cmd: Command) -> Self {
        Self::spawn(cmd, &["serve", "--only", "gateway"])
    }

    /// `llmgw serve --only api` (its `gateway` address is not served).
    pub fn start_api_only(cmd: Command) -> Self {
        Self::spawn(cmd, &["serve", "--only", "api"])
    }

    /// `llmgw serve` with both listeners given as `{host}:{port}` (e.g. `localhost`).
    pub fn start_on_host(cmd: Command, host: &str) -> Self {
        Self::spawn_on(cmd, &["serve"], host)
    }

    fn spawn(cmd: Command, args: &[&str]) -> Self {
        Self::spawn_on(cmd, args, "127.0.0.1")
    }

    fn spawn_on(mut cmd: Command, args: &[&str], host: &str) -> Self {
        let only = args
            .iter()
            .position(|a| *a == "--only")
            .and_then(|i| args.get(i + 1).copied());
        let (gw, api) = (free_port(), free_port());
        cmd.args(args)
            .env("LLMGW_GATEWAY_ADDR", format!("{host}:{gw}"))
            .env("LLMGW_API_ADDR", format!("{host}:{api}"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let logs = Arc::new(Mutex::new(String::new()));
        let sink = logs.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let me = Self {
            child,
            logs,
            gateway: format!("http://{host}:{gw}"),
            api: format!("http://{host}:{api}"),
        };
        me.wait_healthy(only);
        me
    }

    /// Waits for `/healthz` on the listeners that `--only` (if given) serves.
    fn wait_healthy(&self, only: Option<&str>) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let client = reqwest::blocking::Client::new();
        loop {
            let bases = match only {
                Some("gateway") => vec![&self.gateway],
                Some("api") => vec![&self.api],
                _ => vec![&self.gateway, &self.api],
            };
            let ok = bases.iter().all(|base| {
                client
                    .get(format!("{base}/healthz"))
                    .send()
                    .is_ok_and(|r| r.status() == 200)
            });
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "llmgw did not come up:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    /// Sends SIGTERM without waiting.
    pub fn signal_term(&self) {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
    }

    /// Sends SIGKILL (no shutdown, nothing released) and waits for the exit.
    pub fn kill_hard(&mut self) {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        assert!(
            self.wait_exit(Duration::from_secs(10)).is_some(),
            "llmgw survived SIGKILL"
        );
    }

    /// Waits up to `limit` until the logs contain `needle`.
    pub fn wait_for_log(&self, needle: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.logs().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in the logs within {limit:?}:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to `limit` for the process to exit; `None` if it is still running.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the log reader drain the last lines.
                std::thread::sleep(Duration::from_millis(100));
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and returns the exit status. The wait covers the
    /// default 30 s grace period and the bounded flush after it.
    pub fn terminate(mut self) -> (ExitStatus, String) {
        self.signal_term();
        match self.wait_exit(Duration::from_secs(50)) {
            Some(status) => (status, self.logs()),
            None => {
                // The shutdown's own lines first: a long log is cut in the middle.
                let logs = self.logs();
                let since = logs.find("SIGTERM received").unwrap_or(0);
                panic!(
                    "llmgw did not exit after SIGTERM; since the signal:\n{}\n\nall logs:\n{logs}",
                    &logs[since..]
                )
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // A failed test must not leave the server behind.
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Resident memory of process `pid` now, in KiB (`VmRSS` of /proc/<pid>/status).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("/proc/<pid>/status is readable (Linux)");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

/// Peak RSS of `pid` (KiB), sampled every 5 ms while `work` runs.
pub async fn peak_during<T>(pid: u32, work: impl std::future::Future<Output = T>) -> (u64, T) {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(rss_kib(pid)));
    let sampler = {
        let (stop, peak) = (stop.clone(), peak.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let out = work.await;
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    (peak.load(Ordering::Relaxed), out)
}

/// A tenant made through the settings API: an owner's session, an org, a
/// provider named `mycompany` and one gateway API key.
pub struct Tenant {
    pub bearer: String,
    pub org_id: String,
    pub api_key: String,
}

/// Sends `r` and returns the JSON body of its 2xx answer.
async fn send(r: reqwest::RequestBuilder) -> Value {
    let r = r.send().await.unwrap();
    let status = r.status();
    let body: Value = r.json().await.unwrap();
    assert!(status.is_success(), "{status}: {body}");
    body
}

/// Signup → org → provider (`mycompany` at `base_url`) → API key.
pub async fn provision(api_base: &str, base_url: &str, provider_token: &str) -> Tenant {
    let http = reqwest::Client::new();
    let api = format!("{api_base}/api/v1");
    let email = format!("owner-{}@example.com", uuid::Uuid::new_v4().simple());
    let session = send(
        http.post(format!("{api}/auth/signup"))
            .json(&json!({"email": email, "password": "correct horse battery"})),
    )
    .await;
    let bearer = format!("Bearer {}", session["token"].as_str().unwrap());
    let org = send(
        http.post(format!("{api}/orgs"))
            .header("authorization", &bearer)
            .json(&json!({"name": "Acme"})),
    )
    .await;
    let org_id = org["id"].as_str().unwrap().to_owned();
    send(
        http.post(format!("{api}/orgs/{org_id}/provider-keys"))
            .header("authorization", &bearer)
            .json(&json!({"name": "mycompany", "base_url": base_url, "token": provider_token})),
    )
    .await;
    let key = send(
        http.post(format!("{api}/orgs/{org_id}/api-keys"))
            .header("authorization", &bearer)
            .json(&json!({"name": "load"})),
    )
    .await;
    Tenant {
        bearer,
        org_id,
        api_key: key["key"].as_str().unwrap().to_owned(),
    }
}

/// `POST /orgs/{org}/api-keys` with these `limits` (the owner's session);
/// the new key's secret.
pub async fn create_key(api_base: &str, tenant: &Tenant, name: &str, limits: Value) -> String {
    let key = send(
        reqwest::Client::new()
            .post(format!("{api_base}/api/v1/orgs/{}/api-keys", tenant.org_id))
            .header("authorization", &tenant.bearer)
            .json(&json!({"name": name, "limits": limits})),
    )
    .await;
    key["key"].as_str().unwrap().to_owned()
}

/// `PATCH /orgs/{org}` with these `limits` (the owner's session).
pub async fn set_org_limits(api_base: &str, tenant: &Tenant, limits: Value) {
    send(
        reqwest::Client::new()
            .patch(format!("{api_base}/api/v1/orgs/{}", tenant.org_id))
            .header("authorization", &tenant.bearer)
            .json(&json!({"limits": limits})),
    )
    .await;
}

/// The value of the unlabelled metric `name` at `{base}/metrics`.
pub async fn metric(base: &str, name: &str) -> f64 {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
}

/// `x-ratelimit-reset-*` as the gateway writes it (`20ms`, `59.5s`,
/// `1m0s`, `1h0m0s`), to the millisecond.
pub fn parse_reset(text: &str) -> Duration {
    let bad = || -> ! { panic!("not a reset: {text:?}") };
    if let Some(ms) = text.strip_suffix("ms") {
        return Duration::from_millis(ms.parse().unwrap_or_else(|_| bad()));
    }
    let mut rest = text.strip_suffix('s').unwrap_or_else(|| bad());
    let mut ms = 0u64;
    for (unit, factor) in [('h', 3_600_000), ('m', 60_000)] {
        if let Some((n, tail)) = rest.split_once(unit) {
            ms += n.parse::<u64>().unwrap_or_else(|_| bad()) * factor;
            rest = tail;
        }
    }
    let (secs, frac) = rest.split_once('.').unwrap_or((rest, ""));
    let frac = format!("{frac:0<3}");
    ms += secs.parse::<u64>().unwrap_or_else(|_| bad()) * 1000;
    ms += frac.parse::<u64>().unwrap_or_else(|_| bad());
    Duration::from_millis(ms)
}

/// One chat completion through `gateway` with `key`, sending `request_id`:
/// the status and the answer's headers (`None` when the gateway is gone).
pub async fn chat(
    http: &reqwest::Client,
    gateway: &str,
    key: &str,
    request_id: &str,
) -> Option<(u16, reqwest::header::HeaderMap)> {
    let r = http
        .post(format!("{gateway}/v1/chat/completions"))
        .bearer_auth(key)
        .header("x-request-id", request_id)
        .json(&json!({"model": "mycompany/m", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .ok()?;
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    r.bytes().await.ok()?;
    Some((status, headers))
}
