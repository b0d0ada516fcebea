//! The one call to a provider's model routes, shared by the settings API's
//! connectivity test and the gateway's `/v1/models` (list and retrieve):
//! `GET {base}/v1/models` or `GET {base}/v1/models/{model}` with the
//! provider's token, bounded in time ([`PROBE_TIMEOUT`]) and in size
//! ([`MAX_MODELS_BYTES`]), and the parse of OpenAI's `{"data":[{"id":…}]}`.
//!
//! The caller checks the base URL against the SSRF policy first
//! ([`crate::UpstreamClient::check`]); the client's resolver checks names.

use std::time::{Duration, Instant};

use bytes::Bytes;
use domain::BaseUrl;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION};
use serde_json::{Map, Value};

use crate::body::{read_capped, UpstreamBody};
use crate::UpstreamClient;

/// Longest wait for a provider's model list or model (the client's own
/// timeout when shorter); it bounds reading the body too.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest model list (or model) read from a provider; a larger one is refused.
pub const MAX_MODELS_BYTES: usize = 4 * 1024 * 1024;

/// Where a models call goes and with which credentials.
pub struct ModelsProbe<'a> {
    pub client: &'a UpstreamClient,
    pub base_url: &'a BaseUrl,
    /// `Bearer {token}` (see [`crate::bearer`]).
    pub auth: &'a HeaderValue,
    /// The provider's `connect_ms` (`None`: the client's connect timeout).
    pub connect: Option<Duration>,
}

/// What the provider answered (whatever its status).
#[derive(Debug)]
pub struct ModelsAnswer {
    pub status: u16,
    /// Time to the answer's head.
    pub latency: Duration,
    pub headers: HeaderMap,
    /// The body, read whole within [`MAX_MODELS_BYTES`].
    pub body: Result<Bytes, UpstreamBody>,
}

impl ModelsAnswer {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The answer as a model list, when it is a successful one.
    pub fn list(&self) -> Option<ModelList> {
        let body = self.body.as_ref().ok().filter(|_| self.is_success())?;
        ModelList::parse(body)
    }
}

/// Why a models call got no answer at all.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The model name cannot be put in a URL path as it is (`.`/`..` segments, empty).
    #[error("the model name cannot be asked for in a URL path")]
    BadModel,
    /// The base URL and path do not make a URL.
    #[error("the base URL does not take the models path")]
    BadUrl,
    /// The request failed before an answer's head (classify it with [`crate::UpstreamFailure::of`]).
    #[error(transparent)]
    Send(#[from] reqwest::Error),
}

impl ModelsProbe<'_> {
    /// `GET {base}/v1/models`.
    pub async fn list(&self) -> Result<ModelsAnswer, ProbeError> {
        self.get(&self.base_url.endpoint("models")).await
    }

    /// `GET {base}/v1/models/{model}`: `/` in the name stays a path
    /// separator (as servers that serve `meta-llama/Llama-3` expect), every
    /// other byte outside the unreserved set is percent-encoded.
    pub async fn retrieve(&self, model: &str) -> Result<ModelsAnswer, ProbeError> {
        let path = model_path(model).ok_or(ProbeError::BadModel)?;
        self.get(&self.base_url.endpoint(&format!("models/{path}")))
            .await
    }

    async fn get(&self, url: &str) -> Result<ModelsAnswer, ProbeError> {
        let url = reqwest::Url::parse(url).map_err(|_| ProbeError::BadUrl)?;
        let start = Instant::now();
        let resp = self
            .client
            .http_with(self.connect)
            .get(url)
            .header(AUTHORIZATION, self.auth.clone())
            .header(ACCEPT, HeaderValue::from_static("application/json"))
            .timeout(self.client.timeout().min(PROBE_TIMEOUT))
            .send()
            .await?;
        let latency = start.elapsed();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = read_capped(resp, MAX_MODELS_BYTES).await;
        Ok(ModelsAnswer {
            status,
            latency,
            headers,
            body,
        })
    }
}

/// A model name as a URL path: `None` when it is empty or has a `.`/`..`
/// segment (which a URL parser would resolve away, reaching another path).
pub fn model_path(model: &str) -> Option<String> {
    if model.is_empty()
        || model
            .split('/')
            .any(|s| s == "." || s == ".." || s.eq_ignore_ascii_case("%2e") || s.is_empty())
    {
        return None;
    }
    let mut out = String::with_capacity(model.len());
    for b in model.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/' | b':' | b'@')
        {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    Some(out)
}

/// OpenAI's model list `{"data":[…]}`.
#[derive(Debug, serde::Deserialize)]
pub struct ModelList {
    pub data: Vec<Value>,
}

impl ModelList {
    /// `None` when the body is not a JSON object with a `data` array.
    pub fn parse(body: &[u8]) -> Option<Self> {
        serde_json::from_slice(body).ok()
    }

    /// The entries that are objects with a string `id`, in order.
    pub fn models(self) -> impl Iterator<Item = Map<String, Value>> {
        self.data.into_iter().filter_map(|m| match m {
            Value::Object(o) if o.get("id").is_some_and(Value::is_string) => Some(o),
            _ => None,
        })
    }

    /// The ids, in order.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.data
            .iter()
            .filter_map(|m| m.get("id").and_then(Value::as_str))
    }

    /// The entry whose `id` is `id`.
    pub fn find(self, id: &str) -> Option<Map<String, Value>> {
        self.models()
            .find(|m| m.get("id").and_then(Value::as_str) == Some(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_paths_keep_slashes_and_refuse_dot_segments() {
        assert_eq!(
            model_path("meta-llama/Llama-3-8B").as_deref(),
            Some("meta-llama/Llama-3-8B")
        );
        assert_eq!(model_path("a b?c#d%").as_deref(), Some("a%20b%3Fc%23d%25"));
        for bad in ["", "..", "a/../b", "./a", "a//b", "a/", "%2e", "x/%2E"] {
            assert_eq!(model_path(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_list_is_parsed_and_searched_by_id() {
        let list = ModelList::parse(br#"{"object":"list","data":[{"id":"a"},7,{"id":"b","x":1}]}"#)
            .unwrap();
        assert_eq!(list.data.len(), 3);
        assert_eq!(list.ids().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(list.find("b").unwrap()["x"], 1);
        assert!(ModelList::parse(b"{\"models\":[]}").is_none());
        assert!(ModelList::parse(b"<html>").is_none());
    }
}
