//! When a request is tried again, on another endpoint of its provider (or
//! on its next fallback model): only while nothing has reached the client,
//! only for bodies the gateway holds (a streamed upload never), and only
//! for failures that say the upstream did not take the request on:
//!
//! - a connection that could not be made (refused, unreachable, no such
//!   name, or not made within the connect timeout: nothing was sent);
//! - a connection lost before any byte of the answer (a pooled connection
//!   the server had closed);
//! - a 502 or 503 answer;
//! - a 429 whose `Retry-After` is at most [`SHORT_RETRY_AFTER`].
//!
//! Never a 504 or a timeout waiting for the head (the model may still be
//! generating), never after the first byte of an answer has been relayed,
//! never a client's own 4xx, never a TLS or address-policy refusal. Each
//! retry waits a jittered backoff, every attempt stays within the request's
//! overall deadline, and retries are drawn from a budget of about one per
//! ten requests (plus a small reserve), so an outage cannot multiply the
//! load on what is left.

use std::sync::atomic::{AtomicI64, Ordering::Relaxed};
use std::time::Duration;

use rand::Rng;
use upstream::{FailureClass, UpstreamFailure};

/// Attempts per client request at most (the first included), across
/// endpoints and fallback models.
pub(crate) const MAX_ATTEMPTS: u32 = 4;
/// The longest `Retry-After` of a 429 that is retried elsewhere.
pub(crate) const SHORT_RETRY_AFTER: Duration = Duration::from_secs(1);
/// First backoff; doubled per retry, jittered down to half.
const BACKOFF: Duration = Duration::from_millis(20);
const MAX_BACKOFF: Duration = Duration::from_millis(250);

/// Retries earned by requests: each request adds a tenth of a retry.
pub(crate) struct RetryBudget {
    /// In thousandths of a retry.
    milli: AtomicI64,
}

/// Each request deposits this (a tenth of a retry).
const DEPOSIT: i64 = 100;
const RETRY: i64 = 1000;
/// The budget never holds more than this many retries (bursts after a calm).
const CAP: i64 = 100 * RETRY;
/// What a fresh process may spend before it has earned anything.
const RESERVE: i64 = 10 * RETRY;

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            milli: AtomicI64::new(RESERVE),
        }
    }
}

impl RetryBudget {
    /// A client request arrived.
    pub fn deposit(&self) {
        if self.milli.load(Relaxed) < CAP {
            self.milli.fetch_add(DEPOSIT, Relaxed);
        }
    }

    /// Takes one retry, if the budget has one.
    pub fn withdraw(&self) -> bool {
        if self.milli.fetch_sub(RETRY, Relaxed) >= RETRY {
            true
        } else {
            self.milli.fetch_add(RETRY, Relaxed);
            false
        }
    }
}

/// The wait before retry number `n` (1 for the first retry).
pub(crate) fn backoff(n: u32) -> Duration {
    let full = BACKOFF
        .saturating_mul(1 << n.saturating_sub(1).min(8))
        .min(MAX_BACKOFF);
    let ms = full.as_millis() as u64;
    Duration::from_millis(rand::thread_rng().gen_range(ms / 2..=ms))
}

/// Whether a call that failed before any answer may be tried again.
pub(crate) fn retryable_failure(e: &reqwest::Error) -> bool {
    match UpstreamFailure::of(e).class {
        // Nothing reached the server, or it dropped the connection before
        // answering (a pooled connection it had closed).
        FailureClass::ConnectionRefused
        | FailureClass::Unreachable
        | FailureClass::NameDoesNotResolve
        | FailureClass::ConnectionBroke => !e.is_timeout() || e.is_connect(),
        // Not connected within the connect timeout: nothing was sent. A
        // timeout waiting for the answer is never retried.
        FailureClass::TimedOut => e.is_connect(),
        // TLS, the SSRF policy, anything else: a property of the endpoint's
        // configuration, and an answer the client should see.
        _ => false,
    }
}

/// Whether an answer's status (and `Retry-After`) asks for another try elsewhere.
pub(crate) fn retryable_status(status: u16, headers: &reqwest::header::HeaderMap) -> bool {
    match status {
        502 | 503 => true,
        429 => headers
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .is_some_and(|s| s >= 0.0 && s <= SHORT_RETRY_AFTER.as_secs_f64()),
        _ => false,
    }
}

/// Whether a failure counts against the endpoint's health.
pub(crate) fn unhealthy_status(status: u16) -> bool {
    (500..600).contains(&status)
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};

    #[test]
    fn the_budget_allows_about_one_retry_in_ten_after_its_reserve() {
        let b = RetryBudget::default();
        let mut n = 0;
        while b.withdraw() {
            n += 1;
        }
        assert_eq!(n, 10, "the reserve");
        let mut granted = 0;
        for _ in 0..1000 {
            b.deposit();
            if b.withdraw() {
                granted += 1;
            }
        }
        assert_eq!(granted, 100);
    }

    #[test]
    fn statuses_retried_are_502_503_and_a_short_429() {
        let none = HeaderMap::new();
        assert!(retryable_status(502, &none));
        assert!(retryable_status(503, &none));
        for s in [400, 401, 404, 408, 409, 422, 500, 504] {
            assert!(!retryable_status(s, &none), "{s}");
        }
        let after = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(RETRY_AFTER, HeaderValue::from_static(v));
            h
        };
        assert!(
            !retryable_status(429, &none),
            "no Retry-After: unknown wait"
        );
        assert!(retryable_status(429, &after("1")));
        assert!(retryable_status(429, &after("0.2")));
        assert!(!retryable_status(429, &after("30")));
        assert!(!retryable_status(
            429,
            &after("Wed, 21 Oct 2015 07:28:00 GMT")
        ));
    }

    #[test]
    fn backoffs_grow_jittered_and_capped() {
        for _ in 0..100 {
            let b1 = backoff(1);
            assert!(b1 >= Duration::from_millis(10) && b1 <= BACKOFF);
            assert!(backoff(20) <= MAX_BACKOFF);
        }
    }
}
