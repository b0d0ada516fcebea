//! Stage 3: spend controls. A routed request is admitted by the limiter
//! (the key's limits and its organization's, the tighter wins) before it is
//! forwarded; its reservation is `max_tokens` plus ceil(body bytes / 4), and
//! its money reservation those tokens at the model's highest price. When its
//! usage row is finished, it is settled with the usage the upstream reported
//! (or charged its reservation when none was). A key and org without limits
//! cost one check of two empty structs.
//!
//! Answers carry OpenAI's `x-ratelimit-*` headers for each kind of limit
//! that applies (they replace the upstream's own, and its `retry-after`).

use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header::{HeaderMap, HeaderName, HeaderValue};
use limits::{Decision, Headers, Lease, Window};
use storage::limits::Money;
use storage::logs::RequestLog;

use crate::cache::{KeyEntry, ProviderEntry};
use crate::error::GatewayError;
use crate::route::Route;
use crate::state::State;
use crate::usage::LogGuard;

/// An admitted request's lease, and the provider whose prices settle it.
pub(crate) struct Charge {
    lease: Lease,
    provider: Arc<ProviderEntry>,
}

impl Charge {
    /// Settles in the background with what the finished row records.
    pub fn settle(self, row: &RequestLog) {
        let tokens = row.total_tokens.or_else(|| {
            (row.prompt_tokens.is_some() || row.completion_tokens.is_some())
                .then(|| row.prompt_tokens.unwrap_or(0) + row.completion_tokens.unwrap_or(0))
        });
        let cost = self.provider.prices.cost(
            row.upstream_model.as_deref().unwrap_or(""),
            row.prompt_tokens,
            row.completion_tokens,
        );
        let tokens = tokens.map(|t| t.max(0) as u64);
        self.lease.settle_in_background(tokens, cost);
    }
}

/// The tokens a request reserves: its output cap plus its body at four bytes a token.
pub(crate) fn reserve_tokens(max_tokens: u64, body_bytes: usize) -> u64 {
    max_tokens.saturating_add((body_bytes as u64).div_ceil(4))
}

/// Admits the request (or refuses it: 429, or 503 when the limiter fails
/// closed); on admission the row holds the lease until it is finished.
/// Returns the rate-limit headers for the answer.
pub(crate) async fn admit(
    gw: &State,
    key: &KeyEntry,
    route: &Route,
    log: &mut LogGuard,
) -> Result<Headers, GatewayError> {
    if key.limits.is_empty() && key.org_limits.is_empty() {
        return Ok(Headers::default());
    }
    let model = log.row.upstream_model.clone().unwrap_or_default();
    let candidates = std::iter::once((&route.provider, model.as_str())).chain(
        route
            .fallbacks
            .iter()
            .map(|f| (&f.provider, f.upstream_model())),
    );
    let per_million = highest_price(candidates);
    admitted(
        gw,
        key,
        &route.provider,
        route.reserve_tokens,
        per_million,
        log,
    )
    .await
}

/// [`admit`] for a request with one candidate (an upload).
pub(crate) async fn admit_one(
    gw: &State,
    key: &KeyEntry,
    provider: &Arc<ProviderEntry>,
    reserve_tokens: u64,
    log: &mut LogGuard,
) -> Result<Headers, GatewayError> {
    if key.limits.is_empty() && key.org_limits.is_empty() {
        return Ok(Headers::default());
    }
    let model = log.row.upstream_model.clone().unwrap_or_default();
    let per_million = highest_price(std::iter::once((provider, model.as_str())));
    admitted(gw, key, provider, reserve_tokens, per_million, log).await
}

/// The highest price per million tokens, in or out, among the candidates.
fn highest_price<'a>(candidates: impl Iterator<Item = (&'a Arc<ProviderEntry>, &'a str)>) -> Money {
    candidates
        .filter_map(|(p, model)| p.prices.lookup(model))
        .map(|p| p.input_per_million_usd.max(p.output_per_million_usd))
        .max()
        .unwrap_or(Money::ZERO)
}

async fn admitted(
    gw: &State,
    key: &KeyEntry,
    provider: &Arc<ProviderEntry>,
    reserve_tokens: u64,
    per_million: Money,
    log: &mut LogGuard,
) -> Result<Headers, GatewayError> {
    let budget_reserve = Money::from(reserve_tokens)
        .checked_mul(per_million)
        .map_or(Money::MAX, |m| m / Money::from(1_000_000));
    let decision = gw
        .limiter
        .admit(&limits::Request {
            org: key.org_id,
            key: key.id,
            key_limits: &key.limits,
            org_limits: &key.org_limits,
            reserve_tokens,
            budget_reserve,
        })
        .await;
    match decision {
        Decision::Admitted { lease, headers } => {
            log.charge = Some(Charge {
                lease,
                provider: provider.clone(),
            });
            Ok(headers)
        }
        Decision::Refused(refusal) => {
            gw.metrics.limited(refusal.kind);
            Err(GatewayError::Limited(refusal))
        }
    }
}

/// Writes the `x-ratelimit-*` headers of each kind that applies, replacing
/// the upstream's own of that kind and its `retry-after`.
pub(crate) fn write_headers(h: &Headers, to: &mut HeaderMap) {
    let kinds = [(h.requests, "requests"), (h.tokens, "tokens")];
    if kinds.iter().all(|(w, _)| w.is_none()) {
        return;
    }
    to.remove(actix_web::http::header::RETRY_AFTER);
    for (window, kind) in kinds {
        let Some(Window {
            limit,
            remaining,
            reset,
        }) = window
        else {
            continue;
        };
        let values = [
            ("limit", limit.to_string()),
            ("remaining", remaining.to_string()),
            ("reset", reset_text(reset)),
        ];
        for (what, value) in values {
            let name = format!("x-ratelimit-{what}-{kind}");
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(&value),
            ) {
                to.insert(name, value);
            }
        }
    }
}

/// A reset as OpenAI writes it: `20ms`, `1s`, `1.5s`, `6m0s`, `1h0m0s`.
pub(crate) fn reset_text(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (h, m) = (ms / 3_600_000, ms / 60_000 % 60);
    let (s, frac) = (ms / 1000 % 60, ms % 1000);
    let secs = if frac == 0 {
        format!("{s}s")
    } else {
        let f = format!("{frac:03}");
        format!("{s}.{}s", f.trim_end_matches('0'))
    };
    match (h, m) {
        (0, 0) => secs,
        (0, m) => format!("{m}m{secs}"),
        (h, m) => format!("{h}h{m}m{secs}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resets_read_like_openai_s() {
        let t = |ms| reset_text(Duration::from_millis(ms));
        assert_eq!(t(0), "0ms");
        assert_eq!(t(20), "20ms");
        assert_eq!(t(1000), "1s");
        assert_eq!(t(1500), "1.5s");
        assert_eq!(t(1250), "1.25s");
        assert_eq!(t(360_000), "6m0s");
        assert_eq!(t(61_001), "1m1.001s");
        assert_eq!(t(3_600_000), "1h0m0s");
    }

    #[test]
    fn reservations_count_the_body_at_four_bytes_a_token() {
        assert_eq!(reserve_tokens(0, 0), 0);
        assert_eq!(reserve_tokens(0, 1), 1);
        assert_eq!(reserve_tokens(100, 8), 102);
        assert_eq!(reserve_tokens(100, 9), 103);
        assert_eq!(reserve_tokens(u64::MAX, 9), u64::MAX);
    }

    #[test]
    fn only_the_kinds_that_apply_replace_the_upstream_s() {
        let mut map = HeaderMap::new();
        let up = |m: &mut HeaderMap, k: &'static str| {
            m.insert(HeaderName::from_static(k), HeaderValue::from_static("9"))
        };
        up(&mut map, "x-ratelimit-limit-requests");
        up(&mut map, "x-ratelimit-limit-tokens");
        up(&mut map, "retry-after");
        write_headers(&Headers::default(), &mut map);
        assert_eq!(map.len(), 3, "no limit: the upstream's stay");
        let w = Window {
            limit: 60,
            remaining: 59,
            reset: Duration::from_secs(1),
        };
        write_headers(
            &Headers {
                requests: Some(w),
                tokens: None,
            },
            &mut map,
        );
        assert_eq!(map.get("x-ratelimit-limit-requests").unwrap(), "60");
        assert_eq!(map.get("x-ratelimit-remaining-requests").unwrap(), "59");
        assert_eq!(map.get("x-ratelimit-reset-requests").unwrap(), "1s");
        assert_eq!(map.get("x-ratelimit-limit-tokens").unwrap(), "9");
        assert!(map.get("retry-after").is_none());
    }
}
