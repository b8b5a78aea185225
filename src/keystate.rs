//! Per-key state the data plane changes on every request: the key's rate limiter and its
//! last use. A live key reaches its state in one pointer hop (no map lookup, no lock); the
//! registry keyed by id keeps one state across a key's versions (an update or a rotation
//! publishes a new live key) and lets the usage flush and reports find it.

use std::sync::{Arc, OnceLock};

use dashmap::DashMap;

use crate::keyindex::{KeyId, LiveKey};
use crate::prefetch::Lines;
use crate::ratelimit::LimiterCell;
use crate::usage::{LastUseCell, RecentCounter};

/// The mutable per-key state.
pub struct KeyState {
    /// The key's id: the one copy its usage counters share, so a request's counter matches
    /// by pointer (no read of the id's bytes).
    id: KeyId,
    /// The rate limiter at the key's current limit.
    pub limiter: LimiterCell,
    /// When, from where and with which user agent the key was last used.
    pub last_use: LastUseCell,
    /// The usage counter of its last request.
    pub recent: RecentCounter,
}

impl KeyState {
    /// Fresh state for the key with id `id`.
    pub fn new(id: KeyId) -> Self {
        KeyState {
            id,
            limiter: LimiterCell::default(),
            last_use: LastUseCell::default(),
            recent: RecentCounter::default(),
        }
    }

    /// The key's id.
    pub fn id(&self) -> &KeyId {
        &self.id
    }
}

/// The slot a live key caches its state in (empty until the key's first request, so idle
/// keys cost no state). The `Arc` sits inline: reaching the state is one pointer hop from the
/// live key (a boxed slot cost a second, dependent cache miss per request with many keys).
pub type StateSlot = OnceLock<Arc<KeyState>>;

/// Every key's state, by id.
#[derive(Default)]
pub struct KeyStates {
    map: DashMap<KeyId, Arc<KeyState>, foldhash::fast::RandomState>,
}

impl KeyStates {
    /// The state of `key`: from the key's own slot, else from (or new in) the registry, then
    /// cached in the slot. Every version of a key gets the same state.
    pub fn of<'k>(&self, key: &'k LiveKey) -> &'k KeyState {
        key.state_slot().get_or_init(|| self.registered(key.id()))
    }

    /// The state of the key with id `id`, made when it has none (for callers without the
    /// live key: tools and tests).
    pub fn of_id(&self, id: &str) -> Arc<KeyState> {
        self.registered(KeyId::from(id))
    }

    /// The registry's state for `id`, made when it has none.
    fn registered(&self, id: KeyId) -> Arc<KeyState> {
        self.map
            .entry(id.clone())
            .or_insert_with(|| Arc::new(KeyState::new(id)))
            .clone()
    }

    /// The state of the key with id `id`, when it has one.
    pub fn get(&self, id: &str) -> Option<Arc<KeyState>> {
        self.map.get(&KeyId::from(id)).map(|s| s.clone())
    }

    /// Drops the state of a deleted key.
    pub fn forget(&self, id: &str) {
        self.map.remove(&KeyId::from(id));
    }

    /// Calls `f` with every key's id and state.
    pub fn for_each(&self, mut f: impl FnMut(&KeyId, &Arc<KeyState>)) {
        for entry in self.map.iter() {
            f(entry.key(), entry.value());
        }
    }

    /// Number of keys with state.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when no key has state.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Where a request's key, its state and its usage counter are in memory, noted while they
/// are in cache (at admission) so they can all be prefetched at once when the upstream's
/// answer arrives: the round trip evicts them, and reading them afterwards went key → state
/// → counter, one miss after another (the key for its state slot and its reference count).
/// Only addresses: nothing is dereferenced through them.
#[derive(Clone, Copy)]
pub struct KeyLines {
    key: Lines,
    state: Lines,
    counter: Option<Lines>,
}

impl KeyLines {
    /// The lines of `key` (with its `Arc` counts) and its `state`.
    pub fn of(key: &LiveKey, state: &KeyState) -> Self {
        // Live keys are shared in an `Arc`, whose reference counts sit just before the value.
        let counts = 2 * std::mem::size_of::<usize>();
        KeyLines {
            key: Lines::new(
                (key as *const LiveKey as usize).saturating_sub(counts),
                counts + std::mem::size_of::<LiveKey>(),
            ),
            state: Lines::of(state),
            counter: state.recent.lines(),
        }
    }

    /// Starts loading all of them.
    pub fn prefetch(&self) {
        self.key.prefetch();
        self.state.prefetch();
        if let Some(counter) = self.counter {
            counter.prefetch();
        }
    }
}
