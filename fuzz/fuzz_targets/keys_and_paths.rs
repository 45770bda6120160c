//! Document keys, collection patterns and field paths (`core/src/key.rs`, `FieldPath` in
//! `core/src/query.rs`, whose rules the api-server's counter paths of `$increment` follow).
//!
//! Properties: a key that is accepted displays as `collection/id` and splits back at the first
//! `/`, hashes as the documented formula, and is refused iff one of its parts is; a pattern that
//! parses displays to text that parses equal and matches its own name or prefix; a field path
//! that parses displays to the same text, and finds the leaf of a document built along it.
#![no_main]

use causeway_core::key::{validate_collection, validate_id};
use causeway_core::query::{FieldPath, QueryLimits};
use causeway_core::{CollectionPattern, DocKey, KeyHash, KeyLimits};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Map, Value};

#[derive(Debug, Arbitrary)]
struct Input<'a> {
    collection: &'a str,
    id: &'a str,
    pattern: &'a str,
    path: &'a str,
    small_limits: bool,
}

fuzz_target!(|input: Input<'_>| {
    let keys = if input.small_limits {
        KeyLimits {
            max_collection_bytes: 4,
            max_id_bytes: 8,
        }
    } else {
        KeyLimits::default()
    };
    match DocKey::new(input.collection, input.id, &keys) {
        Ok(key) => {
            let shown = key.to_string();
            assert_eq!(
                shown.split_once('/'),
                Some((input.collection, input.id)),
                "{shown:?}"
            );
            assert_eq!(key.hash(), KeyHash::of(input.collection, input.id));
            let mut hashed = input.collection.as_bytes().to_vec();
            hashed.push(0);
            hashed.extend_from_slice(input.id.as_bytes());
            assert!(!input.collection.contains('\0') && !input.id.contains('\0'));
            assert_eq!(key.hash().get(), xxhash_rust::xxh3::xxh3_64(&hashed));
            assert!(input.collection.len() <= keys.max_collection_bytes);
            assert!(input.id.len() <= keys.max_id_bytes);
        }
        Err(e) => assert!(
            validate_collection(input.collection, &keys).is_err()
                || validate_id(input.id, &keys).is_err(),
            "{e}"
        ),
    }

    if let Some(p) = CollectionPattern::parse(input.pattern) {
        assert_eq!(CollectionPattern::parse(&p.to_string()), Some(p.clone()));
        match &p {
            CollectionPattern::Exact(c) => assert!(p.matches(c)),
            CollectionPattern::Prefix(prefix) => {
                assert!(p.matches(prefix));
                assert!(p.matches(&format!("{prefix}x")));
            }
        }
    }

    let limits = QueryLimits::default();
    if let Ok(path) = FieldPath::parse(input.path, &limits) {
        assert_eq!(path.to_string(), input.path);
        assert_eq!(
            FieldPath::parse(&path.to_string(), &limits),
            Ok(path.clone())
        );
        assert!(!path.segments().is_empty() && path.segments().len() <= limits.max_path_segments);
        assert!(path.segments().iter().all(|s| !s.is_empty()));
        // A document with objects along the path holds the leaf at its end.
        let leaf = json!(7);
        let doc = path
            .segments()
            .iter()
            .rev()
            .fold(leaf.clone(), |inner, seg| {
                let mut m = Map::new();
                m.insert(seg.clone(), inner);
                Value::Object(m)
            });
        assert_eq!(path.lookup(&doc), Some(&leaf));
    }
});
