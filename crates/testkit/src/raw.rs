//! HTTP/1.1 by hand over TCP, for the hostile clients an HTTP library will
//! not play: a body that stops half-way, a head that never ends.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One raw connection.
pub struct RawClient {
    stream: TcpStream,
}

/// What the server sent until it closed the connection or the wait ran out.
#[derive(Debug)]
pub struct RawAnswer {
    pub text: String,
    pub closed: bool,
}

impl RawAnswer {
    /// The status of the first response line, if one arrived.
    pub fn status(&self) -> Option<u16> {
        self.text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
    }
}

impl RawClient {
    pub async fn connect(addr: SocketAddr) -> std::io::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Self { stream })
    }

    /// Writes `bytes`; false when the server already closed the connection.
    pub async fn send(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).await.is_ok()
    }

    /// Reads until the server closes the connection or `wait` has passed.
    pub async fn read_answer(&mut self, wait: Duration) -> RawAnswer {
        let mut out = Vec::new();
        let mut buf = [0u8; 8192];
        let deadline = tokio::time::Instant::now() + wait;
        let closed = loop {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break true,
                Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
                Err(_) => break false,
            }
        };
        RawAnswer {
            text: String::from_utf8_lossy(&out).into_owned(),
            closed,
        }
    }
}
