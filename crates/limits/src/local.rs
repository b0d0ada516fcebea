//! The in-process backend: the rules of `admit.lua` and `settle.lua` on
//! this replica's own counters (a single replica without Redis, or the
//! fallback while Redis does not answer). Time is this machine's clock.
//! It admits one request at a time: `count`, `slots` and `hold_us` of an
//! [`Admission`] are for grants, which only a shared backend is asked for.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::{
    Admission, Backend, BackendError, BoxFuture, Budget, Consumption, Crossing, Headers, Outcome,
    RefusalKind, Settlement, Used, Window,
};

const WINDOW_US: i64 = 60_000_000;
/// Scopes kept before idle ones are dropped.
const PRUNE_AT: usize = 10_000;

/// Microseconds since the Unix epoch.
pub(crate) fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

#[derive(Debug, Default)]
struct Scope {
    /// Admission times in the sliding minute, oldest first.
    requests: VecDeque<i64>,
    /// Tokens per UTC second in the sliding minute.
    tokens: VecDeque<(i64, i64)>,
    /// Lease id -> expiry (µs).
    leases: HashMap<String, i64>,
    day: (i64, i64),
    month_tokens: (i64, i64),
    month_usd: (i64, i64),
    /// Settled totals and the alerts raised, per budget (day tokens, month
    /// tokens, month money).
    settled: [Settled; 3],
}

/// A budget's settled total in a period, and the thresholds alerted on in it.
#[derive(Debug, Clone, Copy)]
struct Settled {
    period: i64,
    total: i64,
    /// The soft threshold and the limit last alerted on (-1: none yet).
    soft_alerted: i64,
    limit_alerted: i64,
}

impl Default for Settled {
    fn default() -> Self {
        Self {
            period: 0,
            total: 0,
            soft_alerted: -1,
            limit_alerted: -1,
        }
    }
}

impl Settled {
    /// Adds `by` in `period` and answers which of `soft` and `limit` it
    /// crossed first in the period (`soft` -1: not watched).
    fn add(&mut self, period: i64, by: i64, limit: i64, soft: i64) -> [Option<bool>; 2] {
        if period < self.period {
            // Settled after its period ended: a later period runs now.
            return [None, None];
        }
        if period > self.period {
            *self = Self {
                period,
                ..Self::default()
            };
        }
        self.total = self.total.saturating_add(by).max(0);
        if soft < 0 {
            return [None, None];
        }
        let mut raised = [None, None];
        for (i, (mark, alerted, reached)) in [
            (soft, &mut self.soft_alerted, false),
            (limit, &mut self.limit_alerted, true),
        ]
        .into_iter()
        .enumerate()
        {
            if self.total >= mark && *alerted != mark {
                *alerted = mark;
                raised[i] = Some(reached);
            }
        }
        raised
    }
}

impl Scope {
    fn idle(&self, now: i64) -> bool {
        let month_live = |(_, n): (i64, i64)| n > 0;
        self.requests.back().is_none_or(|t| *t <= now - WINDOW_US)
            && self.tokens.is_empty()
            && self.leases.is_empty()
            && self.day.1 == 0
            && !month_live(self.month_tokens)
            && !month_live(self.month_usd)
            && self.settled.iter().all(|b| b.total == 0)
    }
}

/// In-process counters, keyed by scope prefix.
#[derive(Debug, Default)]
pub struct LocalBackend {
    scopes: Mutex<HashMap<String, Scope>>,
}

/// The UTC calendar day number, `YYYYMM`, and seconds left in the day and month.
pub(crate) fn calendar(now_s: i64) -> (i64, i64, i64, i64) {
    let day = now_s.div_euclid(86_400);
    let (y, m) = civil(day);
    let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    (
        day,
        y * 100 + m,
        (day + 1) * 86_400 - now_s,
        days_from_civil(ny, nm) * 86_400 - now_s,
    )
}

fn civil(z: i64) -> (i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m)
}

fn days_from_civil(y: i64, m: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5;
    era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468
}

/// When UTC day number `day` ends (Unix seconds).
pub(crate) fn day_end(day: i64) -> i64 {
    (day + 1) * 86_400
}

/// When the `YYYYMM` month ends (Unix seconds).
pub(crate) fn month_end(month: i64) -> i64 {
    let (y, m) = (month / 100, month % 100);
    let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    days_from_civil(ny, nm) * 86_400
}

/// The current value of a period counter (0 once the period has passed).
fn period(c: &mut (i64, i64), id: i64) -> &mut i64 {
    if c.0 != id {
        *c = (id, 0);
    }
    &mut c.1
}

impl LocalBackend {
    /// [`admit.lua`](crate) at time `now` (µs).
    pub fn admit_now(&self, a: &Admission, now: i64) -> Outcome {
        let mut map = self.scopes.lock().unwrap_or_else(PoisonError::into_inner);
        if map.len() > PRUNE_AT {
            map.retain(|_, s| !s.idle(now));
        }
        let now_s = now.div_euclid(1_000_000);
        let (day, month, day_left, month_left) = calendar(now_s);
        let mut kind: Option<(RefusalKind, u64)> = None;
        let mut refuse = |k: RefusalKind, r: i64| {
            let r = r.max(1) as u64;
            let rank = |k: RefusalKind| match k {
                RefusalKind::Requests => 1,
                RefusalKind::Tokens => 2,
                RefusalKind::Concurrency => 3,
                _ => 4,
            };
            kind = match kind {
                None => Some((k, r)),
                Some((cur, _)) if rank(k) < rank(cur) => Some((k, r)),
                Some((cur, cr)) if cur == k => Some((k, cr.max(r))),
                keep => keep,
            };
        };
        // Phase 1: expire and check.
        struct Seen {
            rq_used: i64,
            rq_reset_us: i64,
            tm_used: i64,
            tm_reset_s: i64,
        }
        let mut seen = Vec::with_capacity(2);
        for (i, prefix) in a.prefixes.iter().enumerate() {
            let l = &a.limits[i];
            let s = map.entry(prefix.clone()).or_default();
            let mut v = Seen {
                rq_used: 0,
                rq_reset_us: WINDOW_US,
                tm_used: 0,
                tm_reset_s: 60,
            };
            if l[2] >= 0 {
                s.leases.retain(|_, exp| *exp > now);
                if s.leases.len() as i64 >= l[2] {
                    refuse(RefusalKind::Concurrency, 1);
                }
            }
            if l[0] >= 0 {
                while s.requests.front().is_some_and(|t| *t <= now - WINDOW_US) {
                    s.requests.pop_front();
                }
                v.rq_used = s.requests.len() as i64;
                if let Some(oldest) = s.requests.front() {
                    v.rq_reset_us = oldest + WINDOW_US - now;
                }
                if v.rq_used >= l[0] {
                    refuse(RefusalKind::Requests, (v.rq_reset_us + 999_999) / 1_000_000);
                }
            }
            if l[1] >= 0 {
                while s.tokens.front().is_some_and(|(sec, _)| *sec <= now_s - 60) {
                    s.tokens.pop_front();
                }
                v.tm_used = s.tokens.iter().map(|(_, n)| n).sum();
                if let Some((oldest, _)) = s.tokens.iter().find(|(_, n)| *n > 0) {
                    v.tm_reset_s = oldest + 60 - now_s;
                }
                if v.tm_used >= l[1] {
                    refuse(RefusalKind::Tokens, v.tm_reset_s);
                }
            }
            if l[3] >= 0 && *period(&mut s.day, day) >= l[3] {
                refuse(RefusalKind::Quota, day_left);
            }
            if l[4] >= 0 && *period(&mut s.month_tokens, month) >= l[4] {
                refuse(RefusalKind::Quota, month_left);
            }
            if l[5] >= 0 && *period(&mut s.month_usd, month) >= l[5] {
                refuse(RefusalKind::Quota, month_left);
            }
            seen.push(v);
        }
        // Phase 2: apply when nothing refused.
        let admitted = kind.is_none();
        if admitted {
            for (i, prefix) in a.prefixes.iter().enumerate() {
                let l = &a.limits[i];
                let Some(s) = map.get_mut(prefix) else {
                    continue;
                };
                let v = &mut seen[i];
                if l[2] >= 0 {
                    s.leases
                        .insert(a.lease_id.clone(), now + a.lease_ttl.as_micros() as i64);
                }
                if l[0] >= 0 {
                    if v.rq_used == 0 {
                        v.rq_reset_us = WINDOW_US;
                    }
                    s.requests.push_back(now);
                    v.rq_used += 1;
                }
                if l[1] >= 0 {
                    match s.tokens.back_mut() {
                        Some((sec, n)) if *sec == now_s => *n += a.reserve_tokens,
                        _ => s.tokens.push_back((now_s, a.reserve_tokens)),
                    }
                    v.tm_used += a.reserve_tokens;
                }
                if l[3] >= 0 {
                    *period(&mut s.day, day) += a.reserve_tokens;
                }
                if l[4] >= 0 {
                    *period(&mut s.month_tokens, month) += a.reserve_tokens;
                }
                if l[5] >= 0 {
                    *period(&mut s.month_usd, month) += a.reserve_micro_usd;
                }
            }
        }
        // Headers: the tighter scope of each kind.
        let mut headers = Headers::default();
        for (i, v) in seen.iter().enumerate() {
            let l = &a.limits[i];
            let tighter = |cur: Option<Window>, w: Window| match cur {
                Some(c) if c.remaining <= w.remaining => Some(c),
                _ => Some(w),
            };
            if l[0] >= 0 {
                let w = Window {
                    limit: l[0] as u64,
                    remaining: (l[0] - v.rq_used).max(0) as u64,
                    reset: std::time::Duration::from_millis(((v.rq_reset_us + 999) / 1000) as u64),
                };
                headers.requests = tighter(headers.requests, w);
            }
            if l[1] >= 0 {
                let w = Window {
                    limit: l[1] as u64,
                    remaining: (l[1] - v.tm_used).max(0) as u64,
                    reset: std::time::Duration::from_secs(v.tm_reset_s as u64),
                };
                headers.tokens = tighter(headers.tokens, w);
            }
        }
        Outcome {
            admitted,
            kind: kind.map(|(k, _)| k),
            retry_after_secs: kind.map_or(0, |(_, r)| r),
            headers,
            second: now_s,
            day,
            month,
            held_us: 0,
        }
    }

    /// [`settle.lua`](crate) at time `now` (µs); answers the alerts raised.
    pub fn settle_now(&self, st: &Settlement, now: i64) -> Vec<Crossing> {
        let mut map = self.scopes.lock().unwrap_or_else(PoisonError::into_inner);
        let now_s = now.div_euclid(1_000_000);
        let mut crossings = Vec::new();
        for (i, prefix) in st.prefixes.iter().enumerate() {
            let [tpm, cc, tpd, tpmo, usd] = st.flags[i];
            let Some(s) = map.get_mut(prefix) else {
                continue;
            };
            if let Some(ttl) = st.renew {
                if cc {
                    if let Some(exp) = s.leases.get_mut(&st.lease_id) {
                        *exp = now + ttl.as_micros() as i64;
                    }
                }
                continue;
            }
            if cc {
                s.leases.remove(&st.lease_id);
            }
            let fix = |n: &mut i64, d: i64| *n = (*n + d).max(0);
            if st.token_delta != 0 {
                if tpm && st.second > now_s - 60 {
                    if let Some((_, n)) = s.tokens.iter_mut().find(|(sec, _)| *sec == st.second) {
                        fix(n, st.token_delta);
                    }
                }
                if tpd && s.day.0 == st.day {
                    fix(&mut s.day.1, st.token_delta);
                }
                if tpmo && s.month_tokens.0 == st.month {
                    fix(&mut s.month_tokens.1, st.token_delta);
                }
            }
            if usd && st.micro_usd_delta != 0 && s.month_usd.0 == st.month {
                fix(&mut s.month_usd.1, st.micro_usd_delta);
            }
            let (tokens, micro_usd) = st.charged();
            let w = st.watch.as_deref().map_or([-1; 6], |w| w[i]);
            let budgets = [
                (tpd, st.day, tokens),
                (tpmo, st.month, tokens),
                (usd, st.month, micro_usd),
            ];
            for (b, (applied, period, by)) in budgets.into_iter().enumerate() {
                if !applied {
                    continue;
                }
                let (limit, soft) = (w[b * 2], w[b * 2 + 1]);
                let settled = &mut s.settled[b];
                for reached in settled.add(period, by, limit, soft).into_iter().flatten() {
                    crossings.push(Crossing {
                        scope: i,
                        budget: Budget::ALL[b],
                        reached,
                        total: settled.total,
                    });
                }
            }
        }
        crossings
    }

    /// [`consumption.lua`](crate) at time `now` (µs).
    pub fn consumption_now(&self, prefixes: &[String; 2], now: i64) -> Consumption {
        let map = self.scopes.lock().unwrap_or_else(PoisonError::into_inner);
        let now_s = now.div_euclid(1_000_000);
        let (day, month, _, _) = calendar(now_s);
        let used = |prefix: &String| {
            let Some(s) = map.get(prefix) else {
                return Used::default();
            };
            let at = |(id, n): (i64, i64), want: i64| if id == want { n.max(0) as u64 } else { 0 };
            Used {
                requests_per_minute: s.requests.iter().filter(|t| **t > now - WINDOW_US).count()
                    as u64,
                tokens_per_minute: s
                    .tokens
                    .iter()
                    .filter(|(sec, _)| *sec > now_s - 60)
                    .map(|(_, n)| (*n).max(0) as u64)
                    .sum(),
                max_concurrent_requests: s.leases.values().filter(|exp| **exp > now).count() as u64,
                tokens_per_day: at(s.day, day),
                tokens_per_month: at(s.month_tokens, month),
                micro_usd_per_month: at(s.month_usd, month),
            }
        };
        Consumption {
            key: used(&prefixes[0]),
            org: used(&prefixes[1]),
            now_s,
        }
    }
}

impl Backend for LocalBackend {
    fn admit<'a>(&'a self, a: &'a Admission) -> BoxFuture<'a, Result<Outcome, BackendError>> {
        Box::pin(async move { Ok(self.admit_now(a, now_us())) })
    }

    fn settle<'a>(
        &'a self,
        s: &'a Settlement,
    ) -> BoxFuture<'a, Result<Vec<Crossing>, BackendError>> {
        Box::pin(async move { Ok(self.settle_now(s, now_us())) })
    }

    fn consumption<'a>(
        &'a self,
        prefixes: &'a [String; 2],
    ) -> BoxFuture<'a, Result<Consumption, BackendError>> {
        Box::pin(async move { Ok(self.consumption_now(prefixes, now_us())) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_matches_known_dates() {
        // 2024-02-29T12:00:00Z: day 19782, month 202402, 12 h and 12 h left.
        let t = 1_709_208_000;
        assert_eq!(calendar(t), (19_782, 202_402, 43_200, 43_200));
        // 2026-12-31T23:59:59Z: one second to the next day and year.
        assert_eq!(calendar(1_798_761_599).1, 202_612);
        assert_eq!(calendar(1_798_761_599).2, 1);
        assert_eq!(calendar(1_798_761_599).3, 1);
        assert_eq!(calendar(1_798_761_600).1, 202_701);
        // Period ends: the next midnight, the first of the next month.
        assert_eq!(day_end(19_782), 1_709_251_200);
        assert_eq!(month_end(202_402), 1_709_251_200);
        assert_eq!(month_end(202_612), 1_798_761_600);
    }
}
