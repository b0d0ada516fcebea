//! An incremental scanner over a `multipart/form-data` body that finds the
//! `model` field, so an audio upload can be routed and re-sent byte for byte
//! with only that field's value changed.
//!
//! Why not a multipart crate: parsers such as `multer` yield decoded fields,
//! and re-encoding them would change the bytes the upstream gets (header
//! case and order, quoting, the preamble). This scanner only looks at part
//! headers and boundary lines; the bytes are never rewritten except where the
//! caller splices the model value.
//!
//! Memory: the bytes before the end of the `model` part are held (to be sent
//! once the request is routed), so an upload whose `model` comes after the
//! file (curl's `-F file=@… -F model=…`) is held whole, up to the body limit;
//! with `model` first (the OpenAI SDKs' order) only the first parts are held
//! and the file streams through. After the model, [`ModelScan::push_streamed`]
//! keeps scanning with at most one part-header block and a boundary's length
//! held, to refuse a second `model` field (the gateway and the upstream must
//! not disagree on which one counts).

use std::ops::Range;

use bytes::{Bytes, BytesMut};

/// Longest part-header block accepted (browsers and SDKs send a few hundred bytes).
const MAX_PART_HEADERS: usize = 16 * 1024;

/// The boundary of a `multipart/form-data` content type, or why there is none.
pub(crate) fn boundary_of(content_type: Option<&str>) -> Result<&str, &'static str> {
    let Some(ct) = content_type else {
        return Err(
            "an audio upload must be sent as multipart/form-data (no content-type was sent)",
        );
    };
    let mut parts = ct.split(';');
    let mime = parts.next().unwrap_or_default().trim();
    if !mime.eq_ignore_ascii_case("multipart/form-data") {
        return Err("an audio upload must be sent as multipart/form-data");
    }
    let boundary = params(&ct[ct.find(';').map_or(ct.len(), |i| i + 1)..])
        .find(|(k, _)| k.eq_ignore_ascii_case("boundary"))
        .map(|(_, v)| v);
    match boundary {
        // RFC 2046: 1 to 70 characters.
        Some(b) if !b.is_empty() && b.len() <= 70 && !b.contains(['\r', '\n']) => Ok(b),
        Some(_) => Err("the multipart boundary must be 1 to 70 characters"),
        None => Err("the multipart/form-data content-type has no boundary"),
    }
}

/// The `key=value` parameters of a header value after its first item;
/// values may be quoted (`\` escapes are taken literally but skipped over).
fn params(s: &str) -> impl Iterator<Item = (&str, &str)> {
    let mut rest = s;
    std::iter::from_fn(move || loop {
        rest = rest.trim_start_matches([' ', '\t', ';']);
        if rest.is_empty() {
            return None;
        }
        let eq = rest.find(['=', ';']);
        let Some(eq) = eq.filter(|&i| rest.as_bytes()[i] == b'=') else {
            // A bare item (`form-data`): skip it.
            rest = &rest[eq.unwrap_or(rest.len())..];
            continue;
        };
        let key = rest[..eq].trim();
        let after = rest[eq + 1..].trim_start();
        let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
            let bytes = quoted.as_bytes();
            let mut i = 0;
            while i < bytes.len() && bytes[i] != b'"' {
                i += if bytes[i] == b'\\' { 2 } else { 1 };
            }
            let end = i.min(bytes.len());
            (&quoted[..end], &quoted[(end + 1).min(quoted.len())..])
        } else {
            let end = after.find(';').unwrap_or(after.len());
            (after[..end].trim_end(), &after[end..])
        };
        rest = next;
        return Some((key, value));
    })
}

/// Where the scanner is in the body (positions index `buf`).
#[derive(Debug, Clone, PartialEq)]
enum At {
    /// Before the first boundary; the delimiter is searched for from `from`.
    Preamble { from: usize },
    /// Just after a boundary, at `at`: `--` (the end) or the line's end.
    Delimiter { at: usize },
    /// A part's header block starts at `at`; `\r\n\r\n` searched from `from`.
    Headers { at: usize, from: usize },
    /// A part's content from `start`; the next delimiter searched from `from`.
    Content {
        start: usize,
        from: usize,
        model: bool,
    },
    /// The closing boundary was seen.
    End,
}

/// What the bytes pushed so far show.
#[derive(Debug, PartialEq)]
pub(crate) enum Scan {
    /// Nothing decided yet: push more.
    More,
    /// The `model` part is complete: [`ModelScan::model`] and [`ModelScan::split`].
    Model,
    /// The body ended (closing boundary) without a `model` part.
    NoModel,
    /// A second `model` part (after the first was routed).
    Duplicate,
    /// Not a well-formed multipart body.
    Invalid(&'static str),
}

/// Finds the `model` part of a multipart body pushed chunk by chunk.
pub(crate) struct ModelScan {
    /// `\r\n--{boundary}`.
    delim: Vec<u8>,
    buf: BytesMut,
    at: At,
    /// The first `model` value, once found.
    value: Option<Range<usize>>,
}

impl ModelScan {
    pub fn new(boundary: &str) -> Self {
        let mut delim = b"\r\n--".to_vec();
        delim.extend_from_slice(boundary.as_bytes());
        Self {
            delim,
            buf: BytesMut::new(),
            at: At::Preamble { from: 0 },
            value: None,
        }
    }

    /// Bytes held right now.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.buf.len()
    }

    /// Adds bytes before the model is found; all of them are held.
    pub fn push(&mut self, chunk: &[u8]) -> Scan {
        debug_assert!(self.value.is_none());
        self.buf.extend_from_slice(chunk);
        self.run()
    }

    /// The model value found by [`ModelScan::push`].
    pub fn model(&self) -> &[u8] {
        self.value
            .as_ref()
            .map_or(&[][..], |v| &self.buf[v.clone()])
    }

    /// The held bytes with the first `drop` bytes of the model value removed,
    /// as two slices of one buffer (no copy); the scanner then goes on with
    /// [`ModelScan::push_streamed`], and has scanned the bytes held after the
    /// model already (the returned [`Scan`] says what they showed).
    pub fn split(&mut self, drop: usize) -> (Bytes, Bytes, Scan) {
        let value = self.value.clone().unwrap_or(0..0);
        let cut = value.start + drop.min(value.len());
        let all = std::mem::take(&mut self.buf).freeze();
        let resume = match self.at {
            At::Delimiter { at } => at,
            _ => all.len(),
        };
        self.at = At::Delimiter { at: 0 };
        let scan = self.push_streamed(&all[resume..]);
        (all.slice(..value.start), all.slice(cut..), scan)
    }

    /// Scans bytes already sent on (after the model), holding only what an
    /// unfinished boundary line or part-header block needs.
    pub fn push_streamed(&mut self, chunk: &[u8]) -> Scan {
        if self.at == At::End {
            return Scan::More;
        }
        self.buf.extend_from_slice(chunk);
        let scan = self.run();
        let keep = match self.at {
            At::Preamble { from } => from,
            At::Delimiter { at } | At::Headers { at, .. } => at,
            At::Content { from, .. } => from,
            At::End => self.buf.len(),
        };
        let _ = self.buf.split_to(keep);
        self.rebase(keep);
        scan
    }

    /// Positions shift down by `n` bytes dropped from the front.
    fn rebase(&mut self, n: usize) {
        let sub = |p: usize| p.saturating_sub(n);
        self.at = match self.at.clone() {
            At::Preamble { from } => At::Preamble { from: sub(from) },
            At::Delimiter { at } => At::Delimiter { at: sub(at) },
            At::Headers { at, from } => At::Headers {
                at: sub(at),
                from: sub(from),
            },
            At::Content { start, from, model } => At::Content {
                start: sub(start),
                from: sub(from),
                model,
            },
            At::End => At::End,
        };
    }

    fn run(&mut self) -> Scan {
        loop {
            let buf = &self.buf[..];
            match self.at.clone() {
                At::Preamble { from } => {
                    // The first boundary may open the body without a CRLF before it.
                    let bare = &self.delim[2..];
                    if from == 0 && buf.len() < bare.len() && bare.starts_with(buf) {
                        return Scan::More;
                    }
                    if from == 0 && buf.starts_with(bare) {
                        self.at = At::Delimiter { at: bare.len() };
                        continue;
                    }
                    match find(buf, &self.delim, from) {
                        Ok(i) => {
                            self.at = At::Delimiter {
                                at: i + self.delim.len(),
                            }
                        }
                        Err(from) => {
                            self.at = At::Preamble { from };
                            return Scan::More;
                        }
                    }
                }
                At::Delimiter { at } => {
                    let rest = &buf[at..];
                    if rest.len() < 2 {
                        return Scan::More;
                    }
                    if rest.starts_with(b"--") {
                        self.at = At::End;
                        return if self.value.is_some() {
                            Scan::More
                        } else {
                            Scan::NoModel
                        };
                    }
                    // Transport padding (spaces, tabs) may follow a boundary.
                    let pad = rest
                        .iter()
                        .take_while(|b| matches!(b, b' ' | b'\t'))
                        .count();
                    if pad > 64 {
                        return Scan::Invalid("a multipart boundary line is malformed");
                    }
                    match rest.get(pad..pad + 2) {
                        None => return Scan::More,
                        Some(b"\r\n") => {
                            let at = at + pad + 2;
                            self.at = At::Headers { at, from: at };
                        }
                        Some(_) => return Scan::Invalid("a multipart boundary line is malformed"),
                    }
                }
                At::Headers { at, from } => {
                    let rest = &buf[at..];
                    if rest.len() < 2 {
                        return Scan::More;
                    }
                    // The block's length, its last line's CRLF included (0: no headers).
                    let end = if rest.starts_with(b"\r\n") {
                        0
                    } else {
                        match find(buf, b"\r\n\r\n", from.max(at)) {
                            Ok(i) => i + 2 - at,
                            Err(from) => {
                                if buf.len() - at > MAX_PART_HEADERS {
                                    return Scan::Invalid(
                                        "a multipart part's headers are too long",
                                    );
                                }
                                self.at = At::Headers { at, from };
                                return Scan::More;
                            }
                        }
                    };
                    if end > MAX_PART_HEADERS {
                        return Scan::Invalid("a multipart part's headers are too long");
                    }
                    let model = is_model_part(&rest[..end]);
                    if model && self.value.is_some() {
                        return Scan::Duplicate;
                    }
                    let start = at + end + 2;
                    self.at = At::Content {
                        start,
                        from: start,
                        model,
                    };
                }
                At::Content { start, from, model } => match find(buf, &self.delim, from) {
                    Ok(i) => {
                        self.at = At::Delimiter {
                            at: i + self.delim.len(),
                        };
                        if model {
                            self.value = Some(start..i);
                            return Scan::Model;
                        }
                    }
                    Err(from) => {
                        self.at = At::Content { start, from, model };
                        return Scan::More;
                    }
                },
                At::End => return Scan::More,
            }
        }
    }
}

/// The first `needle` in `hay` at or after `from`; else where the next search
/// must start (a match may straddle the end).
fn find(hay: &[u8], needle: &[u8], from: usize) -> Result<usize, usize> {
    let from = from.min(hay.len());
    let first = needle[0];
    let mut i = from;
    while let Some(p) = hay[i..].iter().position(|b| *b == first) {
        let at = i + p;
        if hay.len() - at < needle.len() {
            if needle.starts_with(&hay[at..]) {
                return Err(at);
            }
        } else if &hay[at..at + needle.len()] == needle {
            return Ok(at);
        }
        i = at + 1;
    }
    Err(hay.len())
}

/// Whether a part-header block (CRLF-ended lines) says `Content-Disposition: form-data; name="model"`.
fn is_model_part(headers: &[u8]) -> bool {
    headers
        .split(|b| *b == b'\n')
        .filter_map(|line| std::str::from_utf8(line.strip_suffix(b"\r").unwrap_or(line)).ok())
        .filter_map(|line| line.split_once(':'))
        .filter(|(k, _)| k.trim().eq_ignore_ascii_case("content-disposition"))
        .any(|(_, v)| params(v).any(|(k, v)| k.eq_ignore_ascii_case("name") && v == "model"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: &str = "----llmgwtestboundary";

    fn body(parts: &[(&str, &str)]) -> Vec<u8> {
        let mut b = Vec::new();
        for (headers, content) in parts {
            b.extend_from_slice(format!("--{B}\r\n{headers}\r\n\r\n{content}\r\n").as_bytes());
        }
        b.extend_from_slice(format!("--{B}--\r\n").as_bytes());
        b
    }

    fn model_first() -> Vec<u8> {
        body(&[
            ("Content-Disposition: form-data; name=\"model\"", "acme/whisper-1"),
            (
                "Content-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav",
                // Content that looks like a boundary but is not one.
                "RIFF\r\n--not-the-boundary\r\n--\r\n---llmgw",
            ),
        ])
    }

    fn model_last() -> Vec<u8> {
        body(&[
            (
                "content-disposition: form-data; name=file; filename=\"x.mp3\"",
                "ID3\0\0\r\n\r\n\r\n--",
            ),
            ("Content-Disposition: form-data; name=\"language\"", "en"),
            ("Content-Disposition: form-data; name=\"model\"", "acme/m/x"),
        ])
    }

    /// Pushes `body` split at `cut` and again at `cut2`; returns the first
    /// decisive scan, the model and the re-sent bytes (model prefix dropped),
    /// the rest scanned as streamed.
    fn scan_split(body: &[u8], cuts: &[usize]) -> (Scan, Vec<u8>, Vec<u8>, Scan) {
        let mut s = ModelScan::new(B);
        let mut pieces = Vec::new();
        let mut last = 0;
        for &c in cuts.iter().chain([&body.len()]) {
            pieces.push(&body[last..c]);
            last = c;
        }
        let mut out = Vec::new();
        let mut found = None;
        let mut model = Vec::new();
        let mut after = Scan::More;
        for p in pieces {
            if found.is_none() {
                match s.push(p) {
                    Scan::More => continue,
                    Scan::Model => {
                        model = s.model().to_vec();
                        let drop = model.iter().position(|b| *b == b'/').map_or(0, |i| i + 1);
                        let (a, b, rest) = s.split(drop);
                        assert!(s.held() <= MAX_PART_HEADERS + 128);
                        out.extend_from_slice(&a);
                        out.extend_from_slice(&b);
                        found = Some(Scan::Model);
                        if rest != Scan::More {
                            after = rest;
                        }
                    }
                    other => return (other, model, out, Scan::More),
                }
            } else {
                out.extend_from_slice(p);
                let r = s.push_streamed(p);
                assert!(s.held() <= MAX_PART_HEADERS + 128);
                if r != Scan::More {
                    after = r;
                }
            }
        }
        (found.unwrap_or(Scan::More), model, out, after)
    }

    fn expected(body: &[u8], from: &str, to: &str) -> Vec<u8> {
        let text = String::from_utf8_lossy(body).into_owned();
        text.replacen(from, to, 1).into_bytes()
    }

    #[test]
    fn the_model_is_found_and_spliced_at_every_split_point() {
        for (body, from, to) in [
            (model_first(), "acme/whisper-1", "whisper-1"),
            (model_last(), "acme/m/x", "m/x"),
        ] {
            let want = expected(&body, from, to);
            for cut in 0..=body.len() {
                let (scan, model, out, after) = scan_split(&body, &[cut]);
                assert_eq!(scan, Scan::Model, "cut at {cut}");
                assert_eq!(model, from.as_bytes(), "cut at {cut}");
                assert_eq!(out, want, "cut at {cut}");
                assert_eq!(after, Scan::More, "cut at {cut}");
            }
        }
    }

    #[test]
    fn byte_by_byte_and_two_cuts_give_the_same_answer() {
        let body = model_first();
        let want = expected(&body, "acme/whisper-1", "whisper-1");
        let every: Vec<usize> = (1..body.len()).collect();
        assert_eq!(scan_split(&body, &every).2, want);
        for a in (0..body.len()).step_by(7) {
            for b in a..=body.len() {
                let (scan, _, out, _) = scan_split(&body, &[a, b]);
                assert_eq!(scan, Scan::Model);
                assert_eq!(out, want, "cuts {a} {b}");
            }
        }
    }

    #[test]
    fn a_body_without_model_says_so_at_its_closing_boundary() {
        let body = body(&[(
            "Content-Disposition: form-data; name=\"file\"; filename=\"model\"",
            "x",
        )]);
        for cut in 0..=body.len() {
            assert_eq!(scan_split(&body, &[cut]).0, Scan::NoModel, "cut at {cut}");
        }
        // Truncated before its end: undecided.
        let mut s = ModelScan::new(B);
        assert_eq!(s.push(&body[..body.len() - 4]), Scan::More);
    }

    #[test]
    fn a_second_model_field_is_refused_even_when_streamed() {
        let body = body(&[
            ("Content-Disposition: form-data; name=\"model\"", "acme/a"),
            (
                "Content-Disposition: form-data; name=\"file\"; filename=\"f\"",
                "data",
            ),
            ("Content-Disposition: form-data; name=\"model\"", "other/b"),
        ]);
        for cut in 0..=body.len() {
            let (scan, _, _, after) = scan_split(&body, &[cut]);
            assert_eq!(
                (scan, after),
                (Scan::Model, Scan::Duplicate),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn a_preamble_and_padding_are_allowed_and_kept() {
        let raw = format!(
            "preamble text\r\n--{B}  \r\nContent-Disposition: form-data; name=model\r\n\r\np/q\r\n--{B}--"
        );
        let (scan, model, out, _) = scan_split(raw.as_bytes(), &[3]);
        assert_eq!(scan, Scan::Model);
        assert_eq!(model, b"p/q");
        assert_eq!(out, expected(raw.as_bytes(), "p/q", "q"));
    }

    #[test]
    fn malformed_bodies_are_invalid_not_held_forever() {
        let mut s = ModelScan::new(B);
        let bad = format!("--{B}garbage\r\n");
        assert!(matches!(s.push(bad.as_bytes()), Scan::Invalid(_)));
        let mut s = ModelScan::new(B);
        let head = format!("--{B}\r\nX-Long: ");
        assert_eq!(s.push(head.as_bytes()), Scan::More);
        let long = vec![b'a'; MAX_PART_HEADERS + 1];
        assert!(matches!(s.push(&long), Scan::Invalid(_)));
    }

    #[test]
    fn content_types_give_their_boundary() {
        assert_eq!(
            boundary_of(Some("multipart/form-data; boundary=abc")),
            Ok("abc")
        );
        assert_eq!(
            boundary_of(Some(
                "Multipart/Form-Data;charset=utf-8; boundary=\"a b;c\""
            )),
            Ok("a b;c")
        );
        assert!(boundary_of(Some("application/json")).is_err());
        assert!(boundary_of(Some("multipart/form-data")).is_err());
        assert!(boundary_of(Some("multipart/form-data; boundary=")).is_err());
        assert!(boundary_of(None).is_err());
    }

    #[test]
    fn only_a_part_named_model_counts() {
        assert!(is_model_part(
            b"Content-Disposition: form-data; name=\"model\"\r\n"
        ));
        assert!(is_model_part(b"CONTENT-DISPOSITION:form-data;name=model"));
        assert!(!is_model_part(
            b"Content-Disposition: form-data; name=\"file\"; filename=\"model\""
        ));
        assert!(!is_model_part(
            b"Content-Disposition: form-data; name=\"models\""
        ));
        assert!(!is_model_part(b"X-Name: name=\"model\""));
    }
}
