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
    pub stream: bool,
}

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
        let split = match model.find('/') {
            Some(i) if i > 0 && i + 1 < model.len() => i + 1,
            _ => return Err(GatewayError::ModelWithoutProvider(model.into_owned())),
        };
        // Anything but a boolean or null would be read differently by the
        // gateway and the upstream (`"true"`, `1`): OpenAI refuses it too.
        let stream = match peek.stream.map(RawValue::get) {
            None | Some("null" | "false") => false,
            Some("true") => true,
            Some(_) => return Err(GatewayError::StreamNotBool(model.into_owned())),
        };
        Ok(Self {
            model,
            split,
            span,
            stream,
        })
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
        let raw = &body[self.span.clone()];
        let mut out = Vec::with_capacity(body.len());
        out.extend_from_slice(&body[..self.span.start]);
        if raw.contains(&b'\\') {
            // Escapes: re-encode the decoded name (a JSON string cannot fail to serialize).
            let encoded = serde_json::to_string(self.upstream_model()).unwrap_or_default();
            out.extend_from_slice(encoded.as_bytes());
        } else {
            // No escapes: the raw bytes are the name; drop `{customName}/` after the quote.
            out.push(b'"');
            out.extend_from_slice(&raw[1 + self.split..]);
        }
        out.extend_from_slice(&body[self.span.end..]);
        Bytes::from(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewrite(body: &str) -> String {
        let req = ChatRequest::parse(body.as_bytes()).unwrap();
        String::from_utf8(req.rewrite(body.as_bytes()).to_vec()).unwrap()
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
