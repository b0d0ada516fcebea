//! An address that never answers a connection, as a host behind a firewall
//! that drops packets: a listener on 127.0.0.1 that never accepts, its
//! accept queue (length 0) filled, so the kernel drops every further SYN
//! and a client's connect waits until its own timeout.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// A non-answering `127.0.0.1:port`; gone when dropped.
pub struct Blackhole {
    pub port: u16,
    _listener: tokio::net::TcpListener,
    _queued: Vec<TcpStream>,
}

impl Blackhole {
    /// Needs a Tokio runtime (the listener is a Tokio one, never polled).
    pub fn start() -> Self {
        let socket = tokio::net::TcpSocket::new_v4().expect("a TCP socket");
        socket
            .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .expect("bind 127.0.0.1:0");
        let listener = socket.listen(0).expect("listen");
        let addr = listener.local_addr().expect("local address");
        let mut queued = Vec::new();
        // Connections complete until the queue is full; then SYNs are dropped.
        loop {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                Ok(s) => queued.push(s),
                Err(_) => break,
            }
            assert!(queued.len() < 64, "the accept queue never filled");
        }
        Self {
            port: addr.port(),
            _listener: listener,
            _queued: queued,
        }
    }

    /// `https://127.0.0.1:{port}`.
    pub fn base_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }
}
