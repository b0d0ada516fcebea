//! Bodies read whole, with a cap: whatever is gathered here (a client's
//! request in the gateway, a provider's non-streamed answer) never holds
//! more than its limit.

use bytes::{Bytes, BytesMut};

/// Gathers a body's chunks, refusing more than `limit` bytes; a body of
/// one chunk is kept without a copy.
pub struct Collect {
    limit: usize,
    total: usize,
    first: Option<Bytes>,
    buf: Option<BytesMut>,
    /// Expected length, to allocate once.
    hint: usize,
}

/// The body outgrew its limit.
#[derive(Debug)]
pub struct TooLarge;

impl Collect {
    /// A collector for at most `limit` bytes; `hint` is the declared length, if any.
    pub fn new(limit: usize, hint: Option<usize>) -> Self {
        Self {
            limit,
            total: 0,
            first: None,
            buf: None,
            hint: hint.unwrap_or(0).min(limit),
        }
    }

    /// Adds a chunk, or refuses it when the body would exceed the limit.
    pub fn push(&mut self, chunk: Bytes) -> Result<(), TooLarge> {
        self.total += chunk.len();
        if self.total > self.limit {
            return Err(TooLarge);
        }
        match (&mut self.buf, self.first.take()) {
            (Some(b), _) => b.extend_from_slice(&chunk),
            (None, None) => self.first = Some(chunk),
            (None, Some(f)) => {
                let mut b = BytesMut::with_capacity(self.hint.max(f.len() + chunk.len()));
                b.extend_from_slice(&f);
                b.extend_from_slice(&chunk);
                self.buf = Some(b);
            }
        }
        Ok(())
    }

    /// The whole body.
    pub fn finish(self) -> Bytes {
        match self.buf {
            Some(b) => b.freeze(),
            None => self.first.unwrap_or_default(),
        }
    }
}

/// Why a whole upstream body could not be read.
#[derive(Debug)]
pub enum UpstreamBody {
    /// More than the cap: the response was dropped, which closes its connection.
    TooLarge,
    Failed(reqwest::Error),
}

/// Reads a whole upstream body into memory, holding at most `cap` bytes
/// (a declared larger `content-length` is refused before reading). The
/// request's own timeout, if any, bounds the read in time.
pub async fn read_capped(mut resp: reqwest::Response, cap: usize) -> Result<Bytes, UpstreamBody> {
    let declared = resp.content_length();
    if declared.is_some_and(|n| n > cap as u64) {
        return Err(UpstreamBody::TooLarge);
    }
    let mut body = Collect::new(cap, declared.map(|n| n as usize));
    while let Some(chunk) = resp.chunk().await.map_err(UpstreamBody::Failed)? {
        body.push(chunk)
            .map_err(|TooLarge| UpstreamBody::TooLarge)?;
    }
    Ok(body.finish())
}
