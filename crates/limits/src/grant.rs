//! Quota held ahead, for counters on Redis: instead of one round trip per
//! request, a replica asks Redis for a **grant** — several request units,
//! the concurrency slots it is using, and their token and money
//! reservations, all or nothing, under every limit of the key and its org —
//! and admits the key's next requests itself while the grant lasts
//! ([`crate::Config::hold`]). When the hold ends (or every unit is used) and
//! its requests have finished, one settlement gives back what was not used
//! and settles what was. Requests that outlive it settle one by one.
//!
//! What that keeps exact: a unit is counted in Redis's sliding minute as of
//! the end of its hold, the latest moment it can be used, so no 60-second
//! window ever admits more than `requests_per_minute`; slots are leases in
//! Redis before they are used, so concurrency never exceeds its limit; a
//! grant's reservations fit under the token and money limits when it is
//! made. What it costs: units a replica holds and does not use are
//! unavailable to the other replicas until the hold ends (a refusal there
//! may come up to one hold early), and a grant's tokens count in the
//! second its hold ends. Grants grow (doubling) while a key is busy and are
//! capped by the room the last answer showed, so a key near its limit is
//! admitted one request per round trip, exactly as without grants.
//!
//! A busy key's next grant is asked for **ahead**, by the request that
//! finds the open one running low (a quarter of its units left, or an
//! eighth of its hold), in the background: the key's requests then rarely
//! wait for Redis. A replica holds at most two grants per key at a time,
//! the open one and the next; the next starts admitting when the open one
//! has nothing left, and one never used is given back when its hold ends.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use uuid::Uuid;

use crate::{settle_and_alert, Backend, Headers, Settlement, Watching, Window};

/// Most request units in one grant.
pub(crate) const MAX_UNITS: i64 = 512;
/// Pairs (key, org) remembered before idle ones are dropped.
const PRUNE_AT: usize = 10_000;

/// A grant's fixed terms, as Redis answered them.
pub(crate) struct Terms {
    pub limits: [[i64; 6]; 2],
    pub count: i64,
    pub slots: i64,
    pub tokens: i64,
    pub micro_usd: i64,
    pub headers: Headers,
    /// Prefixes, lease id, periods, flags and watch list; deltas zero.
    pub base: Settlement,
    pub watching: Option<Box<Watching>>,
    pub expires: Instant,
}

#[derive(Default)]
struct State {
    used: i64,
    /// Slot ids (1-based, as admit.lua names them) free and in use.
    free: Vec<i64>,
    in_use: Vec<i64>,
    inflight: i64,
    peak: i64,
    /// The reservations of the requests running, and what the finished
    /// ones were charged: together, what is drawn from the grant's tokens
    /// and money.
    running_tokens: i64,
    running_usd: i64,
    charged_tokens: i64,
    charged_usd: i64,
    /// Charged past its reservations: the grant admits no more.
    exhausted: bool,
    closed: bool,
}

/// One grant: its terms, what its requests have drawn, and where it settles.
pub(crate) struct Grant {
    terms: Terms,
    backend: Arc<dyn Backend>,
    timeout: Duration,
    lease_ttl: Duration,
    hold: Duration,
    state: Mutex<State>,
    idle: Notify,
}

/// What one admitted request drew from a grant.
pub(crate) struct Held {
    grant: Arc<Grant>,
    slot: Option<i64>,
    tokens: i64,
    micro_usd: i64,
}

impl Grant {
    /// A grant just answered by Redis, with the first unit already drawn
    /// for the request that asked, when one did (it fits by construction).
    pub fn start(
        terms: Terms,
        backend: Arc<dyn Backend>,
        timeout: Duration,
        lease_ttl: Duration,
        hold: Duration,
        need: Option<(i64, i64)>,
    ) -> (Arc<Self>, Option<(Held, Headers)>) {
        let state = State {
            free: (1..=terms.slots).rev().collect(),
            ..State::default()
        };
        let g = Arc::new(Self {
            terms,
            backend,
            timeout,
            lease_ttl,
            hold,
            state: Mutex::new(state),
            idle: Notify::new(),
        });
        let first = need.map(|need| {
            let (held, headers, _) = g
                .take(need, true)
                .expect("a new grant covers the request that asked for it");
            (held, headers)
        });
        tokio::spawn(g.clone().run());
        (g, first)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the grant was made for these limits (an edit needs a new one).
    pub fn serves(&self, limits: &[[i64; 6]; 2]) -> bool {
        self.terms.limits == *limits
    }

    /// Draws one request's unit, slot and reservations, when the grant is
    /// still open and has them; says too whether the grant is running low
    /// (a quarter of its units left, or an eighth of its hold), so that the
    /// next one should be asked for.
    pub fn draw(self: &Arc<Self>, need: (i64, i64)) -> Option<(Held, Headers, bool)> {
        let now = Instant::now();
        if now >= self.terms.expires {
            return None;
        }
        let (held, headers, left) = self.take(need, false)?;
        let low = left <= self.terms.count / 4 || now + self.hold / 8 >= self.terms.expires;
        Some((held, headers, low))
    }

    /// Draws from the grant; answers too how many units are left.
    fn take(
        self: &Arc<Self>,
        (tokens, micro_usd): (i64, i64),
        first: bool,
    ) -> Option<(Held, Headers, i64)> {
        let t = &self.terms;
        let mut s = self.lock();
        let [tpm, _, tpd, tpmo, usd] = flags_any(&t.base);
        let short_tokens =
            (tpm || tpd || tpmo) && s.charged_tokens + s.running_tokens + tokens > t.tokens;
        let short_usd = usd && s.charged_usd + s.running_usd + micro_usd > t.micro_usd;
        if !first && (s.closed || s.exhausted || s.used >= t.count || short_tokens || short_usd) {
            return None;
        }
        let slot = if t.slots > 0 {
            Some(s.free.pop()?)
        } else {
            None
        };
        if let Some(id) = slot {
            s.in_use.push(id);
        }
        s.used += 1;
        s.running_tokens += tokens;
        s.running_usd += micro_usd;
        s.inflight += 1;
        s.peak = s.peak.max(s.inflight);
        let headers = Headers {
            requests: t.headers.requests.map(|w| Window {
                remaining: w.remaining + (t.count - s.used).max(0) as u64,
                ..w
            }),
            tokens: t.headers.tokens.map(|w| Window {
                remaining: w.remaining
                    + (t.tokens - s.charged_tokens - s.running_tokens).max(0) as u64,
                ..w
            }),
        };
        let left = t.count - s.used;
        drop(s);
        Some((
            Held {
                grant: self.clone(),
                slot,
                tokens,
                micro_usd,
            },
            headers,
            left,
        ))
    }

    /// How many units and slots the next grant for this pair should ask
    /// for, and what its finished requests were charged on average (tokens,
    /// micro-USD, rounded up; zero before any finished).
    fn next_size(&self) -> (i64, i64, (i64, i64)) {
        let s = self.lock();
        let units = if s.used >= self.terms.count {
            self.terms.count * 2
        } else {
            s.used * 2
        };
        let finished = s.used - s.inflight;
        let mean = |charged: i64| {
            if finished > 0 {
                (charged.max(0) + finished - 1) / finished
            } else {
                0
            }
        };
        (
            units.clamp(1, MAX_UNITS),
            (s.peak * 2).clamp(1, MAX_UNITS),
            (mean(s.charged_tokens), mean(s.charged_usd)),
        )
    }

    /// Closes the grant at the end of its hold once its requests have
    /// finished (waiting one more hold for them at most, unless every unit
    /// is used: then the last request to finish closes it), and keeps the
    /// slots of requests still running renewed until they end.
    async fn run(self: Arc<Self>) {
        let every = (self.lease_ttl / 3).max(Duration::from_millis(10));
        let mut next_renew = Instant::now() + every;
        let last_call = self.terms.expires + self.hold;
        tokio::time::sleep_until(self.terms.expires).await;
        loop {
            let now = Instant::now();
            let (close, renew, closed, held, accepting) = {
                let mut s = self.lock();
                let due = !s.closed
                    && (s.inflight == 0 || (now >= last_call && s.used < self.terms.count));
                let close = due.then(|| self.closing(&mut s));
                let renew = (now >= next_renew && !s.in_use.is_empty()).then(|| s.in_use.clone());
                let accepting =
                    !s.closed && !s.exhausted && s.used < self.terms.count && now < last_call;
                (close, renew, s.closed, !s.in_use.is_empty(), accepting)
            };
            if let Some(close) = close {
                self.send(close).await;
            }
            if let Some(ids) = renew {
                let mut s = self.terms.base.clone();
                s.renew = Some(self.lease_ttl);
                s.slot_ids = ids;
                let _ = tokio::time::timeout(self.timeout * 4, self.backend.settle(&s)).await;
                next_renew += every;
            }
            if closed && !held {
                return;
            }
            let wake = if accepting {
                last_call.min(next_renew)
            } else {
                next_renew
            };
            let _ = tokio::time::timeout_at(wake, self.idle.notified()).await;
        }
    }

    /// The settlement that closes the grant: units and slots not in use
    /// given back, unused reservations returned, finished requests settled.
    fn closing(&self, s: &mut State) -> Settlement {
        s.closed = true;
        let t = &self.terms;
        let mut close = t.base.clone();
        if s.used < t.count {
            close.returned = (s.used + 1, t.count);
        }
        close.slot_ids = std::mem::take(&mut s.free);
        // Redis holds the grant's reservations; it keeps those of the
        // requests still running and takes what the others were charged.
        close.token_delta = s.charged_tokens + s.running_tokens - t.tokens;
        close.micro_usd_delta = s.charged_usd + s.running_usd - t.micro_usd;
        close.reserve_tokens = s.charged_tokens - close.token_delta;
        close.reserve_micro_usd = s.charged_usd - close.micro_usd_delta;
        close
    }

    async fn send(&self, s: Settlement) {
        let nothing =
            s.returned.0 == 0 && s.slot_ids.is_empty() && s.flags.iter().flatten().all(|f| !f);
        if !nothing {
            settle_and_alert(
                &*self.backend,
                self.timeout,
                &s,
                self.terms.watching.as_deref(),
            )
            .await;
        }
    }
}

impl Held {
    /// The request ended, charged `tokens` and `micro_usd` in all: counted
    /// into the grant while it is open, else settled on its own. Answers
    /// the settlement to send, if this ends the grant or outlived it.
    pub fn finish(self, tokens: i64, micro_usd: i64) -> Option<Closing> {
        let g = self.grant;
        let mut s = g.lock();
        s.inflight -= 1;
        if let Some(id) = self.slot {
            if let Some(i) = s.in_use.iter().position(|x| *x == id) {
                s.in_use.swap_remove(i);
            }
        }
        if !s.closed {
            if let Some(id) = self.slot {
                s.free.push(id);
            }
            s.running_tokens -= self.tokens;
            s.running_usd -= self.micro_usd;
            s.charged_tokens += tokens;
            s.charged_usd += micro_usd;
            // Charged past what the grant reserved: it admits no more, and
            // closes as soon as its requests are done.
            let [tpm, _, tpd, tpmo, usd] = flags_any(&g.terms.base);
            let over_tokens =
                (tpm || tpd || tpmo) && s.charged_tokens + s.running_tokens > g.terms.tokens;
            let over_usd = usd && s.charged_usd + s.running_usd > g.terms.micro_usd;
            s.exhausted |= over_tokens || over_usd;
            if s.inflight > 0 {
                return None;
            }
            if s.used >= g.terms.count || s.exhausted {
                // No unit left to admit with, and every request done: close now.
                let close = g.closing(&mut s);
                drop(s);
                return Some(Closing(g, close));
            }
            drop(s);
            g.idle.notify_one();
            return None;
        }
        drop(s);
        // A request that outlived its grant settles on its own.
        let mut own = g.terms.base.clone();
        own.slot_ids = self.slot.into_iter().collect();
        own.token_delta = tokens - self.tokens;
        own.micro_usd_delta = micro_usd - self.micro_usd;
        own.reserve_tokens = self.tokens;
        own.reserve_micro_usd = self.micro_usd;
        Some(Closing(g, own))
    }

    /// Forgets the request without settling, as a process killed mid-request
    /// would: its slot is neither freed nor renewed (it expires by its TTL)
    /// and its reservation stays charged.
    pub fn abandon(self) {
        let mut s = self.grant.lock();
        s.inflight -= 1;
        if let Some(id) = self.slot {
            if let Some(i) = s.in_use.iter().position(|x| *x == id) {
                s.in_use.swap_remove(i);
            }
        }
    }

    /// What the request reserved: charged in all when no usage is known.
    pub fn reserved(&self) -> (i64, i64) {
        (self.tokens, self.micro_usd)
    }
}

/// A settlement a finished request leaves to send.
pub(crate) struct Closing(Arc<Grant>, Settlement);

impl Closing {
    pub async fn send(self) {
        self.0.send(self.1).await;
    }
}

/// Whether any scope applies each of tokens/min, concurrency, tokens/day,
/// tokens/month, money.
fn flags_any(s: &Settlement) -> [bool; 5] {
    std::array::from_fn(|i| s.flags[0][i] || s.flags[1][i])
}

/// This replica's open grant per (org, key), and what the last one used.
#[derive(Default)]
pub(crate) struct Grants {
    map: Mutex<HashMap<(Uuid, Uuid), Entry>>,
}

#[derive(Default)]
struct Entry {
    grant: Option<Arc<Grant>>,
    /// Asked for ahead, while `grant` still admits.
    next: Option<Arc<Grant>>,
    turn: Arc<Turn>,
}

/// What a pair's next grant asks for: request units, concurrency slots,
/// and the tokens and micro-USD reserved per unit.
pub(crate) struct Size {
    pub units: i64,
    pub slots: i64,
    pub per_unit: (i64, i64),
}

/// A draw from a pair's grants, and whether the pair's next grant should
/// be asked for now.
pub(crate) struct Drawn {
    pub held: Held,
    pub headers: Headers,
    pub ask_ahead: bool,
}

/// Who asks Redis for a pair's next grant: one request at a time, while
/// the others wait for its answer instead of each asking for a grant of
/// its own (which would replace one another and waste their units).
#[derive(Default)]
pub(crate) struct Turn {
    lock: Arc<tokio::sync::Mutex<()>>,
    waiting: AtomicI64,
}

/// A request's turn to ask for its pair's next grant, and how many
/// requests are queued behind it (the grant asked for covers them).
pub(crate) struct MyTurn {
    _guard: tokio::sync::OwnedMutexGuard<()>,
    pub waiting: i64,
}

impl Grants {
    /// A draw from the pair's open grant, or else from its next one (which
    /// then becomes the open one), when it has room and was made for these
    /// limits.
    pub fn draw(
        &self,
        pair: (Uuid, Uuid),
        limits: &[[i64; 6]; 2],
        need: (i64, i64),
    ) -> Option<Drawn> {
        let (open, has_next) = {
            let map = self.lock();
            let e = map.get(&pair)?;
            (e.grant.clone(), e.next.is_some())
        };
        let usable = |g: &Arc<Grant>| g.serves(limits);
        if let Some(g) = open.as_ref().filter(|g| usable(g)) {
            if let Some((held, headers, low)) = g.draw(need) {
                return Some(Drawn {
                    held,
                    headers,
                    ask_ahead: low && !has_next,
                });
            }
        }
        // The open grant has nothing left: the next one, if it was asked for.
        let g = self.lock().get(&pair)?.next.clone().filter(usable)?;
        let (held, headers, _) = g.draw(need)?;
        let mut map = self.lock();
        if let Some(e) = map.get_mut(&pair) {
            if e.next.as_ref().is_some_and(|n| Arc::ptr_eq(n, &g)) {
                e.grant = e.next.take();
            }
        }
        Some(Drawn {
            held,
            headers,
            ask_ahead: false,
        })
    }

    /// The pair's turn to ask for its next grant ahead, when no request is
    /// asking for one and none is waiting to be used.
    pub fn turn_ahead(&self, pair: (Uuid, Uuid)) -> Option<MyTurn> {
        let map = self.lock();
        let e = map.get(&pair)?;
        if e.next.is_some() {
            return None;
        }
        let guard = e.turn.lock.clone().try_lock_owned().ok()?;
        Some(MyTurn {
            _guard: guard,
            waiting: 0,
        })
    }

    /// Waits until `deadline` for the pair's turn to ask Redis for a grant.
    /// `None` when the wait ran out: the caller asks for itself.
    pub async fn my_turn(&self, pair: (Uuid, Uuid), deadline: Instant) -> Option<MyTurn> {
        let turn = self.lock().entry(pair).or_default().turn.clone();
        turn.waiting.fetch_add(1, Ordering::Relaxed);
        let guard = tokio::time::timeout_at(deadline, turn.lock.clone().lock_owned()).await;
        turn.waiting.fetch_sub(1, Ordering::Relaxed);
        Some(MyTurn {
            _guard: guard.ok()?,
            waiting: turn.waiting.load(Ordering::Relaxed),
        })
    }

    /// The size of the pair's next grant, from its last one and the
    /// requests `waiting` for it, capped by the room that grant's answer
    /// showed. `need` is what the request asking reserves.
    pub fn size(&self, pair: (Uuid, Uuid), need: (i64, i64), waiting: i64) -> Size {
        let Some(g) = self.lock().get(&pair).and_then(|e| e.grant.clone()) else {
            let n = (waiting + 1).min(MAX_UNITS);
            return Size {
                units: n,
                slots: n,
                per_unit: need,
            };
        };
        let (units, slots, mean) = g.next_size();
        // Each unit reserves what the last grant's requests were charged,
        // when that was more than this one reserves: requests charged past
        // their reservations (no max_tokens, a long answer) then do not
        // use a grant up before its units.
        let per_unit = (need.0.max(mean.0), need.1.max(mean.1));
        let mut units = units.max(waiting + 1).min(MAX_UNITS);
        let h = &g.terms.headers;
        if let Some(w) = h.requests {
            units = units.min((w.remaining / 2) as i64);
        }
        if let (Some(w), true) = (h.tokens, per_unit.0 > 0) {
            units = units.min((w.remaining / 2) as i64 / per_unit.0);
        }
        let units = units.max(1);
        Size {
            units,
            slots: slots.max(waiting + 1).min(units),
            per_unit,
        }
    }

    /// The pair's new open grant (`ahead`: its next one).
    pub fn put(&self, pair: (Uuid, Uuid), g: Arc<Grant>, ahead: bool) {
        let mut map = self.lock();
        if map.len() > PRUNE_AT {
            let now = Instant::now();
            let live =
                |g: &Option<Arc<Grant>>| g.as_ref().is_some_and(|g| g.terms.expires + g.hold > now);
            map.retain(|_, e| {
                Arc::strong_count(&e.turn.lock) > 1 || live(&e.grant) || live(&e.next)
            });
        }
        let e = map.entry(pair).or_default();
        if ahead {
            e.next = Some(g);
        } else {
            e.grant = Some(g);
            e.next = None;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(Uuid, Uuid), Entry>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
