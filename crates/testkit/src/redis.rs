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

impl RedisServer {
    /// A server on a free port; `None` when `redis-server` is missing.
    pub fn start() -> Option<Self> {
        Self::start_with(free_port(), Vec::new())
    }

    fn start_with(port: u16, extra: Vec<String>) -> Option<Self> {
        let mut me = Self {
            child: None,
            port,
            extra,
        };
        if !me.spawn() {
            crate::skip_unless_ci(&format!("the redis-server binary ({INSTALL})"));
            return None;
        }
        Some(me)
    }

    /// Starts the process and waits until it accepts connections; false
    /// when the binary cannot be run.
    fn spawn(&mut self) -> bool {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let Ok(child) = child else {
            return false;
        };
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !listening(self.port) {
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        true
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
        assert!(self.spawn(), "redis-server could not be started again");
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
            let port = free_port();
            let conf = me.dir.join(format!("nodes-{port}.conf"));
            let extra = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                &conf.to_string_lossy(),
                "--dir",
                &me.dir.to_string_lossy(),
            ]
            .map(str::to_owned);
            me.nodes
                .push(RedisServer::start_with(port, extra.to_vec())?);
        }
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(me.nodes.iter().map(|s| format!("127.0.0.1:{}", s.port)))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        match created {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("redis-cli --cluster create failed: {s}"),
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
