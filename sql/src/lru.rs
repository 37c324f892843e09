//! A cache bounded in bytes that forgets the least recently used entries
//! first. The query caches hold tenants' data, so their keys always carry
//! the tenant (see `DatasetKey`); this type only enforces the budget.

use std::collections::HashMap;
use std::hash::Hash;

struct Slot<V> {
    value: V,
    bytes: usize,
    used: u64,
}

pub struct ByteLru<K, V> {
    slots: HashMap<K, Slot<V>>,
    bytes: usize,
    max_bytes: usize,
    tick: u64,
}

impl<K: Hash + Eq + Clone, V: Clone> ByteLru<K, V> {
    pub fn new(max_bytes: usize) -> Self {
        Self {
            slots: HashMap::new(),
            bytes: 0,
            max_bytes,
            tick: 0,
        }
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn get(&mut self, key: &K) -> Option<V> {
        self.tick += 1;
        let tick = self.tick;
        self.slots.get_mut(key).map(|s| {
            s.used = tick;
            s.value.clone()
        })
    }

    /// Keeps `value` if it fits the budget at all, forgetting older entries
    /// to make room. Returns whether it was kept.
    pub fn insert(&mut self, key: K, value: V, bytes: usize) -> bool {
        self.remove(&key);
        if bytes > self.max_bytes {
            return false;
        }
        self.make_room(bytes);
        self.tick += 1;
        self.bytes += bytes;
        self.slots.insert(
            key,
            Slot {
                value,
                bytes,
                used: self.tick,
            },
        );
        true
    }

    /// Grows an entry by `bytes`, forgetting others (never this one) to make
    /// room. Returns false, and changes nothing, if the entry is gone or
    /// would not fit even alone.
    pub fn grow(&mut self, key: &K, bytes: usize) -> bool {
        let Some(current) = self.slots.get(key).map(|s| s.bytes) else {
            return false;
        };
        if current + bytes > self.max_bytes {
            return false;
        }
        if self.bytes + bytes > self.max_bytes {
            // Protect the entry from its own eviction.
            let slot = self.slots.remove(key).expect("checked above");
            self.bytes -= slot.bytes;
            self.make_room(slot.bytes + bytes);
            self.bytes += slot.bytes;
            self.slots.insert(key.clone(), slot);
        }
        self.tick += 1;
        let tick = self.tick;
        if let Some(s) = self.slots.get_mut(key) {
            s.bytes += bytes;
            s.used = tick;
        }
        self.bytes += bytes;
        true
    }

    pub fn remove(&mut self, key: &K) -> Option<V> {
        let slot = self.slots.remove(key)?;
        self.bytes -= slot.bytes;
        Some(slot.value)
    }

    /// Evicts the oldest entries until `bytes` more fit; a batch at a time
    /// (down to 3/4 of the budget) so that a full cache does not sort its
    /// entries on every insert.
    fn make_room(&mut self, bytes: usize) {
        if self.bytes + bytes <= self.max_bytes {
            return;
        }
        let limit = (self.max_bytes / 4 * 3).max(bytes);
        let mut by_age: Vec<(u64, K)> = self
            .slots
            .iter()
            .map(|(k, s)| (s.used, k.clone()))
            .collect();
        by_age.sort_unstable_by_key(|(used, _)| *used);
        for (_, k) in by_age {
            if self.bytes + bytes <= limit {
                break;
            }
            self.remove(&k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used_within_budget() {
        let mut c: ByteLru<&str, u32> = ByteLru::new(100);
        assert!(c.insert("a", 1, 30));
        assert!(c.insert("b", 2, 30));
        assert!(c.insert("c", 3, 30));
        assert_eq!(c.get(&"a"), Some(1));
        // 90 + 30 > 100: the oldest go, down to 3/4 of the budget, and "a"
        // (read last) stays.
        assert!(c.insert("d", 4, 30));
        assert_eq!(c.get(&"b"), None);
        assert_eq!(c.get(&"c"), None);
        assert_eq!(c.get(&"a"), Some(1));
        assert_eq!(c.get(&"d"), Some(4));
        assert_eq!(c.bytes(), 60);
        assert!(!c.insert("huge", 9, 101));
        assert_eq!(c.get(&"huge"), None);
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn grow_keeps_the_growing_entry() {
        let mut c: ByteLru<&str, u32> = ByteLru::new(100);
        c.insert("a", 1, 30);
        c.insert("b", 2, 30);
        assert!(c.grow(&"a", 60));
        assert_eq!(c.get(&"a"), Some(1));
        assert_eq!(c.get(&"b"), None);
        assert_eq!(c.bytes(), 90);
        assert!(!c.grow(&"a", 20));
        assert!(!c.grow(&"gone", 1));
    }
}
