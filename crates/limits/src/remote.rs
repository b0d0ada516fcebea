//! The Redis backend: `admit.lua`, `settle.lua` and `consumption.lua`, each
//! after `clock.lua`, sent by EVALSHA (loaded on first use, and again after
//! a Redis restart) over the connection of [`crate::conn`].

use std::time::Duration;

use redis::Script;

use crate::conn::{ints, RedisConn};
use crate::{
    Admission, Backend, BackendError, BoxFuture, Budget, Consumption, Crossing, Headers, Outcome,
    RefusalKind, Settlement, Used, Window,
};

const ADMIT: &str = concat!(include_str!("clock.lua"), include_str!("admit.lua"));
const SETTLE: &str = concat!(include_str!("clock.lua"), include_str!("settle.lua"));
const CONSUMPTION: &str = concat!(include_str!("clock.lua"), include_str!("consumption.lua"));

/// Counters on Redis, shared by every replica.
pub struct RedisBackend {
    conn: RedisConn,
    admit: Script,
    settle: Script,
    consumption: Script,
}

impl RedisBackend {
    /// A single Redis server (`redis://host:port/db`); connects in the background.
    pub fn single(url: &str, timeout: Duration) -> Result<Self, BackendError> {
        Ok(Self::on(RedisConn::single(url, timeout, "limits")?))
    }

    /// A Redis Cluster, discovered through any of `urls`.
    pub fn cluster(urls: &[String], timeout: Duration) -> Result<Self, BackendError> {
        Ok(Self::on(RedisConn::cluster(urls, timeout, "limits")?))
    }

    fn on(conn: RedisConn) -> Self {
        Self {
            conn,
            admit: Script::new(ADMIT),
            settle: Script::new(SETTLE),
            consumption: Script::new(CONSUMPTION),
        }
    }
}

/// Decodes `admit.lua`'s answer.
fn outcome(v: &[i64]) -> Result<Outcome, BackendError> {
    if v.len() != 13 {
        return Err(BackendError::Redis("unexpected script answer".into()));
    }
    let window = |limit: i64, remaining: i64, reset_ms: i64| {
        (limit >= 0).then(|| Window {
            limit: limit as u64,
            remaining: remaining.max(0) as u64,
            reset: Duration::from_millis(reset_ms.max(0) as u64),
        })
    };
    Ok(Outcome {
        admitted: v[0] == 1,
        kind: match v[1] {
            1 => Some(RefusalKind::Requests),
            2 => Some(RefusalKind::Tokens),
            3 => Some(RefusalKind::Concurrency),
            4 => Some(RefusalKind::Quota),
            _ => None,
        },
        retry_after_secs: v[2].max(0) as u64,
        headers: Headers {
            requests: window(v[3], v[4], v[5]),
            tokens: window(v[6], v[7], v[8]),
        },
        second: v[9],
        day: v[10],
        month: v[11],
        held_us: v[12],
    })
}

/// Decodes `settle.lua`'s answer: four numbers per alert raised.
fn crossings(v: &[i64]) -> Result<Vec<Crossing>, BackendError> {
    let bad = || BackendError::Redis("unexpected script answer".into());
    if !v.len().is_multiple_of(4) {
        return Err(bad());
    }
    v.chunks_exact(4)
        .map(|c| {
            Ok(Crossing {
                scope: usize::from(c[0] == 2),
                budget: *usize::try_from(c[1] - 1)
                    .ok()
                    .and_then(|i| Budget::ALL.get(i))
                    .ok_or_else(bad)?,
                reached: c[2] == 2,
                total: c[3],
            })
        })
        .collect()
}

/// Decodes `consumption.lua`'s answer.
fn consumption(v: &[i64]) -> Result<Consumption, BackendError> {
    if v.len() != 13 {
        return Err(BackendError::Redis("unexpected script answer".into()));
    }
    let used = |c: &[i64]| {
        let u = |i: usize| c[i].max(0) as u64;
        Used {
            requests_per_minute: u(0),
            tokens_per_minute: u(1),
            max_concurrent_requests: u(2),
            tokens_per_day: u(3),
            tokens_per_month: u(4),
            micro_usd_per_month: u(5),
        }
    };
    Ok(Consumption {
        now_s: v[0],
        key: used(&v[1..7]),
        org: used(&v[7..13]),
    })
}

impl Backend for RedisBackend {
    fn admit<'a>(&'a self, a: &'a Admission) -> BoxFuture<'a, Result<Outcome, BackendError>> {
        Box::pin(async move {
            let mut inv = self.admit.prepare_invoke();
            inv.key(&a.prefixes[0])
                .key(&a.prefixes[1])
                .arg(&a.lease_id)
                .arg(a.reserve_tokens)
                .arg(a.reserve_micro_usd)
                .arg(a.lease_ttl.as_millis() as u64);
            for l in a.limits.iter().flatten() {
                inv.arg(*l);
            }
            inv.arg(a.count).arg(a.slots).arg(a.hold_us);
            outcome(&ints(self.conn.run(inv).await?)?)
        })
    }

    fn settle<'a>(
        &'a self,
        s: &'a Settlement,
    ) -> BoxFuture<'a, Result<Vec<Crossing>, BackendError>> {
        Box::pin(async move {
            let mut inv = self.settle.prepare_invoke();
            inv.key(&s.prefixes[0])
                .key(&s.prefixes[1])
                .arg(&s.lease_id)
                .arg(s.second)
                .arg(s.day)
                .arg(s.month)
                .arg(s.token_delta)
                .arg(s.micro_usd_delta)
                .arg(s.renew.map_or(0, |d| d.as_millis() as u64))
                .arg(s.charged().0)
                .arg(s.charged().1);
            let watch = s.watch.as_deref().copied().unwrap_or([[-1; 6]; 2]);
            for (flags, watch) in s.flags.iter().zip(&watch) {
                for f in flags {
                    inv.arg(if *f { "1" } else { "0" });
                }
                for w in watch {
                    inv.arg(*w);
                }
            }
            inv.arg(s.returned.0).arg(s.returned.1);
            for id in &s.slot_ids {
                inv.arg(*id);
            }
            crossings(&ints(self.conn.run(inv).await?)?)
        })
    }

    fn consumption<'a>(
        &'a self,
        prefixes: &'a [String; 2],
    ) -> BoxFuture<'a, Result<Consumption, BackendError>> {
        Box::pin(async move {
            let mut inv = self.consumption.prepare_invoke();
            inv.key(&prefixes[0]).key(&prefixes[1]);
            consumption(&ints(self.conn.run(inv).await?)?)
        })
    }
}
