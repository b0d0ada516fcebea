//! Redis servers a test starts for itself: one `redis-server` on a port of
//! its own (killed and started again on that port, for outages), or a
//! Redis Cluster of several such nodes. No persistence; killed when dropped.
//!
//! Without the `redis-server` binary (or `redis-cli`, which creates a
//! Cluster) the starters return `None` after [`crate::skip_unless_ci`].

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const INSTALL: &str = "apt-get install redis-server redis-tools; .ci/run does this";

/// A port nobody listens on now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .expect("local address")
        .port()
}

/// True when something accepts connections on `127.0.0.1:port`.
pub fn listening(port: u16) -> bool {
    TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}

/// A `redis-server` child process.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    extra: Vec<String>,
}

/// Why a `redis-server` did not come up.
enum Spawn {
    /// The binary cannot be run.
    Missing,
    /// It exited: another process took the port first.
    Exited,
}

/// True when the Redis answering on `port` is process `pid` (not another
/// test's server, nor another listener that took a port picked as free).
fn served_by(port: u16, pid: u32) -> bool {
    use std::io::{Read, Write};
    let Ok(mut conn) = TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    ) else {
        return false;
    };
    let _ = conn.set_read_timeout(Some(Duration::from_millis(500)));
    if conn.write_all(b"INFO server\r\n").is_err() {
        return false;
    }
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n @ 1..) = conn.read(&mut buf) {
        seen.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&seen);
        if let Some(rest) = text.split("process_id:").nth(1) {
            if let Some((id, _)) = rest.split_once("\r\n") {
                return id.trim() == pid.to_string();
            }
        }
    }
    false
}

impl RedisServer {
    /// A server on a free port; `None` when `redis-server` is missing.
    pub fn start() -> Option<Self> {
        Self::start_with(|_| Vec::new())
    }

    /// A server on a free port with the options `extra(port)`.
    fn start_with(extra: impl Fn(u16) -> Vec<String>) -> Option<Self> {
        for _ in 0..5 {
            let port = free_port();
            let mut me = Self {
                child: None,
                port,
                extra: extra(port),
            };
            match me.spawn() {
                Ok(()) => return Some(me),
                Err(Spawn::Exited) => continue,
                Err(Spawn::Missing) => {
                    crate::skip_unless_ci(&format!("the redis-server binary ({INSTALL})"));
                    return None;
                }
            }
        }
        panic!("redis-server exited at start on five free ports");
    }

    /// Starts the process and waits until it answers on its port.
    fn spawn(&mut self) -> Result<(), Spawn> {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let Ok(child) = child else {
            return Err(Spawn::Missing);
        };
        let pid = child.id();
        let child = self.child.insert(child);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !served_by(self.port, pid) {
            if child.try_wait().ok().flatten().is_some() {
                self.child = None;
                return Err(Spawn::Exited);
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL, as a crash or an unplugged machine would stop it; returns
    /// once the process is gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port (empty: nothing was persisted).
    pub fn restart(&mut self) {
        self.kill();
        assert!(
            self.spawn().is_ok(),
            "redis-server could not be started again on port {}",
            self.port
        );
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis Cluster of `redis-server --cluster-enabled yes` nodes, every
/// slot assigned (no replicas), in a scratch directory removed when dropped.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
    dir: PathBuf,
}

impl RedisCluster {
    /// `n` (≥ 3) nodes, waited for until each reports `cluster_state:ok`;
    /// `None` when `redis-server` or `redis-cli` is missing.
    pub fn start(n: usize) -> Option<Self> {
        let dir = std::env::temp_dir().join(format!(
            "llmgw-redis-cluster-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).expect("create the cluster's directory");
        let mut me = Self {
            nodes: Vec::with_capacity(n),
            dir,
        };
        for _ in 0..n {
            let dir = me.dir.to_string_lossy().into_owned();
            let node = RedisServer::start_with(|port| {
                let conf = format!("{dir}/nodes-{port}.conf");
                [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &conf,
                    "--dir",
                    &dir,
                ]
                .map(str::to_owned)
                .to_vec()
            })?;
            me.nodes.push(node);
        }
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(me.nodes.iter().map(|s| format!("127.0.0.1:{}", s.port)))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output();
        match created {
            Ok(o) if o.status.success() => {}
            Ok(o) => panic!(
                "redis-cli --cluster create failed ({}):\n{}{}",
                o.status,
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(_) => {
                crate::skip_unless_ci(&format!("the redis-cli binary ({INSTALL})"));
                return None;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        for node in &me.nodes {
            loop {
                let info = Command::new("redis-cli")
                    .args(["-p", &node.port.to_string(), "cluster", "info"])
                    .output()
                    .expect("run redis-cli");
                if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                    break;
                }
                assert!(Instant::now() < deadline, "the cluster never became ok");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Some(me)
    }

    /// One `redis://` URL per node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
