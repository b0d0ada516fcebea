//! The OpenAI endpoints the gateway proxies, each routed alike by the
//! body's `{customName}/{modelName}` to `{base}/v1/{path}`: the JSON ones
//! ([`Endpoint::ALL`]) and the multipart audio uploads ([`Endpoint::UPLOADS`]).

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
    /// JSON in, audio bytes out (streamed back).
    AudioSpeech,
    /// Multipart in.
    AudioTranscriptions,
    /// Multipart in.
    AudioTranslations,
}

impl Endpoint {
    /// Every JSON endpoint, as the router registers them.
    pub const ALL: [Self; 8] = [
        Self::ChatCompletions,
        Self::Completions,
        Self::Embeddings,
        Self::Moderations,
        Self::Rerank,
        Self::ImagesGenerations,
        Self::Responses,
        Self::AudioSpeech,
    ];

    /// The multipart uploads, routed by their `model` field.
    pub const UPLOADS: [Self; 2] = [Self::AudioTranscriptions, Self::AudioTranslations];

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
            Self::AudioSpeech => "audio/speech",
            Self::AudioTranscriptions => "audio/transcriptions",
            Self::AudioTranslations => "audio/translations",
        }
    }

    /// Streams whose usage is only sent when asked for with
    /// `stream_options.include_usage` (a streamed Responses answer always
    /// carries it in `response.completed`).
    pub fn asks_stream_usage(self) -> bool {
        matches!(self, Self::ChatCompletions | Self::Completions)
    }

    /// A successful answer is not JSON but bytes relayed as they arrive (speech audio).
    pub fn streams_bytes(self) -> bool {
        matches!(self, Self::AudioSpeech)
    }
}
