//! Ends a body that falls silent: each chunk re-arms a deadline, and a body
//! with nothing for `after` yields [`Fault::Idle`] and ends.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use tokio::time::{Instant, Sleep};

/// Why a relayed body ended early.
#[derive(Debug)]
pub(crate) enum Fault<E> {
    /// The body itself failed.
    Broken(E),
    /// Nothing arrived for this long.
    Idle(Duration),
}

pub(crate) struct IdleTimeout<S> {
    inner: S,
    sleep: Pin<Box<Sleep>>,
    after: Duration,
    last_chunk: Instant,
    done: bool,
}

impl<S> IdleTimeout<S> {
    pub fn new(inner: S, after: Duration) -> Self {
        let now = Instant::now();
        Self {
            inner,
            sleep: Box::pin(tokio::time::sleep_until(now + after)),
            after,
            last_chunk: now,
            done: false,
        }
    }
}

impl<S, E> Stream for IdleTimeout<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
{
    type Item = Result<Bytes, Fault<E>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                this.last_chunk = Instant::now();
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.done = true;
                Poll::Ready(Some(Err(Fault::Broken(e))))
            }
            Poll::Ready(None) => {
                this.done = true;
                Poll::Ready(None)
            }
            Poll::Pending => loop {
                // The timer is re-armed lazily, only when it fires, not per chunk.
                if this.sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                let deadline = this.last_chunk + this.after;
                if deadline <= Instant::now() {
                    this.done = true;
                    return Poll::Ready(Some(Err(Fault::Idle(this.after))));
                }
                this.sleep.as_mut().reset(deadline);
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    fn chunk(s: &'static str) -> Result<Bytes, ()> {
        Ok(Bytes::from_static(s.as_bytes()))
    }

    #[tokio::test]
    async fn a_silent_body_ends_with_an_idle_fault_after_its_chunks() {
        let body = futures_util::stream::iter([chunk("a"), chunk("b")])
            .chain(futures_util::stream::pending());
        let mut s = IdleTimeout::new(Box::pin(body), Duration::from_millis(30));
        assert_eq!(s.next().await.unwrap().unwrap(), "a");
        assert_eq!(s.next().await.unwrap().unwrap(), "b");
        let started = std::time::Instant::now();
        assert!(matches!(s.next().await, Some(Err(Fault::Idle(_)))));
        assert!(started.elapsed() >= Duration::from_millis(25));
        assert!(s.next().await.is_none(), "nothing after the fault");
    }

    #[tokio::test]
    async fn steady_chunks_never_trip_the_timeout() {
        let body = futures_util::stream::iter(0..6).then(|_| async {
            tokio::time::sleep(Duration::from_millis(15)).await;
            chunk("x")
        });
        let s = IdleTimeout::new(Box::pin(body), Duration::from_millis(40));
        let got: Vec<_> = s.collect().await;
        assert_eq!(got.len(), 6);
        assert!(got.iter().all(Result::is_ok));
    }

    #[tokio::test]
    async fn a_broken_body_is_reported_once_then_ends() {
        let body = futures_util::stream::iter([chunk("a"), Err(()), chunk("never")]);
        let mut s = IdleTimeout::new(body, Duration::from_secs(5));
        assert!(s.next().await.unwrap().is_ok());
        assert!(matches!(s.next().await, Some(Err(Fault::Broken(())))));
        assert!(s.next().await.is_none());
    }
}
