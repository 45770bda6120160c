//! The storage engine of a store node: multi-version automerge documents in RocksDB, applied
//! deterministically from the transaction log and read at any retained timestamp.
//!
//! # Layout on disk (DESIGN.md §5)
//! - `docs`: `hash (u64 BE) ‖ collection ‖ 0x00 ‖ id ‖ (u64::MAX - ts) (BE)` → a version record
//!   ([`record`]): a tombstone, or the materialized JSON plus the automerge state as a snapshot
//!   (`save()`) or a delta (`save_after` the previous version's heads). Newest first, so the
//!   newest version ≤ ts is one seek; the hash prefix makes an interval a key range.
//! - `meta`: the applied position, the GC watermark, configurations seen, backfill progress.
//! - `pending`: mutations for intervals still being backfilled, keyed by document then log order.
//! - `by_collection`: `collection ‖ 0x00 ‖ hash ‖ id` → empty, for collection scans.
//!
//! # Bounded history: snapshots plus a tail of deltas, re-based past a bound
//! Automerge keeps every change forever, and both applying and `save()`/`load()` grow with the
//! history (automerge issues 596 and 906). We do both of the remedies DESIGN.md §5 names:
//! - **Snapshot + tail.** A version stores only the changes it added (a delta); every
//!   `snapshot_every_versions` versions it stores a full snapshot instead. So a write costs one
//!   local automerge transaction on the cached document plus a delta, a cold load is one snapshot
//!   plus at most `snapshot_every_versions` deltas, and reads never touch automerge at all: every
//!   version carries its materialized JSON.
//! - **Deterministic re-base.** When a document's history passes `max_history_changes`, the
//!   version is written from a fresh automerge document that holds the same values and types
//!   (counters stay counters, text stays text) in ONE change made by actor `(ts, u32::MAX)` at the
//!   record's wall clock. Every replica re-bases at the same ts into the same bytes. This is what
//!   bounds the cost of a write, of a snapshot and of the in-memory document: without it, a
//!   document with 100k updates of history keeps paying for them. The price: a CRDT client whose
//!   raw changes depend on history from before a re-base gets them refused (deterministically,
//!   as [`Rejection::MissingDependencies`]); it must fetch the current automerge bytes and redo its
//!   edits on them. With the default bound (1024 changes) that only hits clients that stayed
//!   offline across a thousand writes to the same document.
//!
//! # Apply
//! [`Store::apply`] takes a group of log records in ts order and the current [`Ownership`]. Every
//! record advances the applied position; only mutations of owned documents make versions, and
//! mutations of intervals being backfilled go to `pending`. One version per document per
//! transaction; the versions and the applied position are one WriteBatch, fsynced per group,
//! and [`Store::committed`] reports only what is synced. Nothing reads the clock or randomness:
//! actors are derived from `(ts, mutation index)`, change times from `wall_clock_ms`.
//!
//! Bad records never wedge the log, and every transaction has one outcome:
//! - a record that is invalid on its own (unparsable JSON, a non-object, an empty counter path,
//!   an undecodable change, a missing op, a bad key, a payload over the size limit, a condition
//!   that checks nothing or whose filter does not parse) is skipped WHOLE ([`Skipped`]), on
//!   every node, since every node sees the whole record;
//! - otherwise the transaction commits or aborts as a whole (`apply`, `txn`): mutations are
//!   total (`document`), so only a false condition, a result over the record's size limit or
//!   raw changes with missing dependencies abort it, decided from the votes of the documents it
//!   names, the same on every replica.
//!
//! # GC and reads
//! A read below the GC watermark answers [`Error::SnapshotTooOld`]; a read above the applied
//! position answers [`Error::NotYetApplied`]. [`Store::gc`] raises the watermark (durably, before
//! pruning) and prunes in bounded, resumable steps; readers take a RocksDB snapshot before
//! checking the watermark, so a read that passes the check never sees a half-pruned document.

mod apply;
mod cache;
mod document;
mod keys;
mod record;
mod txn;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use automerge::{ActorId, Automerge};
use causeway_core::{Epoch, Interval, KeyHash, Timestamp};
use causeway_proto::v1::{Mutation, Transaction};
use prost::Message;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DBCompressionType,
    Options as DbOptions, WriteBatch, WriteOptions, DB,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};

use cache::Lru;
pub use keys::{
    collection_key, collection_key_parts, interval_range, parse_version_key, VersionKey,
};
use record::{Record, Segment};
pub use txn::{
    decision_of, outcome_of, Blocked, DocRef, Limits, RemoteVotes, DEFAULT_IDEMPOTENCY_WINDOW_MS,
    DEFAULT_MAX_DOCUMENT_BYTES, DEFAULT_MAX_HISTORY_CHANGES, IDEMPOTENCY_MAX_DISTANCE,
};

const CF_DOCS: &str = "docs";
const CF_META: &str = "meta";
const CF_PENDING: &str = "pending";
const CF_BY_COLLECTION: &str = "by_collection";

const META_APPLIED: &[u8] = b"applied";
const META_GC: &[u8] = b"gc";
const META_CONFIG: &[u8] = b"config/";
const META_NAMED: &[u8] = b"named/";
/// `outcome/ ‖ ts (u64 BE)` → the outcome (or this node's votes) of the transaction at ts.
const META_OUTCOME: &[u8] = b"outcome/";
/// Outcome records below this ts (u64 BE) are pruned.
const META_OUTCOMES_PRUNED: &[u8] = b"outcomes-pruned";

/// Options of the storage engine. Every limit has a documented default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreOptions {
    /// Documents kept decoded in memory so apply does not reload them (default 65 536).
    pub cache_documents: usize,
    /// Bound on the estimated memory of those documents (default 256 MiB).
    pub cache_bytes: usize,
    /// Write a full snapshot instead of a delta every this many versions (default 64).
    pub snapshot_every_versions: u32,
    /// fsync every applied group before [`Store::apply`] returns (default true). When false,
    /// [`Store::sync`] makes what was applied durable: a store node then syncs on a task of
    /// its own, so the next group applies while the previous one syncs. Either way the
    /// committed ts only counts what is fsynced.
    pub sync_writes: bool,
    /// RocksDB block cache (default 128 MiB).
    pub block_cache_bytes: usize,
    /// RocksDB memtable of each column family (default 64 MiB): what is written before a flush
    /// to a table file, and the space preallocated for the write-ahead log.
    pub write_buffer_bytes: usize,
    /// Threads that apply a group's documents in parallel (default 0: one per core). The
    /// versions written are the same for any count.
    pub apply_threads: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            cache_documents: 65_536,
            cache_bytes: 256 << 20,
            snapshot_every_versions: 64,
            sync_writes: true,
            block_cache_bytes: 128 << 20,
            write_buffer_bytes: 64 << 20,
            apply_threads: 0,
        }
    }
}

/// Errors of the storage engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("rocksdb")]
    RocksDb(#[from] rocksdb::Error),
    #[error("read at ts {requested} is below the gc watermark {gc}")]
    SnapshotTooOld { requested: Timestamp, gc: Timestamp },
    #[error("read at ts {requested} is above the applied position {applied}")]
    NotYetApplied {
        requested: Timestamp,
        applied: Timestamp,
    },
    #[error("transaction format version {0} is not supported by this build")]
    UnsupportedFormat(u32),
    #[error("invalid backfill record")]
    InvalidBackfillRecord,
    #[error("scan cursor does not belong to collection {0:?}")]
    InvalidCursor(String),
    #[error("invalid mutation")]
    Rejected(#[from] Rejection),
    #[error("votes on the transaction at ts {ts} disagree ({detail}): replicas diverged")]
    Diverged { ts: Timestamp, detail: String },
}

/// Why a mutation (or a whole transaction) was not applied. Deterministic: every replica that
/// applies the same records decides the same.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("mutation has no op")]
    MissingOp,
    #[error("invalid collection or id")]
    InvalidKey(#[from] causeway_core::KeyError),
    #[error("json does not parse")]
    InvalidJson,
    #[error("json is not an object")]
    NotAnObject,
    #[error("counter path is empty")]
    EmptyPath,
    #[error("automerge change does not decode")]
    UndecodableChange,
    #[error("document of {bytes} bytes exceeds the limit of {max}")]
    DocumentTooLarge { bytes: usize, max: usize },
    #[error("automerge changes depend on changes the document does not have")]
    MissingDependencies,
    #[error("automerge refused the operation: {0}")]
    Automerge(String),
    #[error("condition filter does not parse")]
    InvalidFilter,
    #[error("condition checks nothing (set exists, version_ts or filter)")]
    EmptyCondition,
    #[error("idempotency key is not 1 to 256 bytes of printable ASCII")]
    InvalidIdempotencyKey,
}

/// A mutation or transaction that apply skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub ts: Timestamp,
    /// The mutation index, or `None` when the whole transaction was skipped.
    pub mutation: Option<u32>,
    pub reason: Rejection,
}

/// Which documents this node stores, as of the records being applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ownership {
    /// Mutations of documents in these intervals are applied.
    pub owned: Vec<Interval>,
    /// Mutations of documents in these intervals (and not in `owned`) go to `pending`, to be
    /// replayed once the interval's backfill is in.
    pub pending: Vec<Interval>,
}

impl Ownership {
    pub fn owned(owned: Vec<Interval>) -> Ownership {
        Ownership {
            owned,
            pending: Vec::new(),
        }
    }

    fn owns(&self, hash: KeyHash) -> bool {
        self.owned.iter().any(|i| i.contains(hash))
    }

    fn pends(&self, hash: KeyHash) -> bool {
        self.pending.iter().any(|i| i.contains(hash))
    }
}

/// What one call to [`Store::apply`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ApplyOutcome {
    /// The applied position after the call.
    pub applied: Timestamp,
    /// Records at or below the applied position, ignored (a resumed stream may repeat them).
    pub repeated: usize,
    pub versions_written: usize,
    pub pending_written: usize,
    /// Transactions that aborted (decided here).
    pub aborted: usize,
    /// Records skipped whole (invalid on their own).
    pub skipped: Vec<Skipped>,
    /// The transaction the group stopped before, for want of other nodes' votes.
    pub blocked: Option<Blocked>,
}

/// A document as read at a timestamp.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    pub collection: String,
    pub id: String,
    /// The ts of the version read (≤ the read ts).
    pub version: Timestamp,
    pub json: Map<String, Json>,
}

/// What one transaction wrote to one document (see [`Store::changes`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Change {
    /// The transaction wrote a version of the document.
    pub written: bool,
    /// The JSON text of that version; `None` for a delete.
    pub after: Option<Vec<u8>>,
    /// The document existed just before the transaction.
    pub before_found: bool,
    /// Its JSON text then, when asked for.
    pub before: Option<Vec<u8>>,
}

/// Where a scan resumes: opaque bytes (the `by_collection` key of the last document examined).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ScanCursor(pub Vec<u8>);

/// One page of a collection scan.
#[derive(Debug, Clone, PartialEq)]
pub struct ScanPage {
    pub documents: Vec<Document>,
    /// Documents examined (live or not, matching or not).
    pub scanned: usize,
    /// `None` when the collection is exhausted.
    pub next: Option<ScanCursor>,
}

/// What a version record is, as GC sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stored {
    Tombstone,
    Snapshot,
    Delta,
}

/// Progress of one GC step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcProgress {
    pub examined: usize,
    pub pruned: usize,
    /// True when this step finished a pass over the whole keyspace.
    pub pass_complete: bool,
}

/// A raw version record, as backfill ships it between replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackfillRecord {
    /// A `docs` key.
    pub key: Vec<u8>,
    /// A version record.
    pub value: Vec<u8>,
}

/// One batch of a backfill scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackfillBatch {
    pub records: Vec<BackfillRecord>,
    /// The `docs` key to pass as `from` for the next batch; `None` when the interval is done.
    pub next: Option<Vec<u8>>,
}

/// A decoded document in the apply cache.
#[derive(Debug)]
enum Cached {
    Absent {
        latest: Option<Timestamp>,
    },
    /// Boxed: a decoded automerge document is large, and absent entries are common.
    Live(Box<Live>),
}

#[derive(Debug)]
struct Live {
    doc: Automerge,
    latest: Timestamp,
    history_changes: u32,
    deltas: u32,
    /// The actor of the store's changes to this history (named by its snapshot); `None` for a
    /// history from before actors were kept per document: then each mutation has its own.
    actor: Option<ActorId>,
    /// The document as JSON (what `document::materialize` gives), kept so a write need not
    /// read it back from automerge.
    json: Map<String, Json>,
    json_bytes: usize,
}

impl Cached {
    fn latest(&self) -> Option<Timestamp> {
        match self {
            Cached::Absent { latest } => *latest,
            Cached::Live(live) => Some(live.latest),
        }
    }

    fn weight(&self) -> usize {
        match self {
            Cached::Absent { .. } => 64,
            // Measured: a decoded automerge document costs some 20 KB with small values, plus
            // about three times its JSON.
            Cached::Live(live) => (16 << 10) + live.json_bytes * 4,
        }
    }
}

/// State only the writer (apply, GC, drops, ingest) touches.
#[derive(Debug)]
struct Writer {
    cache: Lru<Cached>,
    /// Where the current GC pass resumes.
    gc_cursor: Option<Vec<u8>>,
}

/// The storage engine of one store node. `&self` methods are safe to call from many threads:
/// writers serialize on an internal lock, readers use RocksDB snapshots.
pub struct Store {
    db: DB,
    options: StoreOptions,
    writer: Mutex<Writer>,
    /// `options.apply_threads`, with 0 resolved to the number of cores once at open.
    apply_threads: usize,
    applied: AtomicU64,
    committed: AtomicU64,
    gc: AtomicU64,
    outcomes_pruned: AtomicU64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.db.path())
            .field("applied", &self.applied())
            .field("committed", &self.committed())
            .field("gc", &self.gc_watermark())
            .finish()
    }
}

fn read_u64(bytes: Option<Vec<u8>>, what: &str) -> u64 {
    match bytes {
        None => 0,
        Some(b) => u64::from_be_bytes(
            b.as_slice()
                .try_into()
                .unwrap_or_else(|_| panic!("corrupt meta {what}: {b:02x?}")),
        ),
    }
}

impl Store {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: impl AsRef<std::path::Path>, options: StoreOptions) -> Result<Store, Error> {
        let cache = Cache::new_lru_cache(options.block_cache_bytes);
        let cf_options = || {
            let mut block = BlockBasedOptions::default();
            block.set_block_cache(&cache);
            block.set_bloom_filter(10.0, false);
            let mut o = DbOptions::default();
            o.set_compression_type(DBCompressionType::Lz4);
            o.set_block_based_table_factory(&block);
            o.set_write_buffer_size(options.write_buffer_bytes);
            o
        };
        let mut db_options = cf_options();
        db_options.create_if_missing(true);
        db_options.create_missing_column_families(true);
        db_options.increase_parallelism(2);
        let cfs = [CF_DOCS, CF_META, CF_PENDING, CF_BY_COLLECTION]
            .map(|name| ColumnFamilyDescriptor::new(name, cf_options()));
        let db = DB::open_cf_descriptors(&db_options, path, cfs)?;
        // What recovery found is what the WAL held; make it durable before advertising it.
        db.flush_wal(true)?;
        let applied = read_u64(db.get_cf(cf(&db, CF_META), META_APPLIED)?, "applied");
        let gc = read_u64(db.get_cf(cf(&db, CF_META), META_GC)?, "gc");
        assert!(gc <= applied, "gc watermark {gc} above applied {applied}");
        let outcomes_pruned = read_u64(
            db.get_cf(cf(&db, CF_META), META_OUTCOMES_PRUNED)?,
            "outcomes pruned",
        );
        tracing::info!(applied, gc, "storage opened");
        Ok(Store {
            writer: Mutex::new(Writer {
                cache: Lru::new(options.cache_documents, options.cache_bytes),
                gc_cursor: None,
            }),
            apply_threads: match options.apply_threads {
                0 => std::thread::available_parallelism().map_or(1, usize::from),
                n => n,
            },
            db,
            options,
            applied: AtomicU64::new(applied),
            committed: AtomicU64::new(applied),
            gc: AtomicU64::new(gc),
            outcomes_pruned: AtomicU64::new(outcomes_pruned),
        })
    }

    pub fn options(&self) -> &StoreOptions {
        &self.options
    }

    /// The ts of the last applied record (written, maybe not yet synced).
    pub fn applied(&self) -> Timestamp {
        Timestamp(self.applied.load(Ordering::SeqCst))
    }

    /// The highest ts applied and fsynced: what this node may advertise.
    pub fn committed(&self) -> Timestamp {
        Timestamp(self.committed.load(Ordering::SeqCst))
    }

    /// The lowest ts reads may use.
    pub fn gc_watermark(&self) -> Timestamp {
        Timestamp(self.gc.load(Ordering::SeqCst))
    }

    /// fsyncs everything applied so far and advances [`Store::committed`] to it. It does not
    /// wait for the writer: apply goes on meanwhile, and what it writes after `applied` is read
    /// here waits for the next sync.
    pub fn sync(&self) -> Result<Timestamp, Error> {
        // `applied` is stored after its group's write returned, so that write is in the WAL
        // this fsync covers.
        let applied = self.applied.load(Ordering::SeqCst);
        self.db.flush_wal(true)?;
        self.committed.fetch_max(applied, Ordering::SeqCst);
        Ok(Timestamp(applied))
    }

    fn lock(&self) -> MutexGuard<'_, Writer> {
        // A panic while holding the lock is a broken invariant: poisoning propagates it.
        self.writer.lock().expect("storage writer lock poisoned")
    }

    fn cf(&self, name: &str) -> &ColumnFamily {
        cf(&self.db, name)
    }

    fn write(&self, batch: WriteBatch, sync: bool) -> Result<(), Error> {
        let mut options = WriteOptions::default();
        options.set_sync(sync);
        self.db.write_opt(batch, &options)?;
        Ok(())
    }

    // ---------------------------------------------------------------------------------------
    // Apply
    // ---------------------------------------------------------------------------------------

    // [`Store::apply`] and the machinery behind it are in `apply.rs`.

    fn latest_if_any(&self, prefix: &[u8]) -> Option<Timestamp> {
        let mut it = self.db.raw_iterator_cf(self.cf(CF_DOCS));
        it.seek(prefix);
        match it.key() {
            Some(key) if is_version_of(key, prefix) => Some(keys::version_key_parts(key).ts),
            _ => None,
        }
    }

    // ---------------------------------------------------------------------------------------
    // Reads
    // ---------------------------------------------------------------------------------------

    /// Takes a snapshot, then checks `ts` against the watermark and the applied position (in
    /// that order: GC raises the watermark before it prunes).
    fn snapshot_at(&self, ts: Timestamp) -> Result<rocksdb::Snapshot<'_>, Error> {
        // The applied position before the snapshot: apply moves it after its batch is written,
        // so everything up to it is in the snapshot. The GC watermark after the snapshot: GC
        // moves it before it prunes, so if it is still at or below ts, the snapshot holds every
        // version ts needs.
        let applied = self.applied();
        if ts > applied {
            return Err(Error::NotYetApplied {
                requested: ts,
                applied,
            });
        }
        let snapshot = self.db.snapshot();
        let gc = self.gc_watermark();
        if ts < gc {
            return Err(Error::SnapshotTooOld { requested: ts, gc });
        }
        Ok(snapshot)
    }

    /// The document as of `ts` (its newest version ≤ ts); `None` if absent or deleted.
    pub fn get(
        &self,
        collection: &str,
        id: &str,
        ts: Timestamp,
    ) -> Result<Option<Document>, Error> {
        Ok(self.multi_get(&[(collection, id)], ts)?.pop().flatten())
    }

    /// Several documents at one snapshot, in the order asked.
    pub fn multi_get(
        &self,
        ids: &[(&str, &str)],
        ts: Timestamp,
    ) -> Result<Vec<Option<Document>>, Error> {
        let snapshot = self.snapshot_at(ts)?;
        let mut it = snapshot.raw_iterator_cf(self.cf(CF_DOCS));
        let mut out = Vec::with_capacity(ids.len());
        for (collection, id) in ids {
            let prefix = keys::doc_prefix(collection, id);
            out.push(
                read_version(&mut it, &prefix, ts)?.and_then(|(version, value)| {
                    let json = Record::decode(&value).json().map(parse_json)?;
                    Some(Document {
                        collection: (*collection).to_owned(),
                        id: (*id).to_owned(),
                        version,
                        json,
                    })
                }),
            );
        }
        Ok(out)
    }

    /// For each `(collection, id, ts)`: what the transaction at `ts` wrote to the document (change
    /// data capture). Every ts must be at most `at`, and every `ts - 1` at or above the GC
    /// watermark (so both the version at ts and the one before it are still stored).
    pub fn changes(
        &self,
        keys: &[(&str, &str, Timestamp)],
        at: Timestamp,
        with_before: bool,
    ) -> Result<Vec<Change>, Error> {
        let lowest = keys.iter().map(|k| k.2).min().unwrap_or(at);
        let snapshot = self.snapshot_at(at)?;
        let gc = self.gc_watermark();
        if lowest.get().saturating_sub(1) < gc.get() {
            return Err(Error::SnapshotTooOld {
                requested: Timestamp(lowest.get().saturating_sub(1)),
                gc,
            });
        }
        let mut it = snapshot.raw_iterator_cf(self.cf(CF_DOCS));
        let mut out = Vec::with_capacity(keys.len());
        for &(collection, id, ts) in keys {
            assert!(ts <= at, "a change at {ts} read at {at}");
            let prefix = keys::doc_prefix(collection, id);
            let mut change = Change::default();
            it.seek(keys::version_key(&prefix, ts));
            if let (Some(key), Some(value)) = (it.key(), it.value()) {
                if is_version_of(key, &prefix) && keys::version_key_parts(key).ts == ts {
                    change.written = true;
                    change.after = Record::decode(value).json().map(<[u8]>::to_vec);
                    it.next();
                }
            }
            if change.written {
                // The version before ts: the next key of the document, if any.
                if let (Some(key), Some(value)) = (it.key(), it.value()) {
                    if is_version_of(key, &prefix) {
                        if let Some(json) = Record::decode(value).json() {
                            change.before_found = true;
                            if with_before {
                                change.before = Some(json.to_vec());
                            }
                        }
                    }
                }
            }
            it.status()?;
            out.push(change);
        }
        Ok(out)
    }

    /// The automerge bytes (`save()`) of the document as of `ts`, for a client that merges.
    pub fn get_automerge(
        &self,
        collection: &str,
        id: &str,
        ts: Timestamp,
    ) -> Result<Option<Vec<u8>>, Error> {
        let snapshot = self.snapshot_at(ts)?;
        let prefix = keys::doc_prefix(collection, id);
        let mut it = snapshot.raw_iterator_cf(self.cf(CF_DOCS));
        it.seek(keys::version_key(&prefix, ts));
        let mut chain: Vec<Vec<u8>> = Vec::new();
        while let (Some(key), Some(value)) = (it.key(), it.value()) {
            if !is_version_of(key, &prefix) {
                break;
            }
            match Record::decode(value) {
                Record::Tombstone if chain.is_empty() => return Ok(None),
                Record::Tombstone => panic!("a delta follows a tombstone"),
                Record::Put {
                    segment, automerge, ..
                } => {
                    chain.push(automerge.to_vec());
                    if segment == Segment::Snapshot {
                        let snapshot = chain.pop().expect("pushed");
                        let doc =
                            document::load_chain(&snapshot, chain.iter().rev().map(Vec::as_slice));
                        return Ok(Some(doc.save()));
                    }
                }
            }
            it.next();
        }
        it.status()?;
        assert!(chain.is_empty(), "a delta chain without a snapshot");
        Ok(None)
    }

    /// One page of the live documents of `collection` as of `ts` that pass `filter`, in key
    /// order: at most `limit` documents, after examining at most `max_scanned` documents.
    /// Resume with `next`.
    pub fn scan(
        &self,
        collection: &str,
        ts: Timestamp,
        filter: &dyn Fn(&Json) -> bool,
        limit: usize,
        cursor: Option<&ScanCursor>,
        max_scanned: usize,
    ) -> Result<ScanPage, Error> {
        let snapshot = self.snapshot_at(ts)?;
        let start = match cursor {
            Some(ScanCursor(last)) => {
                if !last.starts_with(&keys::collection_start(collection)) {
                    return Err(Error::InvalidCursor(collection.to_owned()));
                }
                let mut after = last.clone();
                after.push(0);
                after
            }
            None => keys::collection_start(collection),
        };
        let end = keys::collection_end(collection);
        let mut index = snapshot.raw_iterator_cf(self.cf(CF_BY_COLLECTION));
        let mut docs = snapshot.raw_iterator_cf(self.cf(CF_DOCS));
        index.seek(&start);
        let mut page = ScanPage {
            documents: Vec::new(),
            scanned: 0,
            next: None,
        };
        while let Some(key) = index.key() {
            if key >= end.as_slice() {
                break;
            }
            if page.documents.len() >= limit.max(1) || page.scanned >= max_scanned.max(1) {
                // At least one document was examined, so `next` names the last of them.
                assert!(page.next.is_some());
                return Ok(page);
            }
            let (c, hash, id) = keys::collection_key_parts(key);
            assert_eq!(c, collection);
            assert_eq!(KeyHash::of(c, id).0, hash, "by_collection hash mismatch");
            page.scanned += 1;
            let prefix = keys::doc_prefix(c, id);
            if let Some((version, value)) = read_version(&mut docs, &prefix, ts)? {
                if let Some(json) = Record::decode(&value).json() {
                    let json = parse_json(json);
                    let value = Json::Object(json);
                    if filter(&value) {
                        let Json::Object(json) = value else {
                            unreachable!("built as an object")
                        };
                        page.documents.push(Document {
                            collection: collection.to_owned(),
                            id: id.to_owned(),
                            version,
                            json,
                        });
                    }
                }
            }
            page.next = Some(ScanCursor(key.to_vec()));
            index.next();
        }
        index.status()?;
        page.next = None;
        Ok(page)
    }

    // ---------------------------------------------------------------------------------------
    // GC and ownership
    // ---------------------------------------------------------------------------------------

    /// Raises the GC watermark to `gc_ts` and prunes, examining about `budget` version keys
    /// (whole documents: a step always finishes the document it is on). Call again to continue;
    /// a pass resumes where the last step stopped. Each step holds the writer lock only for its
    /// own bounded work, so apply interleaves between steps.
    ///
    /// Prunes every version older than a document's newest version ≤ `gc_ts` and the delta
    /// chain it rests on (down to the nearest older snapshot, which stays: at most
    /// `snapshot_every_versions` versions); the version too when it is a tombstone (then, if it
    /// is the newest, the collection index entry with it). GC never decodes a document.
    pub fn gc(&self, gc_ts: Timestamp, budget: usize) -> Result<GcProgress, Error> {
        let mut writer = self.lock();
        let current = self.gc_watermark();
        assert!(
            gc_ts >= current,
            "gc ts {gc_ts} below the watermark {current}"
        );
        assert!(
            gc_ts <= self.applied(),
            "gc ts {gc_ts} above the applied position {}",
            self.applied()
        );
        if gc_ts > current {
            let mut batch = WriteBatch::default();
            batch.put_cf(self.cf(CF_META), META_GC, gc_ts.0.to_be_bytes());
            self.write(batch, true)?;
            self.gc.store(gc_ts.0, Ordering::SeqCst);
        }
        let mut progress = GcProgress::default();
        let mut batch = WriteBatch::default();
        let mut it = self.db.raw_iterator_cf(self.cf(CF_DOCS));
        match &writer.gc_cursor {
            Some(from) => it.seek(from),
            None => it.seek_to_first(),
        }
        let mut next_cursor = None;
        while let Some(first) = it.key() {
            if progress.examined >= budget.max(1) {
                next_cursor = Some(first.to_vec());
                break;
            }
            let prefix = keys::version_key_parts(first).prefix.to_vec();
            // The keys and what each version is: GC never needs a version's bytes.
            let mut versions: Vec<(Vec<u8>, Stored)> = Vec::new();
            while let (Some(key), Some(value)) = (it.key(), it.value()) {
                if !is_version_of(key, &prefix) {
                    break;
                }
                let stored = match Record::decode(value) {
                    Record::Tombstone => Stored::Tombstone,
                    Record::Put {
                        segment: Segment::Snapshot,
                        ..
                    } => Stored::Snapshot,
                    Record::Put {
                        segment: Segment::Delta,
                        ..
                    } => Stored::Delta,
                };
                versions.push((key.to_vec(), stored));
                it.next();
            }
            progress.examined += versions.len();
            progress.pruned += self.gc_document(&mut batch, &versions, gc_ts);
        }
        it.status()?;
        drop(it);
        progress.pass_complete = next_cursor.is_none();
        writer.gc_cursor = next_cursor;
        self.write(batch, false)?;
        tracing::debug!(
            gc_ts = gc_ts.0,
            examined = progress.examined,
            pruned = progress.pruned,
            "gc step"
        );
        Ok(progress)
    }

    /// Prunes one document's versions (newest first). Returns how many were deleted.
    fn gc_document(
        &self,
        batch: &mut WriteBatch,
        versions: &[(Vec<u8>, Stored)],
        gc_ts: Timestamp,
    ) -> usize {
        let ts_of = |key: &[u8]| keys::version_key_parts(key).ts;
        if versions
            .first()
            .is_some_and(|(key, _)| keys::is_idempotency_row(key))
        {
            // A key no transaction after the GC ts can see (`IDEMPOTENCY_MAX_DISTANCE`) goes.
            let forgotten =
                |key: &[u8]| ts_of(key).0.saturating_add(txn::IDEMPOTENCY_MAX_DISTANCE) < gc_ts.0;
            let doomed: Vec<_> = versions.iter().filter(|(k, _)| forgotten(k)).collect();
            for (key, _) in &doomed {
                batch.delete_cf(self.cf(CF_DOCS), key);
            }
            if !doomed.is_empty() {
                return doomed.len();
            }
        }
        let Some(keep) = versions.iter().position(|(k, _)| ts_of(k) <= gc_ts) else {
            return 0;
        };
        let (keep_key, keep_stored) = &versions[keep];
        if *keep_stored == Stored::Tombstone {
            // Nothing at or after the GC ts can read below a tombstone: it goes with everything
            // older (and, if it is the newest, the collection index entry with it).
            for (key, _) in &versions[keep..] {
                batch.delete_cf(self.cf(CF_DOCS), key);
            }
            if keep == 0 {
                let parts = keys::version_key_parts(keep_key);
                batch.delete_cf(
                    self.cf(CF_BY_COLLECTION),
                    keys::collection_key(parts.collection, parts.hash, parts.id),
                );
            }
            return versions.len() - keep;
        }
        // The kept version rests on its delta chain, down to the nearest older snapshot: that
        // chain stays (no automerge work here), everything older goes.
        let base = versions[keep..]
            .iter()
            .position(|(_, stored)| *stored == Stored::Snapshot)
            .map(|i| keep + i)
            .unwrap_or_else(|| panic!("a delta chain without a snapshot below gc ts {gc_ts}"));
        for (key, _) in &versions[base + 1..] {
            batch.delete_cf(self.cf(CF_DOCS), key);
        }
        versions.len() - base - 1
    }

    /// Drops every document of `intervals` (no longer owned): versions, collection index entries
    /// and pending mutations, with range deletes, in one fsynced batch.
    pub fn drop_intervals(&self, intervals: &[Interval]) -> Result<(), Error> {
        self.drop_ranges(intervals, true)
    }

    /// Drops the documents of `intervals` but keeps their pending mutations: a backfill that
    /// starts an interval over.
    pub fn drop_documents(&self, intervals: &[Interval]) -> Result<(), Error> {
        self.drop_ranges(intervals, false)
    }

    fn drop_ranges(&self, intervals: &[Interval], pending: bool) -> Result<(), Error> {
        let mut writer = self.lock();
        let collections = self.collections()?;
        let mut batch = WriteBatch::default();
        for interval in intervals {
            let (start, end) = keys::interval_range(interval);
            batch.delete_range_cf(self.cf(CF_DOCS), &start, &end);
            if pending {
                batch.delete_range_cf(self.cf(CF_PENDING), &start, &end);
            }
            for collection in &collections {
                let from = [keys::collection_start(collection), start.clone()].concat();
                let to = match interval.end_hash() {
                    Some(end) => [
                        keys::collection_start(collection),
                        end.to_be_bytes().to_vec(),
                    ]
                    .concat(),
                    None => keys::collection_end(collection),
                };
                batch.delete_range_cf(self.cf(CF_BY_COLLECTION), from, to);
            }
        }
        self.write(batch, true)?;
        writer.cache.remove_where(|prefix| {
            let hash = KeyHash(u64::from_be_bytes(prefix[..8].try_into().expect("hash")));
            intervals.iter().any(|i| i.contains(hash))
        });
        tracing::info!(intervals = intervals.len(), pending, "intervals dropped");
        Ok(())
    }

    /// The collections with at least one document, in order.
    pub fn collections(&self) -> Result<Vec<String>, Error> {
        let mut out = Vec::new();
        let mut it = self.db.raw_iterator_cf(self.cf(CF_BY_COLLECTION));
        it.seek_to_first();
        while let Some(key) = it.key() {
            let (collection, _, _) = keys::collection_key_parts(key);
            let collection = collection.to_owned();
            it.seek(keys::collection_end(&collection));
            out.push(collection);
        }
        it.status()?;
        Ok(out)
    }

    // ---------------------------------------------------------------------------------------
    // Digests and backfill
    // ---------------------------------------------------------------------------------------

    /// An ordered hash of the documents of `interval` visible at `ts`: over (key, version ts,
    /// JSON) of each live document, in key order. Equal on replicas holding the same documents,
    /// whatever their GC state or snapshot/delta layout.
    pub fn digest(&self, interval: &Interval, ts: Timestamp) -> Result<u128, Error> {
        let (start, end) = keys::interval_range(interval);
        self.digest_range(&start, &end, ts)
    }

    /// [`Store::digest`] of the documents whose `docs` keys lie in `[start, end)` (document
    /// boundaries, as backfill chunks have them).
    pub fn digest_range(&self, start: &[u8], end: &[u8], ts: Timestamp) -> Result<u128, Error> {
        let snapshot = self.snapshot_at(ts)?;
        let mut it = snapshot.raw_iterator_cf(self.cf(CF_DOCS));
        it.seek(start);
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        let mut current: Option<Vec<u8>> = None;
        while let (Some(key), Some(value)) = (it.key(), it.value()) {
            if key >= end {
                break;
            }
            let parts = keys::version_key_parts(key);
            let seen = current.as_deref() == Some(parts.prefix);
            if !seen && parts.ts <= ts {
                current = Some(parts.prefix.to_vec());
                // An idempotency row that no transaction after `ts` can see is not counted:
                // GC may have dropped it on one replica and not yet on another.
                let forgotten = keys::is_idempotency_row(parts.prefix)
                    && parts.ts.0.saturating_add(txn::IDEMPOTENCY_MAX_DISTANCE) < ts.0;
                if let Some(json) = Record::decode(value).json().filter(|_| !forgotten) {
                    hasher.update(&(parts.prefix.len() as u64).to_be_bytes());
                    hasher.update(parts.prefix);
                    hasher.update(&parts.ts.0.to_be_bytes());
                    hasher.update(&(json.len() as u64).to_be_bytes());
                    hasher.update(json);
                }
            }
            it.next();
        }
        it.status()?;
        Ok(hasher.digest128())
    }

    /// A batch of the raw version records of `interval` that a read at any ts in
    /// `[gc_ts, upto]` could need: per document, the versions ≤ `upto` down to the newest
    /// version ≤ `gc_ts`, plus the older ones its delta chain rests on. Start with `from: None`,
    /// continue with the batch's `next`. About `limit` records and `max_bytes` bytes of keys and
    /// values per batch (whole documents: the last one may pass the bounds).
    pub fn backfill_batch(
        &self,
        interval: &Interval,
        gc_ts: Timestamp,
        upto: Timestamp,
        from: Option<&[u8]>,
        limit: usize,
        max_bytes: usize,
    ) -> Result<BackfillBatch, Error> {
        assert!(gc_ts <= upto, "backfill window [{gc_ts}, {upto}] is empty");
        let snapshot = self.snapshot_at(gc_ts)?;
        let applied = self.applied();
        if upto > applied {
            return Err(Error::NotYetApplied {
                requested: upto,
                applied,
            });
        }
        let (start, end) = keys::interval_range(interval);
        let from = from.map_or(start, <[u8]>::to_vec);
        let mut it = snapshot.raw_iterator_cf(self.cf(CF_DOCS));
        it.seek(&from);
        let mut batch = BackfillBatch {
            records: Vec::new(),
            next: None,
        };
        let mut bytes = 0;
        while let Some(first) = it.key() {
            if first >= end.as_slice() {
                break;
            }
            if batch.records.len() >= limit.max(1)
                || (bytes >= max_bytes && !batch.records.is_empty())
            {
                batch.next = Some(first.to_vec());
                break;
            }
            let prefix = keys::version_key_parts(first).prefix.to_vec();
            // Past the newest version ≤ gc_ts, older versions are sent only while the delta
            // chain of what was sent still needs its base.
            let mut reached_gc = false;
            let mut need_base = false;
            while let (Some(key), Some(value)) = (it.key(), it.value()) {
                if !is_version_of(key, &prefix) {
                    break;
                }
                let ts = keys::version_key_parts(key).ts;
                let is_delta = matches!(
                    Record::decode(value),
                    Record::Put {
                        segment: Segment::Delta,
                        ..
                    }
                );
                let needed = ts <= upto && (!reached_gc || need_base);
                if needed {
                    bytes += key.len() + value.len();
                    batch.records.push(BackfillRecord {
                        key: key.to_vec(),
                        value: value.to_vec(),
                    });
                    need_base = is_delta;
                    reached_gc |= ts <= gc_ts;
                }
                it.next();
            }
        }
        it.status()?;
        Ok(batch)
    }

    /// Writes backfilled version records (from [`Store::backfill_batch`] on a peer), with their
    /// collection index entries, in one fsynced batch. Refuses the whole batch if any record is
    /// malformed.
    pub fn ingest(&self, records: &[BackfillRecord]) -> Result<(), Error> {
        let mut writer = self.lock();
        let mut batch = WriteBatch::default();
        for record in records {
            let parts = keys::parse_version_key(&record.key).ok_or(Error::InvalidBackfillRecord)?;
            let parsed = Record::parse(&record.value).ok_or(Error::InvalidBackfillRecord)?;
            if let Some(json) = parsed.json() {
                match serde_json::from_slice::<Json>(json) {
                    Ok(Json::Object(_)) => {}
                    _ => return Err(Error::InvalidBackfillRecord),
                }
            }
            batch.put_cf(self.cf(CF_DOCS), &record.key, &record.value);
            if !keys::is_idempotency_row(&record.key) {
                batch.put_cf(
                    self.cf(CF_BY_COLLECTION),
                    keys::collection_key(parts.collection, parts.hash, parts.id),
                    [],
                );
            }
        }
        self.write(batch, true)?;
        for record in records {
            let parts = keys::version_key_parts(&record.key);
            writer.cache.take(parts.prefix);
        }
        Ok(())
    }

    /// Applies the pending mutations of `interval` (up to about `limit` of them, whole
    /// transactions per document) to the backfilled documents and deletes them, in one fsynced
    /// batch. A mutation at or below `upto` (the backfilled snapshot) or at or below its
    /// document's newest version is already in the backfilled data and is dropped. Returns how
    /// many pending mutations were consumed; 0 when none are left.
    pub fn replay_pending(
        &self,
        interval: &Interval,
        upto: Timestamp,
        limit: usize,
    ) -> Result<usize, Error> {
        let mut writer = self.lock();
        let (start, end) = keys::interval_range(interval);
        let mut it = self.db.raw_iterator_cf(self.cf(CF_PENDING));
        it.seek(&start);
        let mut groups: Vec<PendingGroup> = Vec::new();
        let mut consumed = Vec::new();
        while let (Some(key), Some(value)) = (it.key(), it.value()) {
            if key >= end.as_slice() {
                break;
            }
            let (prefix, ts, index) = keys::pending_key_parts(key);
            let same_group = groups
                .last()
                .is_some_and(|(p, t, ..)| p.as_slice() == prefix && *t == ts);
            if !same_group && consumed.len() >= limit.max(1) {
                break;
            }
            let (wall, limits, mutation) = apply::decode_pending(value);
            let mutation = Mutation::decode(mutation).expect("corrupt pending mutation");
            if !same_group {
                groups.push((prefix.to_vec(), ts, wall, limits, Vec::new()));
            }
            groups.last_mut().expect("pushed").4.push((index, mutation));
            consumed.push(key.to_vec());
            it.next();
        }
        it.status()?;
        drop(it);
        let mut run = apply::Run::new(ApplyOutcome::default());
        for key in &consumed {
            run.batch.delete_cf(self.cf(CF_PENDING), key);
        }
        for (prefix, ts, wall, limits, mutations) in &groups {
            if *ts <= upto
                || self
                    .latest_if_any(prefix)
                    .is_some_and(|latest| latest >= *ts)
            {
                continue;
            }
            if keys::is_idempotency_row(prefix) {
                // The row of a committed key: written as it was at the source.
                run.batch.put_cf(
                    self.cf(CF_DOCS),
                    keys::version_key(prefix, *ts),
                    txn::key_row_value(*wall),
                );
                continue;
            }
            // Decided (committed) when it was logged; its record passed `parse_transaction`.
            let first = &mutations[0].1;
            let mut doc = txn::DocMutations {
                collection: &first.collection,
                id: &first.id,
                ops: Vec::new(),
                conditions: Vec::new(),
                key_row: None,
            };
            for (index, mutation) in mutations {
                let op = txn::parse_op(mutation, limits).unwrap_or_else(|e| {
                    panic!("a pending mutation of ts {ts} does not parse: {e}")
                });
                doc.ops.push((*index, op));
            }
            let version = apply::Version {
                ts: *ts,
                wall_clock_ms: *wall,
                mutations: doc,
                limits: *limits,
                decided: apply::Decided::Committed,
            };
            run.shares.push(prefix.clone(), version);
        }
        self.flush(&mut writer, &mut run)?;
        self.write(std::mem::take(&mut run.batch), true)?;
        run.cache_states(&mut writer);
        Ok(consumed.len())
    }

    // ---------------------------------------------------------------------------------------
    // Transaction outcomes
    // ---------------------------------------------------------------------------------------

    /// What this node recorded of the transaction at `ts`: its outcome, or only this node's
    /// votes (when it wrote nothing of it); `None` when it held none of its documents, has not
    /// applied it, or pruned it.
    pub fn outcome(
        &self,
        ts: Timestamp,
    ) -> Result<Option<causeway_proto::v1::outcome_response::Known>, Error> {
        let Some(bytes) = self.db.get_cf(self.cf(CF_META), apply::outcome_key(ts))? else {
            return Ok(None);
        };
        let record = causeway_proto::v1::OutcomeResponse::decode(bytes.as_slice())
            .unwrap_or_else(|e| panic!("corrupt outcome record of ts {ts}: {e}"));
        Ok(record.known)
    }

    /// The outcomes (not the votes) recorded for the ts in `(after, upto]`, in ts order.
    pub fn outcomes_after(
        &self,
        after: Timestamp,
        upto: Timestamp,
    ) -> Result<Vec<(Timestamp, causeway_proto::v1::TxOutcome)>, Error> {
        use causeway_proto::v1::outcome_response::Known;
        let mut out = Vec::new();
        if upto <= after {
            return Ok(out);
        }
        let end = apply::outcome_key(upto);
        let mut it = self.db.raw_iterator_cf(self.cf(CF_META));
        it.seek(apply::outcome_key(Timestamp(after.0 + 1)));
        while let (Some(key), Some(value)) = (it.key(), it.value()) {
            if key > end.as_slice() || !key.starts_with(META_OUTCOME) {
                break;
            }
            let ts = Timestamp(u64::from_be_bytes(
                key[META_OUTCOME.len()..]
                    .try_into()
                    .expect("an outcome key"),
            ));
            let record = causeway_proto::v1::OutcomeResponse::decode(value)
                .unwrap_or_else(|e| panic!("corrupt outcome record of ts {ts}: {e}"));
            if let Some(Known::Decided(outcome)) = record.known {
                out.push((ts, outcome));
            }
            it.next();
        }
        it.status()?;
        Ok(out)
    }

    /// Drops the outcome records below `ts` (one range delete), and remembers that it did.
    pub fn prune_outcomes(&self, below: Timestamp) -> Result<(), Error> {
        let _writer = self.lock();
        if below <= self.outcomes_pruned() {
            return Ok(());
        }
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(
            self.cf(CF_META),
            apply::outcome_key(Timestamp(0)),
            apply::outcome_key(below),
        );
        batch.put_cf(
            self.cf(CF_META),
            META_OUTCOMES_PRUNED,
            below.0.to_be_bytes(),
        );
        self.write(batch, false)?;
        self.outcomes_pruned.store(below.0, Ordering::SeqCst);
        Ok(())
    }

    /// Outcomes below this ts are no longer kept.
    pub fn outcomes_pruned(&self) -> Timestamp {
        Timestamp(self.outcomes_pruned.load(Ordering::SeqCst))
    }

    // ---------------------------------------------------------------------------------------
    // Meta
    // ---------------------------------------------------------------------------------------

    /// Records a configuration this node has seen (opaque bytes, e.g. serde JSON).
    pub fn put_config(&self, epoch: Epoch, config: &[u8]) -> Result<(), Error> {
        let key = [META_CONFIG, &epoch.0.to_be_bytes()[..]].concat();
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_META), key, config);
        self.write(batch, true)
    }

    /// Every configuration recorded, by epoch.
    pub fn configs(&self) -> Result<Vec<(Epoch, Vec<u8>)>, Error> {
        let mut out = Vec::new();
        let mut it = self.db.raw_iterator_cf(self.cf(CF_META));
        it.seek(META_CONFIG);
        while let (Some(key), Some(value)) = (it.key(), it.value()) {
            let Some(epoch) = key.strip_prefix(META_CONFIG) else {
                break;
            };
            let epoch = u64::from_be_bytes(epoch.try_into().expect("corrupt config key"));
            out.push((Epoch(epoch), value.to_vec()));
            it.next();
        }
        it.status()?;
        Ok(out)
    }

    /// Records a named piece of node state (opaque bytes, e.g. the transition plan) durably;
    /// `None` clears it.
    pub fn put_meta(&self, name: &str, value: Option<&[u8]>) -> Result<(), Error> {
        let key = [META_NAMED, name.as_bytes()].concat();
        let mut batch = WriteBatch::default();
        match value {
            Some(v) => batch.put_cf(self.cf(CF_META), key, v),
            None => batch.delete_cf(self.cf(CF_META), key),
        }
        self.write(batch, true)
    }

    /// A named piece of node state recorded by [`Store::put_meta`].
    pub fn meta(&self, name: &str) -> Result<Option<Vec<u8>>, Error> {
        let key = [META_NAMED, name.as_bytes()].concat();
        Ok(self.db.get_cf(self.cf(CF_META), key)?)
    }

    /// Moves the applied position forward to `ts` without applying the records before it, and
    /// syncs: a node that owns nothing in the current configuration starts storing at the log's
    /// end (what it gains comes by backfill). Never moves it back.
    pub fn skip_to(&self, ts: Timestamp) -> Result<(), Error> {
        let _writer = self.lock();
        if ts <= self.applied() {
            return Ok(());
        }
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_META), META_APPLIED, ts.0.to_be_bytes());
        self.write(batch, true)?;
        self.applied.store(ts.0, Ordering::SeqCst);
        self.committed.fetch_max(ts.0, Ordering::SeqCst);
        tracing::info!(%ts, "applied position moved to the log's end");
        Ok(())
    }

    /// The approximate bytes on disk of the documents of `interval` (flushed data only).
    pub fn estimate_bytes(&self, interval: &Interval) -> u64 {
        let (start, end) = keys::interval_range(interval);
        self.db
            .get_approximate_sizes_cf(self.cf(CF_DOCS), &[rocksdb::Range::new(&start, &end)])
            .first()
            .copied()
            .unwrap_or(0)
    }

    /// Every version record of `interval`, raw, in key order (tests and tooling; unbounded).
    pub fn raw_versions(&self, interval: &Interval) -> Result<Vec<BackfillRecord>, Error> {
        let (start, end) = keys::interval_range(interval);
        let mut it = self.db.raw_iterator_cf(self.cf(CF_DOCS));
        it.seek(&start);
        let mut out = Vec::new();
        while let (Some(key), Some(value)) = (it.key(), it.value()) {
            if key >= end.as_slice() {
                break;
            }
            out.push(BackfillRecord {
                key: key.to_vec(),
                value: value.to_vec(),
            });
            it.next();
        }
        it.status()?;
        Ok(out)
    }

    /// Documents decoded in the apply cache (for tests and metrics).
    pub fn cached_documents(&self) -> usize {
        self.lock().cache.len()
    }
}

/// Whether `key` (a `docs` key) lies in `interval`'s key range.
pub fn key_in(interval: &Interval, key: &[u8]) -> bool {
    // (`interval_range` gives the interval's first and past-the-end keys.)
    let (start, end) = keys::interval_range(interval);
    start.as_slice() <= key && key < end.as_slice()
}

/// One document's pending mutations of one transaction: (document prefix, ts, wall clock,
/// the record's limits, (mutation index, mutation) in order).
type PendingGroup = (Vec<u8>, Timestamp, u64, Limits, Vec<(u32, Mutation)>);

fn cf<'a>(db: &'a DB, name: &str) -> &'a ColumnFamily {
    db.cf_handle(name)
        .unwrap_or_else(|| panic!("column family {name} missing"))
}

fn is_version_of(key: &[u8], prefix: &[u8]) -> bool {
    key.len() == prefix.len() + keys::TS_BYTES && key.starts_with(prefix)
}

fn parse_json(bytes: &[u8]) -> Map<String, Json> {
    match serde_json::from_slice(bytes) {
        Ok(Json::Object(map)) => map,
        _ => panic!("corrupt stored json ({} bytes)", bytes.len()),
    }
}

/// The newest version of `prefix` with ts ≤ `ts`, if any.
fn read_version(
    it: &mut rocksdb::DBRawIterator<'_>,
    prefix: &[u8],
    ts: Timestamp,
) -> Result<Option<(Timestamp, Vec<u8>)>, Error> {
    it.seek(keys::version_key(prefix, ts));
    match (it.key(), it.value()) {
        (Some(key), Some(value)) if is_version_of(key, prefix) => {
            let version = keys::version_key_parts(key).ts;
            assert!(version <= ts, "seek returned a newer version");
            Ok(Some((version, value.to_vec())))
        }
        _ => {
            it.status()?;
            Ok(None)
        }
    }
}

/// Checks a transaction the way apply will, without a document: the api-server can call this
/// before appending, so that nothing apply would skip whole reaches the log.
pub fn validate(tx: &Transaction) -> Result<(), Rejection> {
    txn::parse_transaction(tx)
        .map(|_| ())
        .map_err(|(_, reason)| reason)
}
