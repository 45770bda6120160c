//! Key encodings of the column families (DESIGN.md §5).
//!
//! - `docs`: `hash (u64 BE) ‖ collection ‖ 0x00 ‖ id ‖ (u64::MAX - ts) (BE)`. All versions of a
//!   document share the prefix up to the id and sort newest first, so "the newest version ≤ ts"
//!   is one seek to `prefix ‖ (u64::MAX - ts)`. The hash prefix makes an interval a key range.
//! - `by_collection`: `collection ‖ 0x00 ‖ hash (u64 BE) ‖ id`, empty value.
//! - `pending`: `hash (u64 BE) ‖ collection ‖ 0x00 ‖ id ‖ 0x00 ‖ ts (BE) ‖ mutation index (u32 BE)`,
//!   so an interval is a key range and a document's pending mutations sort in log order.
//!
//! Neither a collection nor an id contains `0x00` (`causeway_core::DocKey`), and a collection is
//! ASCII, so `0xFF` never starts a collection: `[0xFF; 9]` bounds every `docs` and `pending` key.

use causeway_core::{Interval, KeyHash, Timestamp};

/// Bytes of the version suffix of a `docs` key.
pub const TS_BYTES: usize = 8;

/// An exclusive upper bound above every `docs` / `pending` key.
pub const END_OF_KEYSPACE: [u8; 9] = [0xFF; 9];

/// The prefix every version of one document shares: `hash ‖ collection ‖ 0x00 ‖ id`.
pub fn doc_prefix(collection: &str, id: &str) -> Vec<u8> {
    let hash = KeyHash::of(collection, id);
    let mut key = Vec::with_capacity(8 + collection.len() + 1 + id.len() + TS_BYTES);
    key.extend_from_slice(&hash.0.to_be_bytes());
    key.extend_from_slice(collection.as_bytes());
    key.push(0);
    key.extend_from_slice(id.as_bytes());
    key
}

/// The collection name of idempotency rows: a control character, so that no user collection
/// (which starts with a letter or `_`) can be it.
pub const IDEMPOTENCY_COLLECTION: &str = "\u{1}";

/// The prefix of the row that remembers idempotency `key` of `scope` beside the document whose
/// place is `hash`: `hash ‖ 0x01 ‖ 0x00 ‖ hex(scope) ‖ ':' ‖ hex(key) ‖ ';'`. It parses as a
/// version key of collection [`IDEMPOTENCY_COLLECTION`] (the id has no NUL), lies in the
/// document's interval (so it moves with the document), and no row's prefix is the start of
/// another's (a seek to one never lands on the next).
pub fn idempotency_prefix(hash: u64, scope: &str, key: &str) -> Vec<u8> {
    let hex = |text: &str, out: &mut String| {
        for b in text.bytes() {
            out.push_str(&format!("{b:02x}"));
        }
    };
    let mut id = String::with_capacity(2 * (scope.len() + key.len()) + 2);
    hex(scope, &mut id);
    id.push(':');
    hex(key, &mut id);
    id.push(';');
    let mut prefix = Vec::with_capacity(8 + 2 + id.len() + TS_BYTES);
    prefix.extend_from_slice(&hash.to_be_bytes());
    prefix.extend_from_slice(IDEMPOTENCY_COLLECTION.as_bytes());
    prefix.push(0);
    prefix.extend_from_slice(id.as_bytes());
    prefix
}

/// Whether a `docs` key or prefix is an idempotency row's.
pub fn is_idempotency_row(key: &[u8]) -> bool {
    key.len() > 9 && key[8..].starts_with(IDEMPOTENCY_COLLECTION.as_bytes()) && key[9] == 0
}

/// The `docs` key of the version of a document written at `ts`.
pub fn version_key(prefix: &[u8], ts: Timestamp) -> Vec<u8> {
    let mut key = Vec::with_capacity(prefix.len() + TS_BYTES);
    key.extend_from_slice(prefix);
    key.extend_from_slice(&(u64::MAX - ts.0).to_be_bytes());
    key
}

/// A `docs` key, split into its parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VersionKey<'a> {
    pub hash: u64,
    pub collection: &'a str,
    pub id: &'a str,
    pub ts: Timestamp,
    /// `hash ‖ collection ‖ 0x00 ‖ id`.
    pub prefix: &'a [u8],
}

/// Splits a `docs` key; `None` if it is not one (used on bytes from peers).
pub fn parse_version_key(key: &[u8]) -> Option<VersionKey<'_>> {
    if key.len() < 8 + 1 + 1 + 1 + TS_BYTES {
        return None;
    }
    let (prefix, ts) = key.split_at(key.len() - TS_BYTES);
    let hash = u64::from_be_bytes(prefix[..8].try_into().ok()?);
    let rest = &prefix[8..];
    let nul = rest.iter().position(|&b| b == 0)?;
    let collection = std::str::from_utf8(&rest[..nul]).ok()?;
    let id = std::str::from_utf8(&rest[nul + 1..]).ok()?;
    if collection.is_empty() || id.is_empty() || id.as_bytes().contains(&0) {
        return None;
    }
    // An idempotency row takes the place of the document it was written beside.
    if collection != IDEMPOTENCY_COLLECTION && KeyHash::of(collection, id).0 != hash {
        return None;
    }
    let ts = u64::MAX - u64::from_be_bytes(ts.try_into().ok()?);
    Some(VersionKey {
        hash,
        collection,
        id,
        ts: Timestamp(ts),
        prefix,
    })
}

/// Splits a `docs` key this store wrote; a key that does not parse is corruption.
pub fn version_key_parts(key: &[u8]) -> VersionKey<'_> {
    match parse_version_key(key) {
        Some(parts) => parts,
        None => panic!("corrupt docs key {key:02x?}"),
    }
}

/// The `[start, end)` key range of an interval in `docs` (and `pending`).
pub fn interval_range(interval: &Interval) -> (Vec<u8>, Vec<u8>) {
    let start = interval.start.to_be_bytes().to_vec();
    let end = match interval.end_hash() {
        Some(end) => end.to_be_bytes().to_vec(),
        None => END_OF_KEYSPACE.to_vec(),
    };
    (start, end)
}

/// The `by_collection` key of a document.
pub fn collection_key(collection: &str, hash: u64, id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(collection.len() + 1 + 8 + id.len());
    key.extend_from_slice(collection.as_bytes());
    key.push(0);
    key.extend_from_slice(&hash.to_be_bytes());
    key.extend_from_slice(id.as_bytes());
    key
}

/// The first `by_collection` key of a collection.
pub fn collection_start(collection: &str) -> Vec<u8> {
    let mut key = collection.as_bytes().to_vec();
    key.push(0);
    key
}

/// The exclusive end of a collection's `by_collection` keys.
pub fn collection_end(collection: &str) -> Vec<u8> {
    let mut key = collection.as_bytes().to_vec();
    key.push(1);
    key
}

/// Splits a `by_collection` key into (collection, hash, id); corruption if it does not parse.
pub fn collection_key_parts(key: &[u8]) -> (&str, u64, &str) {
    let parse = || {
        let nul = key.iter().position(|&b| b == 0)?;
        let collection = std::str::from_utf8(&key[..nul]).ok()?;
        let rest = &key[nul + 1..];
        if rest.len() < 9 {
            return None;
        }
        let hash = u64::from_be_bytes(rest[..8].try_into().ok()?);
        let id = std::str::from_utf8(&rest[8..]).ok()?;
        Some((collection, hash, id))
    };
    match parse() {
        Some(parts) => parts,
        None => panic!("corrupt by_collection key {key:02x?}"),
    }
}

/// The `pending` key of mutation `index` of the tx at `ts` on a document.
pub fn pending_key(prefix: &[u8], ts: Timestamp, index: u32) -> Vec<u8> {
    let mut key = Vec::with_capacity(prefix.len() + 1 + 8 + 4);
    key.extend_from_slice(prefix);
    key.push(0);
    key.extend_from_slice(&ts.0.to_be_bytes());
    key.extend_from_slice(&index.to_be_bytes());
    key
}

/// Splits a `pending` key into (document prefix, ts, mutation index).
pub fn pending_key_parts(key: &[u8]) -> (&[u8], Timestamp, u32) {
    assert!(key.len() > 8 + 1 + 8 + 4, "corrupt pending key {key:02x?}");
    let (head, tail) = key.split_at(key.len() - 12);
    assert_eq!(head.last(), Some(&0), "corrupt pending key {key:02x?}");
    let prefix = &head[..head.len() - 1];
    let ts = u64::from_be_bytes(tail[..8].try_into().expect("8 bytes"));
    let index = u32::from_be_bytes(tail[8..].try_into().expect("4 bytes"));
    (prefix, Timestamp(ts), index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_sort_newest_first_and_round_trip() {
        let prefix = doc_prefix("users", "alice");
        let old = version_key(&prefix, Timestamp(5));
        let new = version_key(&prefix, Timestamp(9));
        assert!(new < old);
        let parts = version_key_parts(&old);
        assert_eq!(parts.collection, "users");
        assert_eq!(parts.id, "alice");
        assert_eq!(parts.ts, Timestamp(5));
        assert_eq!(parts.hash, KeyHash::of("users", "alice").0);
        assert_eq!(parts.prefix, &prefix[..]);
        assert!(parse_version_key(b"short").is_none());
        let mut forged = old.clone();
        forged[0] ^= 1;
        assert!(parse_version_key(&forged).is_none(), "hash is checked");
    }

    #[test]
    fn keys_fall_inside_their_interval_range() {
        let key = version_key(&doc_prefix("c", "x"), Timestamp(1));
        let hash = KeyHash::of("c", "x").0;
        let (start, end) = interval_range(&Interval::new(hash, u128::from(hash) + 1));
        assert!(start.as_slice() <= key.as_slice() && key.as_slice() < end.as_slice());
        let (start, end) = interval_range(&Interval::FULL);
        assert!(start.as_slice() <= key.as_slice() && key.as_slice() < end.as_slice());
        let top = version_key(
            &[&u64::MAX.to_be_bytes()[..], b"zz\0id"].concat(),
            Timestamp(0),
        );
        assert!(top.as_slice() < end.as_slice());
    }

    #[test]
    fn pending_and_collection_keys_round_trip() {
        let prefix = doc_prefix("c", "x");
        let key = pending_key(&prefix, Timestamp(7), 3);
        assert_eq!(pending_key_parts(&key), (&prefix[..], Timestamp(7), 3));
        let key = collection_key("c", 42, "x");
        assert_eq!(collection_key_parts(&key), ("c", 42, "x"));
        assert!(collection_start("c") <= key && key < collection_end("c"));
    }
}
