//! A cap on the requests one connection has in flight. actix-http does not
//! expose HTTP/2's `SETTINGS_MAX_CONCURRENT_STREAMS`, so one h2c connection
//! could otherwise open streams without end; each stream past the cap is
//! answered at once (429) and freed. HTTP/1 serves one request of a
//! connection at a time, so there the cap never bites.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use actix_web::body::{BodySize, BoxBody, EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::Version;
use actix_web::middleware::Next;
use actix_web::web::Bytes;
use actix_web::HttpResponse;

/// Requests of one connection at most in flight (headers to last body byte).
pub const MAX_IN_FLIGHT_PER_CONNECTION: usize = 100;

/// The per-connection counter, set by `on_connect`.
#[derive(Clone, Default)]
pub struct InFlight(Arc<AtomicUsize>);

struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The response body, holding its connection slot (HTTP/2 only) until it is
/// sent or dropped. Generic over the inner body, so no request pays for a box.
pub struct Held<B> {
    body: B,
    _slot: Option<Slot>,
}

impl<B: MessageBody + Unpin> MessageBody for Held<B> {
    type Error = B::Error;

    fn size(&self) -> BodySize {
        self.body.size()
    }

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_next(cx)
    }
}

pub async fn limit<B: MessageBody + Unpin + 'static>(
    req: ServiceRequest,
    next: Next<B>,
) -> Result<ServiceResponse<EitherBody<Held<B>, BoxBody>>, actix_web::Error> {
    // HTTP/1 serves one request of a connection at a time: nothing to count.
    let counter = (req.version() == Version::HTTP_2)
        .then(|| req.conn_data::<InFlight>().map(|c| c.0.clone()))
        .flatten();
    let Some(counter) = counter else {
        let res = next.call(req).await?;
        return Ok(res
            .map_body(|_, body| Held { body, _slot: None })
            .map_into_left_body());
    };
    let slot = Slot(counter.clone());
    if counter.fetch_add(1, Ordering::AcqRel) >= MAX_IN_FLIGHT_PER_CONNECTION {
        drop(slot);
        // Refused outside the gateway's own middleware: give it the
        // headers every gateway answer carries.
        let refused = HttpResponse::TooManyRequests()
            .insert_header(("retry-after", "1"))
            .insert_header(("x-content-type-options", "nosniff"))
            .insert_header(("x-request-id", uuid::Uuid::new_v4().to_string()))
            .json(serde_json::json!({"error": {
                "message": format!("at most {MAX_IN_FLIGHT_PER_CONNECTION} requests may be in flight on one connection; open another connection or wait"),
                "type": "rate_limit_exceeded",
                "param": null,
                "code": "rate_limit_exceeded",
            }}));
        return Ok(req.into_response(refused).map_into_right_body());
    }
    let res = next.call(req).await?;
    Ok(res
        .map_body(|_, body| Held {
            body,
            _slot: Some(slot),
        })
        .map_into_left_body())
}
