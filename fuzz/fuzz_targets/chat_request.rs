//! The gateway's chat request parse, model split and body rewrite.
//!
//! Properties: never panics; when the parse succeeds, the model splits at its
//! first '/' into two non-empty parts, and the rewritten body is JSON equal to
//! the input with only `model` replaced by the part after that '/'.

#![no_main]

use gateway::body::ChatRequest;
use gateway::GatewayError;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(req) = ChatRequest::parse(data) else {
        return;
    };
    let (provider, model) = req
        .model
        .split_once('/')
        .expect("an accepted model contains '/'");
    assert!(!provider.is_empty() && !model.is_empty());
    assert_eq!(req.provider(), provider);
    assert_eq!(req.upstream_model(), model);

    let out = req.rewrite(data);
    // The rewrite reads back with the upstream's model name in `model`.
    match ChatRequest::parse(&out) {
        Ok(again) => {
            assert_eq!(again.model, model);
            assert_eq!(again.stream, req.stream);
        }
        Err(GatewayError::ModelWithoutProvider(m)) => assert_eq!(m, model),
        Err(e) => panic!("the rewritten body does not parse: {e:?}"),
    }

    // As JSON values (when the input fits in one: serde_json's `Value`
    // refuses some inputs the skipping parser accepts, like deep nesting).
    if let Ok(mut input) = serde_json::from_slice::<Value>(data) {
        assert_eq!(req.stream, input["stream"] == Value::Bool(true));
        let output: Value = serde_json::from_slice(&out).expect("the rewritten body is JSON");
        input["model"] = Value::String(model.to_owned());
        assert_eq!(output, input);
    }
});
