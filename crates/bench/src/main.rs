//! `cargo run --release -p bench` — measures what llmgw adds on top of a
//! direct call to the same upstream, on the same machine, in one run.
//!
//! It starts a mock OpenAI-compatible HTTPS upstream, a fresh database, and
//! the release `llmgw` binary; creates an org, a provider and an API key
//! through the settings API; then drives the same load directly at the mock
//! and through llmgw at several concurrencies, non-streamed and streamed,
//! and prints a table. A soak holds many slow streams open through llmgw
//! and reports its peak memory.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::StreamExt;
use serde_json::{json, Value};
use testkit::{MockUpstream, TestDb};

mod usage_logs;

#[derive(Parser)]
#[command(about = "Benchmark llmgw against a direct call to a mock upstream")]
struct Args {
    /// A few seconds in all: keeps the benchmark working, measures little.
    #[arg(long)]
    quick: bool,
    /// Seconds per measured scenario.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Each scenario alternates direct and llmgw runs this many times (less drift).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Requests at concurrency 64 for the memory-flatness run (0 skips it).
    #[arg(long, default_value_t = 1_000_000)]
    flat_requests: u64,
    /// Concurrencies to run.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    concurrency: Vec<usize>,
    /// Modes to run: `json` (non-streamed), `stream` (SSE), or both.
    #[arg(long, value_delimiter = ',', default_value = "json,stream")]
    modes: Vec<String>,
    /// Slow streams held open at once in the soak (0 skips it).
    #[arg(long, default_value_t = 10_000)]
    soak_streams: usize,
    /// `RUST_LOG` for llmgw; the default `info` writes one JSON line per request, as in production.
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Start llmgw with LLMGW_UPSTREAM_HTTP2=true (the mock offers HTTP/2).
    #[arg(long)]
    upstream_http2: bool,
    /// Path of the llmgw binary (default: build target/release/llmgw).
    #[arg(long)]
    llmgw: Option<String>,
    /// Also measure through a key with every kind of limit set (none ever
    /// reached), interleaved with the unlimited key: what spend controls cost.
    #[arg(long)]
    limits: bool,
    /// `LLMGW_REDIS_URL` for llmgw (limits counted on Redis); unset: in process.
    #[arg(long)]
    redis: Option<String>,
    /// Request rows to generate for the usage API's run (0 skips it; lowered
    /// to fit the free disk): its latency over 30 days and the writer's rows/s.
    #[arg(long, default_value_t = 0)]
    usage_rows: u64,
    /// Also run the usage measurement with this binary (the previous release).
    #[arg(long)]
    usage_before: Option<String>,
    /// Requests to the usage API per grouping (default: 5 with --quick, else 20).
    #[arg(long)]
    usage_queries: Option<usize>,
    /// Only the usage measurement, no load runs.
    #[arg(long)]
    usage_only: bool,
}

struct Gateway {
    child: Child,
    url: String,
    api: String,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // SAFETY: signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on our own process.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: as above.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    lim.rlim_cur
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn build_llmgw() -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    eprintln!("building llmgw (release)…");
    let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    // `cargo run` gave this process the bench's CARGO_MANIFEST_DIR and
    // CARGO_PKG_*; build scripts (ring's) watch those, so passing them on
    // would rebuild ring and all above it now and again at the next plain build.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_MANIFEST_")
            || [
                "CARGO_CRATE_NAME",
                "CARGO_BIN_NAME",
                "CARGO_PRIMARY_PACKAGE",
            ]
            .contains(&&*k)
        {
            cargo.env_remove(&*k);
        }
    }
    let st = cargo
        .args(["build", "--release", "--bin", "llmgw"])
        .current_dir(&root)
        .status()
        .expect("run cargo");
    assert!(st.success(), "cargo build --release --bin llmgw failed");
    // Relative to the root cargo ran in; an absolute CARGO_TARGET_DIR replaces it.
    let target = root.join(std::env::var_os("CARGO_TARGET_DIR").unwrap_or_else(|| "target".into()));
    target.join("release/llmgw").to_string_lossy().into_owned()
}

/// `/proc/<pid>` readings: CPU time in ms, current and peak RSS in KiB.
fn proc_stats(pid: u32) -> (f64, u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, a)| a);
    let f: Vec<&str> = after.split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let ticks = f.get(11).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (ticks * 1000.0 / hz, kib("VmRSS:"), kib("VmHWM:"))
}

async fn start_llmgw(
    bin: &str,
    log_level: &str,
    http2: bool,
    redis: Option<&str>,
    t: &TestDb,
    up: &MockUpstream,
) -> Gateway {
    let (gw, api) = (free_port(), free_port());
    let mut cmd = Command::new(bin);
    if let Some(url) = redis {
        cmd.env("LLMGW_REDIS_URL", url);
    }
    let mut child = cmd
        .arg("serve")
        .env("DATABASE_URL", t.url())
        .env("LLMGW_ENCRYPTION_KEYS", &t.keys)
        .env("LLMGW_GATEWAY_ADDR", format!("127.0.0.1:{gw}"))
        .env("LLMGW_API_ADDR", format!("127.0.0.1:{api}"))
        .env("LLMGW_UPSTREAM_ALLOW_PRIVATE", "true")
        .env("LLMGW_UPSTREAM_CA_FILE", &up.ca.ca_file)
        .env("LLMGW_LOG_FORMAT", "json")
        .env("RUST_LOG", log_level)
        .env("LLMGW_UPSTREAM_HTTP2", if http2 { "true" } else { "false" })
        // The mock upstream's one worker takes seconds to finish a soak's
        // 10,000 TLS handshakes; with the default 5 s, a slow machine's soak
        // opened fewer streams than it asked for.
        .env("LLMGW_UPSTREAM_CONNECT_TIMEOUT_MS", "60000")
        .env("LLMGW_SHUTDOWN_GRACE_MS", "2000")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start llmgw");
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("\"level\":\"ERROR\"") {
                eprintln!("llmgw: {line}");
            }
        }
    });
    let g = Gateway {
        child,
        url: format!("http://127.0.0.1:{gw}"),
        api: format!("http://127.0.0.1:{api}/api/v1"),
    };
    let c = reqwest::Client::new();
    for _ in 0..600 {
        if c.get(format!("{}/readyz", g.url))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            return g;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("llmgw did not become ready");
}

async fn post(c: &reqwest::Client, url: &str, auth: Option<&str>, body: Value) -> Value {
    let mut r = c.post(url).json(&body);
    if let Some(a) = auth {
        r = r.bearer_auth(a);
    }
    let resp = r.send().await.expect("settings API");
    let status = resp.status();
    let v: Value = resp.json().await.unwrap_or(Value::Null);
    assert!(status.is_success(), "{url}: {status} {v}");
    v
}

/// Limits of every kind, none of which the benchmark reaches.
fn unreached_limits() -> Value {
    json!({"requests_per_minute": 1_000_000_000u64, "tokens_per_minute": 1_000_000_000_000u64,
           "max_concurrent_requests": 1_000_000, "tokens_per_day": 1_000_000_000_000u64,
           "tokens_per_month": 1_000_000_000_000u64, "budget_per_month_usd": "1000000"})
}

/// What [`provision`] made.
struct Provisioned {
    /// The admin's session token and the org's id.
    token: String,
    org: String,
    key: String,
    limited_key: Option<String>,
}

/// Sets up org → provider → key via the settings API, and with `limited` a
/// second key with [`unreached_limits`].
async fn provision(g: &Gateway, up: &MockUpstream, limited: bool) -> Provisioned {
    let c = reqwest::Client::new();
    let s = post(
        &c,
        &format!("{}/auth/signup", g.api),
        None,
        json!({"email": "bench@example.com", "password": "bench-password-1"}),
    )
    .await;
    let tok = s["token"].as_str().unwrap().to_owned();
    let org = post(
        &c,
        &format!("{}/orgs", g.api),
        Some(&tok),
        json!({"name": "bench"}),
    )
    .await;
    let org = org["id"].as_str().unwrap().to_owned();
    post(
        &c,
        &format!("{}/orgs/{org}/provider-keys", g.api),
        Some(&tok),
        json!({"name": "bench", "base_url": up.base_url, "token": "sk-bench-upstream"}),
    )
    .await;
    let key = |body: Value| {
        let (c, url, tok) = (&c, format!("{}/orgs/{org}/api-keys", g.api), &tok);
        async move {
            post(c, &url, Some(tok), body).await["key"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    let plain = key(json!({"name": "bench"})).await;
    let limited_key = if limited {
        Some(key(json!({"name": "bench-limited", "limits": unreached_limits()})).await)
    } else {
        None
    };
    Provisioned {
        token: tok,
        org,
        key: plain,
        limited_key,
    }
}

#[derive(Clone)]
struct Target {
    name: &'static str,
    client: reqwest::Client,
    url: String,
    key: Option<String>,
    model: String,
}

#[derive(Default)]
struct Sample {
    total_us: Vec<u32>,
    ttfb_us: Vec<u32>,
    errors: usize,
    elapsed: Duration,
}

impl Sample {
    fn merge(&mut self, other: Sample) {
        self.total_us.extend(other.total_us);
        self.ttfb_us.extend(other.ttfb_us);
        self.errors += other.errors;
        self.elapsed += other.elapsed;
    }
}

fn pct(v: &mut [u32], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    f64::from(v[i]) / 1000.0
}

async fn one(t: &Target, stream: bool) -> Result<(u32, u32), ()> {
    let body = json!({"model": t.model, "stream": stream, "messages": [{"role": "user", "content": "Say hello in one word."}]});
    let start = Instant::now();
    let mut req = t.client.post(&t.url).json(&body);
    if let Some(k) = &t.key {
        req = req.bearer_auth(k);
    }
    let resp = req.send().await.map_err(|_| ())?;
    if !resp.status().is_success() {
        return Err(());
    }
    let mut s = resp.bytes_stream();
    let mut first = None;
    while let Some(chunk) = s.next().await {
        chunk.map_err(|_| ())?;
        first.get_or_insert_with(|| start.elapsed());
    }
    let total = start.elapsed();
    let first = first.unwrap_or(total);
    Ok((total.as_micros() as u32, first.as_micros() as u32))
}

async fn load(t: &Target, concurrency: usize, stream: bool, dur: Duration) -> Sample {
    // Warm up connections.
    let warm = futures_util::future::join_all((0..concurrency).map(|_| one(t, stream))).await;
    let _ = warm;
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let t = t.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut s = Sample::default();
                while !stop.load(Ordering::Relaxed) {
                    match one(&t, stream).await {
                        Ok((total, first)) => {
                            s.total_us.push(total);
                            s.ttfb_us.push(first);
                        }
                        Err(()) => s.errors += 1,
                    }
                }
                s
            })
        })
        .collect();
    tokio::time::sleep(dur).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Sample::default();
    for t in tasks {
        let s = t.await.unwrap();
        all.total_us.extend(s.total_us);
        all.ttfb_us.extend(s.ttfb_us);
        all.errors += s.errors;
    }
    all.elapsed = start.elapsed();
    all
}

/// `n` non-streamed requests at concurrency 64, sampling llmgw's RSS as it goes:
/// memory must stay flat, not grow with the number of requests served.
async fn flat(t: &Target, n: u64, pid: u32) {
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let (t, done, errors) = (t.clone(), done.clone(), errors.clone());
            tokio::spawn(async move {
                while done.fetch_add(1, Ordering::Relaxed) < n {
                    if one(&t, false).await.is_err() {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let step = (n / 10).max(1);
    let mut next = step;
    let mut samples = Vec::new();
    while tasks.iter().any(|t| !t.is_finished()) {
        let d = done.load(Ordering::Relaxed).min(n);
        if d >= next {
            samples.push(format!(
                "{}k:{:.1}",
                d / 1000,
                proc_stats(pid).1 as f64 / 1024.0
            ));
            next += step;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (_, rss, hwm) = proc_stats(pid);
    println!(
        "\nFlatness: {n} requests at concurrency 64 in {:.1}s, {} errors; llmgw RSS (MiB) after k requests: {} end:{:.1}; peak {:.1} MiB",
        start.elapsed().as_secs_f64(),
        errors.load(Ordering::Relaxed),
        samples.join(" "),
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
}

async fn soak(g: &Gateway, key: &str, streams: usize, pid: u32) {
    let (_, rss_before, _) = proc_stats(pid);
    // HTTP/2 (h2c) from the load generator to llmgw: 100 connections carry
    // the streams, so the load generator stays within the open-file limit;
    // llmgw still holds one upstream connection per stream.
    let clients: Vec<reqwest::Client> = (0..100)
        .map(|_| {
            reqwest::Client::builder()
                .http2_prior_knowledge()
                .timeout(Duration::from_secs(120))
                .build()
                .unwrap()
        })
        .collect();
    let opened = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let hold = Duration::from_secs(10);
    let tasks: Vec<_> = (0..streams)
        .map(|i| {
            let (client, url, key, opened) = (clients[i % clients.len()].clone(), format!("{}/v1/chat/completions", g.url), key.to_owned(), opened.clone());
            tokio::spawn(async move {
                let body = json!({"model": "bench/slowstream-1000", "stream": true, "messages": [{"role": "user", "content": "x"}]});
                let Ok(resp) = client.post(url).bearer_auth(key).json(&body).send().await else { return false };
                if !resp.status().is_success() {
                    return false;
                }
                let mut s = resp.bytes_stream();
                if !matches!(s.next().await, Some(Ok(_))) {
                    return false;
                }
                opened.fetch_add(1, Ordering::Relaxed);
                let until = Instant::now() + hold;
                while Instant::now() < until {
                    match tokio::time::timeout_at(until.into(), s.next()).await {
                        Ok(Some(Ok(_))) => {}
                        Ok(_) => return false,
                        Err(_) => break,
                    }
                }
                true
            })
        })
        .collect();
    // Peak over the whole soak (the opening burst included), and the RSS
    // once every stream is open and only chunks flow (the held state).
    let (mut peak, mut held, mut all_open_at) = (0, 0, None);
    while tasks.iter().any(|t| !t.is_finished()) {
        let (_, rss, _) = proc_stats(pid);
        peak = peak.max(rss);
        if opened.load(Ordering::Relaxed) == streams {
            let since = *all_open_at.get_or_insert_with(Instant::now);
            if since.elapsed() >= Duration::from_secs(2) && since.elapsed() < hold {
                held = held.max(rss);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut ok = 0;
    for t in tasks {
        if t.await.unwrap_or(false) {
            ok += 1;
        }
    }
    println!(
        "\nSoak: {streams} concurrent slow streams through llmgw (held {}s): {ok} held to the end, {} opened; llmgw RSS {:.1} MiB before, {:.1} MiB with all open, peak {:.1} MiB during ({:.1}s)",
        hold.as_secs(),
        opened.load(Ordering::Relaxed),
        rss_before as f64 / 1024.0,
        held as f64 / 1024.0,
        peak as f64 / 1024.0,
        started.elapsed().as_secs_f64()
    );
}

fn mode_name(stream: bool) -> &'static str {
    if stream {
        "stream"
    } else {
        "json"
    }
}

fn main() {
    let args = Args::parse();
    raise_fd_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(args));
}

async fn run(args: Args) {
    let bin = args.llmgw.clone().unwrap_or_else(build_llmgw);
    let dur = Duration::from_secs(if args.quick { 1 } else { args.seconds });
    let concurrencies = if args.quick {
        vec![1, 16]
    } else {
        args.concurrency.clone()
    };
    let rounds = if args.quick { 1 } else { args.rounds.max(1) };
    let flat_requests = if args.quick {
        args.flat_requests.min(20_000)
    } else {
        args.flat_requests
    };
    let soak_streams = if args.quick {
        args.soak_streams.min(200)
    } else {
        args.soak_streams
    };

    let up = MockUpstream::start().await;
    if args.usage_rows > 0 {
        let mut bins = Vec::new();
        if let Some(before) = &args.usage_before {
            bins.push(("before", before.as_str()));
        }
        bins.push(("this", bin.as_str()));
        usage_logs::UsageBench {
            rows: args.usage_rows,
            queries: args
                .usage_queries
                .unwrap_or(if args.quick { 5 } else { 20 })
                .max(1),
            writer_for: Duration::from_secs(if args.quick { 1 } else { 5 }),
            up: &up,
        }
        .run(&bins)
        .await;
        if args.usage_only {
            return;
        }
    }
    let t = TestDb::new().await;
    let g = start_llmgw(
        &bin,
        &args.log_level,
        args.upstream_http2,
        args.redis.as_deref(),
        &t,
        &up,
    )
    .await;
    let Provisioned {
        key, limited_key, ..
    } = provision(&g, &up, args.limits).await;
    let pid = g.child.id();

    let ca = reqwest::Certificate::from_pem(up.ca.ca_pem.as_bytes()).unwrap();
    let direct_client = reqwest::Client::builder()
        .add_root_certificate(ca)
        .tcp_nodelay(true)
        .pool_max_idle_per_host(1024)
        .http1_only()
        .build()
        .unwrap();
    let gw_client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(1024)
        .http1_only()
        .build()
        .unwrap();
    let direct = Target {
        name: "direct",
        client: direct_client,
        url: format!("{}/v1/chat/completions", up.base_url),
        key: None,
        model: "m".into(),
    };
    let via = Target {
        name: "llmgw",
        client: gw_client,
        url: format!("{}/v1/chat/completions", g.url),
        key: Some(key.clone()),
        model: "bench/m".into(),
    };
    let mut vias = vec![via.clone()];
    if let Some(k) = limited_key {
        vias.push(Target {
            name: if args.redis.is_some() {
                "llmgw+limits(redis)"
            } else {
                "llmgw+limits"
            },
            key: Some(k),
            ..via.clone()
        });
    }

    println!(
        "llmgw benchmark — {} cores, {}s per scenario, mock upstream over HTTPS on 127.0.0.1",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        dur.as_secs()
    );
    println!(
        "\n| mode | conc | path | req/s | p50 ms | p99 ms | added p50 ms | added p99 ms | TTFB p50 ms | added TTFB p50 ms | llmgw CPU ms/req | llmgw RSS MiB | errors |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let modes = [false, true]
        .into_iter()
        .filter(|&stream| args.modes.iter().any(|m| m == mode_name(stream)));
    for stream in modes {
        for &c in &concurrencies {
            let mut d = Sample::default();
            let mut v: Vec<Sample> = vias.iter().map(|_| Sample::default()).collect();
            let mut cpu = vec![0.0; vias.len()];
            let slice = dur / rounds;
            for _ in 0..rounds {
                d.merge(load(&direct, c, stream, slice).await);
                for (i, via) in vias.iter().enumerate() {
                    let (cpu0, _, _) = proc_stats(pid);
                    v[i].merge(load(via, c, stream, slice).await);
                    cpu[i] += proc_stats(pid).0 - cpu0;
                }
            }
            let (_, rss, _) = proc_stats(pid);
            let mode = mode_name(stream);
            let (d50, d99, dt) = (
                pct(&mut d.total_us, 0.5),
                pct(&mut d.total_us, 0.99),
                pct(&mut d.ttfb_us, 0.5),
            );
            let rps = |s: &Sample| s.total_us.len() as f64 / s.elapsed.as_secs_f64();
            println!(
                "| {mode} | {c} | {} | {:.0} | {d50:.3} | {d99:.3} | - | - | {dt:.3} | - | - | - | {} |",
                direct.name,
                rps(&d),
                d.errors
            );
            for (i, s) in v.iter_mut().enumerate() {
                let (p50, p99, ttfb) = (
                    pct(&mut s.total_us, 0.5),
                    pct(&mut s.total_us, 0.99),
                    pct(&mut s.ttfb_us, 0.5),
                );
                println!(
                    "| {mode} | {c} | {} | {:.0} | {p50:.3} | {p99:.3} | {:.3} | {:.3} | {ttfb:.3} | {:.3} | {:.3} | {:.1} | {} |",
                    vias[i].name,
                    rps(s),
                    p50 - d50,
                    p99 - d99,
                    ttfb - dt,
                    cpu[i] / s.total_us.len().max(1) as f64,
                    rss as f64 / 1024.0,
                    s.errors
                );
            }
        }
    }
    let (_, _, hwm) = proc_stats(pid);
    println!(
        "\nllmgw peak RSS over the load runs: {:.1} MiB",
        hwm as f64 / 1024.0
    );
    if flat_requests > 0 {
        flat(&via, flat_requests, pid).await;
    }
    if soak_streams > 0 {
        let need = soak_streams as u64 + 100;
        if fd_limit() < need {
            println!(
                "\nSoak skipped: open-file limit {} is below {need}",
                fd_limit()
            );
        } else {
            soak(&g, &key, soak_streams, pid).await;
        }
    }
    drop(g);
}
