//! Reading a chat request just enough to route it, and rewriting its `model`
//! in place: every other byte of the client's body reaches the upstream as sent.

use std::borrow::Cow;
use std::ops::Range;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::GatewayError;

/// The fields the gateway needs; everything else is skipped (but still
/// validated as JSON). A duplicated `model` is refused by serde, so the
/// gateway and the upstream can never disagree on which one counts.
#[derive(Deserialize)]
struct Peek<'a> {
    #[serde(borrow, default)]
    model: Option<&'a RawValue>,
    #[serde(borrow, default)]
    stream: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    stream_options: Option<&'a RawValue>,
    /// Output caps, for the token reservation (Chat, Completions; Chat's
    /// newer name; Responses).
    #[serde(borrow, default)]
    max_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    max_completion_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    max_output_tokens: Option<&'a RawValue>,
    /// The Responses API's earlier response this one continues.
    #[serde(borrow, default)]
    previous_response_id: Option<&'a RawValue>,
    /// Fallback models, OpenRouter's convention (not sent upstream).
    #[serde(borrow, default, deserialize_with = "present")]
    models: Option<&'a RawValue>,
}

/// The members of `stream_options` the gateway edits.
#[derive(Deserialize)]
struct StreamOptions<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    include_usage: Option<&'a RawValue>,
}

/// A member that is present, `null` included (`Option` alone reads `null` as absent).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// One byte range of the body replaced by fixed text.
#[derive(Debug, Clone)]
struct Edit {
    span: Range<usize>,
    text: &'static str,
}

/// A parsed chat request: where `model` sits in the body and how it splits.
#[derive(Debug)]
pub struct ChatRequest<'a> {
    /// The model as the client wrote it (`{customName}/{modelName}`).
    pub model: Cow<'a, str>,
    /// Byte length of `{customName}/` inside `model`.
    split: usize,
    /// Byte range of the `model` JSON string (quotes included) in the body.
    span: Range<usize>,
    /// The raw `model` string holds escapes.
    model_raw_escaped: bool,
    pub stream: bool,
    /// The largest output cap the body names (`max_tokens`,
    /// `max_completion_tokens`, `max_output_tokens`), 0 when none is a
    /// non-negative integer (the upstream judges the rest).
    pub max_tokens: u64,
    /// `models`: the fallbacks to try in order when `model` fails before
    /// its answer starts (each `{customName}/{modelName}`).
    pub fallbacks: Vec<Cow<'a, str>>,
    /// `previous_response_id`, when it is a string.
    pub previous_response_id: Option<Cow<'a, str>>,
    /// How to make a streamed body ask for usage, when it does not already.
    usage_edit: Option<Edit>,
    /// Where `models` is cut out of the body.
    models_edit: Option<Edit>,
}

/// Most fallback models a request may name.
pub const MAX_FALLBACKS: usize = 8;

impl<'a> ChatRequest<'a> {
    pub fn parse(body: &'a [u8]) -> Result<Self, GatewayError> {
        // serde would also accept a sequence for a struct.
        if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(GatewayError::InvalidJson(
                "the request body must be a JSON object".to_owned(),
            ));
        }
        let peek: Peek<'a> = serde_json::from_slice(body).map_err(|e| {
            GatewayError::InvalidJson(format!("the request body is not valid JSON ({e})"))
        })?;
        let raw = peek.model.ok_or(GatewayError::MissingModel)?;
        let text = raw.get();
        if !text.starts_with('"') {
            return Err(GatewayError::ModelNotString);
        }
        let model: Cow<'a, str> =
            serde_json::from_str(text).map_err(|_| GatewayError::ModelNotString)?;
        // `RawValue` borrowed from a slice points into that slice.
        let start = text.as_ptr() as usize - body.as_ptr() as usize;
        let span = start..start + text.len();
        debug_assert_eq!(&body[span.clone()], text.as_bytes());
        let Some(split) = split_model(&model) else {
            return Err(GatewayError::ModelWithoutProvider(model.into_owned()));
        };
        // Anything but a boolean or null would be read differently by the
        // gateway and the upstream (`"true"`, `1`): OpenAI refuses it too.
        let stream = match peek.stream.map(RawValue::get) {
            None | Some("null" | "false") => false,
            Some("true") => true,
            Some(_) => return Err(GatewayError::StreamNotBool(model.into_owned())),
        };
        let usage_edit = if stream {
            usage_edit(body, peek.stream_options)
        } else {
            None
        };
        let (fallbacks, models_edit) = match peek.models {
            None => (Vec::new(), None),
            Some(raw) => fallbacks(body, raw)?,
        };
        let cap = |v: Option<&RawValue>| v.and_then(|v| v.get().parse::<u64>().ok()).unwrap_or(0);
        let max_tokens = cap(peek.max_tokens)
            .max(cap(peek.max_completion_tokens))
            .max(cap(peek.max_output_tokens));
        Ok(Self {
            model_raw_escaped: text.contains('\\'),
            model,
            split,
            span,
            stream,
            max_tokens,
            fallbacks,
            previous_response_id: peek
                .previous_response_id
                .and_then(|v| serde_json::from_str(v.get()).ok()),
            usage_edit,
            models_edit,
        })
    }

    /// A streamed request that does not ask for `stream_options.include_usage`
    /// (and whose `stream_options`, if any, is an object or null, so the field can be added).
    pub fn can_ask_usage(&self) -> bool {
        self.usage_edit.is_some()
    }

    /// `{customName}`.
    pub fn provider(&self) -> &str {
        &self.model[..self.split - 1]
    }

    /// `{modelName}`: what the upstream receives.
    pub fn upstream_model(&self) -> &str {
        &self.model[self.split..]
    }

    /// The client's body with only the `model` value replaced by `{modelName}`.
    pub fn rewrite(&self, body: &[u8]) -> Bytes {
        self.splice().apply(body, false)
    }

    /// The edits [`ChatRequest::rewrite`] makes, owning no part of the body
    /// (so the body can be rewritten again, differently, after it is parsed).
    pub fn splice(&self) -> Splice {
        let raw = &self.model_raw_escaped;
        let model = if *raw {
            // Escapes: re-encode the decoded name (a JSON string cannot fail to serialize).
            let encoded = serde_json::to_string(self.upstream_model()).unwrap_or_default();
            (self.span.clone(), encoded.into_bytes())
        } else {
            // No escapes: the raw bytes are the name; drop `{customName}/` after the quote.
            let start = self.span.start + 1;
            (start..start + self.split, Vec::new())
        };
        Splice {
            model,
            model_span: self.span.clone(),
            usage: self.usage_edit.clone(),
            models: self.models_edit.clone(),
        }
    }
}

/// `models` read: an array of at most [`MAX_FALLBACKS`] model strings of the
/// form `{customName}/{modelName}` (`null` or `[]`: none), and the edit that
/// cuts the member out of the body.
fn fallbacks<'a>(
    body: &'a [u8],
    raw: &'a RawValue,
) -> Result<(Vec<Cow<'a, str>>, Option<Edit>), GatewayError> {
    let bad = |why: &str| GatewayError::InvalidFallbacks(why.to_owned());
    let list: Vec<Cow<'a, str>> = match raw.get() {
        "null" => Vec::new(),
        text => serde_json::from_str(text)
            .map_err(|_| bad("`models` must be an array of model names"))?,
    };
    if list.len() > MAX_FALLBACKS {
        return Err(bad("`models` names more than 8 fallback models"));
    }
    if let Some(m) = list.iter().find(|m| split_model(m).is_none()) {
        return Err(GatewayError::ModelWithoutProvider(m.to_string()));
    }
    let start = raw.get().as_ptr() as usize - body.as_ptr() as usize;
    let span = member_span(body, start..start + raw.get().len())
        .ok_or_else(|| bad("write the `models` member without escapes in its name"))?;
    Ok((list, Some(Edit { span, text: "" })))
}

/// The bytes of the object member whose value is at `value` (its key
/// `"models"` written plainly), with one comma beside it.
fn member_span(body: &[u8], value: Range<usize>) -> Option<Range<usize>> {
    let ws = |b: u8| b.is_ascii_whitespace();
    let mut i = value.start;
    while i > 0 && ws(body[i - 1]) {
        i -= 1;
    }
    i = i.checked_sub(1).filter(|&c| body[c] == b':')?;
    while i > 0 && ws(body[i - 1]) {
        i -= 1;
    }
    let key = i.checked_sub(8).filter(|&k| &body[k..i] == b"\"models\"")?;
    let mut j = value.end;
    while j < body.len() && ws(body[j]) {
        j += 1;
    }
    if body.get(j) == Some(&b',') {
        return Some(key..j + 1);
    }
    let mut k = key;
    while k > 0 && ws(body[k - 1]) {
        k -= 1;
    }
    (k > 0 && body[k - 1] == b',').then(|| k - 1..value.end)
}

/// Byte length of `{customName}/` in a model `{customName}/{modelName}`
/// (split at the first `/`; neither side empty), `None` when it names no provider.
pub fn split_model(model: &str) -> Option<usize> {
    match model.find('/') {
        Some(i) if i > 0 && i + 1 < model.len() => Some(i + 1),
        _ => None,
    }
}

/// How a body is rewritten: its `model`, and optionally `stream_options.include_usage`.
#[derive(Debug, Clone)]
pub struct Splice {
    model: (Range<usize>, Vec<u8>),
    /// The whole `model` string (quotes included).
    model_span: Range<usize>,
    usage: Option<Edit>,
    /// Cuts `models` out.
    models: Option<Edit>,
}

impl Splice {
    /// `body` (the one parsed) with `model` replaced and, when `ask_usage`
    /// and the request did not ask already, `stream_options.include_usage: true`.
    pub fn apply(&self, body: &[u8], ask_usage: bool) -> Bytes {
        self.apply_as(body, ask_usage, None)
    }

    /// [`Splice::apply`] with `model` set to `upstream_model` (a fallback's)
    /// instead of the client's own `{modelName}`.
    pub fn apply_as(&self, body: &[u8], ask_usage: bool, upstream_model: Option<&str>) -> Bytes {
        let encoded;
        let model = match upstream_model {
            None => (self.model.0.clone(), self.model.1.as_slice()),
            Some(m) => {
                encoded = serde_json::to_string(m).unwrap_or_default();
                (self.model_span.clone(), encoded.as_bytes())
            }
        };
        let usage = self
            .usage
            .as_ref()
            .filter(|_| ask_usage)
            .map(|e| (e.span.clone(), e.text.as_bytes()));
        let models = self
            .models
            .as_ref()
            .map(|e| (e.span.clone(), e.text.as_bytes()));
        let mut edits = [Some(model), usage, models];
        // An insertion sorts before a cut that starts where it does.
        edits.sort_by_key(|e| {
            e.as_ref()
                .map_or((usize::MAX, usize::MAX), |(r, _)| (r.start, r.end))
        });
        let mut out = Vec::with_capacity(body.len() + 48);
        let mut at = 0;
        for (range, text) in edits.into_iter().flatten() {
            out.extend_from_slice(&body[at..range.start]);
            out.extend_from_slice(text);
            at = range.end;
        }
        out.extend_from_slice(&body[at..]);
        Bytes::from(out)
    }
}

/// Where `stream_options.include_usage: true` goes in `body`, `None` when the
/// client asked for it already or `stream_options` is not an object or null
/// (the upstream judges that). An existing object is edited in place.
fn usage_edit(body: &[u8], options: Option<&RawValue>) -> Option<Edit> {
    let offset = |raw: &RawValue| raw.get().as_ptr() as usize - body.as_ptr() as usize;
    let Some(options) = options else {
        // Parsed as an object, so the body has a `{` (and `model` after it).
        let open = body.iter().position(|b| *b == b'{')?;
        return Some(Edit {
            span: open + 1..open + 1,
            text: "\"stream_options\":{\"include_usage\":true},",
        });
    };
    let text = options.get();
    let start = offset(options);
    if text == "null" {
        return Some(Edit {
            span: start..start + text.len(),
            text: "{\"include_usage\":true}",
        });
    }
    if !text.starts_with('{') {
        return None;
    }
    // Duplicated members are refused here as in the body: left to the upstream.
    let parsed: StreamOptions<'_> = serde_json::from_str(text).ok()?;
    match parsed.include_usage.map(|v| (v, v.get())) {
        Some((_, "true")) => None,
        Some((v, "false" | "null")) => {
            let at = offset(v);
            Some(Edit {
                span: at..at + v.get().len(),
                text: "true",
            })
        }
        Some(_) => None,
        None if text[1..text.len() - 1].trim().is_empty() => Some(Edit {
            span: start..start + text.len(),
            text: "{\"include_usage\":true}",
        }),
        None => Some(Edit {
            span: start + 1..start + 1,
            text: "\"include_usage\":true,",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewrite(body: &str) -> String {
        let req = ChatRequest::parse(body.as_bytes()).unwrap();
        String::from_utf8(req.rewrite(body.as_bytes()).to_vec()).unwrap()
    }

    fn asking_usage(body: &str) -> Option<String> {
        let req = ChatRequest::parse(body.as_bytes()).unwrap();
        req.can_ask_usage().then(|| {
            let out = req.splice().apply(body.as_bytes(), true);
            String::from_utf8(out.to_vec()).unwrap()
        })
    }

    #[test]
    fn fallbacks_are_read_and_cut_from_the_body() {
        let cases = [
            (
                r#"{"model":"p/m","models":["q/x","r/y"],"n":1}"#,
                r#"{"model":"m","n":1}"#,
            ),
            (
                r#"{"n":1, "models" : [] ,"model":"p/m"}"#,
                r#"{"n":1, "model":"m"}"#,
            ),
            (r#"{"model":"p/m" , "models":null}"#, r#"{"model":"m" }"#),
            (r#"{"models":["q/x"],"model":"p/m"}"#, r#"{"model":"m"}"#),
        ];
        for (body, want) in cases {
            assert_eq!(rewrite(body), want, "{body}");
        }
        let req = ChatRequest::parse(br#"{"model":"p/m","models":["q/x","r/y"]}"#).unwrap();
        assert_eq!(req.fallbacks, ["q/x", "r/y"]);
        let body = br#"{"model":"p/m","stream":true,"models":["q/a\"b"]}"#;
        let req = ChatRequest::parse(body).unwrap();
        let out = req.splice().apply_as(body, true, Some("a\"b"));
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"stream_options":{"include_usage":true},"model":"a\"b","stream":true}"#
        );
        for bad in [
            r#"{"model":"p/m","models":"q/x"}"#,
            r#"{"model":"p/m","models":[1]}"#,
            r#"{"model":"p/m","models":["nope"]}"#,
            r#"{"model":"p/m","mod\u0065ls":["q/x"]}"#,
            r#"{"model":"p/m","models":["a/1","a/2","a/3","a/4","a/5","a/6","a/7","a/8","a/9"]}"#,
        ] {
            assert!(ChatRequest::parse(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_output_cap_is_the_largest_integer_one_named() {
        let cap = |b: &str| ChatRequest::parse(b.as_bytes()).unwrap().max_tokens;
        assert_eq!(cap(r#"{"model":"p/m"}"#), 0);
        assert_eq!(cap(r#"{"model":"p/m","max_tokens":100}"#), 100);
        assert_eq!(
            cap(r#"{"model":"p/m","max_tokens":5,"max_completion_tokens":70}"#),
            70
        );
        assert_eq!(cap(r#"{"model":"p/m","max_output_tokens":9}"#), 9);
        // Not a non-negative integer: reserved as none (the upstream refuses it).
        assert_eq!(cap(r#"{"model":"p/m","max_tokens":-1}"#), 0);
        assert_eq!(cap(r#"{"model":"p/m","max_tokens":"50"}"#), 0);
        assert_eq!(cap(r#"{"model":"p/m","max_tokens":1.5}"#), 0);
        assert_eq!(cap(r#"{"model":"p/m","max_tokens":null}"#), 0);
    }

    #[test]
    fn a_stream_is_made_to_ask_for_usage_once_and_in_place() {
        let cases = [
            (
                r#"{"model":"p/m","stream":true}"#,
                Some(r#"{"stream_options":{"include_usage":true},"model":"m","stream":true}"#),
            ),
            (
                r#"{"model":"p/m","stream":true,"stream_options":null}"#,
                Some(r#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#),
            ),
            (
                r#"{"model":"p/m","stream":true,"stream_options":{ }}"#,
                Some(r#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#),
            ),
            (
                r#"{"stream_options":{"x":1},"model":"p/m","stream":true}"#,
                Some(
                    r#"{"stream_options":{"include_usage":true,"x":1},"model":"m","stream":true}"#,
                ),
            ),
            (
                r#"{"model":"p/m","stream_options":{"include_usage": false ,"x":1},"stream":true}"#,
                Some(
                    r#"{"model":"m","stream_options":{"include_usage": true ,"x":1},"stream":true}"#,
                ),
            ),
            (
                r#"{"model":"p/m","stream":true,"stream_options":{"include_usage":null}}"#,
                Some(r#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#),
            ),
            (
                r#"{"model":"p/m","stream":true,"stream_options":{"include_usage":true}}"#,
                None,
            ),
            (
                r#"{"model":"p/m","stream":true,"stream_options":"odd"}"#,
                None,
            ),
            (r#"{"model":"p/m","stream":false}"#, None),
            (r#"{"model":"p/m"}"#, None),
        ];
        for (body, want) in cases {
            let got = asking_usage(body);
            assert_eq!(got.as_deref(), want, "{body}");
            if let Some(got) = got {
                let v: serde_json::Value = serde_json::from_str(&got).unwrap();
                assert_eq!(v["stream_options"]["include_usage"], true, "{got}");
            }
        }
        // Without asking, the body is the plain rewrite.
        let body = r#"{"model":"p/m","stream":true,"stream_options":{"x":1}}"#;
        let req = ChatRequest::parse(body.as_bytes()).unwrap();
        assert_eq!(
            req.splice().apply(body.as_bytes(), false),
            req.rewrite(body.as_bytes())
        );
    }

    #[test]
    fn only_the_model_value_changes() {
        let body = r#"{ "zeta":1,"model" :  "mycompany/meta-llama/Llama-3-8B" , "tools":[{"x":"mycompany/a"}],"vendor_x":{"a":[1,2.50,null]},"stream":false }"#;
        assert_eq!(
            rewrite(body),
            r#"{ "zeta":1,"model" :  "meta-llama/Llama-3-8B" , "tools":[{"x":"mycompany/a"}],"vendor_x":{"a":[1,2.50,null]},"stream":false }"#
        );
        let req = ChatRequest::parse(body.as_bytes()).unwrap();
        assert_eq!(req.provider(), "mycompany");
        assert_eq!(req.upstream_model(), "meta-llama/Llama-3-8B");
        assert!(!req.stream);
    }

    #[test]
    fn escaped_models_are_decoded_and_reencoded() {
        assert_eq!(
            rewrite(r#"{"model":"my\u0063o\/x\"y"}"#),
            r#"{"model":"x\"y"}"#
        );
        let req = ChatRequest::parse(br#"{"model":"my\u0063o\/x","stream":true}"#).unwrap();
        assert_eq!(req.provider(), "myco");
        assert!(req.stream);
    }

    #[test]
    fn stream_is_a_boolean_or_null() {
        for (body, stream) in [
            (r#"{"model":"a/b"}"#, false),
            (r#"{"model":"a/b","stream":null}"#, false),
            (r#"{"model":"a/b","stream":false}"#, false),
            (r#"{"model":"a/b","stream": true }"#, true),
        ] {
            assert_eq!(
                ChatRequest::parse(body.as_bytes()).unwrap().stream,
                stream,
                "{body}"
            );
        }
        for bad in [r#""true""#, "1", "0", "[]", "{}", r#""""#, "1e0"] {
            let body = format!(r#"{{"model":"a/b","stream":{bad}}}"#);
            assert!(
                matches!(
                    ChatRequest::parse(body.as_bytes()),
                    Err(GatewayError::StreamNotBool(_))
                ),
                "{body}"
            );
        }
    }

    #[test]
    fn bad_requests_are_refused() {
        let err = |b: &str| ChatRequest::parse(b.as_bytes()).unwrap_err();
        assert!(matches!(err("{"), GatewayError::InvalidJson(_)));
        assert!(matches!(err("[1]"), GatewayError::InvalidJson(_)));
        assert!(matches!(
            err(r#"{"model":"a/b"} x"#),
            GatewayError::InvalidJson(_)
        ));
        assert!(matches!(
            err(r#"{"model":"a/b","model":"c/d"}"#),
            GatewayError::InvalidJson(_)
        ));
        assert!(matches!(
            err(r#"{"messages":[]}"#),
            GatewayError::MissingModel
        ));
        assert!(matches!(
            err(r#"{"model":null}"#),
            GatewayError::MissingModel
        ));
        assert!(matches!(
            err(r#"{"model":42}"#),
            GatewayError::ModelNotString
        ));
        assert!(matches!(
            err(r#"{"model":"gpt-4"}"#),
            GatewayError::ModelWithoutProvider(_)
        ));
        assert!(matches!(
            err(r#"{"model":"/gpt-4"}"#),
            GatewayError::ModelWithoutProvider(_)
        ));
        assert!(matches!(
            err(r#"{"model":"acme/"}"#),
            GatewayError::ModelWithoutProvider(_)
        ));
    }
}
