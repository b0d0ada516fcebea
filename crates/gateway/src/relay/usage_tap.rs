//! Reads the `usage` of an event stream: from a copy of each chunk (holding
//! at most one line, capped), or by editing the events when the usage was
//! asked for on the client's behalf and must not reach it.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::Stream;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::usage::{usage_of, Usage};

/// Finds the last `usage` in an SSE stream, reading a copy of each chunk;
/// when asked to, also the first Responses API object id (the `response.id`
/// of `response.created`, or of any later event that carries it).
#[derive(Default)]
pub(crate) struct SseUsage {
    partial: Vec<u8>,
    /// The current line outgrew the buffer: skip to its end.
    overflow: bool,
    usage: Option<Usage>,
    /// Look for a response id (Responses API streams only: no cost elsewhere).
    want_id: bool,
    response_id: Option<String>,
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
        if self.want_id && self.response_id.is_none() {
            self.response_id = crate::responses::streamed_id(data);
        }
        if data.windows(7).any(|w| w == b"\"usage\"") {
            if let Some(u) = usage_of(data) {
                self.usage = Some(u);
            }
        }
    }
}

/// The longest event held back to be edited; a longer one is relayed unedited.
const MAX_HELD_EVENT: usize = MAX_SSE_LINE;

/// Withholds the usage a client did not ask for (the gateway asked for it
/// on the client's behalf) while recording it: a usage-only event
/// (`"choices":[]` or none) is removed; a `usage` on a content event
/// (llama.cpp puts it on the last one) is removed from it and the event
/// kept; the `"usage":null` OpenAI-style servers then add to every event is
/// removed too, so the client gets the events it would have got without
/// the request edit. Bytes are held back only to the end of the current event.
#[derive(Default)]
pub(crate) struct StripUsage {
    /// The current event's bytes so far.
    held: Vec<u8>,
    /// The current event outgrew [`MAX_HELD_EVENT`]: relayed unedited to its end.
    passing: bool,
    usage: Option<Usage>,
}

/// Index just past the blank line ending the first event in `buf[from..]`.
fn event_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while let Some(p) = buf[i..].iter().position(|b| *b == b'\n' || *b == b'\r') {
        let at = i + p;
        match (buf[at], buf.get(at + 1), buf.get(at + 2)) {
            (b'\n', Some(b'\n'), _) => return Some(at + 2),
            (b'\n', Some(b'\r'), Some(b'\n')) => return Some(at + 3),
            (b'\r', Some(b'\r'), n) if n != Some(&b'\n') => return Some(at + 2),
            _ => i = at + 1,
        }
    }
    None
}

fn mentions_usage(b: &[u8]) -> bool {
    b.windows(7).any(|w| w == b"\"usage\"")
}

#[derive(serde::Deserialize)]
struct UsagePeek<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    usage: Option<&'a RawValue>,
    #[serde(borrow, default)]
    choices: Option<&'a RawValue>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// `b` from `at` on, past JSON whitespace.
fn skip_ws_fwd(b: &[u8], mut at: usize) -> usize {
    while b.get(at).is_some_and(|c| c.is_ascii_whitespace()) {
        at += 1;
    }
    at
}

/// `b` before `at`, back past JSON whitespace.
fn skip_ws_back(b: &[u8], mut at: usize) -> usize {
    while at > 0 && b[at - 1].is_ascii_whitespace() {
        at -= 1;
    }
    at
}

/// The bytes of `json` to cut to remove its `"usage"` member, whose value is at `value`.
fn usage_member(json: &[u8], value: std::ops::Range<usize>) -> Option<std::ops::Range<usize>> {
    let colon = skip_ws_back(json, value.start).checked_sub(1)?;
    if json[colon] != b':' {
        return None;
    }
    let key_end = skip_ws_back(json, colon);
    let key_start = key_end.checked_sub(7)?;
    // An escaped spelling of the key is left alone (and so is its member).
    if &json[key_start..key_end] != b"\"usage\"" {
        return None;
    }
    let before = skip_ws_back(json, key_start);
    if before > 0 && json[before - 1] == b',' {
        return Some(before - 1..value.end);
    }
    let after = skip_ws_fwd(json, value.end);
    if json.get(after) == Some(&b',') {
        return Some(key_start..skip_ws_fwd(json, after + 1));
    }
    Some(key_start..value.end)
}

impl StripUsage {
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// What to send now of `chunk`: its complete events, edited.
    pub fn feed(&mut self, chunk: Bytes) -> Bytes {
        let mut chunk = chunk;
        let mut passed = Bytes::new();
        if self.passing {
            // Relayed as it comes, to the end of the event that overflowed.
            let Some(end) = event_end(&chunk, 0) else {
                return chunk;
            };
            self.passing = false;
            passed = chunk.split_to(end);
        }
        let (edited, tail) = if self.held.is_empty() {
            let (out, done) = self.events(&chunk);
            (out.unwrap_or_else(|| chunk.slice(..done)), &chunk[done..])
        } else {
            self.held.extend_from_slice(&chunk);
            let held = Bytes::from(std::mem::take(&mut self.held));
            let (out, done) = self.events(&held);
            self.held.extend_from_slice(&held[done..]);
            let out = out.unwrap_or_else(|| held.slice(..done));
            return self.overflow(join(passed, out));
        };
        self.held.extend_from_slice(tail);
        self.overflow(join(passed, edited))
    }

    /// The held part of an event too long to hold goes now, unedited.
    fn overflow(&mut self, out: Bytes) -> Bytes {
        if self.held.len() <= MAX_HELD_EVENT {
            return out;
        }
        self.passing = true;
        join(out, Bytes::from(std::mem::take(&mut self.held)))
    }

    /// The end of the stream: whatever is held, as a last event.
    pub fn finish(&mut self) -> Bytes {
        let held = std::mem::take(&mut self.held);
        if held.is_empty() || self.passing {
            return Bytes::from(held);
        }
        match self.edit(&held) {
            Some(v) => Bytes::from(v),
            None => Bytes::from(held),
        }
    }

    /// The complete events at the start of `buf`, edited (`None` when none
    /// needed an edit), and where they end.
    fn events(&mut self, buf: &[u8]) -> (Option<Bytes>, usize) {
        let mut out: Option<Vec<u8>> = None;
        let mut start = 0;
        while let Some(end) = event_end(buf, start) {
            let event = &buf[start..end];
            let edited = if mentions_usage(event) {
                self.edit(event)
            } else {
                None
            };
            match (edited, &mut out) {
                (Some(e), Some(o)) => o.extend_from_slice(&e),
                (Some(e), None) => {
                    let mut o = buf[..start].to_vec();
                    o.extend_from_slice(&e);
                    out = Some(o);
                }
                (None, Some(o)) => o.extend_from_slice(event),
                (None, None) => {}
            }
            start = end;
        }
        (out.map(Bytes::from), start)
    }

    /// One event without its usage, `None` when it stays as it is.
    fn edit(&mut self, event: &[u8]) -> Option<Vec<u8>> {
        // Only single-line `data:` events are edited (servers send JSON on one line).
        let mut data = None;
        let mut pos = 0;
        for line in event.split(|b| *b == b'\n') {
            let l = line.strip_suffix(b"\r").unwrap_or(line);
            if let Some(rest) = l.strip_prefix(b"data:") {
                if data.is_some() {
                    return None;
                }
                let lead = usize::from(rest.first() == Some(&b' '));
                data = Some((pos + 5 + lead, &rest[lead..]));
            }
            pos += line.len() + 1;
        }
        let (at, json) = data?;
        // Fast path for OpenAI's null on every chunk, last member of the object:
        // an unescaped `,"` is never inside a string, and the final `}` closes the top level.
        const NULL_LAST: &[u8] = b",\"usage\":null}";
        let trimmed = json.trim_ascii_end();
        if trimmed.ends_with(NULL_LAST) {
            let cut = at + trimmed.len() - NULL_LAST.len();
            let mut out = Vec::with_capacity(event.len());
            out.extend_from_slice(&event[..cut]);
            out.extend_from_slice(&event[cut + NULL_LAST.len() - 1..]);
            return Some(out);
        }
        if json.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return None;
        }
        let peek: UsagePeek<'_> = serde_json::from_slice(json).ok()?;
        let value = peek.usage?;
        let offset = value.get().as_ptr() as usize - json.as_ptr() as usize;
        let span = offset..offset + value.get().len();
        if value.get() != "null" {
            if let Ok(u) = serde_json::from_str::<Usage>(value.get()) {
                self.usage = Some(u);
            }
            let usage_only = peek.choices.is_none_or(|c| {
                c.get().len() >= 2 && c.get()[1..c.get().len() - 1].trim().is_empty()
            });
            if usage_only {
                return Some(Vec::new());
            }
        }
        let cut = usage_member(json, span)?;
        let mut out = Vec::with_capacity(event.len());
        out.extend_from_slice(&event[..at + cut.start]);
        out.extend_from_slice(&event[at + cut.end..]);
        Some(out)
    }
}

fn join(a: Bytes, b: Bytes) -> Bytes {
    if a.is_empty() {
        return b;
    }
    if b.is_empty() {
        return a;
    }
    let mut v = Vec::with_capacity(a.len() + b.len());
    v.extend_from_slice(&a);
    v.extend_from_slice(&b);
    Bytes::from(v)
}

/// Reads the usage of the body passing through: a copy of each chunk goes to
/// [`SseUsage`]; or, when the gateway asked for usage the client did not,
/// the events go through [`StripUsage`].
pub(crate) struct UsageTap<S, E> {
    inner: S,
    scanner: SseUsage,
    strip: Option<StripUsage>,
    /// A failure that came while edited bytes were still to be sent.
    deferred: Option<E>,
    ended: bool,
}

impl<S, E> UsageTap<S, E> {
    pub fn new(inner: S, strip: bool) -> Self {
        Self {
            inner,
            scanner: SseUsage::default(),
            strip: strip.then(StripUsage::default),
            deferred: None,
            ended: false,
        }
    }

    /// Watches for the stream's Responses API object id (see [`SseUsage`]);
    /// only the scanner reads it, so not with `strip` (a chat-only edit).
    pub fn watch_response_id(&mut self) {
        self.scanner.want_id = true;
    }

    /// The response id, once seen.
    pub fn response_id(&self) -> Option<&str> {
        self.scanner.response_id.as_deref()
    }

    /// The last `usage` seen so far.
    pub fn usage(&self) -> Option<Usage> {
        match &self.strip {
            Some(s) => s.usage(),
            None => self.scanner.usage,
        }
    }
}

impl<S, E> Stream for UsageTap<S, E>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: Unpin,
{
    type Item = Result<Bytes, E>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let Some(strip) = &mut this.strip else {
            let next = Pin::new(&mut this.inner).poll_next(cx);
            if let Poll::Ready(Some(Ok(chunk))) = &next {
                this.scanner.feed(chunk);
            }
            return next;
        };
        loop {
            if let Some(e) = this.deferred.take() {
                return Poll::Ready(Some(Err(e)));
            }
            if this.ended {
                return Poll::Ready(None);
            }
            match Pin::new(&mut this.inner).poll_next(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    let out = strip.feed(chunk);
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(out)));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    let rest = strip.finish();
                    if rest.is_empty() {
                        return Poll::Ready(Some(Err(e)));
                    }
                    this.deferred = Some(e);
                    return Poll::Ready(Some(Ok(rest)));
                }
                Poll::Ready(None) => {
                    this.ended = true;
                    let rest = strip.finish();
                    if !rest.is_empty() {
                        return Poll::Ready(Some(Ok(rest)));
                    }
                }
                Poll::Pending => return Poll::Pending,
            }
        }
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
    fn the_response_id_is_found_in_the_first_event_that_carries_it() {
        let stream = b"event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_1\",\"usage\":null}}\n\nevent: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"resp_2\"}}\n\n";
        for split in 0..stream.len() {
            let mut s = SseUsage {
                want_id: true,
                ..SseUsage::default()
            };
            s.feed(&stream[..split]);
            s.feed(&stream[split..]);
            assert_eq!(s.response_id.as_deref(), Some("resp_1"), "split at {split}");
        }
        let mut s = SseUsage::default();
        s.feed(stream);
        assert_eq!(s.response_id, None, "not looked for unless asked");
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

    fn strip_all(stream: &[u8], split: usize) -> (Vec<u8>, Option<Usage>) {
        let mut s = StripUsage::default();
        let mut out = s.feed(Bytes::copy_from_slice(&stream[..split])).to_vec();
        out.extend_from_slice(&s.feed(Bytes::copy_from_slice(&stream[split..])));
        out.extend_from_slice(&s.finish());
        (out, s.usage())
    }

    #[test]
    fn openai_style_usage_chunk_and_nulls_are_withheld_at_any_split() {
        let asked = b"data: {\"id\":\"c\",\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n\
data: {\"id\":\"c\",\"usage\":null,\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\r\n\r\n\
data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":5,\"total_tokens\":12}}\n\n\
data: [DONE]\n\n";
        let plain = b"data: {\"id\":\"c\",\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n\
data: {\"id\":\"c\",\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\r\n\r\n\
data: [DONE]\n\n";
        for split in 0..=asked.len() {
            let (out, usage) = strip_all(asked, split);
            assert_eq!(
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(plain),
                "split at {split}"
            );
            assert_eq!(usage.and_then(|u| u.total_tokens), Some(12));
        }
    }

    #[test]
    fn usage_on_the_last_content_chunk_is_cut_from_it_and_the_chunk_kept() {
        let asked = b"data: {\"usage\": {\"prompt_tokens\":3,\"completion_tokens\":2,\"total_tokens\":5} , \"choices\":[{\"delta\":{\"content\":\"!\"},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n";
        let (out, usage) = strip_all(asked, 0);
        assert_eq!(
            String::from_utf8_lossy(&out),
            "data: {\"choices\":[{\"delta\":{\"content\":\"!\"},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n"
        );
        assert_eq!(usage.and_then(|u| u.prompt_tokens), Some(3));
    }

    #[test]
    fn bytes_are_held_only_to_the_end_of_the_current_event() {
        let mut s = StripUsage::default();
        let out = s.feed(Bytes::from_static(b"data: {\"a\":1}\n\ndata: {\"b\""));
        assert_eq!(out, "data: {\"a\":1}\n\n");
        let out = s.feed(Bytes::from_static(b":2}\n\n"));
        assert_eq!(out, "data: {\"b\":2}\n\n");
        assert!(s.finish().is_empty());
    }

    #[test]
    fn an_event_too_long_to_hold_is_relayed_unedited_and_the_next_edited() {
        let mut s = StripUsage::default();
        let mut out = s.feed(Bytes::from_static(b"data: \"")).to_vec();
        let piece = Bytes::from(vec![b'a'; 64 * 1024]);
        for _ in 0..(2 * MAX_HELD_EVENT / piece.len()) {
            out.extend_from_slice(&s.feed(piece.clone()));
            assert!(s.held.len() <= MAX_HELD_EVENT + piece.len());
        }
        out.extend_from_slice(&s.feed(Bytes::from_static(
            b"\"\n\ndata: {\"choices\":[],\"usage\":{\"total_tokens\":3}}\n\ndata: [DONE]\n\n",
        )));
        out.extend_from_slice(&s.finish());
        assert_eq!(out.len(), 7 + 2 * MAX_HELD_EVENT + 3 + 14);
        assert!(out.ends_with(b"\"\n\ndata: [DONE]\n\n"));
        assert_eq!(s.usage().and_then(|u| u.total_tokens), Some(3));
    }

    #[test]
    fn a_trailing_usage_null_is_cut_without_touching_a_nested_one() {
        let asked = b"data: {\"choices\":[{\"delta\":{\"usage\":null}}],\"usage\":null}\n\n";
        let (out, usage) = strip_all(asked, 0);
        assert_eq!(
            String::from_utf8_lossy(&out),
            "data: {\"choices\":[{\"delta\":{\"usage\":null}}]}\n\n"
        );
        assert!(usage.is_none());
    }
}
