//! An OpenTelemetry collector for tests: a real HTTP server on 127.0.0.1
//! that accepts OTLP/HTTP JSON exports (`POST /v1/traces`) and keeps what
//! it was sent, decoded.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Value};

/// One export received: its headers and its JSON body.
pub type Post = (Vec<(String, String)>, Value);

/// An OTLP/HTTP receiver: every `POST /v1/traces` body, with its headers.
#[derive(Clone, Default)]
pub struct Collector {
    posts: Arc<Mutex<Vec<Post>>>,
}

async fn receive(req: HttpRequest, body: web::Bytes, c: web::Data<Collector>) -> HttpResponse {
    let headers = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_owned()))
        .collect();
    match serde_json::from_slice(&body) {
        Ok(v) => {
            c.posts.lock().unwrap().push((headers, v));
            HttpResponse::Ok().json(json!({}))
        }
        Err(_) => HttpResponse::BadRequest().finish(),
    }
}

/// One received span, its resource's `service.name` beside it.
#[derive(Debug, Clone)]
pub struct Span {
    pub service: String,
    pub v: Value,
}

impl Span {
    pub fn str(&self, key: &str) -> &str {
        self.v[key].as_str().unwrap_or_default()
    }

    pub fn attr(&self, key: &str) -> Option<&Value> {
        self.v["attributes"]
            .as_array()?
            .iter()
            .find(|a| a["key"] == key)
            .map(|a| &a["value"])
    }

    pub fn text(&self, key: &str) -> Option<&str> {
        self.attr(key)?["stringValue"].as_str()
    }

    /// OTLP JSON carries int64 as a string.
    pub fn int(&self, key: &str) -> Option<i64> {
        self.attr(key)?["intValue"].as_str()?.parse().ok()
    }

    pub fn kind(&self) -> u64 {
        self.v["kind"].as_u64().unwrap_or_default()
    }
}

impl Collector {
    pub async fn start() -> (Self, String) {
        let c = Self::default();
        let data = web::Data::new(c.clone());
        let (url, _handle) = crate::spawn_http(move |cfg| {
            cfg.app_data(data.clone())
                .route("/v1/traces", web::post().to(receive));
        });
        (c, format!("{url}/v1/traces"))
    }

    pub fn spans(&self) -> Vec<Span> {
        let mut out = Vec::new();
        for (_, body) in self.posts.lock().unwrap().iter() {
            for rs in body["resourceSpans"].as_array().into_iter().flatten() {
                let service = rs["resource"]["attributes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|a| a["key"] == "service.name")
                    .and_then(|a| a["value"]["stringValue"].as_str())
                    .unwrap_or_default()
                    .to_owned();
                for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                    for s in ss["spans"].as_array().into_iter().flatten() {
                        out.push(Span {
                            service: service.clone(),
                            v: s.clone(),
                        });
                    }
                }
            }
        }
        out
    }

    /// Waits until the collector holds `servers` server spans and `clients` client spans.
    pub async fn wait_for(&self, servers: usize, clients: usize) -> (Vec<Span>, Vec<Span>) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let s = self.spans();
            if s.iter().filter(|s| s.kind() == 2).count() >= servers
                && s.iter().filter(|s| s.kind() == 3).count() >= clients
            {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the spans never reached the collector: {}",
                self.raw()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Nothing more than expected arrives.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let s = self.spans();
        let (server, client): (Vec<_>, Vec<_>) = s.into_iter().partition(|s| s.kind() == 2);
        assert_eq!(server.len(), servers, "{server:#?}");
        assert_eq!(client.len(), clients, "{client:#?}");
        (server, client)
    }

    /// Every export received so far.
    pub fn posts(&self) -> Vec<Post> {
        self.posts.lock().unwrap().clone()
    }

    pub fn raw(&self) -> String {
        self.posts
            .lock()
            .unwrap()
            .iter()
            .map(|(h, b)| format!("{h:?} {b}"))
            .collect()
    }
}
