//! Bearer-token authentication and per-collection authorisation (DESIGN.md §13).
//!
//! The tokens file is JSON:
//!
//! ```json
//! {"tokens": [
//!   {"name": "ops", "token": "0123456789abcdef0123", "admin": true},
//!   {"name": "shop", "token": "fedcba9876543210fedc", "read": ["orders", "catalog_*"], "write": ["orders"]}
//! ]}
//! ```
//!
//! A pattern is a collection name, `prefix*` (every collection starting with `prefix`) or `*`.
//! `admin` may read and write every collection. Write does not imply read. Tokens are at least
//! 16 bytes, distinct, and compared in constant time (`subtle`): every configured token is
//! compared, whatever matches, so the time taken does not tell which bytes were right.
//!
//! A `token` may instead be stored as `"sha256:<64 hex digits>"`, the SHA-256 of the token
//! ([`token_hash`]; `causeway admin tokens create` prints both): the file then holds no secret
//! that opens the API. The presented token is hashed once and its digest compared in constant
//! time with every hashed entry. Hash only high-entropy tokens (the generated ones have 256
//! bits): a fast hash of a guessable token can be reversed by trying guesses.
//!
//! [`TokenStore`] holds the tokens in use and reloads the file when its contents change, so
//! tokens rotate without a restart; a file that does not load keeps the tokens in use.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use axum::http::{header, HeaderMap};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};

use crate::problem::{Kind, Problem};
use causeway_core::key::CollectionPattern as Pattern;

/// The shortest token accepted in a tokens file.
pub const MIN_TOKEN_BYTES: usize = 16;
/// The prefix of a hashed entry's `token`.
pub const SHA256_PREFIX: &str = "sha256:";

/// The tokens file's form of a hashed token: `sha256:` and the SHA-256 of `token` in lowercase
/// hex.
pub fn token_hash(token: &str) -> String {
    format!(
        "{SHA256_PREFIX}{}",
        hex::encode(Sha256::digest(token.as_bytes()))
    )
}

/// Why a tokens file was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    #[error("cannot read the file")]
    Read(#[source] std::io::Error),
    #[error("the file is not valid tokens JSON")]
    Parse(#[source] serde_json::Error),
    #[error("token {name:?} is shorter than {MIN_TOKEN_BYTES} bytes")]
    TooShort { name: String },
    #[error("token {name:?} has characters other than printable ASCII")]
    BadCharacters { name: String },
    #[error("token {name:?} is configured twice")]
    Duplicate { name: String },
    #[error("token {name:?} has an invalid collection pattern {pattern:?}")]
    BadPattern { name: String, pattern: String },
    #[error("token {name:?} starts with sha256: but is not 64 hex digits after it")]
    BadHash { name: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    tokens: Vec<TokenEntry>,
}

/// One entry of the tokens file.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    /// A name for logs; never the token itself.
    pub name: String,
    pub token: String,
    #[serde(default)]
    pub admin: bool,
    #[serde(default)]
    pub read: Vec<String>,
    #[serde(default)]
    pub write: Vec<String>,
}

impl std::fmt::Debug for TokenEntry {
    /// Without the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenEntry")
            .field("name", &self.name)
            .field("admin", &self.admin)
            .field("read", &self.read)
            .field("write", &self.write)
            .finish_non_exhaustive()
    }
}

/// Who a request is: the permissions of its token.
#[derive(Debug)]
pub struct Principal {
    pub name: String,
    admin: bool,
    read: Vec<Pattern>,
    write: Vec<Pattern>,
}

/// What a request does to a collection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

impl Principal {
    /// Whether this principal may `access` `collection`.
    pub fn allows(&self, access: Access, collection: &str) -> bool {
        let patterns = match access {
            Access::Read => &self.read,
            Access::Write => &self.write,
        };
        self.admin || patterns.iter().any(|p| p.matches(collection))
    }

    /// Whether this principal may read some collection.
    pub fn reads_any(&self) -> bool {
        self.admin || !self.read.is_empty()
    }

    /// 403 unless this principal may `access` `collection`.
    pub fn require(&self, access: Access, collection: &str) -> Result<(), Problem> {
        if self.allows(access, collection) {
            return Ok(());
        }
        let what = match access {
            Access::Read => "read",
            Access::Write => "write",
        };
        Err(Problem::new(
            Kind::Forbidden,
            format!("this token may not {what} collection {collection:?}"),
        ))
    }
}

/// How a token is stored.
#[derive(PartialEq, Eq)]
enum Secret {
    /// The token itself.
    Plain(Vec<u8>),
    /// The SHA-256 of the token.
    Sha256([u8; 32]),
}

impl Secret {
    fn parse(name: &str, token: &str) -> Result<Secret, TokensError> {
        let Some(hex_digest) = token.strip_prefix(SHA256_PREFIX) else {
            if token.len() < MIN_TOKEN_BYTES {
                return Err(TokensError::TooShort { name: name.into() });
            }
            if !token.bytes().all(|b| (0x21..0x7f).contains(&b)) {
                return Err(TokensError::BadCharacters { name: name.into() });
            }
            return Ok(Secret::Plain(token.as_bytes().to_vec()));
        };
        let mut digest = [0u8; 32];
        hex::decode_to_slice(hex_digest, &mut digest)
            .map_err(|_| TokensError::BadHash { name: name.into() })?;
        Ok(Secret::Sha256(digest))
    }

    /// The digest of this secret, to find a token configured both plain and hashed.
    fn digest(&self) -> [u8; 32] {
        match self {
            Secret::Plain(t) => Sha256::digest(t).into(),
            Secret::Sha256(d) => *d,
        }
    }
}

/// The configured tokens.
#[derive(Default)]
pub struct Tokens {
    entries: Vec<(Secret, Arc<Principal>)>,
    /// Whether any entry is hashed (then the presented token is hashed once per request).
    any_hashed: bool,
}

impl std::fmt::Debug for Tokens {
    /// Names only: a token never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.entries.iter().map(|(_, p)| &p.name))
            .finish()
    }
}

impl Tokens {
    /// Loads and validates a tokens file.
    pub fn load(path: &Path) -> Result<Tokens, TokensError> {
        Tokens::parse(&std::fs::read(path).map_err(TokensError::Read)?)
    }

    /// Parses and validates the contents of a tokens file.
    pub fn parse(bytes: &[u8]) -> Result<Tokens, TokensError> {
        let file: TokensFile = serde_json::from_slice(bytes).map_err(TokensError::Parse)?;
        Tokens::from_entries(file.tokens)
    }

    /// Validates entries (as a tokens file holds them).
    pub fn from_entries(entries: Vec<TokenEntry>) -> Result<Tokens, TokensError> {
        let mut tokens = Tokens::default();
        for e in entries {
            let secret = Secret::parse(&e.name, &e.token)?;
            let digest = secret.digest();
            if tokens.entries.iter().any(|(s, _)| s.digest() == digest) {
                return Err(TokensError::Duplicate { name: e.name });
            }
            let patterns = |ps: &[String]| -> Result<Vec<Pattern>, TokensError> {
                ps.iter()
                    .map(|p| {
                        Pattern::parse(p).ok_or_else(|| TokensError::BadPattern {
                            name: e.name.clone(),
                            pattern: p.clone(),
                        })
                    })
                    .collect()
            };
            let principal = Principal {
                read: patterns(&e.read)?,
                write: patterns(&e.write)?,
                name: e.name.clone(),
                admin: e.admin,
            };
            tokens.any_hashed |= matches!(secret, Secret::Sha256(_));
            tokens.entries.push((secret, Arc::new(principal)));
        }
        Ok(tokens)
    }

    /// How many tokens are configured.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The principal of a request's `Authorization: Bearer <token>`, or 401.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Arc<Principal>, Problem> {
        let unauthorized = |why: &str| Problem::new(Kind::Unauthorized, why);
        let value = headers
            .get(header::AUTHORIZATION)
            .ok_or_else(|| unauthorized("an Authorization: Bearer <token> header is required"))?;
        let presented = value
            .as_bytes()
            .strip_prefix(b"Bearer ")
            .ok_or_else(|| unauthorized("the Authorization header must be Bearer <token>"))?;
        self.find(presented)
            .ok_or_else(|| unauthorized("the bearer token is not valid"))
    }

    /// Compares `presented` with every token in constant time (per token length) and answers the
    /// principal of the one that matches.
    fn find(&self, presented: &[u8]) -> Option<Arc<Principal>> {
        let digest: [u8; 32] = if self.any_hashed {
            Sha256::digest(presented).into()
        } else {
            [0; 32]
        };
        let mut found = None;
        for (secret, principal) in &self.entries {
            let equal = match secret {
                Secret::Plain(token) => ct_equal(token, presented),
                Secret::Sha256(d) => d.ct_eq(&digest),
            };
            if bool::from(equal) {
                found = Some(principal.clone());
            }
        }
        found
    }
}

/// The tokens in use, and the file they come from: [`TokenStore::reload`] replaces them when
/// the file's contents change.
#[derive(Debug)]
pub struct TokenStore {
    path: Option<PathBuf>,
    current: RwLock<Arc<Tokens>>,
    /// The contents of the file last tried (loaded or refused), so an unchanged file is not
    /// parsed again and a bad one is reported once.
    last_seen: Mutex<Option<Vec<u8>>>,
}

impl TokenStore {
    /// Loads the tokens of `path` (none: no token is valid). A file that does not load is an
    /// error here: a server does not start without the tokens it was given.
    pub fn open(path: Option<PathBuf>) -> Result<TokenStore, TokensError> {
        let (tokens, seen) = match &path {
            Some(p) => {
                let bytes = std::fs::read(p).map_err(TokensError::Read)?;
                (Tokens::parse(&bytes)?, Some(bytes))
            }
            None => (Tokens::default(), None),
        };
        Ok(TokenStore {
            path,
            current: RwLock::new(Arc::new(tokens)),
            last_seen: Mutex::new(seen),
        })
    }

    /// The tokens in use.
    pub fn current(&self) -> Arc<Tokens> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The principal of a request's `Authorization: Bearer <token>`, or 401.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Arc<Principal>, Problem> {
        self.current().authenticate(headers)
    }

    /// Reads the file again and, when its contents changed and load, uses its tokens. `Ok(true)`
    /// when the tokens were replaced; an `Err` (the tokens in use are kept) once per change.
    pub fn reload(&self) -> Result<bool, TokensError> {
        let Some(path) = &self.path else {
            return Ok(false);
        };
        let bytes = std::fs::read(path).map_err(TokensError::Read)?;
        {
            let mut seen = self.last_seen.lock().unwrap_or_else(|e| e.into_inner());
            if seen.as_deref() == Some(&bytes[..]) {
                return Ok(false);
            }
            *seen = Some(bytes.clone());
        }
        let tokens = Tokens::parse(&bytes)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(tokens);
        Ok(true)
    }
}

/// Equality of two byte strings whose time depends only on the length of `presented`.
fn ct_equal(token: &[u8], presented: &[u8]) -> Choice {
    let same_len = (token.len() as u64).ct_eq(&(presented.len() as u64));
    let mut acc = Choice::from(1u8);
    for (i, b) in presented.iter().enumerate() {
        let t = token.get(i).copied().unwrap_or(0);
        acc &= t.ct_eq(b);
    }
    same_len & acc
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn entry(name: &str, token: &str, admin: bool, read: &[&str], write: &[&str]) -> TokenEntry {
        TokenEntry {
            name: name.into(),
            token: token.into(),
            admin,
            read: read.iter().map(|s| s.to_string()).collect(),
            write: write.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn tokens() -> Tokens {
        Tokens::from_entries(vec![
            entry("ops", "admin-token-0123456789", true, &[], &[]),
            entry(
                "shop",
                "shop-token-0123456789",
                false,
                &["orders", "cat_*"],
                &["orders"],
            ),
        ])
        .unwrap()
    }

    fn bearer(t: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(t).unwrap());
        h
    }

    #[test]
    fn tokens_authenticate_and_authorise_by_pattern() {
        let t = tokens();
        let admin = t
            .authenticate(&bearer("Bearer admin-token-0123456789"))
            .unwrap();
        assert!(admin.allows(Access::Write, "anything"));
        let shop = t
            .authenticate(&bearer("Bearer shop-token-0123456789"))
            .unwrap();
        assert_eq!(shop.name, "shop");
        assert!(shop.allows(Access::Read, "orders"));
        assert!(shop.allows(Access::Write, "orders"));
        assert!(shop.allows(Access::Read, "cat_books"));
        assert!(!shop.allows(Access::Write, "cat_books"));
        assert!(!shop.allows(Access::Read, "users"));
        assert_eq!(
            shop.require(Access::Read, "users").unwrap_err().kind,
            Kind::Forbidden
        );
    }

    #[test]
    fn missing_malformed_and_wrong_tokens_are_401() {
        let t = tokens();
        for h in [
            HeaderMap::new(),
            bearer("admin-token-0123456789"),
            bearer("Basic admin-token-0123456789"),
            bearer("Bearer admin-token-012345678"),
            bearer("Bearer admin-token-01234567890"),
            bearer("Bearer "),
        ] {
            assert_eq!(t.authenticate(&h).unwrap_err().kind, Kind::Unauthorized);
        }
    }

    #[test]
    fn weak_duplicate_and_bad_entries_are_refused() {
        assert!(matches!(
            Tokens::from_entries(vec![entry("a", "short", true, &[], &[])]),
            Err(TokensError::TooShort { .. })
        ));
        assert!(matches!(
            Tokens::from_entries(vec![
                entry("a", "same-token-0123456789", true, &[], &[]),
                entry("b", "same-token-0123456789", false, &[], &[]),
            ]),
            Err(TokensError::Duplicate { .. })
        ));
        assert!(matches!(
            Tokens::from_entries(vec![entry("a", "token with spaces 0123", true, &[], &[])]),
            Err(TokensError::BadCharacters { .. })
        ));
        assert!(matches!(
            Tokens::from_entries(vec![entry(
                "a",
                "ok-token-0123456789",
                false,
                &["a*b"],
                &[]
            )]),
            Err(TokensError::BadPattern { .. })
        ));
        let all = Tokens::from_entries(vec![entry("a", "ok-token-0123456789", false, &["*"], &[])])
            .unwrap();
        let p = all.find(b"ok-token-0123456789").unwrap();
        assert!(p.allows(Access::Read, "x") && !p.allows(Access::Write, "x"));
    }

    #[test]
    fn a_hashed_entry_authenticates_its_token_and_refuses_others() {
        let token = "a-high-entropy-token-0123456789abcdef";
        let hash = token_hash(token);
        assert!(hash.starts_with("sha256:") && hash.len() == 7 + 64);
        let t = Tokens::from_entries(vec![
            entry("hashed", &hash, false, &["orders"], &[]),
            entry("plain", "plain-token-0123456789", true, &[], &[]),
        ])
        .unwrap();
        assert_eq!(t.find(token.as_bytes()).unwrap().name, "hashed");
        assert_eq!(t.find(b"plain-token-0123456789").unwrap().name, "plain");
        for other in [
            &hash[..],
            "a-high-entropy-token-0123456789abcdeF",
            "a-high-entropy-token-0123456789abcde",
            "",
        ] {
            assert!(t.find(other.as_bytes()).is_none(), "{other:?} was accepted");
        }
        // Uppercase hex is the same digest; a bad one, or the same token twice, is refused.
        let upper = format!("sha256:{}", hash[7..].to_uppercase());
        assert!(
            Tokens::from_entries(vec![entry("u", &upper, true, &[], &[])])
                .unwrap()
                .find(token.as_bytes())
                .is_some()
        );
        for bad in [
            "sha256:",
            "sha256:abc",
            &format!("{hash}00"),
            &format!("{}g", &hash[..hash.len() - 1]),
        ] {
            assert!(
                matches!(
                    Tokens::from_entries(vec![entry("b", bad, true, &[], &[])]),
                    Err(TokensError::BadHash { .. })
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(
            Tokens::from_entries(vec![
                entry("a", token, true, &[], &[]),
                entry("b", &hash, true, &[], &[]),
            ]),
            Err(TokensError::Duplicate { .. })
        ));
    }

    #[test]
    fn constant_time_equality_is_equality() {
        assert!(bool::from(ct_equal(b"abc", b"abc")));
        assert!(!bool::from(ct_equal(b"abc", b"abd")));
        assert!(!bool::from(ct_equal(b"abc", b"ab")));
        assert!(!bool::from(ct_equal(b"ab", b"abc")));
        assert!(!bool::from(ct_equal(b"ab\0", b"ab")));
    }
}
