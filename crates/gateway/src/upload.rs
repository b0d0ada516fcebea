//! The client's side of an audio upload (`POST /v1/audio/transcriptions`,
//! `/v1/audio/translations`): its multipart body is read up to the end of
//! the `model` field (held, at most `max_body_bytes`), then the held bytes,
//! with only the model's `{customName}/` removed, and the rest of the body
//! stream to the upstream as they arrive ([`Upload::stream`]).
//!
//! The whole body stays within `max_body_bytes` (413) and `client_body_timeout`
//! (408) however it is sent; a body cut short reaches the upstream as a
//! broken upload, never as a shorter complete one. When `model` comes after
//! the file (curl's `-F file=@… -F model=…`), the file is held until it is
//! seen: up to the body limit (see [`crate::multipart`]).

use std::time::Duration;

use actix_web::http::header as ax;
use actix_web::{web, HttpRequest};
use bytes::Bytes;
use futures_util::StreamExt;
use reqwest::header as rq;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::body::split_model;
use crate::error::GatewayError;
use crate::forward::timed_out;
use crate::multipart::{boundary_of, ModelScan, Scan};

/// Client chunks in flight to the upstream at most (each as actix read it).
const IN_FLIGHT: usize = 4;

/// An upload read up to its `model` field.
pub(crate) struct Upload {
    scan: ModelScan,
    /// The client's `content-type`, boundary included, as the upstream gets it.
    pub content_type: rq::HeaderValue,
    declared: Option<u64>,
    /// Body bytes read so far.
    read: usize,
    limit: usize,
    deadline: Instant,
    body_timeout: Duration,
    /// `{customName}/{modelName}` as sent.
    pub model: String,
    /// Byte length of `{customName}/`.
    pub split: usize,
}

/// A client body chunk, or why there is none.
async fn next_chunk(
    payload: &mut web::Payload,
    deadline: Instant,
    body_timeout: Duration,
) -> Result<Option<Bytes>, GatewayError> {
    match tokio::time::timeout_at(deadline, payload.next()).await {
        Err(_) => Err(GatewayError::BodyTimeout(body_timeout)),
        Ok(None) => Ok(None),
        Ok(Some(Err(e))) => Err(GatewayError::BadBody(e.to_string())),
        Ok(Some(Ok(chunk))) => Ok(Some(chunk)),
    }
}

impl Upload {
    /// Reads the body until its `model` field is complete. `on_model` is
    /// told the model as sent when it names no provider (for the usage row).
    pub async fn read(
        req: &HttpRequest,
        payload: &mut web::Payload,
        limit: usize,
        body_timeout: Duration,
        on_model: impl FnOnce(&str),
    ) -> Result<Self, GatewayError> {
        let deadline = Instant::now() + body_timeout;
        let raw_type = req.headers().get(ax::CONTENT_TYPE);
        let boundary = boundary_of(raw_type.and_then(|v| v.to_str().ok()))
            .map_err(|why| GatewayError::InvalidMultipart(why.to_owned()))?;
        let content_type = raw_type
            .and_then(|v| rq::HeaderValue::from_bytes(v.as_bytes()).ok())
            .ok_or_else(|| GatewayError::InvalidMultipart("unreadable content-type".to_owned()))?;
        let declared = req
            .headers()
            .get(ax::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(GatewayError::PayloadTooLarge(limit));
        }
        let mut scan = ModelScan::new(boundary);
        let mut read = 0;
        loop {
            let Some(chunk) = next_chunk(payload, deadline, body_timeout).await? else {
                // Ended without its closing boundary: no model either way.
                return Err(GatewayError::MissingModel);
            };
            read += chunk.len();
            if read > limit {
                return Err(GatewayError::PayloadTooLarge(limit));
            }
            match scan.push(&chunk) {
                Scan::More => continue,
                Scan::Model => break,
                Scan::NoModel => return Err(GatewayError::MissingModel),
                Scan::Duplicate => return Err(GatewayError::DuplicateModel),
                Scan::Invalid(why) => return Err(GatewayError::InvalidMultipart(why.to_owned())),
            }
        }
        let model = std::str::from_utf8(scan.model())
            .map_err(|_| GatewayError::ModelNotString)?
            .to_owned();
        let Some(split) = split_model(&model) else {
            on_model(&model);
            return Err(GatewayError::ModelWithoutProvider(model));
        };
        Ok(Self {
            scan,
            content_type,
            declared,
            read,
            limit,
            deadline,
            body_timeout,
            model,
            split,
        })
    }

    /// `{customName}`.
    pub fn provider(&self) -> &str {
        &self.model[..self.split - 1]
    }

    /// The upstream's `content-length`: the client's, less the removed `{customName}/`.
    pub fn length(&self) -> Option<u64> {
        self.declared.map(|n| n.saturating_sub(self.split as u64))
    }

    /// The upstream's body, and the pump that feeds it the rest of the
    /// client's body (it must run while the upstream call does). The pump
    /// fails with the client's fault (413, 408, a second `model`), or with
    /// 504 when the upstream takes no data for `stall`.
    pub fn stream(
        mut self,
        mut payload: web::Payload,
        provider: String,
        stall: Duration,
    ) -> (
        reqwest::Body,
        impl std::future::Future<Output = Result<(), GatewayError>>,
    ) {
        let (head, tail, scanned) = self.scan.split(self.split);
        let (tx, rx) = mpsc::channel::<Piece>(IN_FLIGHT);
        let held = futures_util::stream::iter([Ok::<_, std::io::Error>(head), Ok(tail)]);
        let body = reqwest::Body::wrap_stream(held.chain(pieces(rx)));
        let pump = async move {
            match scanned {
                Scan::Duplicate => return Err(GatewayError::DuplicateModel),
                Scan::Invalid(why) => return Err(GatewayError::InvalidMultipart(why.to_owned())),
                _ => {}
            }
            while let Some(chunk) =
                next_chunk(&mut payload, self.deadline, self.body_timeout).await?
            {
                self.read += chunk.len();
                if self.read > self.limit {
                    return Err(GatewayError::PayloadTooLarge(self.limit));
                }
                match self.scan.push_streamed(&chunk) {
                    Scan::Duplicate => return Err(GatewayError::DuplicateModel),
                    Scan::Invalid(why) => {
                        return Err(GatewayError::InvalidMultipart(why.to_owned()))
                    }
                    _ => {}
                }
                match tokio::time::timeout(stall, tx.send(Piece::Data(chunk))).await {
                    Err(_) => return Err(timed_out(&provider, stall)),
                    // The upstream stopped reading (it answered, or failed): nothing more to send.
                    Ok(Err(_)) => return Ok(()),
                    Ok(Ok(())) => {}
                }
            }
            let _ = tx.send(Piece::End).await;
            Ok(())
        };
        (body, pump)
    }
}

/// What the pump hands the upstream's body.
enum Piece {
    Data(Bytes),
    /// The client's body is all sent.
    End,
}

/// The pump's pieces as a body; a pump gone without [`Piece::End`] (a fault,
/// the request dropped) breaks the upload rather than ending it early.
fn pieces(
    rx: mpsc::Receiver<Piece>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    futures_util::stream::unfold(Some(rx), |rx| async move {
        let mut rx = rx?;
        match rx.recv().await {
            Some(Piece::Data(b)) => Some((Ok(b), Some(rx))),
            Some(Piece::End) => None,
            None => Some((
                Err(std::io::Error::other("the client's upload was cut short")),
                None,
            )),
        }
    })
}
