//! The role credentials the simulated instance hands out, and when it replaces them.
//!
//! A set issued at `T` expires at `T + lifetime`. The first request at or after
//! `expiration - margin` gets a new set, where `margin = min(5 minutes, lifetime / 2)`: real IMDS
//! publishes new credentials at least five minutes before the old ones expire (IMDS.md), and
//! short test lifetimes still rotate before expiry.

use std::time::{Duration, SystemTime};

use super::json::{pretty_object, Value};
use super::{clock, random};

/// Longest head start new credentials get over the expiry of the old ones.
const MAX_REFRESH_MARGIN_SECS: u64 = 5 * 60;

/// The instance profile a role is attached through, as `iam/info` reports it.
pub(super) struct InstanceProfile {
    /// `arn:aws:iam::<account>:instance-profile/<role>`.
    pub(super) arn: String,
    /// The profile's unique id (`AIPA...`).
    pub(super) id: &'static str,
}

/// One issued set of temporary credentials. Deliberately not `Debug`: it holds secrets.
pub(super) struct CredentialSet {
    issued_at: SystemTime,
    expiration: SystemTime,
    access_key_id: String,
    secret_access_key: String,
    session_token: String,
}

impl CredentialSet {
    fn issue(now: SystemTime, lifetime: Duration) -> Result<Self, getrandom::Error> {
        // Whole seconds, so `LastUpdated` and `Expiration` say exactly what is stored.
        let issued_at = clock::whole_seconds(now);
        Ok(CredentialSet {
            issued_at,
            expiration: clock::add(issued_at, lifetime),
            access_key_id: random::access_key_id()?,
            secret_access_key: random::secret_access_key()?,
            session_token: random::session_token()?,
        })
    }

    /// When this set was issued: its `LastUpdated`, and the `Last-Modified` of documents about it.
    pub(super) fn issued_at(&self) -> SystemTime {
        self.issued_at
    }

    /// The `security-credentials/<role>` document, keys in IMDS's order.
    pub(super) fn to_json(&self) -> String {
        pretty_object(&[
            ("Code", Value::Str("Success")),
            ("LastUpdated", Value::Str(&clock::rfc3339(self.issued_at))),
            ("Type", Value::Str("AWS-HMAC")),
            ("AccessKeyId", Value::Str(&self.access_key_id)),
            ("SecretAccessKey", Value::Str(&self.secret_access_key)),
            ("Token", Value::Str(&self.session_token)),
            ("Expiration", Value::Str(&clock::rfc3339(self.expiration))),
        ])
    }

    /// The `iam/info` document; its `LastUpdated` follows credential rotation as on EC2.
    pub(super) fn info_json(&self, profile: &InstanceProfile) -> String {
        pretty_object(&[
            ("Code", Value::Str("Success")),
            ("LastUpdated", Value::Str(&clock::rfc3339(self.issued_at))),
            ("InstanceProfileArn", Value::Str(&profile.arn)),
            ("InstanceProfileId", Value::Str(profile.id)),
        ])
    }
}

/// The current credential set and the rule for replacing it.
pub(super) struct Rotation {
    lifetime: Duration,
    margin: Duration,
    current: Option<CredentialSet>,
}

impl Rotation {
    /// No credentials yet: the first request issues them, as after an instance boots.
    pub(super) fn new(lifetime: Duration) -> Self {
        Rotation {
            lifetime,
            margin: (lifetime / 2).min(Duration::from_secs(MAX_REFRESH_MARGIN_SECS)),
            current: None,
        }
    }

    /// The set to serve at `now`, issuing a new one when none exists or the refresh point
    /// (`expiration - margin`) has been reached. If issuing fails, the next request tries again.
    pub(super) fn current(&mut self, now: SystemTime) -> Result<&CredentialSet, getrandom::Error> {
        let set = match self.current.take() {
            Some(set) if now < refresh_at(&set, self.margin) => set,
            _ => CredentialSet::issue(now, self.lifetime)?,
        };
        Ok(self.current.insert(set))
    }
}

/// The first instant at which `set` is replaced.
fn refresh_at(set: &CredentialSet, margin: Duration) -> SystemTime {
    set.expiration
        .checked_sub(margin)
        .unwrap_or(set.issued_at)
        .max(set.issued_at)
}
