//! Stage 4: relaying an upstream event stream as it arrives, composed of
//! small wrappers around the upstream body, innermost first: [`Gather`]
//! (what an HTTP/1.1 upstream already sent goes out as one write),
//! [`IdleTimeout`] (a silent upstream is cut), [`UsageTap`] (the `usage` is
//! read from the events, and withheld when the gateway asked for it on the
//! client's behalf), [`ErrorEvent`] (a fault becomes a last
//! OpenAI-shaped event). [`Relay`] on the outside finishes the usage row.
//! Answers that are bytes, not events (speech audio), go through
//! [`RawRelay`]: gathered as above, with the idle timeout alone.
//!
//! Dropped early (the client went away), the relay drops the upstream
//! response, which closes that request, and its row says canceled. A stream
//! that breaks or falls silent keeps status 200 in its row, with
//! `error_class` `upstream_stream_error` or `upstream_timeout`.

mod error_event;
mod gather;
mod idle;
mod raw;
mod usage_tap;

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;

use crate::metrics::Metrics;
use crate::usage::LogGuard;

use error_event::ErrorEvent;
use gather::Gather;
use idle::IdleTimeout;
use usage_tap::UsageTap;

pub(crate) use raw::RawRelay;

type UpstreamBody = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// The upstream's body as both relays read it: gathered over HTTP/1.1. An
/// HTTP/2 body already yields what was read without waiting, so there the
/// extra pass would cost and save nothing.
fn upstream_body(upstream: reqwest::Response) -> UpstreamBody {
    if upstream.version() < reqwest::Version::HTTP_2 {
        Box::pin(Gather::new(upstream.bytes_stream()))
    } else {
        Box::pin(upstream.bytes_stream())
    }
}

/// The relayed body handed to actix.
pub(crate) struct Relay {
    inner: ErrorEvent<UsageTap<IdleTimeout<UpstreamBody>, idle::Fault<reqwest::Error>>>,
    log: LogGuard,
    metrics: Arc<Metrics>,
    status: u16,
    first: bool,
    done: bool,
    /// Told the Responses API object id once the stream carries it.
    on_response_id: Option<Box<dyn FnOnce(String) + Send>>,
    /// Whether the stream's usage goes on the row (not for a replay of a stored response).
    count_usage: bool,
}

impl Relay {
    pub fn new(
        upstream: reqwest::Response,
        log: LogGuard,
        metrics: Arc<Metrics>,
        idle_timeout: Duration,
        status: u16,
        strip_usage: bool,
    ) -> Self {
        let body = upstream_body(upstream);
        let provider = log.row.provider_name.clone().unwrap_or_default();
        let request_id = log.row.request_id.clone();
        Self {
            inner: ErrorEvent::new(
                UsageTap::new(IdleTimeout::new(body, idle_timeout), strip_usage),
                provider,
                idle_timeout,
                request_id,
            ),
            log,
            metrics,
            status,
            first: true,
            done: false,
            on_response_id: None,
            count_usage: true,
        }
    }

    /// Calls `f` with the stream's Responses API object id as soon as a
    /// chunk carrying it has been read (before that chunk is passed on).
    pub fn on_response_id(mut self, f: impl FnOnce(String) + Send + 'static) -> Self {
        self.inner.get_mut().watch_response_id();
        self.on_response_id = Some(Box::new(f));
        self
    }

    /// Leaves the stream's usage off the row: what it replays was counted when created.
    pub fn without_usage(mut self) -> Self {
        self.count_usage = false;
        self
    }

    fn finish(&mut self) {
        self.done = true;
        if let Some(u) = self.inner.get_ref().usage().filter(|_| self.count_usage) {
            self.log.set_usage(u);
        }
        let class = self.inner.fault().map(|f| {
            self.metrics.upstream_error(f.kind);
            f.class
        });
        self.log.finish(self.status, class);
    }
}

impl Stream for Relay {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_next(cx) {
            Poll::Ready(Some(chunk)) => {
                if this.on_response_id.is_some() {
                    if let Some(id) = this.inner.get_ref().response_id() {
                        let id = id.to_owned();
                        if let Some(f) = this.on_response_id.take() {
                            f(id);
                        }
                    }
                }
                if this.inner.fault().is_some() {
                    // The error event: the row is complete even if the client leaves now.
                    this.finish();
                } else if this.first {
                    this.first = false;
                    if let (Some(t), Ok(bytes)) = (&mut this.log.trace, &chunk) {
                        t.answered_by(bytes);
                    }
                    this.log.set_ttfb();
                    this.metrics.upstream_ttfb.observe(this.log.elapsed());
                }
                Poll::Ready(Some(chunk))
            }
            Poll::Ready(None) => {
                this.finish();
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}
