//! The key model: secret format (prefix_env_body with a CRC32 checksum), ids, digests,
//! roles, statuses, expiry parsing and the public JSON form of a key.

use chrono::{DateTime, SecondsFormat, Utc};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::text;
use crate::units::parse_duration;

/// The base62 digits, in ASCII order (so ids sort by their digits' values).
pub const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// What every key id starts with.
pub const ID_PREFIX: &str = "key_";
/// Random base62 characters in a secret's body.
pub const SECRET_ENTROPY_CHARS: usize = 32;
/// Base62 characters of the CRC32 checksum at the end of a secret.
pub const CHECKSUM_CHARS: usize = 6;
/// Base62 characters after `key_` in a key id.
pub const ID_CHARS: usize = 16;

/// A SHA-256 (or HMAC-SHA256) digest of a secret: the only form a secret is stored in.
pub type SecretDigest = [u8; 32];

/// Fills `out` with uniformly random base62 characters from the OS CSPRNG.
fn random_base62(out: &mut String, count: usize) -> Result<(), getrandom::Error> {
    let mut pushed = 0;
    let mut buf = [0u8; 64];
    while pushed < count {
        getrandom::fill(&mut buf)?;
        for &b in &buf {
            // Rejection sampling: 248 = 4 * 62 keeps every character equally likely.
            if b < 248 && pushed < count {
                out.push(BASE62[(b % 62) as usize] as char);
                pushed += 1;
            }
        }
    }
    Ok(())
}

/// Encodes a CRC32 as exactly six base62 characters.
fn checksum_chars(text: &[u8]) -> [u8; CHECKSUM_CHARS] {
    let mut n = crc32fast::hash(text) as u64;
    let mut out = [b'0'; CHECKSUM_CHARS];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    out
}

/// Each byte's base62 digit value, or 0xff.
static BASE62_DIGIT: [u8; 256] = {
    let mut t = [0xff; 256];
    let mut i = 0;
    while i < BASE62.len() {
        t[BASE62[i] as usize] = i as u8;
        i += 1;
    }
    t
};

/// The number written by `checksum_chars` (62^6 > 2^32, so the encoding is one-to-one).
fn decode_checksum(chars: &[u8]) -> Option<u32> {
    let mut n: u64 = 0;
    for &c in chars {
        let d = BASE62_DIGIT[c as usize];
        if d == 0xff {
            return None;
        }
        n = n * 62 + u64::from(d);
    }
    u32::try_from(n).ok()
}

/// Generates a new secret `{prefix}_{env}_{32 random}{6 checksum}`.
pub fn generate_secret(prefix: &str, env: &str) -> Result<String, getrandom::Error> {
    let mut s =
        String::with_capacity(prefix.len() + env.len() + 2 + SECRET_ENTROPY_CHARS + CHECKSUM_CHARS);
    s.push_str(prefix);
    s.push('_');
    s.push_str(env);
    s.push('_');
    random_base62(&mut s, SECRET_ENTROPY_CHARS)?;
    let sum = checksum_chars(s.as_bytes());
    s.extend(sum.iter().map(|&b| b as char));
    Ok(s)
}

/// Generates a new public key id, `key_` + 16 base62 characters.
pub fn generate_id() -> Result<String, getrandom::Error> {
    let mut s = String::with_capacity(ID_PREFIX.len() + ID_CHARS);
    s.push_str(ID_PREFIX);
    random_base62(&mut s, ID_CHARS)?;
    Ok(s)
}

/// True when `id` has the shape of a key id.
pub fn is_valid_id(id: &str) -> bool {
    id.len() == ID_PREFIX.len() + ID_CHARS
        && id.starts_with(ID_PREFIX)
        && id.as_bytes()[ID_PREFIX.len()..]
            .iter()
            .all(|&b| BASE62_DIGIT[b as usize] != 0xff)
}

/// Checks a presented secret's shape, prefix, environment and checksum without any
/// lookup. Returns the environment (the configured name) on success.
pub fn check_secret_format<'e>(
    secret: impl AsRef<[u8]>,
    prefix: &str,
    environments: &'e [String],
) -> Option<&'e str> {
    let secret = secret.as_ref();
    let env = check_secret_shape(secret, prefix, environments)?;
    // The checksum characters are decoded and compared with the CRC of the rest; the random
    // characters need no check of their own: any byte outside base62 there changes the CRC
    // (and could not match a stored digest anyway).
    let signed = &secret[..secret.len() - CHECKSUM_CHARS];
    (decode_checksum(&secret[secret.len() - CHECKSUM_CHARS..])? == crc32fast::hash(signed))
        .then_some(env)
}

/// [`check_secret_format`] without the checksum: length, prefix, environment and separators.
/// Returns the environment (the configured name) on success.
pub fn check_secret_shape<'e>(
    secret: &[u8],
    prefix: &str,
    environments: &'e [String],
) -> Option<&'e str> {
    // Byte-wise: prefix and environment equal configured ASCII text at '_' boundaries (the
    // body is left to the checksum or the digest lookup), so the secret needs no UTF-8 pass.
    let body_len = SECRET_ENTROPY_CHARS + CHECKSUM_CHARS;
    let prefix = prefix.as_bytes();
    if secret.len() < prefix.len() + 3 + body_len || !text::starts_with(secret, prefix) {
        return None;
    }
    let body_start = secret.len() - body_len;
    if secret[prefix.len()] != b'_' || secret[body_start - 1] != b'_' {
        return None;
    }
    let env = &secret[prefix.len() + 1..body_start - 1];
    environments
        .iter()
        .find(|e| text::short_eq(e.as_bytes(), env))
        .map(String::as_str)
}

/// SHA-256 of a message that fits one block (every well-formed secret does): the padded
/// block is built on the stack and compressed once, skipping the streaming hasher's
/// buffering (a third of the hash's cost at this size). `None` for longer input.
///
/// The block is put together in registers and written 16 bytes at a time, the width SHA-NI
/// reads it in: a load that spans several narrower stores cannot take its data from the store
/// buffer and waits until they reach the cache. Built with a byte copy and a marker byte, the
/// block's loads stalled so (~20 of the hash's ~64 ns on the benchmark host). The digest
/// leaves as 8-byte words, the width the index reads it in.
// Inlined: returned through memory, the digest's bytes sat one past an 8-byte boundary (the
// `Option`'s flag first) and its caller's 16-byte reads of them stalled.
#[inline(always)]
fn sha256_short(msg: &[u8]) -> Option<SecretDigest> {
    const H0: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    let len = msg.len();
    // Room for the 0x80 marker and the 64-bit length.
    if len > 55 {
        return None;
    }
    // Written out, not `array::map`: that one is not inlined and returns the words through
    // memory, 8 bytes at a time.
    let word = |start| message_word(msg, start);
    let mut words = [
        word(0),
        word(8),
        word(16),
        word(24),
        word(32),
        word(40),
        word(48),
        word(56),
    ];
    let marker = 0x80 << (8 * (len % 8));
    for (i, word) in words.iter_mut().enumerate() {
        // A select per word, not an indexed store (which would put the words in memory).
        *word |= if i == len / 8 { marker } else { 0 };
    }
    // The length in bits, big-endian, in the block's last 8 bytes.
    words[7] |= (len as u64 * 8).swap_bytes();
    let mut block = sha2::digest::generic_array::GenericArray::default();
    for (chunk, pair) in block.chunks_exact_mut(16).zip(words.chunks_exact(2)) {
        store_16(chunk, pair[0], pair[1]);
    }
    let mut state = H0;
    sha2::compress256(&mut state, &[block]);
    let mut out = [0u8; 32];
    for (chunk, pair) in out.chunks_exact_mut(8).zip(state.chunks_exact(2)) {
        // Big-endian words, two to an 8-byte store.
        let word = u64::from(pair[0].swap_bytes()) | u64::from(pair[1].swap_bytes()) << 32;
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    Some(out)
}

/// Bytes `start..start + 8` of `msg` as a little-endian word, zero past its end: one 8-byte
/// load from the message (its last 8 bytes, shifted, for the word the message ends in).
#[inline(always)]
fn message_word(msg: &[u8], start: usize) -> u64 {
    if let Some(full) = msg.get(start..).and_then(|m| m.first_chunk::<8>()) {
        return u64::from_le_bytes(*full);
    }
    if start >= msg.len() {
        return 0;
    }
    match msg.last_chunk::<8>() {
        // Byte `start` of the message is byte `start + 8 - len` of its last 8.
        Some(tail) => u64::from_le_bytes(*tail) >> (8 * (start + 8 - msg.len())),
        // Under 8 bytes (never a well-formed secret): copied byte-wise.
        None => {
            let mut short = [0u8; 8];
            short[..msg.len()].copy_from_slice(msg);
            u64::from_le_bytes(short)
        }
    }
}

/// Writes two little-endian words to `chunk` (16 bytes) with one 16-byte store, so that
/// SHA-NI's 16-byte loads of the block take them straight from the store buffer.
#[inline(always)]
fn store_16(chunk: &mut [u8], lo: u64, hi: u64) {
    #[cfg(target_arch = "x86_64")]
    if chunk.len() == 16 {
        use core::arch::x86_64::{_mm_set_epi64x, _mm_storeu_si128};
        // SAFETY: SSE2 is part of the x86_64 baseline; `chunk` is 16 writable bytes (checked
        // above) and the store is unaligned.
        unsafe {
            _mm_storeu_si128(
                chunk.as_mut_ptr().cast(),
                _mm_set_epi64x(hi as i64, lo as i64),
            )
        };
        return;
    }
    let (a, b) = chunk.split_at_mut(chunk.len() / 2);
    a.copy_from_slice(&lo.to_le_bytes());
    b.copy_from_slice(&hi.to_le_bytes());
}

/// Hashes secrets: SHA-256, or HMAC-SHA256 keyed with the pepper from `KEYGATE_PEPPER`.
#[derive(Clone)]
pub struct SecretHasher {
    pepper: Option<Hmac<Sha256>>,
}

impl std::fmt::Debug for SecretHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the pepper.
        f.debug_struct("SecretHasher")
            .field("peppered", &self.pepper.is_some())
            .finish()
    }
}

impl SecretHasher {
    /// A hasher with an optional pepper (empty means none).
    pub fn new(pepper: Option<&[u8]>) -> Self {
        let pepper = pepper
            .filter(|p| !p.is_empty())
            .map(|p| Hmac::<Sha256>::new_from_slice(p).expect("HMAC accepts keys of any length"));
        SecretHasher { pepper }
    }

    /// A hasher using `KEYGATE_PEPPER` when it is set.
    pub fn from_env() -> Self {
        let pepper = std::env::var_os("KEYGATE_PEPPER");
        Self::new(pepper.as_ref().map(|p| p.as_encoded_bytes()))
    }

    /// The digest of a secret.
    #[inline]
    pub fn digest(&self, secret: impl AsRef<[u8]>) -> SecretDigest {
        let secret = secret.as_ref();
        match &self.pepper {
            None => sha256_short(secret).unwrap_or_else(|| Sha256::digest(secret).into()),
            Some(mac) => {
                let mut mac = mac.clone();
                mac.update(secret);
                mac.finalize().into_bytes().into()
            }
        }
    }
}

/// The masked display form of a secret: `kg_prod_****…ab12`.
pub fn display_secret(secret: &str, prefix: &str, env: &str) -> String {
    let last4 = &secret[secret.len().saturating_sub(4)..];
    format!("{prefix}_{env}_****…{last4}")
}

/// A built-in role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything, including the admin API.
    Admin,
    /// Every method on its deployments; no key management.
    Operator,
    /// Only GET, HEAD and OPTIONS on its deployments.
    Viewer,
}

impl Role {
    /// The role's name as written in config and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "admin" => Ok(Role::Admin),
            "operator" => Ok(Role::Operator),
            "viewer" => Ok(Role::Viewer),
            other => Err(format!(
                "unknown role {other:?} (use admin, operator or viewer)"
            )),
        }
    }
}

/// A key's lifecycle status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Usable.
    Active,
    /// Past its expiry time.
    Expired,
    /// Revoked for good.
    Revoked,
}

impl Status {
    /// The status name as in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Active => "active",
            Status::Expired => "expired",
            Status::Revoked => "revoked",
        }
    }
}

/// A previous secret that stays valid until `valid_until` after a rotation with grace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraceSecret {
    /// Hex digest of the old secret.
    pub digest: String,
    /// When the old secret stops working.
    pub valid_until: DateTime<Utc>,
}

/// A key as persisted in the store (never holds the secret itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// Public id, `key_…`.
    pub id: String,
    /// Human name.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Who the key belongs to.
    #[serde(default)]
    pub owner: String,
    /// Built-in role.
    pub role: Role,
    /// Scopes granted.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Deployments allowed (`*` for all).
    #[serde(default)]
    pub deployments: Vec<String>,
    /// Environment label from the secret.
    pub env: String,
    /// Masked secret for display.
    pub display: String,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Expiry, `None` for never.
    pub expires_at: Option<DateTime<Utc>>,
    /// Revocation time.
    pub revoked_at: Option<DateTime<Utc>>,
    /// Per-key rate limit (`N/DURATION` or `none`), `None` for the role's or default.
    pub rate_limit: Option<String>,
    /// Hex digest of the current secret.
    pub digest: String,
    /// Old secrets still valid during a rotation grace period.
    #[serde(default)]
    pub grace: Vec<GraceSecret>,
}

impl KeyRecord {
    /// A fresh active record with a new id and secret, no expiry and no own limit (bulk
    /// import, benchmarks, tests); returns it with its secret. The admin path builds records
    /// through `manage`, which also validates.
    pub fn issue(
        name: String,
        role: Role,
        scopes: Vec<String>,
        deployments: Vec<String>,
        hasher: &SecretHasher,
    ) -> Result<(KeyRecord, String), getrandom::Error> {
        let secret = generate_secret("kg", "prod")?;
        let record = KeyRecord {
            id: generate_id()?,
            name,
            description: String::new(),
            owner: "bench".into(),
            role,
            scopes,
            deployments,
            env: "prod".into(),
            display: display_secret(&secret, "kg", "prod"),
            created_at: Utc::now(),
            expires_at: None,
            revoked_at: None,
            rate_limit: None,
            digest: hex(&hasher.digest(&secret)),
            grace: vec![],
        };
        Ok((record, secret))
    }
}

/// Formats a time as RFC 3339 UTC with second precision.
pub fn rfc3339(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Usage-derived fields shown with a key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LastUsed {
    /// Last request time.
    pub at: Option<DateTime<Utc>>,
    /// Last client IP.
    pub ip: Option<String>,
    /// Last user agent.
    pub user_agent: Option<String>,
}

impl KeyRecord {
    /// The status at `now`.
    pub fn status(&self, now: DateTime<Utc>) -> Status {
        if self.revoked_at.is_some() {
            Status::Revoked
        } else if self.expires_at.is_some_and(|e| e <= now) {
            Status::Expired
        } else {
            Status::Active
        }
    }

    /// The public JSON form (SPEC §1).
    pub fn to_json(&self, now: DateTime<Utc>, last: &LastUsed) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "name": self.name,
            "description": self.description,
            "owner": self.owner,
            "role": self.role,
            "scopes": self.scopes,
            "deployments": self.deployments,
            "env": self.env,
            "display": self.display,
            "status": self.status(now),
            "created_at": rfc3339(&self.created_at),
            "expires_at": self.expires_at.as_ref().map(rfc3339),
            "revoked_at": self.revoked_at.as_ref().map(rfc3339),
            "rate_limit": self.rate_limit,
            "last_used_at": last.at.as_ref().map(rfc3339),
            "last_used_ip": last.ip,
            "last_used_user_agent": last.user_agent,
        })
    }
}

/// Parses an expiry (`90d`, `1y`, an RFC 3339 time or `never`) relative to `now`.
pub fn parse_expiry(text: &str, now: DateTime<Utc>) -> Result<Option<DateTime<Utc>>, String> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("never") {
        return Ok(None);
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(Some(t.with_timezone(&Utc)));
    }
    let d = parse_duration(text).map_err(|_| {
        format!("bad expiry {text:?}: use a duration such as 90d or 1y, an RFC 3339 time, or never")
    })?;
    let d = chrono::Duration::from_std(d)
        .map_err(|_| format!("bad expiry {text:?}: too far in the future"))?;
    now.checked_add_signed(d)
        .map(Some)
        .ok_or_else(|| format!("bad expiry {text:?}: too far in the future"))
}

/// Lower-case hex of a digest.
pub fn hex(digest: &SecretDigest) -> String {
    let mut s = String::with_capacity(64);
    for b in digest {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Parses a lower-case hex digest.
pub fn unhex(text: &str) -> Option<SecretDigest> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, slot) in out.iter_mut().enumerate() {
        *slot = u8::from_str_radix(text.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envs() -> Vec<String> {
        ["dev", "ci", "stg", "prod"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    #[test]
    fn one_block_sha256_matches_the_streaming_hasher() {
        let msg: Vec<u8> = (0..80u8).map(|i| i.wrapping_mul(37)).collect();
        for len in 0..=msg.len() {
            let full: SecretDigest = Sha256::digest(&msg[..len]).into();
            match sha256_short(&msg[..len]) {
                Some(d) => assert_eq!(d, full, "length {len}"),
                None => assert!(len > 55, "length {len} fits one block"),
            }
        }
    }

    #[test]
    fn generated_secret_passes_format_check() {
        let s = generate_secret("kg", "prod").unwrap();
        assert!(s.starts_with("kg_prod_"));
        assert_eq!(s.len(), "kg_prod_".len() + 38);
        assert_eq!(check_secret_format(&s, "kg", &envs()), Some("prod"));
    }

    #[test]
    fn mistyped_secret_fails_checksum() {
        let s = generate_secret("kg", "ci").unwrap();
        let mut bytes = s.into_bytes();
        let i = 10;
        bytes[i] = if bytes[i] == b'a' { b'b' } else { b'a' };
        let s = String::from_utf8(bytes).unwrap();
        assert_eq!(check_secret_format(&s, "kg", &envs()), None);
    }

    #[test]
    fn wrong_prefix_or_env_rejected() {
        let s = generate_secret("kg", "ci").unwrap();
        assert_eq!(check_secret_format(&s, "xx", &envs()), None);
        assert_eq!(check_secret_format(&s, "kg", &["prod".to_string()]), None);
        assert_eq!(check_secret_format("kg_ci_short", "kg", &envs()), None);
        assert_eq!(check_secret_format("", "kg", &envs()), None);
        assert_eq!(check_secret_format("kg_ci_é", "kg", &envs()), None);
    }

    #[test]
    fn non_ascii_secret_is_rejected_without_panicking() {
        let tail = "A".repeat(38);
        // The env/body split would fall inside the two-byte 'é'.
        assert_eq!(
            check_secret_format(format!("kg_aé{tail}"), "kg", &envs()),
            None
        );
        assert_eq!(
            check_secret_format(format!("kg_prod_{}é", "A".repeat(37)), "kg", &envs()),
            None
        );
        assert_eq!(check_secret_format("é".repeat(30), "kg", &envs()), None);
    }

    #[test]
    fn ids_have_the_documented_shape() {
        let id = generate_id().unwrap();
        assert!(is_valid_id(&id), "{id}");
        assert!(!is_valid_id("key_short"));
    }

    #[test]
    fn pepper_changes_digest() {
        let plain = SecretHasher::new(None).digest("x");
        let peppered = SecretHasher::new(Some(b"pepper")).digest("x");
        assert_ne!(plain, peppered);
        assert_eq!(unhex(&hex(&plain)), Some(plain));
    }

    #[test]
    fn display_masks_all_but_last_four() {
        let s = generate_secret("kg", "prod").unwrap();
        let d = display_secret(&s, "kg", "prod");
        assert!(d.starts_with("kg_prod_****…"));
        assert!(d.ends_with(&s[s.len() - 4..]));
    }

    #[test]
    fn expiry_forms() {
        let now = Utc::now();
        assert_eq!(parse_expiry("never", now).unwrap(), None);
        assert_eq!(
            parse_expiry("1h", now).unwrap(),
            Some(now + chrono::Duration::hours(1))
        );
        assert!(parse_expiry("2030-01-01T00:00:00Z", now).unwrap().is_some());
        assert!(parse_expiry("soon", now).is_err());
    }
}
