//! The OpenAI JSON endpoints the gateway proxies, each routed alike by the
//! body's `{customName}/{modelName}` to `{base}/v1/{path}`.

/// One proxied endpoint; its [`Endpoint::path`] is `request_logs.endpoint`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
    Moderations,
    Rerank,
    ImagesGenerations,
    Responses,
}

impl Endpoint {
    /// Every JSON endpoint, as the router registers them.
    pub const ALL: [Self; 7] = [
        Self::ChatCompletions,
        Self::Completions,
        Self::Embeddings,
        Self::Moderations,
        Self::Rerank,
        Self::ImagesGenerations,
        Self::Responses,
    ];

    /// The path after `/v1/`, the same for the client and the upstream.
    pub fn path(self) -> &'static str {
        match self {
            Self::ChatCompletions => "chat/completions",
            Self::Completions => "completions",
            Self::Embeddings => "embeddings",
            Self::Moderations => "moderations",
            Self::Rerank => "rerank",
            Self::ImagesGenerations => "images/generations",
            Self::Responses => "responses",
        }
    }

    /// Streams whose usage is only sent when asked for with
    /// `stream_options.include_usage` (a streamed Responses answer always
    /// carries it in `response.completed`).
    pub fn asks_stream_usage(self) -> bool {
        matches!(self, Self::ChatCompletions | Self::Completions)
    }
}
