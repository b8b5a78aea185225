//! The redb store: keys, the digest index, the audit trail and metadata, each change in one
//! write transaction. Only digests of secrets are ever written.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::audit::AuditEvent;
use crate::keyindex::LiveKey;
use crate::keys::{unhex, KeyRecord, SecretDigest, BASE62, ID_PREFIX};

const KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("keys");
const DIGESTS: TableDefinition<&[u8], &str> = TableDefinition::new("digests");
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// id → the compact form the live index loads at start (see `LiveKey::encode`).
const LIVE: TableDefinition<&str, &[u8]> = TableDefinition::new("live_keys");

/// redb's page cache size.
const STORE_CACHE_BYTES: usize = 16 << 20;

/// Ids that cut the id space into `parts` ranges of about as many keys: ids are `key_` and
/// random base62 characters, so the ranges split on the first of those. The first and last
/// ranges are open-ended, so ids of any other shape are read too.
fn id_splits(parts: usize) -> Vec<String> {
    let parts = parts.clamp(1, BASE62.len());
    (1..parts)
        .map(|i| {
            format!(
                "{ID_PREFIX}{}",
                char::from(BASE62[i * BASE62.len() / parts])
            )
        })
        .collect()
}

/// A store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another process (a running gateway) holds the file.
    #[error("the key store {0} is in use by a running keygate; use its admin API (set KEYGATE_ADMIN_KEY or --admin-key-file) or stop it first")]
    InUse(PathBuf),
    /// The directory could not be created or the file opened.
    #[error("cannot open the key store {path}: {source}")]
    Io {
        /// The store file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// redb reported an error.
    #[error("key store error: {0}")]
    Db(Box<redb::Error>),
    /// A record could not be decoded.
    #[error("key store record is corrupt: {0}")]
    Corrupt(String),
    /// A unique digest collided (practically impossible with 190 bits of entropy).
    #[error("a key with the same secret digest already exists")]
    DuplicateDigest,
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self { StoreError::Db(Box::new(e.into())) }
        }
    )*};
}
from_redb!(
    redb::Error,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// The embedded key store.
pub struct Store {
    db: Database,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

fn decode_key(bytes: &[u8]) -> Result<KeyRecord, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// All digests a record answers to (the current secret and those in grace).
pub fn record_digests(r: &KeyRecord) -> Vec<SecretDigest> {
    std::iter::once(r.digest.as_str())
        .chain(r.grace.iter().map(|g| g.digest.as_str()))
        .filter_map(unhex)
        .collect()
}

impl Store {
    /// Opens (creating if needed) the store at `path`. Fails with [`StoreError::InUse`]
    /// while another process holds it.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        }
        // Keys are read once at start and then served from memory: a small page cache keeps
        // the store from holding a copy of itself in RAM.
        let db = match redb::Builder::new()
            .set_cache_size(STORE_CACHE_BYTES)
            .create(path)
        {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(StoreError::InUse(path.to_path_buf()))
            }
            Err(redb::DatabaseError::Storage(redb::StorageError::Io(source))) => {
                if source.kind() == std::io::ErrorKind::WouldBlock {
                    return Err(StoreError::InUse(path.to_path_buf()));
                }
                return Err(StoreError::Io {
                    path: path.to_path_buf(),
                    source,
                });
            }
            Err(e) => return Err(StoreError::Db(Box::new(e.into()))),
        };
        let txn = db.begin_write()?;
        txn.open_table(KEYS)?;
        txn.open_table(DIGESTS)?;
        txn.open_table(AUDIT)?;
        txn.open_table(META)?;
        {
            // Stores written before the live table existed get it built once.
            let keys = txn.open_table(KEYS)?;
            let mut live = txn.open_table(LIVE)?;
            if live.len()? != keys.len()? {
                for row in keys.iter()? {
                    let (id, v) = row?;
                    live.insert(
                        id.value(),
                        LiveKey::encode(&decode_key(v.value())?).as_slice(),
                    )?;
                }
            }
        }
        txn.commit()?;
        Ok(Store {
            db,
            path: path.to_path_buf(),
        })
    }

    /// The file path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The underlying database, for modules that keep their own tables (usage).
    pub fn database(&self) -> &Database {
        &self.db
    }

    /// One key by id.
    pub fn get_key(&self, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(KEYS)?;
        let found = table.get(id)?;
        found.map(|v| decode_key(v.value())).transpose()
    }

    /// Every key, ordered by id.
    pub fn list_keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(KEYS)?;
        let mut out = Vec::with_capacity(table.len()? as usize);
        for row in table.iter()? {
            let (_, v) = row?;
            out.push(decode_key(v.value())?);
        }
        Ok(out)
    }

    /// Calls `f` with the compact live form of every key, reading `parts` ranges of ids at
    /// once, each on its own thread (in id order within a range), and returns how many keys
    /// were read. With a cold page cache the read is tens of thousands of scattered page
    /// reads, which a disk serves faster several at a time; with a warm one, the decoding
    /// `f` does spreads over the cores. One read transaction serves every range.
    pub fn for_each_live(
        &self,
        parts: usize,
        f: impl Fn(&[u8]) -> Result<(), StoreError> + Sync,
    ) -> Result<usize, StoreError> {
        use std::ops::Bound::{Excluded, Included, Unbounded};
        let txn = self.db.begin_read()?;
        let table = txn.open_table(LIVE)?;
        let splits = id_splits(parts);
        let read_range = |lo: Option<&str>, hi: Option<&str>| -> Result<usize, StoreError> {
            let range = (
                lo.map_or(Unbounded, Included),
                hi.map_or(Unbounded, Excluded),
            );
            let mut n = 0;
            for row in table.range::<&str>(range)? {
                f(row?.1.value())?;
                n += 1;
            }
            Ok(n)
        };
        std::thread::scope(|scope| {
            let (mut readers, mut counts) = (Vec::new(), Vec::new());
            for i in 0..=splits.len() {
                let lo = i.checked_sub(1).map(|j| splits[j].as_str());
                let hi = splits.get(i).map(String::as_str);
                let read_range = &read_range;
                match std::thread::Builder::new()
                    .name("keygate-load".into())
                    .spawn_scoped(scope, move || read_range(lo, hi))
                {
                    Ok(reader) => readers.push(reader),
                    // No thread to be had (a process limit): that range is read here instead.
                    Err(_) => counts.push(read_range(lo, hi)),
                }
            }
            // Every reader is joined before an error is returned.
            for r in readers {
                counts.push(
                    r.join().unwrap_or_else(|_| {
                        Err(StoreError::Corrupt("a key reader panicked".into()))
                    }),
                );
            }
            counts.into_iter().sum()
        })
    }

    /// The number of keys.
    pub fn key_count(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(KEYS)?.len()?)
    }

    /// The id of the key answering to `digest`, if any.
    pub fn id_for_digest(&self, digest: &SecretDigest) -> Result<Option<String>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(DIGESTS)?;
        let found = table.get(digest.as_slice())?;
        Ok(found.map(|v| v.value().to_string()))
    }

    /// Writes `record` (new or changed) and its audit event in one transaction, keeping the
    /// digest index in step with `previous`.
    pub fn put_key(
        &self,
        record: &KeyRecord,
        previous: Option<&KeyRecord>,
        audit: Option<&AuditEvent>,
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut digests = txn.open_table(DIGESTS)?;
            let new = record_digests(record);
            if let Some(prev) = previous {
                for d in record_digests(prev) {
                    if !new.contains(&d) {
                        digests.remove(d.as_slice())?;
                    }
                }
            }
            for d in &new {
                let existing = digests.get(d.as_slice())?.map(|v| v.value().to_string());
                if existing.is_some_and(|id| id != record.id) {
                    return Err(StoreError::DuplicateDigest);
                }
                digests.insert(d.as_slice(), record.id.as_str())?;
            }
            let mut keys = txn.open_table(KEYS)?;
            keys.insert(record.id.as_str(), encode(record)?.as_slice())?;
            txn.open_table(LIVE)?
                .insert(record.id.as_str(), LiveKey::encode(record).as_slice())?;
            if let Some(ev) = audit {
                append_audit_in(&txn, ev)?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Inserts many new keys in one transaction (bulk import, benchmarks).
    pub fn insert_keys(&self, records: &[KeyRecord]) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut digests = txn.open_table(DIGESTS)?;
            let mut keys = txn.open_table(KEYS)?;
            let mut live = txn.open_table(LIVE)?;
            for r in records {
                live.insert(r.id.as_str(), LiveKey::encode(r).as_slice())?;
                for d in record_digests(r) {
                    if digests.get(d.as_slice())?.is_some() {
                        return Err(StoreError::DuplicateDigest);
                    }
                    digests.insert(d.as_slice(), r.id.as_str())?;
                }
                keys.insert(r.id.as_str(), encode(r)?.as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Removes a key and its digests, recording `audit`, in one transaction.
    pub fn delete_key(
        &self,
        record: &KeyRecord,
        audit: Option<&AuditEvent>,
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut digests = txn.open_table(DIGESTS)?;
            for d in record_digests(record) {
                digests.remove(d.as_slice())?;
            }
            txn.open_table(KEYS)?.remove(record.id.as_str())?;
            txn.open_table(LIVE)?.remove(record.id.as_str())?;
            if let Some(ev) = audit {
                append_audit_in(&txn, ev)?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Appends one audit event.
    pub fn append_audit(&self, ev: &AuditEvent) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        append_audit_in(&txn, ev)?;
        txn.commit()?;
        Ok(())
    }

    /// Up to `limit` audit events, newest first.
    pub fn list_audit(&self, limit: usize) -> Result<Vec<AuditEvent>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(AUDIT)?;
        let mut out = Vec::new();
        for row in table.iter()?.rev().take(limit) {
            let (_, v) = row?;
            out.push(
                serde_json::from_slice(v.value())
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?,
            );
        }
        Ok(out)
    }

    /// A metadata value.
    pub fn meta_get(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(META)?;
        let found = table.get(name)?;
        Ok(found.map(|v| v.value().to_vec()))
    }

    /// Sets a metadata value.
    pub fn meta_set(&self, name: &str, value: &[u8]) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(META)?.insert(name, value)?;
        txn.commit()?;
        Ok(())
    }
}

/// Appends an event under a strictly increasing key (microseconds, bumped on ties).
fn append_audit_in(txn: &redb::WriteTransaction, ev: &AuditEvent) -> Result<(), StoreError> {
    let mut table = txn.open_table(AUDIT)?;
    let now = u64::try_from(ev.time.timestamp_micros()).unwrap_or(0);
    let last = table.last()?.map(|(k, _)| k.value()).unwrap_or(0);
    let id = now.max(last + 1);
    table.insert(id, encode(ev)?.as_slice())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::Actor;
    use crate::keys::{hex, Role, SecretHasher};
    use chrono::Utc;

    fn record(id: &str, secret: &str) -> KeyRecord {
        KeyRecord {
            id: id.into(),
            name: "n".into(),
            description: String::new(),
            owner: String::new(),
            role: Role::Viewer,
            scopes: vec![],
            deployments: vec!["*".into()],
            env: "dev".into(),
            display: "kg_dev_****…abcd".into(),
            created_at: Utc::now(),
            expires_at: None,
            revoked_at: None,
            rate_limit: None,
            digest: hex(&SecretHasher::new(None).digest(secret)),
            grace: vec![],
        }
    }

    #[test]
    fn live_keys_are_read_once_each_whatever_the_number_of_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("k.redb")).unwrap();
        let mut ids: Vec<String> = (0..300)
            .map(|_| crate::keys::generate_id().unwrap())
            .collect();
        // Ids at and around the split points, and ids of other shapes.
        for odd in [
            "key_", "key_0", "key_A", "key_Z", "key_a", "key_z", "key_zz", "a", "zzz",
        ] {
            ids.push(odd.into());
        }
        let records: Vec<KeyRecord> = ids.iter().map(|id| record(id, id)).collect();
        store.insert_keys(&records).unwrap();
        ids.sort();
        for parts in [1, 2, 3, 8, 16, 62, 100] {
            let seen = std::sync::Mutex::new(Vec::new());
            let n = store
                .for_each_live(parts, |bytes| {
                    let (key, _, _) = LiveKey::decode(bytes).unwrap();
                    seen.lock().unwrap().push(key.id_str().to_string());
                    Ok(())
                })
                .unwrap();
            let mut seen = seen.into_inner().unwrap();
            seen.sort();
            assert_eq!((n, &seen), (ids.len(), &ids), "{parts} parts");
        }
        // A failure in any range is the answer.
        let failed = store.for_each_live(8, |bytes| match LiveKey::decode(bytes) {
            Some((key, _, _)) if key.id_str() == "key_z" => {
                Err(StoreError::Corrupt("refused".into()))
            }
            _ => Ok(()),
        });
        assert!(matches!(failed, Err(StoreError::Corrupt(_))));
    }

    #[test]
    fn keys_round_trip_and_second_open_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/k.redb");
        let store = Store::open(&path).unwrap();
        let r = record("key_0000000000000001", "s1");
        let ev = Actor::local().event("key.created", Some(&r.id), Some(&r.name), vec![]);
        store.put_key(&r, None, Some(&ev)).unwrap();
        assert_eq!(store.get_key(&r.id).unwrap().as_ref(), Some(&r));
        let d = SecretHasher::new(None).digest("s1");
        assert_eq!(
            store.id_for_digest(&d).unwrap().as_deref(),
            Some(r.id.as_str())
        );
        assert!(matches!(Store::open(&path), Err(StoreError::InUse(_))));
        store.delete_key(&r, None).unwrap();
        assert_eq!(store.get_key(&r.id).unwrap(), None);
        assert_eq!(store.id_for_digest(&d).unwrap(), None);
        assert_eq!(store.list_audit(10).unwrap().len(), 1);
    }
}
