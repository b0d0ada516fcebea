//! Gathers what the upstream has already sent into one chunk, so the client
//! gets one write where it would get one per upstream chunk.
//!
//! Over HTTP/1.1 the upstream connection is driven by a task of its own that
//! hands the body over a chunk at a time: after each chunk the body answers
//! `Pending` until that task has run again, even when the next chunk is
//! already in its buffer. The listener writes to the client each time the
//! body answers `Pending`, so a burst of N events cost N writes (six system
//! calls per streamed answer of the benchmark, against one over HTTP/2,
//! whose streams buffer what was read). Here a chunk is held for one pass of
//! the scheduler: when that pass brought more, it is appended and the wait
//! repeats; when it brought nothing, what was gathered goes out. A chunk
//! waits no longer than the tasks that were already ready take to run, and
//! never for the network.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures_util::Stream;

/// Past this many bytes what was gathered goes out at once.
const MAX_GATHERED: usize = 16 * 1024;

pub(crate) struct Gather<S, E> {
    inner: S,
    /// The first chunk of this gathering, passed on without a copy when no
    /// other joins it.
    first: Option<Bytes>,
    more: BytesMut,
    /// Whether a chunk arrived since the last pass given to the upstream's task.
    grew: bool,
    /// What ended the body, held until what was gathered before it has gone out.
    end: Option<Option<E>>,
}

impl<S, E> Gather<S, E> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            first: None,
            more: BytesMut::new(),
            grew: false,
            end: None,
        }
    }

    fn gathered(&self) -> usize {
        self.first.as_ref().map_or(0, Bytes::len) + self.more.len()
    }

    fn take(&mut self) -> Option<Bytes> {
        let first = self.first.take()?;
        if self.more.is_empty() {
            return Some(first);
        }
        let mut all = BytesMut::with_capacity(first.len() + self.more.len());
        all.extend_from_slice(&first);
        all.extend_from_slice(&self.more);
        self.more.clear();
        Some(all.freeze())
    }
}

impl<S, E> Stream for Gather<S, E>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: Unpin,
{
    type Item = Result<Bytes, E>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(end) = this.end.take() {
            if let Some(chunk) = this.take() {
                this.end = Some(end);
                return Poll::Ready(Some(Ok(chunk)));
            }
            return Poll::Ready(end.map(Err));
        }
        loop {
            match Pin::new(&mut this.inner).poll_next(cx) {
                Poll::Ready(Some(Ok(chunk))) if chunk.is_empty() => {}
                Poll::Ready(Some(Ok(chunk))) => {
                    if this.first.is_none() {
                        this.first = Some(chunk);
                    } else {
                        this.more.extend_from_slice(&chunk);
                    }
                    this.grew = true;
                    if this.gathered() >= MAX_GATHERED {
                        this.grew = false;
                        return Poll::Ready(this.take().map(Ok));
                    }
                }
                Poll::Ready(end) => {
                    let end = end.map(|r| r.expect_err("Ok chunks are matched above"));
                    return match this.take() {
                        Some(chunk) => {
                            this.end = Some(end);
                            Poll::Ready(Some(Ok(chunk)))
                        }
                        None => Poll::Ready(end.map(Err)),
                    };
                }
                Poll::Pending if this.first.is_none() => return Poll::Pending,
                Poll::Pending if this.grew => {
                    // One more pass of the scheduler: the upstream's task
                    // decodes the next chunk if it already has it.
                    this.grew = false;
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Poll::Pending => return Poll::Ready(this.take().map(Ok)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    /// A body that answers `Pending` once between its chunks (as an HTTP/1.1
    /// body does until its connection's task runs), then fails or ends.
    struct Handover {
        items: std::collections::VecDeque<Result<Bytes, &'static str>>,
        ready: bool,
    }

    impl Stream for Handover {
        type Item = Result<Bytes, &'static str>;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            if !self.ready {
                self.ready = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            self.ready = false;
            Poll::Ready(self.items.pop_front())
        }
    }

    fn handover(items: Vec<Result<&'static str, &'static str>>) -> Handover {
        handover_bytes(
            items
                .into_iter()
                .map(|r| r.map(|s| Bytes::from_static(s.as_bytes())))
                .collect(),
        )
    }

    fn handover_bytes(items: Vec<Result<Bytes, &'static str>>) -> Handover {
        Handover {
            items: items.into(),
            ready: false,
        }
    }

    #[tokio::test]
    async fn chunks_handed_over_one_at_a_time_go_out_as_one() {
        let out: Vec<_> = Gather::new(handover(vec![
            Ok("data: a\n\n"),
            Ok("data: b\n\n"),
            Ok("data: [DONE]\n\n"),
        ]))
        .collect()
        .await;
        assert_eq!(
            out,
            vec![Ok(Bytes::from_static(
                b"data: a\n\ndata: b\n\ndata: [DONE]\n\n"
            ))]
        );
    }

    #[tokio::test]
    async fn what_came_before_a_failure_goes_out_before_it() {
        let out: Vec<_> = Gather::new(handover(vec![Ok("data: a\n\n"), Err("reset")]))
            .collect()
            .await;
        assert_eq!(
            out,
            vec![Ok(Bytes::from_static(b"data: a\n\n")), Err("reset")]
        );
    }

    #[tokio::test]
    async fn a_chunk_waits_for_the_scheduler_not_for_the_network() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Result<Bytes, &'static str>>();
        let mut g = Gather::new(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)));
        tx.send(Ok(Bytes::from_static(b"one"))).unwrap();
        // Nothing else is coming yet: the chunk goes out on the next poll.
        let first = tokio::time::timeout(std::time::Duration::from_secs(1), g.next()).await;
        assert_eq!(first.unwrap(), Some(Ok(Bytes::from_static(b"one"))));
        tx.send(Ok(Bytes::from_static(b"two"))).unwrap();
        drop(tx);
        assert_eq!(g.next().await, Some(Ok(Bytes::from_static(b"two"))));
        assert_eq!(g.next().await, None);
    }

    #[tokio::test]
    async fn a_large_burst_goes_out_in_bounded_pieces() {
        let piece = Bytes::from(vec![b'x'; 4096]);
        let out: Vec<_> = Gather::new(handover_bytes(vec![Ok(piece); 10]))
            .collect()
            .await;
        let sizes: Vec<usize> = out.iter().map(|c| c.as_ref().unwrap().len()).collect();
        assert_eq!(sizes, vec![MAX_GATHERED, MAX_GATHERED, 2 * 4096]);
    }
}
