//! The live key index: digest → key, read lock-free by the data plane, written only by the
//! admin path (and at start-up). Revocation, deletion and rotation apply here before the
//! admin answer is sent.

use std::sync::Arc;

use dashmap::DashMap;
use http::HeaderValue;
use subtle::ConstantTimeEq;

use crate::keys::{unhex, KeyRecord, Role, SecretDigest};
use crate::units::Limit;

/// What the data plane needs to know about a key, with its identity headers pre-built.
#[derive(Debug)]
pub struct LiveKey {
    /// Public id.
    pub id: std::sync::Arc<str>,
    /// Role.
    pub role: Role,
    /// Granted scopes.
    pub scopes: Box<[Box<str>]>,
    /// Allowed deployments; `None` means all (`*`).
    pub deployments: Option<Box<[Box<str>]>>,
    /// Expiry as Unix seconds.
    pub expires_at: Option<i64>,
    /// The key's own limit: `None` = role/default, `Some(None)` = unlimited.
    pub rate_limit: Option<Option<Limit>>,
    /// `X-Keygate-Key-Id`.
    pub hv_id: HeaderValue,
    /// `X-Keygate-Key-Name`.
    pub hv_name: HeaderValue,
    /// `X-Keygate-Owner`.
    pub hv_owner: HeaderValue,
    /// `X-Keygate-Role`.
    pub hv_role: HeaderValue,
    /// `X-Keygate-Scopes`.
    pub hv_scopes: HeaderValue,
}

/// Makes a header value from free text, dropping characters headers cannot carry.
fn header_text(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| {
        let cleaned: Vec<u8> = s
            .bytes()
            .filter(|&b| b == b'\t' || (b >= 0x20 && b != 0x7f))
            .collect();
        HeaderValue::from_bytes(&cleaned).unwrap_or_else(|_| HeaderValue::from_static(""))
    })
}

impl LiveKey {
    /// Builds the live form of a record.
    pub fn from_record(r: &KeyRecord) -> LiveKey {
        let all = r.deployments.iter().any(|d| d == "*");
        LiveKey {
            id: r.id.as_str().into(),
            role: r.role,
            scopes: r.scopes.iter().map(|s| s.as_str().into()).collect(),
            deployments: (!all).then(|| r.deployments.iter().map(|d| d.as_str().into()).collect()),
            expires_at: r.expires_at.map(|t| t.timestamp()),
            rate_limit: r
                .rate_limit
                .as_deref()
                .map(|l| Limit::parse(l).ok().flatten()),
            hv_id: header_text(&r.id),
            hv_name: header_text(&r.name),
            hv_owner: header_text(&r.owner),
            hv_role: HeaderValue::from_static(r.role.as_str()),
            hv_scopes: header_text(&r.scopes.join(",")),
        }
    }

    /// True when the key may be used on `deployment`.
    pub fn allows_deployment(&self, deployment: &str) -> bool {
        self.role == Role::Admin
            || match &self.deployments {
                None => true,
                Some(list) => list.iter().any(|d| &**d == deployment),
            }
    }

    /// True when the key grants `scope`.
    pub fn has_scope(&self, scope: &str) -> bool {
        self.role == Role::Admin || self.scopes.iter().any(|s| &**s == scope || &**s == "*")
    }

    /// The scopes as owned strings (for error bodies).
    pub fn scope_list(&self) -> Vec<String> {
        self.scopes.iter().map(|s| s.to_string()).collect()
    }
}

/// One digest's entry.
#[derive(Debug, Clone)]
pub struct IndexEntry {
    /// The full digest, compared in constant time after the hash lookup.
    pub digest: SecretDigest,
    /// The key.
    pub key: Arc<LiveKey>,
    /// For a rotated-out secret in its grace period: Unix seconds it stops working.
    pub valid_until: Option<i64>,
}

/// The in-memory digest → key index.
#[derive(Debug, Default)]
pub struct KeyIndex {
    map: DashMap<SecretDigest, IndexEntry>,
}

impl KeyIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of digests indexed.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Finds the key for `digest` (constant-time comparison of the full digest).
    pub fn lookup(&self, digest: &SecretDigest) -> Option<IndexEntry> {
        let entry = self.map.get(digest)?;
        if bool::from(entry.digest.ct_eq(digest)) {
            Some(entry.clone())
        } else {
            None
        }
    }

    /// Replaces `previous` by `current` (either may be absent). New digests go in before the
    /// old ones come out, so a key that stays valid is never briefly missing.
    pub fn apply(&self, previous: Option<&KeyRecord>, current: Option<&KeyRecord>) {
        let mut kept: Vec<SecretDigest> = Vec::new();
        if let Some(r) = current.filter(|r| r.revoked_at.is_none()) {
            let key = Arc::new(LiveKey::from_record(r));
            if let Some(d) = unhex(&r.digest) {
                self.map.insert(
                    d,
                    IndexEntry {
                        digest: d,
                        key: key.clone(),
                        valid_until: None,
                    },
                );
                kept.push(d);
            }
            for g in &r.grace {
                if let Some(d) = unhex(&g.digest) {
                    let until = g.valid_until.timestamp();
                    self.map.insert(
                        d,
                        IndexEntry {
                            digest: d,
                            key: key.clone(),
                            valid_until: Some(until),
                        },
                    );
                    kept.push(d);
                }
            }
        }
        if let Some(prev) = previous {
            for d in crate::store::record_digests(prev) {
                if !kept.contains(&d) {
                    self.map.remove(&d);
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
}
