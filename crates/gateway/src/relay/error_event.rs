//! Ends a faulted stream the way OpenAI does: headers are gone already, so
//! the client is told in one last `data: {"error":…}` event.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;

use super::idle::Fault;
use crate::error::{error_body, ErrorClass, GatewayError, UpstreamErrorKind};
use crate::forward::{classify, timed_out};

/// A fault, as the client, the row and the metric see it.
#[derive(Debug, Clone)]
pub(crate) struct StreamFault {
    pub class: ErrorClass,
    pub kind: UpstreamErrorKind,
    pub message: String,
}

impl StreamFault {
    pub(super) fn of(
        fault: Fault<reqwest::Error>,
        provider: &str,
        idle: Duration,
        request_id: &str,
    ) -> Self {
        let e = match fault {
            Fault::Broken(e) => classify(&e, provider, idle, request_id),
            Fault::Idle(after) => timed_out(provider, after),
        };
        match &e {
            GatewayError::UpstreamTimeout { provider, after } => Self {
                class: ErrorClass::UpstreamTimeout,
                kind: UpstreamErrorKind::Stream,
                message: format!(
                    "the provider `{provider}` sent nothing for {} ms; the stream was cut",
                    after.as_millis()
                ),
            },
            GatewayError::UpstreamUnreachable { provider, failure } => Self {
                class: ErrorClass::UpstreamStreamError,
                kind: UpstreamErrorKind::Stream,
                message: format!("the provider `{provider}` broke off the stream: {failure}"),
            },
            _ => Self {
                class: ErrorClass::UpstreamStreamError,
                kind: UpstreamErrorKind::Stream,
                message: e.to_string(),
            },
        }
    }

    /// The SSE event that tells the client.
    pub fn event(&self) -> Bytes {
        let mut event = b"data: ".to_vec();
        event.extend_from_slice(&error_body(
            &self.message,
            "upstream_error",
            None,
            self.class.as_str(),
        ));
        event.extend_from_slice(b"\n\n");
        Bytes::from(event)
    }
}

pub(crate) struct ErrorEvent<S> {
    inner: S,
    provider: String,
    /// The idle timeout, named when a body read times out.
    idle: Duration,
    request_id: String,
    fault: Option<StreamFault>,
}

impl<S> ErrorEvent<S> {
    pub fn new(inner: S, provider: String, idle: Duration, request_id: String) -> Self {
        Self {
            inner,
            provider,
            idle,
            request_id,
            fault: None,
        }
    }

    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The fault the stream ended with, once it has.
    pub fn fault(&self) -> Option<&StreamFault> {
        self.fault.as_ref()
    }
}

impl<S> Stream for ErrorEvent<S>
where
    S: Stream<Item = Result<Bytes, Fault<reqwest::Error>>> + Unpin,
{
    type Item = Result<Bytes, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.fault.is_some() {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => Poll::Ready(Some(Ok(chunk))),
            Poll::Ready(Some(Err(fault))) => {
                let fault = StreamFault::of(fault, &this.provider, this.idle, &this.request_id);
                tracing::warn!(request_id = %this.request_id, error = %fault.message, "upstream stream failed");
                let event = fault.event();
                this.fault = Some(fault);
                Poll::Ready(Some(Ok(event)))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    #[tokio::test]
    async fn an_idle_fault_becomes_one_openai_shaped_event_then_the_end() {
        let body = futures_util::stream::iter([
            Ok(Bytes::from_static(b"data: {}\n\n")),
            Err(Fault::Idle(Duration::from_millis(1500))),
        ]);
        let mut s = ErrorEvent::new(body, "acme".into(), Duration::from_secs(1), "rid".into());
        assert_eq!(s.next().await.unwrap().unwrap(), "data: {}\n\n");
        let last = s.next().await.unwrap().unwrap();
        let json: serde_json::Value =
            serde_json::from_slice(last.strip_prefix(b"data: ").unwrap().trim_ascii()).unwrap();
        assert_eq!(json["error"]["code"], "upstream_timeout");
        assert_eq!(json["error"]["type"], "upstream_error");
        assert!(json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("sent nothing for 1500 ms"));
        assert_eq!(
            s.fault().map(|f| f.class),
            Some(ErrorClass::UpstreamTimeout)
        );
        assert!(s.next().await.is_none());
    }
}
