//! IMDSv2 session tokens the simulator has issued, with their expiry, in bounded memory.
//!
//! Three indexes over the same entries: by token text (lookups), by expiry (dropping expired
//! tokens costs nothing when none have expired), by issue order (evicting the oldest when full).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime};

/// When one token stops working and its place in issue order.
struct Entry {
    expires_at: SystemTime,
    seq: u64,
}

/// The live tokens, never more than `capacity`.
pub(super) struct TokenStore {
    capacity: usize,
    next_seq: u64,
    by_token: HashMap<String, Entry>,
    by_expiry: BTreeMap<(SystemTime, u64), String>,
    by_age: BTreeMap<u64, SystemTime>,
}

impl TokenStore {
    /// An empty store that holds at most `capacity` tokens (at least one).
    pub(super) fn new(capacity: usize) -> Self {
        TokenStore {
            capacity: capacity.max(1),
            next_seq: 0,
            by_token: HashMap::new(),
            by_expiry: BTreeMap::new(),
            by_age: BTreeMap::new(),
        }
    }

    /// Remembers `token` until `expires_at`. Drops expired tokens first; if the store is still
    /// full, forgets the oldest live tokens to make room.
    pub(super) fn insert(&mut self, token: String, expires_at: SystemTime, now: SystemTime) {
        self.purge_expired(now);
        self.remove(&token);
        while self.by_token.len() >= self.capacity {
            self.evict_oldest();
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.by_expiry.insert((expires_at, seq), token.clone());
        self.by_age.insert(seq, expires_at);
        self.by_token.insert(token, Entry { expires_at, seq });
    }

    /// How long `token` still works, or `None` when it was never issued, was evicted, or has
    /// expired. A token works while `now < expires_at`.
    pub(super) fn remaining(&self, token: &str, now: SystemTime) -> Option<Duration> {
        let entry = self.by_token.get(token)?;
        entry
            .expires_at
            .duration_since(now)
            .ok()
            .filter(|left| !left.is_zero())
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.by_token.len()
    }

    fn purge_expired(&mut self, now: SystemTime) {
        while let Some(entry) = self.by_expiry.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let ((_, seq), token) = entry.remove_entry();
            self.by_age.remove(&seq);
            self.by_token.remove(&token);
        }
    }

    fn evict_oldest(&mut self) {
        if let Some((seq, expires_at)) = self.by_age.pop_first() {
            if let Some(token) = self.by_expiry.remove(&(expires_at, seq)) {
                self.by_token.remove(&token);
            }
        }
    }

    /// Forgets `token` if present (only a 336-bit random collision could make it so).
    fn remove(&mut self, token: &str) {
        if let Some(Entry { expires_at, seq }) = self.by_token.remove(token) {
            self.by_expiry.remove(&(expires_at, seq));
            self.by_age.remove(&seq);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn expires_exactly_at_expiry() {
        let mut store = TokenStore::new(10);
        store.insert("a".into(), at(110), at(100));
        assert_eq!(store.remaining("a", at(100)), Some(Duration::from_secs(10)));
        assert_eq!(store.remaining("a", at(109)), Some(Duration::from_secs(1)));
        assert_eq!(store.remaining("a", at(110)), None);
        assert_eq!(store.remaining("b", at(100)), None);
    }

    #[test]
    fn full_store_drops_expired_before_live() {
        let mut store = TokenStore::new(3);
        store.insert("old-live".into(), at(1000), at(0));
        store.insert("short".into(), at(50), at(1));
        store.insert("newer".into(), at(1000), at(2));
        // Full at t=60; "short" has expired, so it goes and the oldest live token stays.
        store.insert("fourth".into(), at(1000), at(60));
        assert_eq!(store.len(), 3);
        assert!(store.remaining("old-live", at(60)).is_some());
        assert!(store.remaining("newer", at(60)).is_some());
        assert!(store.remaining("fourth", at(60)).is_some());
    }

    #[test]
    fn full_store_of_live_tokens_evicts_oldest() {
        let mut store = TokenStore::new(3);
        store.insert("first".into(), at(5000), at(0));
        store.insert("second".into(), at(1000), at(1));
        store.insert("third".into(), at(1000), at(2));
        store.insert("fourth".into(), at(1000), at(3));
        assert_eq!(store.len(), 3);
        assert_eq!(store.remaining("first", at(3)), None);
        assert!(store.remaining("second", at(3)).is_some());
        assert!(store.remaining("fourth", at(3)).is_some());
    }
}
