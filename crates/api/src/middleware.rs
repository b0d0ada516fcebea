//! What every request of the API listener goes through: `x-request-id` and
//! `X-Content-Type-Options: nosniff` on every response with one log line per
//! request, and a deadline on the request body.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::error::PayloadError;
use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{web, HttpMessage, ResponseError};
use futures_util::Stream;
use tracing::Instrument;

use crate::error::ApiError;
use crate::State;

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// A client-supplied id is kept when it is short and plain; otherwise a new one is made.
fn request_id_of(req: &ServiceRequest) -> String {
    req.headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|s| {
            (1..=128).contains(&s.len())
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        })
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

/// The outermost layer: its headers land on every answer the API makes,
/// default 404/405 and error answers included.
pub async fn request_id(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let id = request_id_of(&req);
    // Only the path is logged: query strings and bodies may carry secrets one day.
    let span =
        tracing::info_span!("api", request_id = %id, method = %req.method(), path = %req.path());
    let start = Instant::now();
    let mut res = next.call(req).instrument(span.clone()).await?;
    let headers = res.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&id) {
        headers.insert(REQUEST_ID, v);
    }
    // Browsers must not guess a type (an error echoing input rendered as HTML).
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    span.in_scope(|| {
        tracing::info!(
            status = res.status().as_u16(),
            latency_ms = start.elapsed().as_millis() as u64,
            "request"
        )
    });
    Ok(res)
}

/// Bounds the time a client may take to send its body, counted from the
/// moment its head arrived (`LLMGW_API_BODY_TIMEOUT_MS`).
///
/// The payload is wrapped rather than each reader timed, so every body
/// reader (extractor or handler) is covered; whatever a reader makes of the
/// resulting read error, the answer is 408 `request_timeout`. The connection
/// then closes, as actix does after any unfinished body, which frees its slot
/// of `LLMGW_API_MAX_CONNECTIONS`.
pub async fn body_deadline(
    mut req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let timeout = req
        .app_data::<web::Data<State>>()
        .map(|s| s.cfg.body_timeout);
    let expired = Rc::new(Cell::new(false));
    if let Some(timeout) = timeout {
        match req.take_payload() {
            Payload::None => {}
            inner => req.set_payload(Payload::Stream {
                payload: Box::pin(Deadline {
                    inner,
                    sleep: Box::pin(tokio::time::sleep(timeout)),
                    timeout,
                    expired: expired.clone(),
                }),
            }),
        }
    }
    let res = next.call(req).await?;
    match timeout.filter(|_| expired.get()) {
        Some(timeout) => {
            let answer = ApiError::RequestTimeout(timeout).error_response();
            Ok(res.into_response(answer).map_into_right_body())
        }
        None => Ok(res.map_into_left_body()),
    }
}

/// A request body that fails once its deadline has passed with bytes still missing.
struct Deadline {
    inner: Payload,
    sleep: Pin<Box<tokio::time::Sleep>>,
    timeout: Duration,
    expired: Rc<Cell<bool>>,
}

impl Stream for Deadline {
    type Item = Result<web::Bytes, PayloadError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.expired.get() {
            return Poll::Ready(None);
        }
        // Bytes that already arrived are handed over even past the deadline:
        // only a body still missing data is cut.
        if let Poll::Ready(item) = Pin::new(&mut this.inner).poll_next(cx) {
            return Poll::Ready(item);
        }
        match this.sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                this.expired.set(true);
                tracing::info!(
                    timeout_ms = this.timeout.as_millis() as u64,
                    "request body timed out"
                );
                Poll::Ready(Some(Err(PayloadError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "request body deadline passed",
                )))))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}
