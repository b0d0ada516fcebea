//! Relays an answer that is bytes, not events (speech audio), as it arrives:
//! [`IdleTimeout`] cuts a silent upstream, and a fault ends the client's body
//! with an error (the connection is cut, so a partial file is never taken
//! for a whole one; there is no event to tell it in). The row is finished
//! when the body ends, canceled when the client goes away first.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;

use super::error_event::StreamFault;
use super::idle::IdleTimeout;
use super::{upstream_body, UpstreamBody};
use crate::metrics::Metrics;
use crate::usage::LogGuard;

pub(crate) struct RawRelay {
    inner: IdleTimeout<UpstreamBody>,
    log: LogGuard,
    metrics: Arc<Metrics>,
    idle: Duration,
    status: u16,
    first: bool,
    done: bool,
}

impl RawRelay {
    pub fn new(
        upstream: reqwest::Response,
        log: LogGuard,
        metrics: Arc<Metrics>,
        idle: Duration,
        status: u16,
    ) -> Self {
        let body = upstream_body(upstream);
        Self {
            inner: IdleTimeout::new(body, idle),
            log,
            metrics,
            idle,
            status,
            first: true,
            done: false,
        }
    }
}

impl Stream for RawRelay {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                if this.first {
                    this.first = false;
                    this.log.set_ttfb();
                    this.metrics.upstream_ttfb.observe(this.log.elapsed());
                }
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(fault))) => {
                this.done = true;
                let provider = this.log.row.provider_name.clone().unwrap_or_default();
                let fault = StreamFault::of(fault, &provider, this.idle, &this.log.row.request_id);
                tracing::warn!(request_id = %this.log.row.request_id, error = %fault.message, "upstream body failed");
                this.metrics.upstream_error(fault.kind);
                this.log.finish(this.status, Some(fault.class));
                Poll::Ready(Some(Err(std::io::Error::other(fault.message))))
            }
            Poll::Ready(None) => {
                this.done = true;
                this.log.finish(this.status, None);
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}
