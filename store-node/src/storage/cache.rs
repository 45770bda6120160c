//! A bounded least-recently-used map, bounded both in entries and in (estimated) bytes.

use std::collections::{BTreeMap, HashMap};

#[derive(Debug)]
pub struct Lru<V> {
    entries: HashMap<Vec<u8>, Entry<V>>,
    /// Last-use tick → key; the first entry is the least recently used.
    order: BTreeMap<u64, Vec<u8>>,
    tick: u64,
    bytes: usize,
    max_entries: usize,
    max_bytes: usize,
}

#[derive(Debug)]
struct Entry<V> {
    value: V,
    tick: u64,
    bytes: usize,
}

impl<V> Lru<V> {
    pub fn new(max_entries: usize, max_bytes: usize) -> Lru<V> {
        Lru {
            entries: HashMap::new(),
            order: BTreeMap::new(),
            tick: 0,
            bytes: 0,
            max_entries,
            max_bytes,
        }
    }

    /// Removes and returns the value (the caller puts it back with [`Lru::insert`]).
    pub fn take(&mut self, key: &[u8]) -> Option<V> {
        let entry = self.entries.remove(key)?;
        self.order.remove(&entry.tick);
        self.bytes -= entry.bytes;
        Some(entry.value)
    }

    /// Inserts as the most recently used entry, then evicts down to the bounds.
    pub fn insert(&mut self, key: Vec<u8>, value: V, bytes: usize) {
        self.take(&key);
        if self.max_entries == 0 || bytes > self.max_bytes {
            return;
        }
        self.tick += 1;
        self.order.insert(self.tick, key.clone());
        self.entries.insert(
            key,
            Entry {
                value,
                tick: self.tick,
                bytes,
            },
        );
        self.bytes += bytes;
        while self.entries.len() > self.max_entries || self.bytes > self.max_bytes {
            let (_, oldest) = self.order.pop_first().expect("entries exist");
            let entry = self
                .entries
                .remove(&oldest)
                .expect("order and entries agree");
            self.bytes -= entry.bytes;
        }
        debug_assert_eq!(self.order.len(), self.entries.len());
    }

    /// Drops every entry whose key matches.
    pub fn remove_where(&mut self, mut matches: impl FnMut(&[u8]) -> bool) {
        let doomed: Vec<Vec<u8>> = self
            .entries
            .keys()
            .filter(|k| matches(k))
            .cloned()
            .collect();
        for key in doomed {
            self.take(&key);
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used_within_bounds() {
        let mut lru = Lru::new(2, 100);
        lru.insert(b"a".to_vec(), 1, 10);
        lru.insert(b"b".to_vec(), 2, 10);
        let a = lru.take(b"a").unwrap();
        lru.insert(b"a".to_vec(), a, 10);
        lru.insert(b"c".to_vec(), 3, 10);
        assert_eq!(lru.take(b"b"), None, "b was least recently used");
        assert_eq!(lru.len(), 2);
        lru.insert(b"d".to_vec(), 4, 95);
        assert_eq!(lru.len(), 1, "byte bound");
        lru.insert(b"e".to_vec(), 5, 101);
        assert_eq!(lru.take(b"e"), None, "too big to cache");
        lru.remove_where(|k| k == b"d");
        assert_eq!(lru.len(), 0);
    }
}
