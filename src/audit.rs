//! Audit events: who did what to which key, when. Never holds a secret.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// One audit trail entry (SPEC §3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// When it happened.
    #[serde(with = "rfc3339_secs")]
    pub time: DateTime<Utc>,
    /// `key.created`, `key.updated`, `key.rotated`, `key.revoked`, `key.deleted`, `admin.auth_failed`.
    pub action: String,
    /// The admin key that acted (`None` for the offline CLI or a failed authentication).
    pub actor_key_id: Option<String>,
    /// Client address of the admin request (`None` for the offline CLI).
    pub client_ip: Option<String>,
    /// The key acted on.
    pub target_key_id: Option<String>,
    /// Its name at the time.
    pub target_name: Option<String>,
    /// Names of the fields that changed (never values of secrets).
    #[serde(default)]
    pub changes: Vec<String>,
}

/// Who performs an admin action.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Actor {
    /// The admin key id, if authenticated by key.
    pub key_id: Option<String>,
    /// The client IP, if over the network.
    pub client_ip: Option<String>,
}

impl Actor {
    /// The local CLI working on the store directly.
    pub fn local() -> Self {
        Actor::default()
    }

    /// An event by this actor.
    pub fn event(
        &self,
        action: &str,
        target_id: Option<&str>,
        target_name: Option<&str>,
        changes: Vec<String>,
    ) -> AuditEvent {
        AuditEvent {
            time: Utc::now(),
            action: action.to_string(),
            actor_key_id: self.key_id.clone(),
            client_ip: self.client_ip.clone(),
            target_key_id: target_id.map(str::to_string),
            target_name: target_name.map(str::to_string),
            changes,
        }
    }
}

mod rfc3339_secs {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::keys::rfc3339(t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let s = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&s)
            .map(|t| t.with_timezone(&Utc))
            .map_err(serde::de::Error::custom)
    }
}
