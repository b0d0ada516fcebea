//! Bodies read whole, with a cap: the client's request (bounded in size,
//! the caller bounds it in time) and non-streamed upstream answers.

use actix_web::http::header as ax;
use actix_web::{web, HttpRequest};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;

use crate::error::GatewayError;

/// Gathers a body's chunks, refusing more than `limit` bytes; a body of
/// one chunk is kept without a copy.
struct Collect {
    limit: usize,
    total: usize,
    first: Option<Bytes>,
    buf: Option<BytesMut>,
    /// Expected length, to allocate once.
    hint: usize,
}

/// The body outgrew its limit.
struct TooLarge;

impl Collect {
    fn new(limit: usize, hint: Option<usize>) -> Self {
        Self {
            limit,
            total: 0,
            first: None,
            buf: None,
            hint: hint.unwrap_or(0).min(limit),
        }
    }

    fn push(&mut self, chunk: Bytes) -> Result<(), TooLarge> {
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

    fn finish(self) -> Bytes {
        match self.buf {
            Some(b) => b.freeze(),
            None => self.first.unwrap_or_default(),
        }
    }
}

/// Reads the client's body, refusing more than `limit` bytes. Callers bound
/// it in time: a client that stalls mid-body must not hold the request forever.
pub(crate) async fn read_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<Bytes, GatewayError> {
    let declared = req
        .headers()
        .get(ax::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(GatewayError::PayloadTooLarge(limit));
    }
    let mut body = Collect::new(limit, declared);
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| GatewayError::BadBody(e.to_string()))?;
        body.push(chunk)
            .map_err(|TooLarge| GatewayError::PayloadTooLarge(limit))?;
    }
    Ok(body.finish())
}

/// Why a whole upstream body could not be read.
pub(crate) enum UpstreamBody {
    /// More than the cap: the response was dropped, which closes its connection.
    TooLarge,
    Failed(reqwest::Error),
}

/// Reads a whole upstream body into memory, holding at most `cap` bytes
/// (a declared larger `content-length` is refused before reading).
pub(crate) async fn read_capped(
    mut resp: reqwest::Response,
    cap: usize,
) -> Result<Bytes, UpstreamBody> {
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
