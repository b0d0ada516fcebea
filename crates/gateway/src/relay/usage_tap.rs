//! Reads the `usage` of an event stream from a copy of each chunk, holding
//! at most one line (capped) of it.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::Stream;

use crate::usage::{usage_of, Usage};

/// Finds the last `usage` in an SSE stream, reading a copy of each chunk.
#[derive(Default)]
pub(crate) struct SseUsage {
    partial: Vec<u8>,
    /// The current line outgrew the buffer: skip to its end.
    overflow: bool,
    usage: Option<Usage>,
}

const MAX_SSE_LINE: usize = 1 << 20;

impl SseUsage {
    pub fn feed(&mut self, mut chunk: &[u8]) {
        while let Some(i) = chunk.iter().position(|b| *b == b'\n') {
            let (line, rest) = (&chunk[..i], &chunk[i + 1..]);
            chunk = rest;
            if self.overflow {
                self.overflow = false;
                self.partial.clear();
            } else if self.partial.is_empty() {
                self.line(line);
            } else {
                let mut full = std::mem::take(&mut self.partial);
                full.extend_from_slice(line);
                self.line(&full);
                full.clear();
                self.partial = full;
            }
        }
        if !chunk.is_empty() && !self.overflow {
            if self.partial.len() + chunk.len() > MAX_SSE_LINE {
                self.overflow = true;
                self.partial.clear();
            } else {
                self.partial.extend_from_slice(chunk);
            }
        }
    }

    fn line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        if data.windows(7).any(|w| w == b"\"usage\"") {
            if let Some(u) = usage_of(data) {
                self.usage = Some(u);
            }
        }
    }
}

/// Passes a body through unchanged while its [`SseUsage`] scanner reads it.
pub(crate) struct UsageTap<S> {
    inner: S,
    scanner: SseUsage,
}

impl<S> UsageTap<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            scanner: SseUsage::default(),
        }
    }

    /// The last `usage` seen so far.
    pub fn usage(&self) -> Option<Usage> {
        self.scanner.usage
    }
}

impl<S, E> Stream for UsageTap<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
{
    type Item = Result<Bytes, E>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let next = Pin::new(&mut this.inner).poll_next(cx);
        if let Poll::Ready(Some(Ok(chunk))) = &next {
            this.scanner.feed(chunk);
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_usage_is_found_across_chunk_boundaries() {
        let stream = b"data: {\"choices\":[],\"usage\":null}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":5,\"total_tokens\":12}}\r\n\r\ndata: [DONE]\n\n";
        for split in 0..stream.len() {
            let mut s = SseUsage::default();
            s.feed(&stream[..split]);
            s.feed(&stream[split..]);
            let u = s.usage.expect("usage found");
            assert_eq!(
                (u.prompt_tokens, u.completion_tokens, u.total_tokens),
                (Some(7), Some(5), Some(12))
            );
        }
    }

    #[test]
    fn sse_usage_scanner_memory_is_bounded_by_one_line_cap() {
        let mut s = SseUsage::default();
        s.feed(b"data: ");
        let piece = vec![b'a'; 64 * 1024];
        for _ in 0..(4 * MAX_SSE_LINE / piece.len()) {
            s.feed(&piece);
            assert!(
                s.partial.capacity() <= 2 * MAX_SSE_LINE,
                "the copy grows with the line"
            );
        }
        s.feed(b"\n\ndata: {\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2,\"total_tokens\":3}}\n\n");
        assert_eq!(s.usage.and_then(|u| u.total_tokens), Some(3));
    }
}
