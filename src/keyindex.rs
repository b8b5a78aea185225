//! The live key index: digest → key, read lock-free by the data plane, written only by the
//! admin path (and at start-up). Revocation, deletion and rotation apply here before the
//! admin answer is sent.
//!
//! Built for a million keys: a key's strings live in one shared buffer (identity headers are
//! slices of it, so forwarding allocates nothing), the main map is keyed by the first 8
//! bytes of the digest (already uniformly random, so it is its own hash) and the full digest
//! is then compared in constant time. Secrets in a rotation grace period, and the
//! astronomically rare 64-bit tag collision, live in a small side map.

use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use dashmap::DashMap;
use http::HeaderValue;
use subtle::ConstantTimeEq;

use crate::keys::{unhex, KeyRecord, Role, SecretDigest};
use crate::keystate::StateSlot;
use crate::prefetch::{prefetch, Lines};
use crate::text;
use crate::units::Limit;
use crate::usage::counter_lines;

/// A key id (`key_…`) sharing its key's string buffer: cloning it allocates nothing.
#[derive(Clone, Eq, PartialOrd, Ord)]
pub struct KeyId(Bytes);

impl PartialEq for KeyId {
    fn eq(&self, other: &Self) -> bool {
        // Ids taken from the same live key share one buffer: skip the byte compare.
        (self.0.as_ptr() == other.0.as_ptr() && self.0.len() == other.0.len()) || self.0 == other.0
    }
}

impl KeyId {
    /// The id as text.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or("")
    }

    /// The id's bytes (no UTF-8 check).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl Hash for KeyId {
    fn hash<H: Hasher>(&self, state: &mut H) {
        hash_id(&self.0, state);
    }
}

/// Hashes key id bytes the way [`KeyId`] does (for lookups by borrowed id): ids end in 16
/// random base62 characters, so their last 8 bytes are hash enough.
pub fn hash_id<H: Hasher>(id: &[u8], state: &mut H) {
    match id.len().checked_sub(8) {
        Some(tail) => {
            let mut word = [0u8; 8];
            word.copy_from_slice(&id[tail..]);
            state.write_u64(u64::from_le_bytes(word));
        }
        None => state.write(id),
    }
}

impl std::ops::Deref for KeyId {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl From<&str> for KeyId {
    fn from(s: &str) -> Self {
        KeyId(Bytes::copy_from_slice(s.as_bytes()))
    }
}

/// A decoded live entry: the key, its grace secrets (digest, valid until), revoked or not.
pub type Decoded = (LiveKey, Vec<(SecretDigest, i64)>, bool);

/// The strings of a key, in this order, in its buffer.
const ID: usize = 0;
const NAME: usize = 1;
const OWNER: usize = 2;
const SCOPES: usize = 3;
const DEPLOYMENTS: usize = 4;

/// What the data plane needs to know about a key.
pub struct LiveKey {
    /// Digest of the current secret.
    pub digest: SecretDigest,
    /// id, name, owner, scopes (comma-separated), deployments (comma-separated).
    text: Bytes,
    ends: [u16; 5],
    /// Role.
    pub role: Role,
    all_deployments: bool,
    /// Expiry as Unix seconds.
    pub expires_at: Option<i64>,
    /// The key's own limit: `None` = role/default, `Some(None)` = unlimited.
    pub rate_limit: Option<Option<Limit>>,
    /// Its limiter and last use, once it has been used (see `keystate`).
    state: StateSlot,
    /// Where the usage counter of its last request is (`RecentCounter::address`): known here,
    /// that counter is prefetched with the key's state instead of after it (with many keys,
    /// one dependent cache miss less per request). Only a hint: it may be stale or 0.
    counter_hint: AtomicUsize,
}

impl std::fmt::Debug for LiveKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveKey")
            .field("id", &self.id_str())
            .field("role", &self.role)
            .finish()
    }
}

/// Removes bytes a header value cannot carry (names are validated on create; this guards
/// records written by older versions).
fn header_safe(s: &str) -> impl Iterator<Item = u8> + '_ {
    s.bytes().filter(|&b| is_header_safe(b))
}

/// A byte a header value may carry.
fn is_header_safe(b: u8) -> bool {
    b == b'\t' || (b >= 0x20 && b != 0x7f)
}

impl LiveKey {
    /// Builds the live form of a record.
    pub fn from_record(r: &KeyRecord) -> LiveKey {
        let all = r.deployments.iter().any(|d| d == "*");
        let mut text = BytesMut::with_capacity(r.id.len() + r.name.len() + r.owner.len() + 32);
        let mut ends = [0u16; 5];
        let mut push = |i: usize, parts: &mut dyn Iterator<Item = &str>, text: &mut BytesMut| {
            let start = text.len();
            for (n, p) in parts.enumerate() {
                if n > 0 {
                    text.put_u8(b',');
                }
                text.extend(header_safe(p));
            }
            // Strings are capped well below this on create; anything larger (older records) is
            // cut at an item boundary, so a cut never forms a different, shorter name.
            let cap = u16::MAX as usize / 8;
            if text.len() - start > cap {
                let cut = text[start..start + cap]
                    .iter()
                    .rposition(|&b| b == b',')
                    .unwrap_or(0);
                text.truncate(start + cut);
            }
            ends[i] = text.len() as u16;
        };
        push(ID, &mut std::iter::once(r.id.as_str()), &mut text);
        push(NAME, &mut std::iter::once(r.name.as_str()), &mut text);
        push(OWNER, &mut std::iter::once(r.owner.as_str()), &mut text);
        push(SCOPES, &mut r.scopes.iter().map(String::as_str), &mut text);
        let deployments: &mut dyn Iterator<Item = &str> = if all {
            &mut std::iter::empty()
        } else {
            &mut r.deployments.iter().map(String::as_str)
        };
        push(DEPLOYMENTS, deployments, &mut text);
        LiveKey {
            digest: unhex(&r.digest).unwrap_or([0; 32]),
            text: text.freeze(),
            ends,
            role: r.role,
            all_deployments: all,
            expires_at: r.expires_at.map(|t| t.timestamp()),
            rate_limit: r
                .rate_limit
                .as_deref()
                .map(|l| Limit::parse(l).ok().flatten()),
            state: StateSlot::new(),
            counter_hint: AtomicUsize::new(0),
        }
    }

    /// The compact binary form the store keeps beside each record, so start-up reads keys
    /// without parsing JSON: version, role, flags, expiry, limit, digest, grace secrets,
    /// string ends, strings.
    pub fn encode(r: &KeyRecord) -> Vec<u8> {
        let k = LiveKey::from_record(r);
        let grace: Vec<(SecretDigest, i64)> = r
            .grace
            .iter()
            .filter_map(|g| Some((unhex(&g.digest)?, g.valid_until.timestamp())))
            .take(255)
            .collect();
        let mut out = Vec::with_capacity(68 + grace.len() * 40 + k.text.len());
        out.push(1);
        out.push(match k.role {
            Role::Admin => 0,
            Role::Operator => 1,
            Role::Viewer => 2,
        });
        out.push(u8::from(k.all_deployments) | (u8::from(r.revoked_at.is_some()) << 1));
        out.extend_from_slice(&k.expires_at.unwrap_or(i64::MIN).to_le_bytes());
        let (kind, requests, period) = match k.rate_limit {
            None => (0u8, 0u32, 0u64),
            Some(None) => (1, 0, 0),
            Some(Some(l)) => (
                2,
                l.requests,
                l.period.as_nanos().min(u128::from(u64::MAX)) as u64,
            ),
        };
        out.push(kind);
        out.extend_from_slice(&requests.to_le_bytes());
        out.extend_from_slice(&period.to_le_bytes());
        out.extend_from_slice(&k.digest);
        out.push(grace.len() as u8);
        for (d, until) in &grace {
            out.extend_from_slice(d);
            out.extend_from_slice(&until.to_le_bytes());
        }
        for e in k.ends {
            out.extend_from_slice(&e.to_le_bytes());
        }
        out.extend_from_slice(&k.text);
        out
    }

    /// Decodes [`LiveKey::encode`]: the key, its grace secrets, and whether it is revoked.
    pub fn decode(b: &[u8]) -> Option<Decoded> {
        fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
            let (head, rest) = b.split_at_checked(n)?;
            *b = rest;
            Some(head)
        }
        fn arr<const N: usize>(b: &mut &[u8]) -> Option<[u8; N]> {
            take(b, N)?.try_into().ok()
        }
        let mut b = b;
        let [version, role, flags] = arr::<3>(&mut b)?;
        if version != 1 {
            return None;
        }
        let role = match role {
            0 => Role::Admin,
            1 => Role::Operator,
            2 => Role::Viewer,
            _ => return None,
        };
        let expires = i64::from_le_bytes(arr(&mut b)?);
        let [kind] = arr::<1>(&mut b)?;
        let requests = u32::from_le_bytes(arr(&mut b)?);
        let period = u64::from_le_bytes(arr(&mut b)?);
        let rate_limit = match kind {
            0 => None,
            1 => Some(None),
            _ => Some(Some(Limit {
                requests,
                period: std::time::Duration::from_nanos(period),
            })),
        };
        let digest: SecretDigest = arr(&mut b)?;
        let [n_grace] = arr::<1>(&mut b)?;
        let mut grace = Vec::with_capacity(n_grace as usize);
        for _ in 0..n_grace {
            grace.push((arr(&mut b)?, i64::from_le_bytes(arr(&mut b)?)));
        }
        let mut ends = [0u16; 5];
        for e in &mut ends {
            *e = u16::from_le_bytes(arr(&mut b)?);
        }
        if ends.windows(2).any(|w| w[0] > w[1])
            || ends[4] as usize != b.len()
            // A fold, not `all`: no early exit, so it vectorises (this runs for every key
            // at start-up).
            || !b.iter().fold(true, |ok, &c| ok & is_header_safe(c))
        {
            return None;
        }
        let key = LiveKey {
            digest,
            text: Bytes::copy_from_slice(b),
            ends,
            role,
            all_deployments: flags & 1 != 0,
            expires_at: (expires != i64::MIN).then_some(expires),
            rate_limit,
            state: StateSlot::new(),
            counter_hint: AtomicUsize::new(0),
        };
        Some((key, grace, flags & 2 != 0))
    }

    fn range(&self, i: usize) -> Range<usize> {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        start..self.ends[i] as usize
    }

    fn bytes(&self, i: usize) -> &[u8] {
        &self.text[self.range(i)]
    }

    fn field(&self, i: usize) -> &str {
        std::str::from_utf8(self.bytes(i)).unwrap_or("")
    }

    fn header(&self, i: usize) -> HeaderValue {
        let bytes = self.text.slice(self.range(i));
        // SAFETY (an HTTP-validity invariant, not a memory one): `text` only ever holds
        // header-safe bytes — `from_record` filters them through `header_safe` and `decode`
        // rejects anything else — so the per-request re-validation can be skipped.
        unsafe { HeaderValue::from_maybe_shared_unchecked(bytes) }
    }

    /// The key id (shares this key's buffer).
    pub fn id(&self) -> KeyId {
        KeyId(self.text.slice(self.range(ID)))
    }

    /// The id's bytes (borrowed; no reference count touched).
    pub fn id_bytes(&self) -> &[u8] {
        self.bytes(ID)
    }

    /// The slot caching this key's per-request state.
    pub fn state_slot(&self) -> &StateSlot {
        &self.state
    }

    /// Starts loading what a request reads of this key next (its strings and its state), so
    /// those cache misses overlap instead of following one another: with many keys, each
    /// request's key is rarely in cache.
    pub fn prefetch(&self) {
        let text = self.text.as_ptr();
        prefetch(text);
        if self.text.len() > 64 {
            prefetch(text.wrapping_add(64));
        }
        if let Some(state) = self.state.get() {
            // Every line of it: the limiter sits inline (see `ratelimit::LimiterCell`).
            Lines::of(&**state).prefetch();
        }
        if let Some(counter) = counter_lines(self.counter_hint.load(Ordering::Relaxed)) {
            counter.prefetch();
        }
    }

    /// Notes where the usage counter of the key's latest request is (see `counter_hint`).
    pub fn note_counter(&self, at: usize) {
        // Read first: the store is needed only when the counter changed (about once a day).
        if self.counter_hint.load(Ordering::Relaxed) != at {
            self.counter_hint.store(at, Ordering::Relaxed);
        }
    }

    /// The key id as text.
    pub fn id_str(&self) -> &str {
        self.field(ID)
    }

    /// The granted scopes.
    pub fn scopes(&self) -> impl Iterator<Item = &str> {
        self.field(SCOPES).split(',').filter(|s| !s.is_empty())
    }

    /// The name's, owner's and scopes' bytes as sent in the identity headers (borrowed).
    pub fn name_bytes(&self) -> &[u8] {
        self.bytes(NAME)
    }

    /// See [`LiveKey::name_bytes`].
    pub fn owner_bytes(&self) -> &[u8] {
        self.bytes(OWNER)
    }

    /// See [`LiveKey::name_bytes`].
    pub fn scopes_bytes(&self) -> &[u8] {
        self.bytes(SCOPES)
    }

    /// `X-Keygate-Key-Id`.
    pub fn hv_id(&self) -> HeaderValue {
        self.header(ID)
    }

    /// `X-Keygate-Key-Name`.
    pub fn hv_name(&self) -> HeaderValue {
        self.header(NAME)
    }

    /// `X-Keygate-Owner`.
    pub fn hv_owner(&self) -> HeaderValue {
        self.header(OWNER)
    }

    /// `X-Keygate-Role`.
    pub fn hv_role(&self) -> HeaderValue {
        HeaderValue::from_static(self.role.as_str())
    }

    /// `X-Keygate-Scopes`.
    pub fn hv_scopes(&self) -> HeaderValue {
        self.header(SCOPES)
    }

    /// Items of a comma-separated field, as bytes (no UTF-8 re-validation on the hot path).
    fn items(&self, i: usize) -> impl Iterator<Item = &[u8]> {
        self.text[self.range(i)]
            .split(|&b| b == b',')
            .filter(|s| !s.is_empty())
    }

    /// True when the key may be used on `deployment`.
    pub fn allows_deployment(&self, deployment: &str) -> bool {
        self.role == Role::Admin
            || self.all_deployments
            || self
                .items(DEPLOYMENTS)
                .any(|d| text::short_eq(d, deployment.as_bytes()))
    }

    /// True when the key grants `scope`.
    pub fn has_scope(&self, scope: &str) -> bool {
        self.role == Role::Admin
            || self
                .items(SCOPES)
                .any(|s| text::short_eq(s, scope.as_bytes()) || s == b"*")
    }

    /// The scopes as owned strings (for error bodies).
    pub fn scope_list(&self) -> Vec<String> {
        self.scopes().map(str::to_string).collect()
    }
}

/// One digest's entry as found by a lookup.
#[derive(Debug, Clone)]
pub struct IndexEntry {
    /// The key.
    pub key: Arc<LiveKey>,
    /// For a rotated-out secret in its grace period: Unix seconds it stops working.
    pub valid_until: Option<i64>,
}

/// Hashes a u64 tag to itself: the tag is already a slice of a SHA-256 output.
#[derive(Default)]
pub struct TagHasher(u64);

impl Hasher for TagHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // A tag (8 bytes) is taken whole. The length written before it is overwritten.
        if let Ok(word) = <[u8; 8]>::try_from(bytes) {
            self.0 = u64::from_le_bytes(word);
            return;
        }
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Constant-time equality of two digests: the words' differences are OR-ed together and
/// only the result goes through `subtle` (one optimisation barrier instead of four).
fn digest_eq(a: &SecretDigest, b: &SecretDigest) -> bool {
    let mut diff = 0u64;
    for (x, y) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        let word = |c: &[u8]| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]));
        diff |= word(x) ^ word(y);
    }
    diff.ct_eq(&0).into()
}

/// The first 8 bytes of a digest: the main map's hash and key.
fn tag(d: &SecretDigest) -> &[u8; 8] {
    // Never `None`: a digest is 32 bytes.
    d.first_chunk::<8>().unwrap_or(&[0; 8])
}

/// A live key as the main map's key, identified by its digest's tag (read from the key
/// itself). The map then holds one pointer a slot: with a copy of the tag beside it, slots
/// took 16 bytes, and at 1 000 000 keys (2 097 152 slots) the map outgrew what caches hold.
/// The lookup reads the key's digest anyway to compare it in full.
#[derive(Clone)]
struct Tagged(Arc<LiveKey>);

impl std::borrow::Borrow<[u8; 8]> for Tagged {
    fn borrow(&self) -> &[u8; 8] {
        tag(&self.0.digest)
    }
}

impl PartialEq for Tagged {
    fn eq(&self, other: &Self) -> bool {
        tag(&self.0.digest) == tag(&other.0.digest)
    }
}

impl Eq for Tagged {}

impl Hash for Tagged {
    // As `[u8; 8]` hashes, which `Borrow` requires.
    fn hash<H: Hasher>(&self, state: &mut H) {
        tag(&self.0.digest).hash(state);
    }
}

/// The in-memory digest → key index.
#[derive(Default)]
pub struct KeyIndex {
    /// Current secrets by digest tag.
    main: DashMap<Tagged, (), BuildHasherDefault<TagHasher>>,
    /// Grace-period secrets and tag collisions, by full digest.
    side: DashMap<SecretDigest, IndexEntry, foldhash::fast::RandomState>,
    side_len: AtomicUsize,
}

impl std::fmt::Debug for KeyIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyIndex")
            .field("len", &self.len())
            .finish()
    }
}

impl KeyIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty index sized for `n` keys.
    pub fn with_capacity(n: usize) -> Self {
        KeyIndex {
            main: DashMap::with_capacity_and_hasher(n, BuildHasherDefault::default()),
            ..Self::default()
        }
    }

    /// Number of digests indexed.
    pub fn len(&self) -> usize {
        self.main.len() + self.side_len.load(Ordering::Relaxed)
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Finds the key for `digest`, comparing the full digest in constant time.
    ///
    /// The main map is probed by hand (DashMap's raw API) to start loading the slots the key
    /// most likely sits in together with the control bytes that point to it: otherwise the
    /// slot's load waits for the control bytes', and with a million keys both are cache
    /// misses, one after the other.
    pub fn lookup(&self, digest: &SecretDigest) -> Option<IndexEntry> {
        let t = tag(digest);
        // As DashMap hashes a key, to land on the shard and probe sequence its inserts used.
        let hash = self.main.hasher().hash_one(t);
        if let Some(shard) = self
            .main
            .shards()
            .get(self.main.determine_shard(hash as usize))
        {
            let table = shard.read();
            // Slots are stored backwards from `data_end`; the probe starts at `hash & mask`
            // and the key is nearly always within the next few slots (lower addresses).
            let first = table
                .data_end()
                .as_ptr()
                .wrapping_sub((hash as usize & (table.buckets() - 1)) + 1);
            prefetch(first);
            prefetch(first.cast::<u8>().wrapping_sub(64));
            if let Some((k, _)) = table.get(hash, |(k, _)| tag(&k.0.digest) == t) {
                let key = &k.0;
                if digest_eq(&key.digest, digest) {
                    return Some(IndexEntry {
                        key: key.clone(),
                        valid_until: None,
                    });
                }
            }
        }
        if self.side_len.load(Ordering::Acquire) == 0 {
            return None;
        }
        let e = self.side.get(digest)?;
        digest_eq(e.key(), digest).then(|| e.value().clone())
    }

    fn side_insert(&self, d: SecretDigest, e: IndexEntry) {
        if self.side.insert(d, e).is_none() {
            self.side_len.fetch_add(1, Ordering::Release);
        }
    }

    fn side_remove(&self, d: &SecretDigest) {
        if self.side.remove(d).is_some() {
            self.side_len.fetch_sub(1, Ordering::Release);
        }
    }

    /// Indexes `key` under its current digest (or the side map on a tag collision).
    fn insert_current(&self, key: Arc<LiveKey>) {
        let d = key.digest;
        let mut collided = None;
        match self.main.entry(Tagged(key)) {
            dashmap::Entry::Occupied(o) => {
                if o.key().0.digest == d {
                    // The entry's key is the new version: it replaces the stored one.
                    o.replace_entry(());
                } else {
                    collided = Some(o.into_key().0);
                }
            }
            dashmap::Entry::Vacant(v) => {
                v.insert(());
            }
        }
        if let Some(key) = collided {
            self.side_insert(
                d,
                IndexEntry {
                    key,
                    valid_until: None,
                },
            );
        }
    }

    fn remove_digest(&self, d: &SecretDigest) {
        self.main.remove_if(tag(d), |k, _| k.0.digest == *d);
        self.side_remove(d);
    }

    /// Replaces `previous` by `current` (either may be absent). New digests go in before the
    /// old ones come out, so a key that stays valid is never briefly missing.
    pub fn apply(&self, previous: Option<&KeyRecord>, current: Option<&KeyRecord>) {
        let mut kept: Vec<SecretDigest> = Vec::new();
        if let Some(r) = current.filter(|r| r.revoked_at.is_none()) {
            let key = Arc::new(LiveKey::from_record(r));
            kept.push(key.digest);
            for g in &r.grace {
                if let Some(d) = unhex(&g.digest) {
                    self.side_insert(
                        d,
                        IndexEntry {
                            key: key.clone(),
                            valid_until: Some(g.valid_until.timestamp()),
                        },
                    );
                    // A secret just rotated out leaves the main map: it now has a deadline.
                    self.main.remove_if(tag(&d), |k, _| k.0.digest == d);
                    kept.push(d);
                }
            }
            self.insert_current(key);
        }
        if let Some(prev) = previous {
            for d in crate::store::record_digests(prev) {
                if !kept.contains(&d) {
                    self.remove_digest(&d);
                }
            }
        }
    }

    /// Loads every record.
    pub fn load<'a>(&self, records: impl IntoIterator<Item = &'a KeyRecord>) {
        for r in records {
            self.apply(None, Some(r));
        }
    }

    /// An index of every key of `store`, sized for them up front (the map grows once), loaded
    /// streaming (no full copy of the table in memory) and on several threads at once for a
    /// large store (see `Store::for_each_live`); and how many keys were read.
    pub fn from_store(
        store: &crate::store::Store,
    ) -> Result<(KeyIndex, usize), crate::store::StoreError> {
        // Below this, threads cost more than they save.
        const PARALLEL_FROM: usize = 10_000;
        let keys = usize::try_from(store.key_count()?).unwrap_or(usize::MAX);
        let parts = if keys < PARALLEL_FROM {
            1
        } else {
            // More readers than cores: on a cold page cache they wait on the disk, which
            // serves several reads at once faster than one after the other.
            std::thread::available_parallelism().map_or(8, |n| n.get().clamp(8, 16))
        };
        let index = KeyIndex::with_capacity(keys);
        let n = index.load_in_parts(store, parts)?;
        Ok((index, n))
    }

    /// Loads every key of `store`, reading `parts` ranges of ids at once.
    fn load_in_parts(
        &self,
        store: &crate::store::Store,
        parts: usize,
    ) -> Result<usize, crate::store::StoreError> {
        use crate::store::StoreError;
        store.for_each_live(parts, |bytes| {
            let (key, grace, revoked) = LiveKey::decode(bytes)
                .ok_or_else(|| StoreError::Corrupt("undecodable live key entry".into()))?;
            self.insert_loaded(key, grace, revoked);
            Ok(())
        })
    }

    /// Adds one decoded live-table entry (revoked entries only count).
    fn insert_loaded(&self, key: LiveKey, grace: Vec<(SecretDigest, i64)>, revoked: bool) {
        if revoked {
            return;
        }
        let key = Arc::new(key);
        for (d, until) in grace {
            self.side_insert(
                d,
                IndexEntry {
                    key: key.clone(),
                    valid_until: Some(until),
                },
            );
        }
        self.insert_current(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{hex, GraceSecret, SecretHasher};
    use chrono::Utc;

    fn record(secret: &str) -> KeyRecord {
        KeyRecord {
            id: "key_0000000000000001".into(),
            name: "CI pipeline".into(),
            description: "d".into(),
            owner: "alice".into(),
            role: Role::Viewer,
            scopes: vec!["read".into(), "data:read".into()],
            deployments: vec!["a".into(), "b".into()],
            env: "ci".into(),
            display: "x".into(),
            created_at: Utc::now(),
            expires_at: Some(Utc::now()),
            revoked_at: None,
            rate_limit: Some("10/1m".into()),
            digest: hex(&SecretHasher::new(None).digest(secret)),
            grace: vec![GraceSecret {
                digest: hex(&SecretHasher::new(None).digest("old")),
                valid_until: Utc::now(),
            }],
        }
    }

    #[test]
    fn compact_form_round_trips() {
        let r = record("s");
        let (k, grace, revoked) = LiveKey::decode(&LiveKey::encode(&r)).unwrap();
        let direct = LiveKey::from_record(&r);
        assert_eq!(k.digest, direct.digest);
        assert_eq!(k.text, direct.text);
        assert_eq!(k.ends, direct.ends);
        assert_eq!(
            (k.role, k.expires_at, k.rate_limit),
            (direct.role, direct.expires_at, direct.rate_limit)
        );
        assert_eq!(grace.len(), 1);
        assert!(!revoked);
        assert_eq!(k.id_str(), "key_0000000000000001");
        assert_eq!(k.hv_scopes(), "read,data:read");
        assert!(k.allows_deployment("b") && !k.allows_deployment("c"));
        assert!(k.has_scope("data:read") && !k.has_scope("write"));
        assert!(k.has_scope("read") && !k.has_scope("rea") && !k.has_scope(""));
        assert!(k.allows_deployment("a") && !k.allows_deployment("a,b"));
        // A list of one item, and the wildcard scope.
        let mut one = record("s");
        (one.scopes, one.deployments) = (vec!["*".into()], vec!["app".into()]);
        let one = LiveKey::from_record(&one);
        assert!(one.has_scope("anything"));
        assert!(one.allows_deployment("app") && !one.allows_deployment("ap"));
        let bytes = LiveKey::encode(&r);
        assert!(LiveKey::decode(&bytes[..bytes.len() - 1]).is_none());
        // Identity headers are built from the text unchecked: a control byte (a corrupt
        // entry) must not get that far.
        let mut bad = bytes.clone();
        let last = bad.len() - 1;
        bad[last] = b'\n';
        assert!(LiveKey::decode(&bad).is_none());
    }

    #[test]
    fn rotation_moves_the_old_secret_to_the_side_map() {
        let index = KeyIndex::new();
        let h = SecretHasher::new(None);
        let mut r = record("s1");
        r.grace.clear();
        index.apply(None, Some(&r));
        let prev = r.clone();
        r.grace = vec![GraceSecret {
            digest: r.digest.clone(),
            valid_until: Utc::now(),
        }];
        r.digest = hex(&h.digest("s2"));
        index.apply(Some(&prev), Some(&r));
        assert!(index.lookup(&h.digest("s1")).unwrap().valid_until.is_some());
        assert_eq!(index.lookup(&h.digest("s2")).unwrap().valid_until, None);
        let prev = r.clone();
        r.grace.clear();
        index.apply(Some(&prev), Some(&r));
        assert!(index.lookup(&h.digest("s1")).is_none());
        assert_eq!(index.len(), 1);
        index.apply(Some(&r), None);
        assert!(index.is_empty());
    }

    #[test]
    fn every_key_of_a_large_index_is_found_and_no_other() {
        // The lookup probes DashMap's tables itself: it must land where inserts did, in a
        // table that grew key by key as well as in one sized up front.
        let h = SecretHasher::new(None);
        for index in [KeyIndex::new(), KeyIndex::with_capacity(20_000)] {
            let mut r = record("unused");
            r.grace.clear();
            for i in 0..20_000 {
                r.digest = hex(&h.digest(format!("s{i}")));
                index.apply(None, Some(&r));
            }
            assert_eq!(index.len(), 20_000);
            assert!((0..20_000).all(|i| index.lookup(&h.digest(format!("s{i}"))).is_some()));
            assert!((0..2_000).all(|i| index.lookup(&h.digest(format!("t{i}"))).is_none()));
        }
    }

    #[test]
    fn a_store_loaded_in_parallel_ranges_gives_every_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(&dir.path().join("k.redb")).unwrap();
        let h = SecretHasher::new(None);
        let records: Vec<KeyRecord> = (0..300)
            .map(|i| {
                let mut r = record("unused");
                r.id = crate::keys::generate_id().unwrap();
                r.digest = hex(&h.digest(format!("s{i}")));
                r.grace.clear();
                r
            })
            .collect();
        store.insert_keys(&records).unwrap();
        let index = KeyIndex::new();
        assert_eq!(index.load_in_parts(&store, 8).unwrap(), 300);
        assert_eq!(index.len(), 300);
        assert!((0..300).all(|i| index.lookup(&h.digest(format!("s{i}"))).is_some()));
    }

    #[test]
    fn digests_sharing_a_tag_are_told_apart() {
        let index = KeyIndex::new();
        let digest = |rest: u8| {
            let mut d = [rest; 32];
            d[..8].copy_from_slice(&[7; 8]);
            d
        };
        let keyed = |id: &str, name: &str, d: &SecretDigest| {
            let mut r = record("unused");
            (r.id, r.name, r.digest) = (id.into(), name.into(), hex(d));
            r.grace.clear();
            r
        };
        let a = keyed("key_a", "first", &digest(1));
        let b = keyed("key_b", "second", &digest(2));
        index.apply(None, Some(&a));
        index.apply(None, Some(&b));
        let name_of = |d: &SecretDigest| index.lookup(d).map(|e| e.key.field(NAME).to_string());
        assert_eq!(name_of(&digest(1)).as_deref(), Some("first"));
        assert_eq!(name_of(&digest(2)).as_deref(), Some("second"));
        assert_eq!(name_of(&digest(3)), None);
        assert_eq!(index.len(), 2);
        // A new version of a key (same secret) replaces the old one in place.
        let renamed = keyed("key_a", "renamed", &digest(1));
        index.apply(Some(&a), Some(&renamed));
        assert_eq!(name_of(&digest(1)).as_deref(), Some("renamed"));
        assert_eq!(index.len(), 2);
        // Removing one leaves the other findable.
        index.apply(Some(&renamed), None);
        assert_eq!(name_of(&digest(1)), None);
        assert_eq!(name_of(&digest(2)).as_deref(), Some("second"));
        index.apply(Some(&b), None);
        assert!(index.is_empty());
    }
}

#[cfg(test)]
mod limits {
    use super::*;
    use crate::keys::{KeyRecord, Role, SecretHasher};

    #[test]
    fn oversized_lists_are_cut_at_an_item_boundary() {
        let (mut r, _) = KeyRecord::issue(
            "n".into(),
            Role::Operator,
            vec![],
            vec!["*".into()],
            &SecretHasher::new(None),
        )
        .unwrap();
        r.scopes = (0..2000).map(|i| format!("scope-{i:05}")).collect();
        let k = LiveKey::from_record(&r);
        let kept: Vec<&str> = k.scopes().collect();
        assert!(!kept.is_empty() && kept.len() < 2000);
        assert!(
            kept.iter().all(|s| s.len() == "scope-00000".len()),
            "a cut item survived"
        );
    }
}
