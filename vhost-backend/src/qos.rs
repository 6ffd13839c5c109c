//! Quality of service: limits on a device's I/O operations and bytes per
//! second (for reads, writes, or both), with a burst allowance, enforced
//! across all of the device's queues whichever reactors run them, and
//! limits shared by a group of devices (as QEMU's throttle groups).
//!
//! Each limit is a token bucket (in thousandths of an operation or a byte,
//! so slow rates keep their precision) refilled from elapsed time, shared
//! by the queues through atomics. A queue never touches the shared bucket
//! per request: it takes a grant of about a millisecond's worth at a time
//! into a local credit and spends that, so a queue on another reactor pays
//! one atomic operation per grant. A request the credit cannot cover waits
//! in Quern, in its queue's order, and is admitted when the bucket has
//! refilled: it is never failed. A limit of 0 means none.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use quern_bdev::IoKind;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Limits as configured (`[[vhost_blk]] qos = {...}`, `[[qos_group]]`,
/// `vhost_blk_set_qos`). Zero: no limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QosLimits {
    /// Operations per second, reads and writes together.
    #[serde(default)]
    pub iops: u64,
    /// Read operations per second.
    #[serde(default)]
    pub read_iops: u64,
    /// Write operations per second (writes, discards, write-zeroes).
    #[serde(default)]
    pub write_iops: u64,
    /// Bytes per second, read and written together.
    #[serde(default)]
    pub bps: u64,
    /// Bytes read per second.
    #[serde(default)]
    pub read_bps: u64,
    /// Bytes written per second.
    #[serde(default)]
    pub write_bps: u64,
    /// How much may pass at once after a quiet spell, as time at the limit
    /// (default 100 ms; at least one request always fits).
    #[serde(default = "default_burst_ms")]
    pub burst_ms: u64,
}

fn default_burst_ms() -> u64 {
    100
}

impl Default for QosLimits {
    /// No limits, and the default burst.
    fn default() -> Self {
        QosLimits {
            iops: 0,
            read_iops: 0,
            write_iops: 0,
            bps: 0,
            read_bps: 0,
            write_bps: 0,
            burst_ms: default_burst_ms(),
        }
    }
}

impl QosLimits {
    pub fn is_unlimited(&self) -> bool {
        [
            self.iops,
            self.read_iops,
            self.write_iops,
            self.bps,
            self.read_bps,
            self.write_bps,
        ]
        .iter()
        .all(|&r| r == 0)
    }

    /// The limits' rates in bucket order: iops, read_iops, write_iops,
    /// bps, read_bps, write_bps.
    fn rates(&self) -> [u64; BUCKETS] {
        [
            self.iops,
            self.read_iops,
            self.write_iops,
            self.bps,
            self.read_bps,
            self.write_bps,
        ]
    }

    /// What a configuration file or the API may not give.
    pub fn check(&self) -> Result<(), String> {
        if !(1..=10_000).contains(&self.burst_ms) {
            return Err(format!("burst_ms {} is outside 1..=10000", self.burst_ms));
        }
        for (name, r) in [
            "iops",
            "read_iops",
            "write_iops",
            "bps",
            "read_bps",
            "write_bps",
        ]
        .iter()
        .zip(self.rates())
        {
            if r > 1 << 40 {
                return Err(format!("{name} {r} is larger than 2^40"));
            }
        }
        Ok(())
    }
}

const BUCKETS: usize = 6;
/// Thousandths: bucket contents and costs are in 1/1000 units.
const MILLI: i64 = 1000;
/// How often a bucket is refilled at most, in ns.
const REFILL_NS: u64 = 250_000;

/// One token bucket.
#[derive(Debug, Default)]
struct Bucket {
    /// Units per second (0: no limit).
    rate: AtomicU64,
    /// Thousandths of a unit available (may dip below zero by a grant).
    tokens: AtomicI64,
    /// Most tokens kept (thousandths).
    cap: AtomicI64,
    /// Turns: a queue that needs a grant from this bucket takes a ticket
    /// and takes tokens only when `serving` reaches it, so queues (and a
    /// group's devices) share the bucket fairly whatever order their
    /// reactors poll in. Per bucket: a queue waiting for read tokens does
    /// not hold up one that wants write tokens.
    next_ticket: AtomicU64,
    serving: AtomicU64,
    /// When the queue being served last tried (ns): one that stops trying
    /// for [`STALL_NS`] (its queue stopped) loses its turn.
    heartbeat_ns: AtomicU64,
}

/// A set of limits shared by the queues of one device, or of a group of
/// devices.
#[derive(Debug)]
pub struct Limiter {
    pub name: String,
    buckets: [Bucket; BUCKETS],
    /// When the buckets were last refilled (the engine clock, ns).
    last_ns: AtomicU64,
    /// Bumped by every [`Limiter::set`]: queues reload their copy of the
    /// rates when it moves (one load per cycle, on a line of its own so
    /// the writes to the buckets do not evict it).
    generation: Padded<AtomicU64>,
    /// Requests that had to wait, and how long they waited in all (ns).
    pub throttled: AtomicU64,
    pub throttled_ns: AtomicU64,
    limits: Mutex<QosLimits>,
}

/// A value alone on its cache line.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Padded<T>(T);

/// How long a queue may hold its turn without trying.
const STALL_NS: u64 = 5_000_000;

impl Limiter {
    pub fn new(name: &str, l: QosLimits) -> Arc<Limiter> {
        let lim = Arc::new(Limiter {
            name: name.into(),
            buckets: Default::default(),
            last_ns: AtomicU64::new(now_ns()),
            generation: Padded(AtomicU64::new(0)),
            throttled: AtomicU64::new(0),
            throttled_ns: AtomicU64::new(0),
            limits: Mutex::new(QosLimits::default()),
        });
        lim.set(l);
        lim
    }

    /// New limits, effective at once (control plane). A bucket that had
    /// no limit starts full (the burst is there at once); one that had a
    /// limit keeps what it held, up to the new burst, so lowering a limit
    /// under load lets no extra burst through.
    pub fn set(&self, l: QosLimits) {
        let mut kept = self.limits.lock().unwrap_or_else(|e| e.into_inner());
        for (b, r) in self.buckets.iter().zip(l.rates()) {
            let cap = (r as i64 * MILLI / 1000 * l.burst_ms as i64).max(0);
            let was_limited = b.rate.load(Ordering::Relaxed) != 0;
            b.cap.store(cap, Ordering::Relaxed);
            b.rate.store(r, Ordering::Relaxed);
            if was_limited {
                let _ = b
                    .tokens
                    .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |t| Some(t.min(cap)));
            } else {
                b.tokens.store(cap, Ordering::Relaxed);
            }
        }
        *kept = l;
        self.generation.0.fetch_add(1, Ordering::Release);
    }

    pub fn limits(&self) -> QosLimits {
        *self.limits.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Add what has accrued since the last refill (at most every
    /// REFILL_NS; one caller wins the race, the others skip).
    fn refill(&self, now: u64) {
        let last = self.last_ns.load(Ordering::Relaxed);
        if now < last + REFILL_NS
            || self
                .last_ns
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let dt = now - last;
        for b in &self.buckets {
            let r = b.rate.load(Ordering::Relaxed);
            if r == 0 {
                continue;
            }
            // thousandths accrued: r units/s * dt ns * 1000 / 1e9
            let add = (u128::from(r) * u128::from(dt) / 1_000_000) as i64;
            let cap = b.cap.load(Ordering::Relaxed);
            let _ = b
                .tokens
                .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |t| {
                    Some(t.saturating_add(add).min(cap.max(t)))
                });
        }
    }
}

/// The clock the limiters share: the reactors' cheap clock in ns (queues
/// convert their cycle's reading, so QoS reads no clock of its own).
pub fn now_ns() -> u64 {
    quern_reactor::clock::scale().ns(quern_reactor::clock::ticks())
}

/// Which limiters a device's queues obey: its own and its group's. The
/// group can change at run time; queues notice by the generation (one
/// load per cycle) and take the list under the lock then, off the
/// per-request path.
#[derive(Debug)]
pub struct QosBinding {
    generation: Padded<AtomicU64>,
    limiters: Mutex<Vec<Arc<Limiter>>>,
}

impl QosBinding {
    pub fn new(own: Arc<Limiter>, group: Option<Arc<Limiter>>) -> Arc<QosBinding> {
        Arc::new(QosBinding {
            generation: Padded(AtomicU64::new(0)),
            limiters: Mutex::new(std::iter::once(own).chain(group).collect()),
        })
    }

    /// A device's binding with no limits (until set).
    pub fn unlimited(name: &str) -> Arc<QosBinding> {
        QosBinding::new(Limiter::new(name, QosLimits::default()), None)
    }

    /// The device's own limiter.
    pub fn own(&self) -> Arc<Limiter> {
        self.limiters.lock().unwrap_or_else(|e| e.into_inner())[0].clone()
    }

    /// The group's limiter, if the device is in one.
    pub fn group(&self) -> Option<Arc<Limiter>> {
        self.limiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(1)
            .cloned()
    }

    /// Join a group, move to another or leave (None).
    pub fn set_group(&self, group: Option<Arc<Limiter>>) {
        let mut l = self.limiters.lock().unwrap_or_else(|e| e.into_inner());
        l.truncate(1);
        l.extend(group);
        self.generation.0.fetch_add(1, Ordering::Release);
    }
}

/// A queue's view of its device's limiters: a copy of the buckets that
/// have a limit, and its local credits. Owned by the queue's poller (one
/// reactor); the limiters are shared, and touched only when a grant is
/// due (about once a millisecond per limited queue).
pub struct QueueQos {
    binding: Arc<QosBinding>,
    binding_gen: u64,
    limiters: Vec<Arc<Limiter>>,
    /// Each limiter's generation when its buckets were copied.
    gens: Vec<u64>,
    /// The buckets with a limit, flat: what a grant is taken from.
    active: Vec<Active>,
    /// What the common case reads, laid out for it: per kind of request,
    /// each active bucket's cost per request and per byte (thousandths;
    /// `cost(j) = per_io[kind][j] + per_byte[kind][j] * bytes`).
    per_io: [[i64; MAX_ACTIVE]; 5],
    per_byte: [[i64; MAX_ACTIVE]; 5],
    /// Local credit per active bucket, thousandths.
    credit: [i64; MAX_ACTIVE],
    /// Admitted by the fast check and not yet spent from `credit`: per
    /// kind, requests and bytes.
    pend_ios: [i64; 5],
    pend_bytes: [i64; 5],
    /// What the fast check may still admit before the credits are looked
    /// at bucket by bucket: requests and bytes, counted as if every
    /// request cost each bucket the most any kind costs it (a bucket that
    /// charges both per request and per byte lends half its credit to
    /// each). Never more than the credits cover, so the fast check admits
    /// only what the plain rule admits.
    ios_left: i64,
    bytes_left: i64,
    /// The queue's place in each active bucket's line, while it waits for
    /// a turn (it holds at most one at a time).
    ticket: Vec<Option<u64>>,
    /// A request that could not go is not tried again before this time
    /// (ns): a waiting queue touches the shared buckets a few thousand
    /// times a second at most, not once per reactor cycle.
    retry_at: u64,
}

/// Most buckets a queue checks: its device's six and its group's six.
const MAX_ACTIVE: usize = 2 * BUCKETS;

/// One bucket with a limit, as a queue sees it.
#[derive(Clone, Copy, Debug)]
struct Active {
    /// Which limiter, and which of its buckets (iops, read_iops,
    /// write_iops, bps, read_bps, write_bps).
    li: usize,
    bi: usize,
    /// Units per second (= thousandths per ms: a grant's worth).
    rate: i64,
    /// Most the bucket holds, thousandths.
    cap: i64,
}

const KINDS: [IoKind; 5] = [
    IoKind::Read,
    IoKind::Write,
    IoKind::Flush,
    IoKind::Discard,
    IoKind::WriteZeroes,
];

/// A grant from a shared bucket is this many milliseconds of its rate (or
/// what a request is missing, if more).
const GRANT_MS: i64 = 4;

/// Shortest and longest pause before a waiting queue tries again.
const RETRY_MIN_NS: u64 = 50_000;
const RETRY_MAX_NS: u64 = 1_000_000;

/// What a request costs bucket `bi`, thousandths.
#[inline]
fn cost(bi: usize, kind: IoKind, bytes: u64) -> i64 {
    let read = kind == IoKind::Read;
    let write = matches!(kind, IoKind::Write | IoKind::Discard | IoKind::WriteZeroes);
    // discard and write-zeroes move no data through the guest
    let data = bytes as i64 * MILLI;
    match bi {
        0 if read || write => MILLI,
        1 if read => MILLI,
        2 if write => MILLI,
        3 | 4 if read => data,
        3 | 5 if kind == IoKind::Write => data,
        _ => 0,
    }
}

impl QueueQos {
    pub fn new(binding: Arc<QosBinding>) -> QueueQos {
        let mut q = QueueQos {
            binding,
            binding_gen: u64::MAX,
            limiters: Vec::new(),
            gens: Vec::new(),
            active: Vec::new(),
            per_io: [[0; MAX_ACTIVE]; 5],
            per_byte: [[0; MAX_ACTIVE]; 5],
            credit: [0; MAX_ACTIVE],
            pend_ios: [0; 5],
            pend_bytes: [0; 5],
            ios_left: 0,
            bytes_left: 0,
            ticket: Vec::new(),
            retry_at: 0,
        };
        q.refresh();
        q
    }

    /// Take up changed limits or group membership (once per cycle: a load
    /// per limiter, and the copy only when something changed).
    #[inline]
    pub fn refresh(&mut self) {
        let g = self.binding.generation.0.load(Ordering::Acquire);
        let mut changed = false;
        if g != self.binding_gen {
            self.binding_gen = g;
            // turns held in the old limiters are passed on first
            self.release_all();
            self.active.clear();
            self.ticket.clear();
            self.limiters = self
                .binding
                .limiters
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            self.gens = vec![u64::MAX; self.limiters.len()];
            changed = true;
        }
        for (i, l) in self.limiters.iter().enumerate() {
            let g = l.generation.0.load(Ordering::Acquire);
            if g != self.gens[i] {
                self.gens[i] = g;
                changed = true;
            }
        }
        if changed {
            self.rebuild();
        }
    }

    /// A new copy of the limited buckets; what the old limits granted
    /// does not carry over, and turns held are passed on.
    #[cold]
    fn rebuild(&mut self) {
        self.release_all();
        self.active.clear();
        for (li, l) in self.limiters.iter().enumerate() {
            for (bi, b) in l.buckets.iter().enumerate() {
                let rate = b.rate.load(Ordering::Relaxed) as i64;
                if rate != 0 {
                    self.active.push(Active {
                        li,
                        bi,
                        rate,
                        cap: b.cap.load(Ordering::Relaxed),
                    });
                }
            }
        }
        // a binding holds its own limiter and at most one group's
        assert!(
            self.active.len() <= MAX_ACTIVE,
            "more limited buckets than a queue checks"
        );
        self.per_io = [[0; MAX_ACTIVE]; 5];
        self.per_byte = [[0; MAX_ACTIVE]; 5];
        for (j, a) in self.active.iter().enumerate() {
            for (k, kind) in KINDS.into_iter().enumerate() {
                self.per_io[k][j] = cost(a.bi, kind, 0);
                self.per_byte[k][j] = cost(a.bi, kind, 1) - self.per_io[k][j];
            }
        }
        self.credit = [0; MAX_ACTIVE];
        self.pend_ios = [0; 5];
        self.pend_bytes = [0; 5];
        self.allow();
        self.ticket = vec![None; self.active.len()];
        self.retry_at = 0;
    }

    /// Spend from the credits what the fast check admitted; whether there
    /// was anything.
    fn settle(&mut self) -> bool {
        let n = self.active.len().min(MAX_ACTIVE);
        let mut any = false;
        for k in 0..5 {
            let (ios, bytes) = (self.pend_ios[k], self.pend_bytes[k]);
            if ios == 0 && bytes == 0 {
                continue;
            }
            any = true;
            for j in 0..n {
                self.credit[j] -= self.per_io[k][j] * ios + self.per_byte[k][j] * bytes;
            }
        }
        self.pend_ios = [0; 5];
        self.pend_bytes = [0; 5];
        any
    }

    /// What the fast check may admit on the credits as they are (settled).
    fn allow(&mut self) {
        const NONE: i64 = i64::MAX / 4;
        let (mut ios, mut bytes) = (NONE, NONE);
        for j in 0..self.active.len().min(MAX_ACTIVE) {
            let per_io = (0..5).map(|k| self.per_io[k][j]).max().unwrap_or(0);
            let per_byte = (0..5).map(|k| self.per_byte[k][j]).max().unwrap_or(0);
            let c = self.credit[j].max(0);
            match (per_io > 0, per_byte > 0) {
                (true, true) => {
                    ios = ios.min(c / 2 / per_io);
                    bytes = bytes.min(c / 2 / per_byte);
                }
                (true, false) => ios = ios.min(c / per_io),
                (false, true) => bytes = bytes.min(c / per_byte),
                (false, false) => {}
            }
        }
        self.ios_left = ios;
        self.bytes_left = bytes;
    }

    /// Whether any limit applies (local: no shared memory, no clock).
    #[inline]
    pub fn active(&self) -> bool {
        !self.active.is_empty()
    }

    /// Admit a request of `kind` and `bytes` now, or say no (it waits).
    /// Without limits this reads no clock.
    #[inline]
    pub fn admit(&mut self, kind: IoKind, bytes: u64) -> bool {
        !self.active() || self.admit_at(kind, bytes, now_ns())
    }

    /// Admit at time `now` (ns of [`now_ns`]), or say no. On yes its cost
    /// is spent from every limited bucket; on no nothing is.
    #[inline]
    pub fn admit_at(&mut self, kind: IoKind, bytes: u64, now: u64) -> bool {
        self.admit_with(kind, bytes, || now)
    }

    /// [`QueueQos::admit_at`] with the time read only if the local credit
    /// does not cover the request (the common case reads no clock).
    #[inline]
    pub fn admit_with(&mut self, kind: IoKind, bytes: u64, now: impl FnOnce() -> u64) -> bool {
        self.admit_local(kind, bytes) || self.admit_slow(kind, bytes, now())
    }

    /// The common case of [`QueueQos::admit_with`]: admit the request if
    /// the local credit covers it; nothing to undo when it does not. No
    /// clock, no shared memory. While the fast allowance lasts (about a
    /// grant's worth of requests) that is two subtractions, a test and
    /// two additions; then the credits are settled and the request is
    /// checked bucket by bucket.
    #[inline(always)]
    pub fn admit_local(&mut self, kind: IoKind, bytes: u64) -> bool {
        let b = bytes as i64;
        self.ios_left -= 1;
        self.bytes_left -= b;
        if (self.ios_left | self.bytes_left) >= 0 {
            let k = kind as usize;
            self.pend_ios[k] += 1;
            self.pend_bytes[k] += b;
            return true;
        }
        self.admit_exact(kind, bytes)
    }

    /// [`QueueQos::admit_local`] past the fast allowance: settle, check
    /// every bucket, spend, and renew the allowance from what is left.
    #[inline(never)]
    fn admit_exact(&mut self, kind: IoKind, bytes: u64) -> bool {
        let settled = self.settle();
        let ok = self.spend_if_covered(kind, bytes);
        if settled || ok {
            self.allow();
        } else {
            // nothing spent: the allowance stands (a waiting queue asks
            // again every cycle; the divisions are not paid each time)
            self.ios_left = self.ios_left.max(-1);
            self.bytes_left = self.bytes_left.max(-1);
        }
        ok
    }

    /// The plain rule on settled credits: if every bucket covers the
    /// request's cost, spend it from each and say yes.
    #[inline]
    fn spend_if_covered(&mut self, kind: IoKind, bytes: u64) -> bool {
        let (per_io, per_byte) = (&self.per_io[kind as usize], &self.per_byte[kind as usize]);
        let b = bytes as i64;
        let c = &mut self.credit;
        let n = self.active.len().min(MAX_ACTIVE);
        let ok = (0..n).all(|j| c[j] >= per_io[j] + per_byte[j] * b);
        if ok {
            for j in 0..n {
                c[j] -= per_io[j] + per_byte[j] * b;
            }
        }
        ok
    }

    /// Whether a request refused before may be tried again at `now` (ns):
    /// the local credit grows only by grants, and after a refusal the
    /// next grant is not sought before the time the buckets named.
    #[inline]
    pub fn may_retry(&self, now: u64) -> bool {
        now >= self.retry_at
    }

    /// Grants from the shared buckets, by turns.
    #[cold]
    #[inline(never)]
    pub(crate) fn admit_slow(&mut self, kind: IoKind, bytes: u64, now: u64) -> bool {
        if now < self.retry_at {
            return false;
        }
        self.settle();
        let ok = self.grant_and_spend(kind, bytes, now);
        self.allow();
        ok
    }

    /// Try again once a bucket of `rate` (thousandths per ms) has accrued
    /// `missing` thousandths (within the shortest and longest pause).
    fn retry_when_accrued(&mut self, now: u64, missing: i64, rate: i64) {
        let wait = missing.max(0) as u64 * 1_000_000 / rate.max(1) as u64;
        self.retry_at = now + wait.clamp(RETRY_MIN_NS, RETRY_MAX_NS);
    }

    fn grant_and_spend(&mut self, kind: IoKind, bytes: u64, now: u64) -> bool {
        for j in 0..self.active.len() {
            let a = self.active[j];
            let c = cost(a.bi, kind, bytes);
            // A request larger than the bucket can ever hold needs only a
            // full bucket to pass; it still pays its whole cost, the credit
            // going into debt that later grants repay, so the rate holds
            // over time and no request waits for ever.
            let need = c.min(a.cap.max(MILLI));
            if c == 0 || self.credit[j] >= need {
                continue;
            }
            if !self.my_turn(j, now) {
                self.retry_at = now + RETRY_MIN_NS;
                return false;
            }
            let lim = &self.limiters[a.li];
            lim.refill(now);
            // a grant: what is missing, or GRANT_MS' worth
            let want = (need - self.credit[j]).max(a.rate.max(1) * GRANT_MS);
            // A queue that is being throttled waits (keeping its turn)
            // until the bucket holds its whole grant, and then takes it
            // at once: its requests go, complete and are signalled in
            // batches, not one wake-up of the guest per request. (The
            // rate is the same; what changes is how many completions
            // each interrupt carries: at 5,000 IOPS a one-token grant
            // meant a wake-up per 3.5 requests, costing an unlimited
            // neighbour on this two-core machine 7 % of its IOPS.)
            let batch = want.min(a.cap.max(MILLI));
            let have = lim.buckets[a.bi].tokens.load(Ordering::Relaxed);
            if have < batch {
                self.retry_when_accrued(now, batch - have.max(0), a.rate);
                return false;
            }
            // (less than a batch would be left: take that too, so that a
            // burst is not cut short by a remainder that waits)
            let want = if have - want < batch { have } else { want };
            self.credit[j] += take(&lim.buckets[a.bi].tokens, want);
            if self.credit[j] < need {
                // still short: keep the turn until the bucket has accrued
                // what is missing
                self.retry_when_accrued(now, need - self.credit[j], a.rate);
                return false;
            }
            self.release(j, now);
        }
        for j in 0..self.active.len() {
            self.credit[j] -= cost(self.active[j].bi, kind, bytes);
        }
        true
    }

    /// Whether it is this queue's turn to take from active bucket `j`,
    /// taking a place in line first if it has none.
    fn my_turn(&mut self, j: usize, now: u64) -> bool {
        let a = self.active[j];
        let b = &self.limiters[a.li].buckets[a.bi];
        let serving = b.serving.load(Ordering::Acquire);
        let t = match self.ticket[j] {
            Some(t) if t >= serving => t,
            // none yet, or skipped while away: to the end of the line
            _ => {
                let t = b.next_ticket.fetch_add(1, Ordering::AcqRel);
                self.ticket[j] = Some(t);
                t
            }
        };
        if t == serving {
            b.heartbeat_ns.store(now, Ordering::Relaxed);
            return true;
        }
        // the queue being served has stopped trying: skip it
        if now.saturating_sub(b.heartbeat_ns.load(Ordering::Relaxed)) > STALL_NS
            && b.serving
                .compare_exchange(serving, serving + 1, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            b.heartbeat_ns.store(now, Ordering::Relaxed);
        }
        false
    }

    /// Give up the place in a bucket's line (the next queue's turn).
    fn release(&mut self, j: usize, now: u64) {
        if let Some(t) = self.ticket[j].take() {
            let a = self.active[j];
            let b = &self.limiters[a.li].buckets[a.bi];
            if b.serving
                .compare_exchange(t, t + 1, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                b.heartbeat_ns.store(now, Ordering::Relaxed);
            }
        }
    }

    fn release_all(&mut self) {
        let now = now_ns();
        for j in 0..self.ticket.len() {
            self.release(j, now);
        }
    }

    /// Count a request that waited `waited_ns` before admission.
    pub fn waited(&self, waited_ns: u64) {
        for l in &self.limiters {
            l.throttled.fetch_add(1, Ordering::Relaxed);
            l.throttled_ns.fetch_add(waited_ns, Ordering::Relaxed);
        }
    }
}

impl Drop for QueueQos {
    fn drop(&mut self) {
        // a queue that goes away in its turn passes it on
        self.release_all();
    }
}

/// Take up to `want` from a bucket, as much as it has (never below zero).
fn take(tokens: &AtomicI64, want: i64) -> i64 {
    // an empty bucket costs a load, not a locked instruction
    if tokens.load(Ordering::Relaxed) <= 0 {
        return 0;
    }
    let mut got = 0;
    let _ = tokens.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |t| {
        got = want.min(t).max(0);
        Some(t - got)
    });
    got
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fast check and the bucket-by-bucket check behind it answer
    /// as the plain rule does (every bucket covers its cost, and only then
    /// is every cost spent), request after request, for any number of
    /// limits, on credits at and around the costs and on credits that run
    /// out part way through a sequence; settled, the credits are the
    /// plain rule's.
    #[test]
    fn the_local_check_is_the_plain_rule_for_any_number_of_limits() {
        let mut q = QueueQos::new(QosBinding::unlimited("t"));
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut rand = |m: i64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % m as u64) as i64
        };
        for n in 1..=MAX_ACTIVE {
            for _ in 0..1_000 {
                q.active = vec![
                    Active {
                        li: 0,
                        bi: 0,
                        rate: 1,
                        cap: 1,
                    };
                    n
                ];
                for k in 0..5 {
                    for j in 0..n {
                        q.per_io[k][j] = rand(3) * MILLI;
                        q.per_byte[k][j] = rand(2) * MILLI;
                    }
                }
                let reqs: Vec<(IoKind, i64)> = (0..30)
                    .map(|_| (KINDS[rand(5) as usize], [0, 1, 512, 4096][rand(4) as usize]))
                    .collect();
                let cost = |q: &QueueQos, (kind, bytes): (IoKind, i64), j: usize| {
                    q.per_io[kind as usize][j] + q.per_byte[kind as usize][j] * bytes
                };
                let near = rand(2) == 0;
                for j in 0..n {
                    q.credit[j] = if near {
                        cost(&q, reqs[0], j) + rand(3) - 1
                    } else {
                        rand(30 * 4096 * MILLI)
                    };
                }
                q.pend_ios = [0; 5];
                q.pend_bytes = [0; 5];
                q.allow();
                let mut model = q.credit;
                for (i, &r) in reqs.iter().enumerate() {
                    let want = (0..n).all(|j| model[j] >= cost(&q, r, j));
                    if want {
                        for (j, m) in model.iter_mut().enumerate().take(n) {
                            *m -= cost(&q, r, j);
                        }
                    }
                    assert_eq!(
                        q.admit_local(r.0, r.1 as u64),
                        want,
                        "{n} limits, request {i}"
                    );
                }
                q.settle();
                assert_eq!(q.credit[..n], model[..n], "{n} limits");
            }
        }
    }

    #[test]
    fn tabulated_costs_are_the_costs() {
        let lim = Limiter::new(
            "t",
            QosLimits {
                iops: 1,
                read_iops: 1,
                write_iops: 1,
                bps: 1,
                read_bps: 1,
                write_bps: 1,
                ..QosLimits::default()
            },
        );
        let mut q = QueueQos::new(QosBinding::new(lim, None));
        q.refresh();
        assert_eq!(q.active.len(), 6, "every bucket limited");
        for (j, a) in q.active.iter().enumerate() {
            for kind in KINDS {
                for bytes in [0, 1, 512, 4096, 1 << 20, u64::from(u32::MAX)] {
                    let k = kind as usize;
                    assert_eq!(
                        q.per_io[k][j] + q.per_byte[k][j] * bytes as i64,
                        cost(a.bi, kind, bytes),
                        "bucket {} {kind:?} {bytes}",
                        a.bi
                    );
                }
            }
        }
    }

    #[test]
    fn a_rate_is_held_and_the_burst_comes_first() {
        let lim = Limiter::new(
            "t",
            QosLimits {
                iops: 1000,
                burst_ms: 10,
                ..Default::default()
            },
        );
        let mut q = QueueQos::new(QosBinding::new(lim.clone(), None));
        let t0 = now_ns();
        // the burst: 10 ms at 1000/s = 10 requests at once
        let burst = (0..100)
            .filter(|_| q.admit_at(IoKind::Read, 4096, t0))
            .count();
        assert!((10..=12).contains(&burst), "{burst}");
        // then 1 per ms: over a simulated second, about 1000
        let mut n = 0;
        for ms in 1..=1000u64 {
            while q.admit_at(IoKind::Read, 4096, t0 + ms * 1_000_000) {
                n += 1;
            }
        }
        assert!((950..=1050).contains(&n), "{n}");
    }

    #[test]
    fn reads_and_writes_and_bytes_are_limited_apart() {
        let lim = Limiter::new(
            "t",
            QosLimits {
                read_iops: 100,
                write_bps: 1 << 20,
                burst_ms: 1000,
                ..Default::default()
            },
        );
        let mut q = QueueQos::new(QosBinding::new(lim.clone(), None));
        let t = now_ns();
        let reads = (0..500)
            .filter(|_| q.admit_at(IoKind::Read, 4096, t))
            .count();
        assert!((100..=101).contains(&reads), "{reads}");
        // writes are limited by bytes only: 1 MiB of burst in 64 KiB writes
        // (another queue: one that waits tries again only later, in order)
        let mut q = QueueQos::new(QosBinding::new(lim, None));
        let writes = (0..500)
            .filter(|_| q.admit_at(IoKind::Write, 65536, t))
            .count();
        assert!((16..=17).contains(&writes), "{writes}");
        // flushes are free
        assert!((0..500).all(|_| q.admit_at(IoKind::Flush, 0, t)));
    }

    #[test]
    fn two_queues_share_one_limit() {
        let lim = Limiter::new(
            "t",
            QosLimits {
                iops: 2000,
                burst_ms: 1,
                ..Default::default()
            },
        );
        let (mut a, mut b) = (
            QueueQos::new(QosBinding::new(lim.clone(), None)),
            QueueQos::new(QosBinding::new(lim, None)),
        );
        let t0 = now_ns();
        let mut n = 0;
        for us in (250..=1_000_000u64).step_by(250) {
            let now = t0 + us * 1000;
            while a.admit_at(IoKind::Read, 512, now) {
                n += 1;
            }
            while b.admit_at(IoKind::Read, 512, now) {
                n += 1;
            }
        }
        assert!((1900..=2100).contains(&n), "{n}");
    }

    /// A queue held at its limit gets its requests in batches of a
    /// grant's worth (GRANT_MS of the rate), not one at a time as tokens
    /// trickle in: the same rate, a few hundred wake-ups of the guest a
    /// second instead of thousands.
    #[test]
    fn a_throttled_queue_is_granted_in_batches() {
        let lim = Limiter::new(
            "t",
            QosLimits {
                iops: 5000,
                burst_ms: 10,
                ..Default::default()
            },
        );
        let mut q = QueueQos::new(QosBinding::new(lim, None));
        let t0 = now_ns();
        let (mut n, mut batches) = (0, 0);
        // a queue that always has requests waiting, polled every 20 µs
        // for a simulated second
        for step in 1..=50_000u64 {
            let now = t0 + step * 20_000;
            if !q.may_retry(now) {
                continue;
            }
            let mut got = 0;
            while q.admit_at(IoKind::Read, 4096, now) {
                got += 1;
            }
            n += got;
            batches += usize::from(got > 0);
        }
        assert!((4900..=5150).contains(&n), "{n} admitted in 1 s");
        let per_batch = n as f64 / batches as f64;
        assert!(
            per_batch >= 0.9 * (5 * GRANT_MS) as f64,
            "{per_batch:.1} requests per batch ({batches} batches)"
        );
    }

    /// A request bigger than the whole burst still passes, and pays.
    #[test]
    fn a_request_larger_than_the_bucket_passes_in_time() {
        let lim = Limiter::new(
            "t",
            QosLimits {
                bps: 1 << 20,
                burst_ms: 1,
                ..Default::default()
            },
        );
        let mut q = QueueQos::new(QosBinding::new(lim, None));
        let t0 = now_ns();
        let mut admitted = Vec::new();
        for ms in 0..=2000u64 {
            if q.admit_at(IoKind::Write, 256 << 10, t0 + ms * 1_000_000) {
                admitted.push(ms);
            }
        }
        // 256 KiB at 1 MiB/s: four a second
        assert!((7..=10).contains(&admitted.len()), "{admitted:?}");
    }

    #[test]
    fn zero_is_no_limit_and_limits_change_at_once() {
        let lim = Limiter::new("t", QosLimits::default());
        assert!(lim.limits().is_unlimited());
        let mut q = QueueQos::new(QosBinding::new(lim.clone(), None));
        let t = now_ns();
        assert!((0..10_000).all(|_| q.admit_at(IoKind::Write, 1 << 20, t)));
        lim.set(QosLimits {
            iops: 10,
            burst_ms: 100,
            ..Default::default()
        });
        q.refresh();
        let n = (0..100)
            .filter(|_| q.admit_at(IoKind::Write, 4096, t))
            .count();
        assert!(n <= 2, "{n}");
        assert!(QosLimits {
            burst_ms: 0,
            ..Default::default()
        }
        .check()
        .is_err());
    }

    /// Two devices in one group share its limit on top of their own; a
    /// device that leaves the group is bound by its own limit alone.
    #[test]
    fn a_group_limits_its_devices_together_and_membership_changes() {
        let g = Limiter::new(
            "g",
            QosLimits {
                iops: 1000,
                burst_ms: 1,
                ..Default::default()
            },
        );
        let own = |n| Limiter::new(n, QosLimits::default());
        let (da, db) = (
            QosBinding::new(own("a"), Some(g.clone())),
            QosBinding::new(own("b"), Some(g.clone())),
        );
        let (mut a, mut b) = (QueueQos::new(da.clone()), QueueQos::new(db));
        let t0 = now_ns();
        let run = |a: &mut QueueQos, b: &mut QueueQos, from_ms: u64| {
            let (mut na, mut nb) = (0, 0);
            for us in (250..=1_000_000u64).step_by(250) {
                let now = t0 + from_ms * 1_000_000 + us * 1000;
                a.refresh();
                b.refresh();
                // two reactors: either may come first
                for turn in [us % 500 == 0, us % 500 != 0] {
                    if turn {
                        while na < 100_000 && a.admit_at(IoKind::Read, 512, now) {
                            na += 1;
                        }
                    } else {
                        while b.admit_at(IoKind::Read, 512, now) {
                            nb += 1;
                        }
                    }
                }
            }
            (na, nb)
        };
        let (na, nb) = run(&mut a, &mut b, 0);
        assert!((950..=1050).contains(&(na + nb)), "{na} + {nb}");
        assert!(na > 300 && nb > 300, "shared unfairly: {na} {nb}");
        da.set_group(None);
        let (na, nb) = run(&mut a, &mut b, 1000);
        assert_eq!(na, 100_000, "a left the group and has no limit of its own");
        assert!((950..=1050).contains(&nb), "{nb}");
        assert!(
            g.throttled.load(Ordering::Relaxed) == 0,
            "admit_at does not count waits"
        );
    }

    /// Queues that always poll in the same order (one reactor, the first
    /// poller always first) still share a limit evenly: grants go by turns.
    #[test]
    fn a_fixed_poll_order_does_not_starve_the_second_queue() {
        let lim = Limiter::new(
            "t",
            QosLimits {
                iops: 2000,
                burst_ms: 1,
                ..Default::default()
            },
        );
        let (mut a, mut b) = (
            QueueQos::new(QosBinding::new(lim.clone(), None)),
            QueueQos::new(QosBinding::new(lim, None)),
        );
        let t0 = now_ns();
        let (mut na, mut nb) = (0, 0);
        for us in (50..=1_000_000u64).step_by(50) {
            let now = t0 + us * 1000;
            while a.admit_at(IoKind::Read, 512, now) {
                na += 1;
            }
            while b.admit_at(IoKind::Read, 512, now) {
                nb += 1;
            }
        }
        assert!((1900..=2100).contains(&(na + nb)), "{na} + {nb}");
        assert!((na as i64 - nb as i64).abs() < 200, "unfair: {na} {nb}");
    }

    /// A queue that takes its turn and goes away does not stop the others
    /// for long.
    #[test]
    fn a_queue_gone_in_its_turn_is_skipped() {
        let lim = Limiter::new(
            "t",
            QosLimits {
                iops: 1000,
                burst_ms: 1,
                ..Default::default()
            },
        );
        let (mut a, mut b) = (
            QueueQos::new(QosBinding::new(lim.clone(), None)),
            QueueQos::new(QosBinding::new(lim, None)),
        );
        let t0 = now_ns();
        // a drains the burst and waits in its turn, then never comes back
        while a.admit_at(IoKind::Read, 512, t0) {}
        std::mem::forget(a);
        let mut first = None;
        for ms in 1..100u64 {
            if b.admit_at(IoKind::Read, 512, t0 + ms * 1_000_000) {
                first = Some(ms);
                break;
            }
        }
        let first = first.expect("b never admitted");
        assert!(first <= 7, "b waited {first} ms");
    }

    /// A queue waiting for read tokens does not hold up another queue's
    /// writes, which have a budget of their own.
    #[test]
    fn waiting_reads_do_not_hold_up_writes() {
        let lim = Limiter::new(
            "t",
            QosLimits {
                read_iops: 10,
                write_iops: 1000,
                burst_ms: 1,
                ..Default::default()
            },
        );
        let mut r = QueueQos::new(QosBinding::new(lim.clone(), None));
        let mut w = QueueQos::new(QosBinding::new(lim, None));
        let t0 = now_ns();
        let mut writes = 0;
        for ms in 1..=100u64 {
            let now = t0 + ms * 1_000_000;
            // the reader is always short, and always first
            let _ = r.admit_at(IoKind::Read, 4096, now);
            while w.admit_at(IoKind::Write, 4096, now) {
                writes += 1;
            }
        }
        assert!((90..=110).contains(&writes), "{writes}");
    }
}
