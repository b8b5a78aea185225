//! Usage accounting. The data plane only bumps in-memory counters; a background task
//! flushes the deltas to redb in one write transaction per interval. Reports add the
//! not-yet-flushed deltas so they are always current.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Instant;

use chrono::{DateTime, NaiveDate, Utc};
use dashmap::DashMap;
use http::{HeaderValue, Method};
use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use arc_swap::ArcSwapOption;

use crate::keyindex::{hash_id, KeyId};
use crate::keys::{rfc3339, LastUsed};
use crate::keystate::{KeyState, KeyStates};
use crate::manage::LastUsedSource;
use crate::prefetch::Lines;
use crate::store::{Store, StoreError};

/// (key id, day number, deployment, operation, status class) → requests.
const USAGE: TableDefinition<UsageKey, u64> = TableDefinition::new("usage");
/// The same table as the flush writes it: keys as their encoded bytes (see [`UsageRowKey`]).
const USAGE_ROWS: TableDefinition<UsageRowKey, u64> = TableDefinition::new("usage");

/// The usage table's key.
type UsageKey = (&'static str, u32, &'static str, &'static str, u8);

/// The usage table's key as its encoded bytes, compared without decoding them.
///
/// redb stores a tuple key as the lengths of all elements but the last, then the elements;
/// its compare decodes every string element with a UTF-8 check, which was the largest part of
/// a flush's CPU (two B-tree descents a row, each a few dozen compares). UTF-8 text orders as
/// its bytes do, so comparing the bytes orders rows exactly as the tuple does, and the type
/// name is the tuple's, so this opens the same table (unit test: both orders agree).
#[derive(Debug)]
struct UsageRowKey;

impl redb::Value for UsageRowKey {
    type SelfType<'a>
        = &'a [u8]
    where
        Self: 'a;
    type AsBytes<'a>
        = &'a [u8]
    where
        Self: 'a;

    fn fixed_width() -> Option<usize> {
        None
    }

    fn from_bytes<'a>(data: &'a [u8]) -> &'a [u8]
    where
        Self: 'a,
    {
        data
    }

    fn as_bytes<'a, 'b: 'a>(value: &'a &'b [u8]) -> &'a [u8]
    where
        Self: 'b,
    {
        value
    }

    fn type_name() -> redb::TypeName {
        <UsageKey as redb::Value>::type_name()
    }
}

impl redb::Key for UsageRowKey {
    fn compare(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
        match (UsageKeyParts::parse(a), UsageKeyParts::parse(b)) {
            (Some(a), Some(b)) => a.cmp(&b),
            // Not a key this table holds (a damaged page): by bytes, without a panic.
            _ => a.cmp(b),
        }
    }
}

/// A usage key's elements, borrowed from its encoding. The derived order is the tuple's:
/// element by element, strings by their bytes, numbers by value.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct UsageKeyParts<'a> {
    key: &'a [u8],
    day: u32,
    deployment: &'a [u8],
    operation: &'a [u8],
    class: u8,
}

impl<'a> UsageKeyParts<'a> {
    /// Reads redb's encoding of a [`UsageKey`]: four little-endian `u32` lengths (key id, day,
    /// deployment, operation), those elements, then the class.
    fn parse(data: &'a [u8]) -> Option<Self> {
        let (lens, mut rest) = data.split_first_chunk::<16>()?;
        let mut take = |i: usize| -> Option<&'a [u8]> {
            let len = u32::from_le_bytes(lens[4 * i..4 * i + 4].try_into().ok()?) as usize;
            let (element, tail) = rest.split_at_checked(len)?;
            rest = tail;
            Some(element)
        };
        let key = take(0)?;
        let day = u32::from_le_bytes(take(1)?.try_into().ok()?);
        let (deployment, operation) = (take(2)?, take(3)?);
        let [class] = rest.try_into().ok()?;
        Some(UsageKeyParts {
            key,
            day,
            deployment,
            operation,
            class,
        })
    }
}
/// key id → JSON of [`StoredLastUse`].
const LAST_USED: TableDefinition<&str, &[u8]> = TableDefinition::new("last_used");

/// One report row: (day, deployment, operation, status class, requests).
type UsageRow = (u32, String, String, u8, u64);

/// The status class index of a status code (1xx counts with 2xx).
pub fn class_of(status: u16) -> u8 {
    match status {
        0..=299 => 0,
        300..=399 => 1,
        400..=499 => 2,
        _ => 3,
    }
}

/// Days since 1970-01-01 (UTC) for a Unix time.
pub fn day_number(unix_secs: i64) -> u32 {
    u32::try_from(unix_secs.div_euclid(86_400)).unwrap_or(0)
}

fn day_date(day: u32) -> NaiveDate {
    DateTime::<Utc>::from_timestamp(i64::from(day) * 86_400, 0)
        .unwrap_or_default()
        .date_naive()
}

/// The operation a request counts under: a route's name, or the method when no rule matched.
// Equality only adds a pointer fast path to content equality, so the derived Hash agrees.
#[allow(clippy::derived_hash_with_manual_eq)]
#[derive(Debug, Clone, Eq, Hash)]
pub enum Operation {
    /// A named route rule.
    Route(Arc<str>),
    /// No rule: the method.
    Method(Method),
}

impl PartialEq for Operation {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            // Within one configuration the same name is the same allocation: skip the compare.
            (Operation::Route(a), Operation::Route(b)) => Arc::ptr_eq(a, b) || a == b,
            (Operation::Method(a), Operation::Method(b)) => a == b,
            _ => false,
        }
    }
}

impl Operation {
    /// The name used in reports.
    pub fn as_str(&self) -> &str {
        match self {
            Operation::Route(r) => r,
            Operation::Method(m) => m.as_str(),
        }
    }
}

/// A counter's identity as stored in the map.
#[derive(Debug, Clone)]
struct CounterKey {
    key: KeyId,
    day: u32,
    deployment: Arc<str>,
    operation: Operation,
    class: u8,
}

/// A counter's identity by reference: what a request looks its counter up with, so the
/// lookup clones (and reference-counts) nothing.
#[derive(Clone, Copy)]
struct CounterParts<'a> {
    key: &'a KeyId,
    day: u32,
    deployment: &'a Arc<str>,
    operation: &'a Operation,
    class: u8,
}

impl PartialEq for CounterParts<'_> {
    fn eq(&self, o: &Self) -> bool {
        self.day == o.day
            && self.class == o.class
            // A key's counters share its state's id: this is a pointer compare.
            && self.key == o.key
            && (Arc::ptr_eq(self.deployment, o.deployment) || self.deployment == o.deployment)
            && self.operation == o.operation
    }
}

/// Owned and borrowed counter identities alike, so the map (keyed by [`CounterKey`]) can be
/// probed with a [`CounterParts`] through `Borrow<dyn CounterIdentity>`.
trait CounterIdentity {
    fn parts(&self) -> CounterParts<'_>;
}

impl CounterKey {
    /// Its row's key in the usage table, encoded.
    fn row_key(&self) -> Vec<u8> {
        <UsageKey as redb::Value>::as_bytes(&(
            self.key.as_str(),
            self.day,
            &*self.deployment,
            self.operation.as_str(),
            self.class,
        ))
    }
}

impl CounterIdentity for CounterKey {
    fn parts(&self) -> CounterParts<'_> {
        CounterParts {
            key: &self.key,
            day: self.day,
            deployment: &self.deployment,
            operation: &self.operation,
            class: self.class,
        }
    }
}

impl CounterIdentity for CounterParts<'_> {
    fn parts(&self) -> CounterParts<'_> {
        *self
    }
}

impl PartialEq for dyn CounterIdentity + '_ {
    fn eq(&self, o: &Self) -> bool {
        self.parts() == o.parts()
    }
}

impl Eq for dyn CounterIdentity + '_ {}

// Hashes the key and day only: a key has few deployment × operation × class counters a
// day, and equality sorts those out; hashing the names too cost more than the collisions.
impl std::hash::Hash for dyn CounterIdentity + '_ {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let p = self.parts();
        hash_id(p.key.as_bytes(), state);
        state.write_u32(p.day);
    }
}

impl<'a> std::borrow::Borrow<dyn CounterIdentity + 'a> for CounterKey {
    fn borrow(&self) -> &(dyn CounterIdentity + 'a) {
        self
    }
}

// Both agree with the `dyn CounterIdentity` forms, as `Borrow` requires.
impl PartialEq for CounterKey {
    fn eq(&self, o: &Self) -> bool {
        self.parts() == o.parts()
    }
}

impl Eq for CounterKey {}

impl std::hash::Hash for CounterKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (self as &dyn CounterIdentity).hash(state);
    }
}

/// Set in a counter the flush has dropped from the map (it was a past day's and at zero): a
/// request that still holds it counts again through the map.
const RETIRED: u64 = 1 << 63;

/// One in-memory counter: the requests not yet flushed, and (for the per-key cache) what it
/// counts.
#[derive(Debug)]
struct CounterCell {
    count: AtomicU64,
    identity: CounterKey,
    /// Its row's total as the last committed flush left it ([`UNKNOWN_TOTAL`] until then):
    /// the next flush writes total + delta without reading the row first, one B-tree descent
    /// a row instead of two. Only the flush, `prune` and `delete_key` write usage rows, each
    /// under the flush lock; `prune` forgets the totals of the days it deletes, and
    /// `delete_key` drops the cells.
    stored_total: AtomicU64,
}

/// [`CounterCell::stored_total`] before the cell's row has been written (or after a prune).
const UNKNOWN_TOTAL: u64 = u64::MAX;

impl CounterCell {
    /// True when this cell counts the requests `probe` describes.
    fn counts(&self, probe: &CounterParts<'_>) -> bool {
        self.identity.parts() == *probe
    }

    /// Counts one request; false when the cell was retired (the count went nowhere).
    fn add(&self) -> bool {
        self.count.fetch_add(1, Ordering::Relaxed) & RETIRED == 0
    }

    /// Requests counted and not yet flushed.
    fn pending(&self) -> u64 {
        self.count.load(Ordering::Acquire) & !RETIRED
    }
}

/// The counter a key counted its last request in (in its `keystate::KeyState`): a request
/// counting under the same day, deployment, operation and class (nearly all of them) bumps
/// it without a map lookup: one pointer hop from the key's state instead of hashing and
/// probing a map of every key's counters, a few dependent cache misses with many keys.
#[derive(Default)]
pub struct RecentCounter {
    cell: ArcSwapOption<CounterCell>,
    /// The cell's address, for prefetching only (see `keystate::KeyLines`): a plain load,
    /// where loading `cell` costs `ArcSwap`'s protection. Never dereferenced.
    address: AtomicUsize,
}

impl RecentCounter {
    /// The address of the counter's memory and its size, for a prefetch hint; `None` before
    /// the key's first request. It may be stale by the time it is used (another request of
    /// the key replaced the counter): a prefetch of it then only loads a line for nothing.
    pub fn lines(&self) -> Option<Lines> {
        counter_lines(self.address())
    }

    /// The counter's address (0 before the key's first request); only a hint, see `lines`.
    pub fn address(&self) -> usize {
        self.address.load(Ordering::Relaxed)
    }

    /// Makes `cell` the counter of the key's last request.
    fn set(&self, cell: Arc<CounterCell>) {
        self.address
            .store(Arc::as_ptr(&cell) as usize, Ordering::Relaxed);
        self.cell.store(Some(cell));
    }
}

/// The memory of the counter at address `at` (as [`RecentCounter::address`] gave it; 0 for
/// none), for a prefetch hint.
pub fn counter_lines(at: usize) -> Option<Lines> {
    (at != 0).then(|| Lines::new(at, std::mem::size_of::<CounterCell>()))
}

/// The client address and user agent of a key's last use.
#[derive(Debug)]
struct Seen {
    ip: IpAddr,
    user_agent: Option<HeaderValue>,
}

/// A key's last use (in its `keystate::KeyState`), written lock-free by every request and
/// read by the flush and reports.
pub struct LastUseCell {
    /// Unix seconds; 0 = not used since start.
    at: AtomicI64,
    /// Changed since the flush last wrote it.
    dirty: AtomicBool,
    /// `at` as last written to the store (the flush's own bookkeeping).
    stored_at: AtomicI64,
    /// Replaced only when the address or user agent changes (a key's clients rarely do).
    seen: ArcSwapOption<Seen>,
}

impl Default for LastUseCell {
    fn default() -> Self {
        LastUseCell {
            at: AtomicI64::new(0),
            dirty: AtomicBool::new(false),
            stored_at: AtomicI64::new(i64::MIN),
            seen: ArcSwapOption::empty(),
        }
    }
}

impl LastUseCell {
    fn record(&self, now: i64, ip: IpAddr, user_agent: Option<&HeaderValue>) {
        // Kept to the second, like the time: a second already recorded stays as its first
        // request left it (one load, where comparing address and user agent cost ~10 ns).
        if self.at.load(Ordering::Relaxed) == now {
            return;
        }
        let unchanged = self
            .seen
            .load()
            .as_deref()
            .is_some_and(|s| s.ip == ip && s.user_agent.as_ref() == user_agent);
        if !unchanged {
            self.seen.store(Some(Arc::new(Seen {
                ip,
                user_agent: user_agent.cloned(),
            })));
        }
        self.at.store(now, Ordering::Relaxed);
        // Release: whoever sees the flag set sees the values above.
        self.dirty.store(true, Ordering::Release);
    }

    /// The last use as stored, when the key was used since start.
    fn snapshot(&self) -> Option<StoredLastUse> {
        let at = self.at.load(Ordering::Acquire);
        let seen = self.seen.load_full()?;
        (at != 0).then(|| StoredLastUse {
            at,
            ip: seen.ip.to_string(),
            user_agent: seen
                .user_agent
                .as_ref()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
        })
    }

    /// Takes the change for a flush: the snapshot when the key changed since the last write
    /// and (unless `all`) that write is old enough.
    fn take_due(&self, all: bool) -> Option<StoredLastUse> {
        if !self.dirty.load(Ordering::Acquire) {
            return None;
        }
        let at = self.at.load(Ordering::Relaxed);
        let stored_at = self.stored_at.load(Ordering::Relaxed);
        if !all && at.saturating_sub(stored_at) < LAST_USED_PERSIST_SECS {
            return None;
        }
        // Cleared before reading (a read-modify-write, so it sees the latest request's flag
        // and values), and a request landing after this leaves it set for next time.
        self.dirty.swap(false, Ordering::AcqRel);
        let snap = self.snapshot()?;
        self.stored_at.store(snap.at, Ordering::Relaxed);
        Some(snap)
    }

    /// Marks the last use as not yet written (after a failed flush).
    fn mark_dirty(&self) {
        self.dirty.store(true, Ordering::Release);
    }
}

/// A busy key's last-use row is rewritten at most this often by the periodic flush (reports
/// read the in-memory value, and shutdown writes everything).
const LAST_USED_PERSIST_SECS: i64 = 30;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredLastUse {
    at: i64,
    ip: String,
    user_agent: Option<String>,
}

/// One request to count.
pub struct Hit<'a> {
    /// The key's state (from [`Usage::key_states`]): its id, cached counter and last use.
    pub state: &'a KeyState,
    /// Deployment name.
    pub deployment: &'a Arc<str>,
    /// Operation.
    pub operation: &'a Operation,
    /// Response status.
    pub status: u16,
    /// Unix seconds.
    pub now: i64,
    /// Client address.
    pub ip: IpAddr,
    /// User agent.
    pub user_agent: Option<&'a HeaderValue>,
}

/// Reads usage for reports (admin API, CLI).
pub trait UsageReader: Send + Sync {
    /// The usage report for `id` over the last `days` days (SPEC §3).
    fn report(&self, id: &str, days: u32) -> Result<Value, StoreError>;
    /// The summary shown with a key (the 7-day report).
    fn summary(&self, id: &str) -> Result<Value, StoreError> {
        self.report(id, 7)
    }
}

/// Usage counters and their persistence.
pub struct Usage {
    store: Arc<Store>,
    /// Every counter. A key's [`RecentCounter`] shares one of them.
    counters: DashMap<CounterKey, Arc<CounterCell>, foldhash::fast::RandomState>,
    /// Per-key state: the last uses live there (and the limiters, for the gateway).
    states: KeyStates,
    /// Held for writing across a flush (read counters → commit → subtract) and a key's
    /// deletion, and for reading while a report merges stored rows with pending counters, so
    /// that a report never sees a count twice or not at all, flushes never overlap, and a
    /// flush cannot write back rows of a key deleted meanwhile. The request path never takes it.
    flush_lock: RwLock<()>,
    /// Seconds the last flush took (for metrics), in microseconds.
    pub last_flush_micros: AtomicU64,
}

impl Usage {
    /// Usage over `store` (creates its tables).
    pub fn new(store: Arc<Store>) -> Result<Self, StoreError> {
        let txn = store.database().begin_write()?;
        txn.open_table(USAGE)?;
        txn.open_table(LAST_USED)?;
        txn.commit()?;
        Ok(Usage {
            store,
            counters: DashMap::default(),
            states: KeyStates::default(),
            flush_lock: RwLock::new(()),
            last_flush_micros: AtomicU64::new(0),
        })
    }

    /// Every key's per-request state.
    pub fn key_states(&self) -> &KeyStates {
        &self.states
    }

    /// Counts one request. No disk, no await, no allocation once the counter exists.
    pub fn record(&self, hit: Hit<'_>) {
        let probe = CounterParts {
            key: hit.state.id(),
            day: day_number(hit.now),
            deployment: hit.deployment,
            operation: hit.operation,
            class: class_of(hit.status),
        };
        let recent = &hit.state.recent;
        let counted = recent
            .cell
            .load()
            .as_deref()
            .is_some_and(|c| c.counts(&probe) && c.add());
        if !counted {
            recent.set(self.count_in_map(&probe));
        }
        hit.state.last_use.record(hit.now, hit.ip, hit.user_agent);
    }

    /// Counts one request through the map (its counter made when it has none); returns the
    /// counter, for the key's cache.
    fn count_in_map(&self, probe: &CounterParts<'_>) -> Arc<CounterCell> {
        loop {
            let cell = match self.counters.get(probe as &dyn CounterIdentity) {
                Some(c) => c.clone(),
                None => {
                    let key = CounterKey {
                        key: probe.key.clone(),
                        day: probe.day,
                        deployment: probe.deployment.clone(),
                        operation: probe.operation.clone(),
                        class: probe.class,
                    };
                    self.counters
                        .entry(key.clone())
                        .or_insert_with(|| {
                            Arc::new(CounterCell {
                                count: AtomicU64::new(0),
                                identity: key,
                                stored_total: AtomicU64::new(UNKNOWN_TOTAL),
                            })
                        })
                        .clone()
                }
            };
            // Retired between the lookup and the add: it has left the map; look again.
            if cell.add() {
                return cell;
            }
        }
    }

    /// Requests counted but not yet committed to the store. A request leaves this count only
    /// once the transaction holding it has committed, so `0` means everything counted so far
    /// is on disk.
    pub fn pending(&self) -> u64 {
        self.counters.iter().map(|c| c.value().pending()).sum()
    }

    /// Writes all deltas in one transaction. The in-memory counters are decreased only after
    /// the commit, so a crash or a failed write loses nothing that was counted before the
    /// flush began, and failures leave the counts for the next try.
    pub fn flush(&self) -> Result<u64, StoreError> {
        self.flush_with(true)
    }

    /// The periodic flush: every count, but a busy key's last-use row only every
    /// [`LAST_USED_PERSIST_SECS`] (it is the bulk of a flush with many active keys).
    pub fn flush_due(&self) -> Result<u64, StoreError> {
        self.flush_with(false)
    }

    fn flush_with(&self, all_last_used: bool) -> Result<u64, StoreError> {
        let _guard = self
            .flush_lock
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let started = Instant::now();
        // The cells themselves, not their keys: after the commit each is decreased directly,
        // with no second lookup (nothing can take a cell with pending counts out of the map
        // while the flush lock is held).
        let deltas: Vec<(Arc<CounterCell>, u64)> = self
            .counters
            .iter()
            .filter_map(|c| {
                let n = c.value().pending();
                (n > 0).then(|| (c.value().clone(), n))
            })
            .collect();
        let mut lasts: Vec<(KeyId, Arc<KeyState>, StoredLastUse)> = Vec::new();
        self.states.for_each(|id, state| {
            if let Some(l) = state.last_use.take_due(all_last_used) {
                lasts.push((id.clone(), state.clone(), l));
            }
        });
        if deltas.is_empty() && lasts.is_empty() {
            return Ok(0);
        }
        let result = self.write(&deltas, &lasts);
        match &result {
            Ok(totals) => {
                // Only what was written leaves the counters; requests counted meanwhile stay.
                for ((cell, n), total) in deltas.iter().zip(totals) {
                    cell.count.fetch_sub(*n, Ordering::AcqRel);
                    cell.stored_total.store(*total, Ordering::Relaxed);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "usage flush failed; keeping the counts for the next try");
                for (_, state, _) in &lasts {
                    state.last_use.mark_dirty();
                }
            }
        }
        // Counters of past days that stayed at zero are done with. `retain` write-locks every
        // shard in turn, and this thread runs at nice 19: a request needing a shard it holds
        // would wait for it to be scheduled again (p99 rose ~0.8 ms under load). So look first
        // (read locks only) and remove only when something is there to remove. A removed
        // counter is retired first (only at zero, atomically), so a request still holding it
        // in its key's cache counts through the map instead of into a counter nobody flushes.
        let today = day_number(Utc::now().timestamp());
        let spent = |k: &CounterKey, c: &CounterCell| k.day < today && c.pending() == 0;
        if self.counters.iter().any(|c| spent(c.key(), c.value())) {
            self.counters.retain(|k, c| {
                !(spent(k, c)
                    && c.count
                        .compare_exchange(0, RETIRED, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok())
            });
        }
        self.last_flush_micros
            .store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        result.map(|_| deltas.iter().map(|(_, n)| n).sum())
    }

    /// Writes the deltas and last uses in one transaction; returns each delta's row total as
    /// written (in `deltas` order), for the cells to remember once it has committed.
    fn write(
        &self,
        deltas: &[(Arc<CounterCell>, u64)],
        lasts: &[(KeyId, Arc<KeyState>, StoredLastUse)],
    ) -> Result<Vec<u64>, StoreError> {
        // In key order: the B-tree's pages are then visited once each, in sequence, instead
        // of at random (the counters come out of a hash map).
        let mut rows: Vec<(Vec<u8>, usize)> = deltas
            .iter()
            .enumerate()
            .map(|(i, (cell, _))| (cell.identity.row_key(), i))
            .collect();
        rows.sort_unstable_by(|(a, _), (b, _)| <UsageRowKey as redb::Key>::compare(a, b));
        let mut totals = vec![0; deltas.len()];
        let txn = self.store.database().begin_write()?;
        {
            let mut usage = txn.open_table(USAGE_ROWS)?;
            for (row, (key, i)) in rows.iter().enumerate() {
                offer_cpu_every_few_rows(row);
                let (cell, n) = &deltas[*i];
                let stored = match cell.stored_total.load(Ordering::Relaxed) {
                    UNKNOWN_TOTAL => usage.get(key.as_slice())?.map(|v| v.value()).unwrap_or(0),
                    known => known,
                };
                totals[*i] = stored + n;
                usage.insert(key.as_slice(), totals[*i])?;
            }
            let mut last = txn.open_table(LAST_USED)?;
            for (i, (k, _, l)) in lasts.iter().enumerate() {
                offer_cpu_every_few_rows(i);
                let bytes =
                    serde_json::to_vec(l).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                last.insert(&**k, bytes.as_slice())?;
            }
        }
        txn.commit()?;
        Ok(totals)
    }

    /// Deletes rows older than `retention_days`. Returns how many went.
    pub fn prune(&self, retention_days: u32) -> Result<u64, StoreError> {
        // Under the flush lock: a flush between the delete and the forgetting below would
        // write a deleted row back from its remembered total.
        let _guard = self
            .flush_lock
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let cutoff =
            day_number(Utc::now().timestamp()).saturating_sub(retention_days.saturating_sub(1));
        // Forgotten first, so a failed commit leaves nothing remembered that may be gone.
        for c in self.counters.iter() {
            if c.key().day < cutoff {
                c.value()
                    .stored_total
                    .store(UNKNOWN_TOTAL, Ordering::Relaxed);
            }
        }
        let txn = self.store.database().begin_write()?;
        let mut removed = 0;
        {
            let mut usage = txn.open_table(USAGE)?;
            usage.retain(|(_, day, _, _, _), _| {
                let keep = day >= cutoff;
                if !keep {
                    removed += 1;
                }
                keep
            })?;
        }
        txn.commit()?;
        Ok(removed)
    }

    /// Removes a key's usage from disk and memory.
    pub fn delete_key(&self, id: &str) -> Result<(), StoreError> {
        let _guard = self
            .flush_lock
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        self.counters.retain(|k, _| &*k.key != id);
        self.states.forget(id);
        let txn = self.store.database().begin_write()?;
        {
            let mut usage = txn.open_table(USAGE)?;
            usage.retain_in(
                (id, 0u32, "", "", 0u8)..=(id, u32::MAX, "\u{10FFFF}", "\u{10FFFF}", u8::MAX),
                |_, _| false,
            )?;
            txn.open_table(LAST_USED)?.remove(id)?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Rows (day, deployment, operation, class, count) for `id` from day `from` on,
    /// stored plus pending.
    fn rows(&self, id: &str, from: u32) -> Result<Vec<UsageRow>, StoreError> {
        let mut merged: BTreeMap<(u32, String, String, u8), u64> = BTreeMap::new();
        let _guard = self
            .flush_lock
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let txn = self.store.database().begin_read()?;
        let usage = txn.open_table(USAGE)?;
        for row in usage
            .range((id, from, "", "", 0u8)..=(id, u32::MAX, "\u{10FFFF}", "\u{10FFFF}", u8::MAX))?
        {
            let (k, v) = row?;
            let (_, day, dep, op, class) = k.value();
            *merged
                .entry((day, dep.to_string(), op.to_string(), class))
                .or_default() += v.value();
        }
        for c in self.counters.iter() {
            let k = c.key();
            let n = c.value().pending();
            if &*k.key == id && k.day >= from && n > 0 {
                *merged
                    .entry((
                        k.day,
                        k.deployment.to_string(),
                        k.operation.as_str().to_string(),
                        k.class,
                    ))
                    .or_default() += n;
            }
        }
        Ok(merged
            .into_iter()
            .map(|((d, dep, op, c), n)| (d, dep, op, c, n))
            .collect())
    }

    fn stored_last(&self, id: &str) -> Option<StoredLastUse> {
        if let Some(l) = self.states.get(id).and_then(|s| s.last_use.snapshot()) {
            return Some(l);
        }
        let txn = self.store.database().begin_read().ok()?;
        let table = txn.open_table(LAST_USED).ok()?;
        let v = table.get(id).ok()??;
        serde_json::from_slice(v.value()).ok()
    }
}

fn share(part: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        ((part as f64 / total as f64) * 1000.0).round() / 1000.0
    }
}

fn ranked(map: BTreeMap<String, u64>, total: u64) -> Vec<Value> {
    let mut items: Vec<(String, u64)> = map.into_iter().collect();
    items.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    items
        .into_iter()
        .map(|(name, n)| json!({"name": name, "requests": n, "share": share(n, total)}))
        .collect()
}

impl UsageReader for Usage {
    fn report(&self, id: &str, days: u32) -> Result<Value, StoreError> {
        let days = days.max(1);
        let today = day_number(Utc::now().timestamp());
        let from = today.saturating_sub(days - 1);
        let rows = self.rows(id, from)?;
        let mut per_day: BTreeMap<u32, u64> = (from..=today).map(|d| (d, 0)).collect();
        let mut by_op: BTreeMap<String, u64> = BTreeMap::new();
        let mut by_dep: BTreeMap<String, u64> = BTreeMap::new();
        let mut by_class = [0u64; 4];
        let mut total = 0;
        for (day, dep, op, class, n) in rows {
            *per_day.entry(day).or_default() += n;
            *by_op.entry(op).or_default() += n;
            *by_dep.entry(dep).or_default() += n;
            by_class[usize::from(class.min(3))] += n;
            total += n;
        }
        let errors = by_class[2] + by_class[3];
        let last = self.stored_last(id);
        let avg = ((total as f64 / f64::from(days)) * 10.0).round() / 10.0;
        Ok(json!({
            "key_id": id,
            "days": per_day.iter().map(|(d, n)| json!({"date": day_date(*d).to_string(), "requests": n})).collect::<Vec<_>>(),
            "total": total,
            "avg_per_day": avg,
            "by_operation": ranked(by_op, total),
            "by_deployment": ranked(by_dep, total),
            "by_status": {"2xx": by_class[0], "3xx": by_class[1], "4xx": by_class[2], "5xx": by_class[3]},
            "error_rate": share(errors, total),
            "last_used_at": last.as_ref().and_then(|l| DateTime::<Utc>::from_timestamp(l.at, 0)).map(|t| rfc3339(&t)),
            "last_used_ip": last.as_ref().map(|l| l.ip.clone()),
            "last_used_user_agent": last.as_ref().and_then(|l| l.user_agent.clone()),
        }))
    }
}

impl LastUsedSource for Usage {
    fn last_used(&self, id: &str) -> LastUsed {
        match self.stored_last(id) {
            None => LastUsed::default(),
            Some(l) => LastUsed {
                at: DateTime::<Utc>::from_timestamp(l.at, 0),
                ip: Some(l.ip),
                user_agent: l.user_agent,
            },
        }
    }

    fn forget(&self, id: &str) {
        if let Err(e) = self.delete_key(id) {
            tracing::error!(error = %e, key_id = id, "could not delete the key's usage");
        }
    }
}

/// Rows a flush writes between two offers of the CPU to other threads.
const ROWS_PER_YIELD: usize = 64;

/// Every [`ROWS_PER_YIELD`] rows, lets a waiting data-plane thread run: the flush shares a
/// core with the data plane, and its long unbroken runs showed in the tail latency.
fn offer_cpu_every_few_rows(row: usize) {
    if row % ROWS_PER_YIELD == ROWS_PER_YIELD - 1 {
        std::thread::yield_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    /// A `200` from 127.0.0.1 without a user agent.
    fn ok_hit<'a>(
        state: &'a KeyState,
        deployment: &'a Arc<str>,
        operation: &'a Operation,
        now: i64,
    ) -> Hit<'a> {
        Hit {
            state,
            deployment,
            operation,
            status: 200,
            now,
            ip: IpAddr::from([127, 0, 0, 1]),
            user_agent: None,
        }
    }

    fn stored_total(store: &Store, id: &str) -> u64 {
        let txn = store.database().begin_read().unwrap();
        let table = txn.open_table(USAGE).unwrap();
        let rows = table
            .range((id, 0u32, "", "", 0u8)..=(id, u32::MAX, "\u{10FFFF}", "\u{10FFFF}", u8::MAX))
            .unwrap();
        rows.map(|r| r.unwrap().1.value()).sum()
    }

    /// Encodes a usage key as redb does.
    fn encoded(k: (&str, u32, &str, &str, u8)) -> Vec<u8> {
        <UsageKey as redb::Value>::as_bytes(&k)
    }

    #[test]
    fn row_keys_order_exactly_as_the_tuple_does() {
        use redb::Key;
        // Strings that are prefixes of one another, empty, non-ASCII (multi-byte UTF-8 sorts
        // after ASCII and by code point), and days and classes whose little-endian bytes
        // order differently from their values (1 < 256, but [1, 0] > [0, 1]).
        let texts = [
            "", "a", "ab", "b", "a\u{0}", "é", "z", "€", "key_A", "key_a",
        ];
        let days = [0u32, 1, 255, 256, 257, 65_535, 65_536, 20_000, u32::MAX];
        let (names, classes) = (["", "a", "ab", "é"], [1u8, 0]);
        let mut keys = Vec::new();
        for key in texts {
            for day in days {
                for dep in names {
                    for op in names.iter().rev() {
                        for class in classes {
                            keys.push((key, day, dep, *op, class));
                        }
                    }
                }
            }
        }
        let bytes: Vec<Vec<u8>> = keys.iter().map(|k| encoded(*k)).collect();
        // Both orders sort every key to the same place...
        let sorted_by = |compare: fn(&[u8], &[u8]) -> std::cmp::Ordering| {
            let mut sorted = bytes.clone();
            sorted.sort_by(|a, b| compare(a, b));
            sorted
        };
        assert!(sorted_by(UsageRowKey::compare) == sorted_by(UsageKey::compare));
        // ...and agree on every pair among a spread of them.
        for a in bytes.iter().step_by(7) {
            for b in bytes.iter().step_by(5) {
                assert_eq!(UsageRowKey::compare(a, b), UsageKey::compare(a, b));
            }
        }
        // The type name is the tuple's: the same table opens through either type.
        assert_eq!(
            <UsageRowKey as redb::Value>::type_name(),
            <UsageKey as redb::Value>::type_name()
        );
        // Bytes that are no usage key are ordered, not a panic.
        assert_eq!(
            UsageRowKey::compare(b"\x01", &bytes[0]),
            b"\x01"[..].cmp(&bytes[0][..])
        );
        let cut = &bytes[5][..bytes[5].len() - 1];
        assert!(UsageKeyParts::parse(cut).is_none());
    }

    #[test]
    fn rows_written_as_bytes_read_back_as_tuples() {
        let (_dir, store, _) = usage_in_temp_store();
        let rows = [
            ("key_b", 256, "app", "GET", 0u8),
            ("key_a", 1, "app", "read", 2),
            ("key_a", 1, "api", "read", 0),
            ("key_a", 300, "app", "GET", 0),
        ];
        let txn = store.database().begin_write().unwrap();
        {
            let mut table = txn.open_table(USAGE_ROWS).unwrap();
            for (i, row) in rows.iter().enumerate() {
                table
                    .insert(encoded(*row).as_slice(), i as u64 + 1)
                    .unwrap();
            }
        }
        txn.commit().unwrap();
        let txn = store.database().begin_read().unwrap();
        let table = txn.open_table(USAGE).unwrap();
        let read: Vec<_> = table
            .iter()
            .unwrap()
            .map(|r| {
                let (k, v) = r.unwrap();
                let (key, day, dep, op, class) = k.value();
                (
                    (key.to_string(), day, dep.to_string(), op.to_string(), class),
                    v.value(),
                )
            })
            .collect();
        let mut expected: Vec<_> = rows
            .iter()
            .enumerate()
            .map(|(i, &(key, day, dep, op, class))| {
                (
                    (key.into(), day, dep.into(), op.into(), class),
                    i as u64 + 1,
                )
            })
            .collect();
        expected.sort();
        assert_eq!(read, expected);
        assert_eq!(stored_total(&store, "key_a"), 2 + 3 + 4);
    }

    /// `key_a`'s state, deployment `app` and operation `GET`: what most tests count under.
    fn key_a_get(usage: &Usage) -> (Arc<KeyState>, Arc<str>, Operation) {
        (
            usage.key_states().of_id("key_a"),
            Arc::from("app"),
            Operation::Method(Method::GET),
        )
    }

    /// Usage over a fresh store in a temporary directory (kept alive by the first item).
    fn usage_in_temp_store() -> (tempfile::TempDir, Arc<Store>, Usage) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("u.redb")).unwrap());
        let usage = Usage::new(store.clone()).unwrap();
        (dir, store, usage)
    }

    #[test]
    fn flushed_counters_of_past_days_are_dropped_and_todays_kept() {
        let (_dir, _store, usage) = usage_in_temp_store();
        let (state, dep, op) = key_a_get(&usage);
        let now = Utc::now().timestamp();
        for at in [now - 3 * 86_400, now - 86_400, now] {
            usage.record(ok_hit(&state, &dep, &op, at));
        }
        assert_eq!(usage.counters.len(), 3);
        assert_eq!(usage.flush().unwrap(), 3);
        assert_eq!(usage.counters.len(), 1, "only today's counter stays");
        assert_eq!(usage.flush().unwrap(), 0);
        assert_eq!(usage.counters.len(), 1);
    }

    #[test]
    fn a_flush_adds_to_the_total_it_last_wrote() {
        let (_dir, store, usage) = usage_in_temp_store();
        let (state, dep, op) = key_a_get(&usage);
        let now = Utc::now().timestamp();
        for (hits, total) in [(3, 3), (2, 5), (1, 6)] {
            for _ in 0..hits {
                usage.record(ok_hit(&state, &dep, &op, now));
            }
            assert_eq!(usage.flush().unwrap(), hits);
            assert_eq!(stored_total(&store, "key_a"), total);
        }
        let remembered: Vec<u64> = usage
            .counters
            .iter()
            .map(|c| c.value().stored_total.load(Ordering::Relaxed))
            .collect();
        assert_eq!(remembered, [6]);
    }

    #[test]
    fn a_pruned_row_is_not_written_back_from_a_remembered_total() {
        let (_dir, store, usage) = usage_in_temp_store();
        let (state, dep, op) = key_a_get(&usage);
        let old = Utc::now().timestamp() - 3 * 86_400;
        // A past day's counter with a request pending whose row an earlier flush left at 5
        // (as when a request lands on it while that flush runs, which keeps the cell).
        usage.record(ok_hit(&state, &dep, &op, old));
        let txn = store.database().begin_write().unwrap();
        txn.open_table(USAGE)
            .unwrap()
            .insert(("key_a", day_number(old), "app", "GET", 0u8), 5)
            .unwrap();
        txn.commit().unwrap();
        for c in usage.counters.iter() {
            c.value().stored_total.store(5, Ordering::Relaxed);
        }
        // Retention of one day deletes that row; the flush then writes the pending request
        // alone, not 5 + 1.
        assert_eq!(usage.prune(1).unwrap(), 1);
        assert_eq!(usage.flush().unwrap(), 1);
        assert_eq!(stored_total(&store, "key_a"), 1);
    }

    #[test]
    fn a_key_alternating_counters_counts_each_in_its_own() {
        let (_dir, store, usage) = usage_in_temp_store();
        let state = usage.key_states().of_id("key_a");
        let dep: Arc<str> = Arc::from("app");
        let (get, post) = (
            Operation::Method(Method::GET),
            Operation::Method(Method::POST),
        );
        let now = Utc::now().timestamp();
        for i in 0..10 {
            let op = if i % 2 == 0 { &get } else { &post };
            let mut hit = ok_hit(&state, &dep, op, now);
            hit.status = if i < 6 { 200 } else { 503 };
            usage.record(hit);
        }
        let rows = usage.rows("key_a", 0).unwrap();
        let count = |op: &str, class: u8| {
            rows.iter()
                .find(|r| r.2 == op && r.3 == class)
                .map_or(0, |r| r.4)
        };
        assert_eq!((count("GET", 0), count("POST", 0)), (3, 3));
        assert_eq!((count("GET", 3), count("POST", 3)), (2, 2));
        assert_eq!(usage.flush().unwrap(), 10);
        assert_eq!(stored_total(&store, "key_a"), 10);
    }

    #[test]
    fn a_keys_counters_share_its_states_id() {
        let (_dir, _store, usage) = usage_in_temp_store();
        let (state, dep, op) = key_a_get(&usage);
        let now = Utc::now().timestamp();
        usage.record(ok_hit(&state, &dep, &op, now));
        usage.record(ok_hit(&state, &dep, &op, now - 86_400));
        assert_eq!(usage.counters.len(), 2);
        // The per-request match is then a pointer compare, with no read of the id's bytes.
        for c in usage.counters.iter() {
            assert_eq!(
                c.key().key.as_bytes().as_ptr(),
                state.id().as_bytes().as_ptr()
            );
            assert_eq!(
                c.value().identity.key.as_bytes().as_ptr(),
                state.id().as_bytes().as_ptr()
            );
        }
    }

    #[test]
    fn a_request_holding_a_dropped_counter_counts_through_the_map() {
        let (_dir, store, usage) = usage_in_temp_store();
        let (state, dep, op) = key_a_get(&usage);
        let yesterday = Utc::now().timestamp() - 86_400;
        usage.record(ok_hit(&state, &dep, &op, yesterday));
        assert_eq!(usage.flush().unwrap(), 1);
        assert_eq!(
            usage.counters.len(),
            0,
            "yesterday's spent counter is dropped"
        );
        // The key's cache still holds the dropped counter (a request from just before
        // midnight): its count must reach the store all the same.
        usage.record(ok_hit(&state, &dep, &op, yesterday));
        assert_eq!(usage.pending(), 1);
        assert_eq!(usage.flush().unwrap(), 1);
        assert_eq!(stored_total(&store, "key_a"), 2);
    }

    #[test]
    fn last_use_is_kept_to_the_second() {
        let cell = LastUseCell::default();
        assert!(cell.snapshot().is_none());
        let (a, b) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]));
        cell.record(1_000, a, None);
        cell.record(1_000, b, None);
        assert_eq!(
            cell.snapshot().unwrap().ip,
            "10.0.0.1",
            "the second's first request"
        );
        let ua = HeaderValue::from_static("curl/8");
        cell.record(1_001, b, Some(&ua));
        let last = cell.snapshot().unwrap();
        assert_eq!((last.at, last.ip.as_str()), (1_001, "10.0.0.2"));
        assert_eq!(last.user_agent.as_deref(), Some("curl/8"));
        assert!(cell.take_due(true).is_some());
        assert!(
            cell.take_due(true).is_none(),
            "nothing new since the flush took it"
        );
    }

    /// Flushes running concurrently with requests and readers: a report never misses a count
    /// recorded before it started, and `pending() == 0` means everything counted is on disk.
    #[test]
    fn counts_are_never_invisible_while_a_flush_is_in_flight() {
        let (_dir, store, usage) = usage_in_temp_store();
        let usage = Arc::new(usage);
        let recorded = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicBool::new(false));
        const N: u64 = 3000;
        let writer = {
            let (usage, recorded) = (usage.clone(), recorded.clone());
            std::thread::spawn(move || {
                let state = usage.key_states().of_id("key_a");
                let dep: Arc<str> = Arc::from("app");
                let op = Operation::Method(Method::GET);
                for _ in 0..N {
                    let now = Utc::now().timestamp();
                    usage.record(ok_hit(&state, &dep, &op, now));
                    recorded.fetch_add(1, Ordering::SeqCst);
                }
            })
        };
        let flusher = {
            let (usage, done) = (usage.clone(), done.clone());
            std::thread::spawn(move || {
                while !done.load(Ordering::SeqCst) {
                    usage.flush().unwrap();
                }
            })
        };
        let mut checks = 0;
        while !writer.is_finished() || checks < 200 {
            let before = recorded.load(Ordering::SeqCst);
            let reported = usage.report("key_a", 1).unwrap()["total"].as_u64().unwrap();
            assert!(
                reported >= before,
                "the report shows {reported} of at least {before} counted requests"
            );
            let before = recorded.load(Ordering::SeqCst);
            if usage.pending() == 0 {
                let on_disk = stored_total(&store, "key_a");
                assert!(
                    on_disk >= before,
                    "pending 0 but only {on_disk} of at least {before} on disk"
                );
            }
            checks += 1;
        }
        writer.join().unwrap();
        done.store(true, Ordering::SeqCst);
        flusher.join().unwrap();
        usage.flush().unwrap();
        assert_eq!(usage.pending(), 0);
        assert_eq!(stored_total(&store, "key_a"), N);
        assert_eq!(usage.report("key_a", 1).unwrap()["total"], N);
    }

    /// A flush racing a delete cannot write the deleted key's rows back.
    #[test]
    fn a_deleted_key_stays_deleted_under_concurrent_flushes() {
        let (_dir, store, usage) = usage_in_temp_store();
        let usage = Arc::new(usage);
        let id = "key_d";
        let dep: Arc<str> = Arc::from("app");
        for round in 0..300u32 {
            let state = usage.key_states().of_id(id);
            for i in 0..200u32 {
                let op = Operation::Route(Arc::from(format!("op{}", i % 50)));
                usage.record(ok_hit(&state, &dep, &op, Utc::now().timestamp()));
            }
            let barrier = Arc::new(std::sync::Barrier::new(2));
            let (u, b) = (usage.clone(), barrier.clone());
            let flusher = std::thread::spawn(move || {
                b.wait();
                u.flush().unwrap();
            });
            barrier.wait();
            // Land the delete at varying points of the flush.
            let spin = Instant::now();
            while spin.elapsed() < std::time::Duration::from_micros(u64::from(round % 60) * 5) {
                std::hint::spin_loop();
            }
            usage.delete_key(id).unwrap();
            flusher.join().unwrap();
            assert_eq!(
                stored_total(&store, id),
                0,
                "round {round}: rows of a deleted key came back"
            );
        }
    }
}
