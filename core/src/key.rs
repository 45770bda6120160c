//! Document keys and their place in the keyspace.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A document's place in the `u64` keyspace: `xxh3_64(collection ‖ 0x00 ‖ id)`.
///
/// Neither a collection nor an id may contain `0x00` (see [`DocKey`]), so the hashed bytes
/// name exactly one document.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct KeyHash(pub u64);

impl KeyHash {
    pub fn of(collection: &str, id: &str) -> KeyHash {
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        hasher.update(collection.as_bytes());
        hasher.update(&[0]);
        hasher.update(id.as_bytes());
        KeyHash(hasher.digest())
    }

    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Limits on collection names and document ids. The defaults suit most deployments; every
/// service takes them from its `Options`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KeyLimits {
    /// Longest collection name, in bytes.
    pub max_collection_bytes: usize,
    /// Longest document id, in bytes of UTF-8.
    pub max_id_bytes: usize,
}

impl Default for KeyLimits {
    fn default() -> Self {
        KeyLimits {
            max_collection_bytes: 64,
            max_id_bytes: 256,
        }
    }
}

/// Why a collection name or document id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("collection name is empty")]
    EmptyCollection,
    #[error("collection name is {len} bytes, longer than the limit of {max}")]
    CollectionTooLong { len: usize, max: usize },
    #[error("collection name may contain only ASCII letters, digits, '_' and '-', and must start with a letter or '_'")]
    CollectionCharacters,
    #[error("document id is empty")]
    EmptyId,
    #[error("document id is {len} bytes, longer than the limit of {max}")]
    IdTooLong { len: usize, max: usize },
    #[error("document id may not contain control characters (such as NUL), '/' or '\\'")]
    IdCharacters,
    #[error("document id may not be '.' or '..'")]
    IdDotSegment,
}

/// A validated document key: a collection name and a document id.
///
/// Collections: 1 to `max_collection_bytes` of `[A-Za-z_][A-Za-z0-9_-]*`. Ids: 1 to
/// `max_id_bytes` of UTF-8 without control characters (so no `0x00`, the hash separator), without
/// `/` or `\` (so an id is always one URL path segment), and not `.` or `..`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DocKey {
    collection: String,
    id: String,
}

impl DocKey {
    pub fn new(collection: &str, id: &str, limits: &KeyLimits) -> Result<DocKey, KeyError> {
        validate_collection(collection, limits)?;
        validate_id(id, limits)?;
        Ok(DocKey {
            collection: collection.to_owned(),
            id: id.to_owned(),
        })
    }

    pub fn collection(&self) -> &str {
        &self.collection
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn hash(&self) -> KeyHash {
        KeyHash::of(&self.collection, &self.id)
    }
}

impl fmt::Display for DocKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.collection, self.id)
    }
}

pub fn validate_collection(collection: &str, limits: &KeyLimits) -> Result<(), KeyError> {
    let bytes = collection.as_bytes();
    let Some(&first) = bytes.first() else {
        return Err(KeyError::EmptyCollection);
    };
    if bytes.len() > limits.max_collection_bytes {
        return Err(KeyError::CollectionTooLong {
            len: bytes.len(),
            max: limits.max_collection_bytes,
        });
    }
    let body_ok = bytes
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !(first.is_ascii_alphabetic() || first == b'_') || !body_ok {
        return Err(KeyError::CollectionCharacters);
    }
    Ok(())
}

pub fn validate_id(id: &str, limits: &KeyLimits) -> Result<(), KeyError> {
    if id.is_empty() {
        return Err(KeyError::EmptyId);
    }
    if id.len() > limits.max_id_bytes {
        return Err(KeyError::IdTooLong {
            len: id.len(),
            max: limits.max_id_bytes,
        });
    }
    if id.chars().any(|c| c.is_control() || c == '/' || c == '\\') {
        return Err(KeyError::IdCharacters);
    }
    if id == "." || id == ".." {
        return Err(KeyError::IdDotSegment);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_separates_collection_and_id() {
        assert_ne!(KeyHash::of("ab", "c"), KeyHash::of("a", "bc"));
        assert_eq!(KeyHash::of("users", "1"), KeyHash::of("users", "1"));
        // The documented formula, spelled out.
        assert_eq!(
            KeyHash::of("users", "1").0,
            xxhash_rust::xxh3::xxh3_64(b"users\x001")
        );
    }

    #[test]
    fn bad_keys_are_refused() {
        let l = KeyLimits::default();
        assert_eq!(DocKey::new("", "a", &l), Err(KeyError::EmptyCollection));
        assert_eq!(
            DocKey::new("1abc", "a", &l),
            Err(KeyError::CollectionCharacters)
        );
        assert_eq!(
            DocKey::new("a b", "a", &l),
            Err(KeyError::CollectionCharacters)
        );
        assert_eq!(
            DocKey::new("a\0", "a", &l),
            Err(KeyError::CollectionCharacters)
        );
        assert!(matches!(
            DocKey::new(&"c".repeat(65), "a", &l),
            Err(KeyError::CollectionTooLong { len: 65, max: 64 })
        ));
        assert_eq!(DocKey::new("c", "", &l), Err(KeyError::EmptyId));
        assert_eq!(DocKey::new("c", "a\0b", &l), Err(KeyError::IdCharacters));
        assert_eq!(DocKey::new("c", "a/b", &l), Err(KeyError::IdCharacters));
        assert_eq!(DocKey::new("c", "..", &l), Err(KeyError::IdDotSegment));
        assert_eq!(DocKey::new("c", ".", &l), Err(KeyError::IdDotSegment));
        assert!(matches!(
            DocKey::new("c", &"x".repeat(64 * 1024), &l),
            Err(KeyError::IdTooLong { .. })
        ));
    }

    #[test]
    fn good_keys_are_kept() {
        let l = KeyLimits::default();
        let k = DocKey::new("_users-v2", "ünï code id .. with spaces", &l).unwrap();
        assert_eq!(k.collection(), "_users-v2");
        assert_eq!(
            k.hash(),
            KeyHash::of("_users-v2", "ünï code id .. with spaces")
        );
    }
}

/// A pattern of collection names, as in the tokens file and in change feeds: a name,
/// `prefix*` (every collection starting with `prefix`), or `*` (every collection).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CollectionPattern {
    Exact(String),
    Prefix(String),
}

impl CollectionPattern {
    /// `None` unless `p` is a name or a prefix of letters, digits, `_` and `-`, with an optional
    /// trailing `*`.
    pub fn parse(p: &str) -> Option<CollectionPattern> {
        let valid = |s: &str| {
            s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        };
        match p.strip_suffix('*') {
            Some(prefix) if valid(prefix) => Some(CollectionPattern::Prefix(prefix.to_owned())),
            None if !p.is_empty() && valid(p) => Some(CollectionPattern::Exact(p.to_owned())),
            _ => None,
        }
    }

    pub fn matches(&self, collection: &str) -> bool {
        match self {
            CollectionPattern::Exact(c) => c == collection,
            CollectionPattern::Prefix(p) => collection.starts_with(p.as_str()),
        }
    }
}

impl std::fmt::Display for CollectionPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CollectionPattern::Exact(c) => f.write_str(c),
            CollectionPattern::Prefix(p) => write!(f, "{p}*"),
        }
    }
}
