//! Apply: log records become versions. A group of records is routed into each owned document's
//! share (its mutations in ts order); documents are independent, so their shares are applied in
//! parallel, each on its own decoded automerge document, and the results are written as one
//! WriteBatch. Every replica computes the same versions whatever the thread count: a document's
//! versions depend only on its own mutations, in log order.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use causeway_core::{KeyHash, Timestamp};
use causeway_proto::v1::{Transaction, TRANSACTION_FORMAT_VERSION};
use prost::Message;
use rocksdb::WriteBatch;

use super::document::{self, Op};
use super::record::{Record, Segment};
use super::{
    check_size, is_version_of, keys, parse_json, parse_transaction, ApplyOutcome, Cached,
    DocMutations, Error, Live, Ownership, Skipped, Store, Writer, CF_BY_COLLECTION, CF_DOCS,
    CF_META, CF_PENDING, META_APPLIED,
};

/// One transaction's mutations of one document, and when it was logged.
pub(super) struct Version<'a> {
    pub ts: Timestamp,
    pub wall_clock_ms: u64,
    pub mutations: DocMutations<'a>,
}

/// One document's share of a group: its versions in ts order.
struct DocWork<'a> {
    prefix: Vec<u8>,
    versions: Vec<Version<'a>>,
}

/// A group's documents' shares, in order of first appearance.
#[derive(Default)]
pub(super) struct Shares<'a> {
    work: Vec<DocWork<'a>>,
    /// Prefix → index in `work`.
    index: HashMap<Vec<u8>, usize>,
}

impl<'a> Shares<'a> {
    /// Files `version` under its document's share, making the share on first sight.
    pub fn push(&mut self, prefix: Vec<u8>, version: Version<'a>) {
        match self.index.get(&prefix) {
            Some(&slot) => self.work[slot].versions.push(version),
            None => {
                self.index.insert(prefix.clone(), self.work.len());
                self.work.push(DocWork {
                    prefix,
                    versions: vec![version],
                });
            }
        }
    }
}

/// What applying one document's share produced, for the group's batch.
struct DocOutput {
    prefix: Vec<u8>,
    state: Cached,
    /// (column family, key, value)
    puts: Vec<(&'static str, Vec<u8>, Vec<u8>)>,
    skipped: Vec<Skipped>,
    versions_written: usize,
}

/// Below this many documents per thread a group is applied on the calling thread: a thread
/// costs more than a document or two.
const MIN_DOCUMENTS_PER_THREAD: usize = 2;

impl Store {
    /// Applies a group of log records, in strictly increasing ts order, as one WriteBatch.
    ///
    /// Records at or below the applied position are ignored (counted in `repeated`), so a
    /// stream may be resumed from any earlier position. An unknown record format stops the
    /// group before anything is written ([`Error::UnsupportedFormat`]): this build cannot apply
    /// it and must not skip it. On a RocksDB error nothing of the group is applied.
    pub fn apply(
        &self,
        records: &[(Timestamp, Transaction)],
        ownership: &Ownership,
    ) -> Result<ApplyOutcome, Error> {
        let mut writer = self.lock();
        let start = self.applied();
        let mut outcome = ApplyOutcome {
            applied: start,
            ..ApplyOutcome::default()
        };
        let mut previous = None;
        for (ts, tx) in records {
            assert!(
                previous.is_none_or(|p| p < *ts),
                "records out of order: {ts} after {previous:?}"
            );
            previous = Some(*ts);
            if tx.format_version != TRANSACTION_FORMAT_VERSION && *ts > start {
                return Err(Error::UnsupportedFormat(tx.format_version));
            }
        }
        let mut batch = WriteBatch::default();
        let mut shares = Shares::default();
        for (ts, tx) in records {
            if *ts <= start {
                outcome.repeated += 1;
                continue;
            }
            self.route(&mut batch, &mut shares, *ts, tx, ownership, &mut outcome);
            outcome.applied = *ts;
        }
        if outcome.applied == start {
            return Ok(outcome);
        }
        batch.put_cf(
            self.cf(CF_META),
            META_APPLIED,
            outcome.applied.0.to_be_bytes(),
        );
        self.apply_documents(
            &mut writer,
            batch,
            shares,
            &mut outcome,
            self.options.sync_writes,
        )?;
        self.applied.store(outcome.applied.0, Ordering::SeqCst);
        if self.options.sync_writes {
            self.committed.store(outcome.applied.0, Ordering::SeqCst);
        }
        for skipped in &outcome.skipped {
            tracing::warn!(ts = skipped.ts.0, mutation = ?skipped.mutation, reason = %skipped.reason, "mutation skipped");
        }
        Ok(outcome)
    }

    /// Sends one record's mutations where they go: owned documents' into their share of the
    /// group, those of intervals being backfilled into `pending`, the rest nowhere.
    fn route<'a>(
        &self,
        batch: &mut WriteBatch,
        shares: &mut Shares<'a>,
        ts: Timestamp,
        tx: &'a Transaction,
        ownership: &Ownership,
        outcome: &mut ApplyOutcome,
    ) {
        let docs = match parse_transaction(tx, &self.options) {
            Ok(docs) => docs,
            Err((culprit, reason)) => {
                tracing::debug!(ts = ts.0, ?culprit, %reason, "whole transaction skipped");
                outcome.skipped.push(Skipped {
                    ts,
                    mutation: None,
                    reason,
                });
                return;
            }
        };
        for doc in docs {
            let hash = KeyHash::of(doc.collection, doc.id);
            if ownership.owns(hash) {
                let prefix = keys::doc_prefix(doc.collection, doc.id);
                let version = Version {
                    ts,
                    wall_clock_ms: tx.wall_clock_ms,
                    mutations: doc,
                };
                shares.push(prefix, version);
            } else if ownership.pends(hash) {
                let prefix = keys::doc_prefix(doc.collection, doc.id);
                for (index, _) in &doc.ops {
                    let mutation = &tx.mutations[*index as usize];
                    let mut value = tx.wall_clock_ms.to_be_bytes().to_vec();
                    mutation.encode(&mut value).expect("a Vec grows");
                    batch.put_cf(
                        self.cf(CF_PENDING),
                        keys::pending_key(&prefix, ts, *index),
                        value,
                    );
                    outcome.pending_written += 1;
                }
            }
        }
    }

    /// Applies every document's share (in parallel over documents), adds the versions to
    /// `batch` and writes it. The decoded documents join the cache only once the batch is
    /// written; on an error they are dropped, and the cache never holds state ahead of disk.
    pub(super) fn apply_documents(
        &self,
        writer: &mut Writer,
        mut batch: WriteBatch,
        shares: Shares<'_>,
        outcome: &mut ApplyOutcome,
        sync: bool,
    ) -> Result<(), Error> {
        let jobs: Vec<_> = shares
            .work
            .into_iter()
            .map(|share| {
                let cached = writer.cache.take(&share.prefix);
                (share, cached)
            })
            .collect();
        let results = parallel_map(jobs, self.apply_threads, |(share, cached)| {
            self.apply_share(share, cached)
        });
        let mut states = Vec::with_capacity(results.len());
        for result in results {
            let output = result?;
            for (cf, key, value) in output.puts {
                batch.put_cf(self.cf(cf), key, value);
            }
            outcome.skipped.extend(output.skipped);
            outcome.versions_written += output.versions_written;
            states.push((output.prefix, output.state));
        }
        outcome.skipped.sort_by_key(|s| (s.ts, s.mutation));
        self.write(batch, sync)?;
        for (prefix, state) in states {
            let weight = state.weight();
            writer.cache.insert(prefix, state, weight);
        }
        Ok(())
    }

    /// Applies one document's share, starting from its cached state or its newest version.
    fn apply_share(&self, share: DocWork<'_>, cached: Option<Cached>) -> Result<DocOutput, Error> {
        let state = match cached {
            Some(state) => state,
            None => self.load_newest(&share.prefix)?,
        };
        let mut output = DocOutput {
            prefix: share.prefix,
            state,
            puts: Vec::new(),
            skipped: Vec::new(),
            versions_written: 0,
        };
        for version in &share.versions {
            apply_version(&mut output, version, &self.options);
        }
        Ok(output)
    }

    /// Decodes a document from its newest version (a snapshot and the deltas after it).
    fn load_newest(&self, prefix: &[u8]) -> Result<Cached, Error> {
        let mut it = self.db.raw_iterator_cf(self.cf(CF_DOCS));
        it.seek(prefix);
        let mut chain: Vec<Vec<u8>> = Vec::new();
        let mut newest: Option<(Timestamp, u32, u32, Vec<u8>)> = None;
        while let (Some(key), Some(value)) = (it.key(), it.value()) {
            if !is_version_of(key, prefix) {
                break;
            }
            let ts = keys::version_key_parts(key).ts;
            match Record::decode(value) {
                Record::Tombstone => {
                    assert!(newest.is_none(), "a delta follows a tombstone");
                    return Ok(Cached::Absent { latest: Some(ts) });
                }
                Record::Put {
                    segment,
                    history_changes,
                    deltas,
                    json,
                    automerge,
                } => {
                    if newest.is_none() {
                        newest = Some((ts, history_changes, deltas, json.to_vec()));
                    }
                    chain.push(automerge.to_vec());
                    if segment == Segment::Snapshot {
                        let (latest, history_changes, deltas, json) = newest.expect("set above");
                        let snapshot = chain.pop().expect("pushed");
                        let doc =
                            document::load_chain(&snapshot, chain.iter().rev().map(Vec::as_slice));
                        return Ok(Cached::Live(Box::new(Live {
                            doc,
                            latest,
                            history_changes,
                            deltas,
                            json: parse_json(&json),
                            json_bytes: json.len(),
                        })));
                    }
                }
            }
            it.next();
        }
        it.status()?;
        assert!(newest.is_none(), "a delta chain without a snapshot");
        Ok(Cached::Absent { latest: None })
    }
}

/// Applies one transaction's mutations of the document in `output.state`: at most one new
/// version (a delta, a snapshot or a tombstone) goes to `output.puts`, and the state moves on.
fn apply_version(output: &mut DocOutput, version: &Version<'_>, options: &super::StoreOptions) {
    let Version {
        ts,
        wall_clock_ms,
        mutations,
    } = version;
    let (ts, wall_clock_ms) = (*ts, *wall_clock_ms);
    let state = std::mem::replace(&mut output.state, Cached::Absent { latest: None });
    let latest_before = state.latest();
    if let Some(latest) = latest_before {
        assert!(
            latest < ts,
            "version {latest} is not older than applied ts {ts}"
        );
    }
    // `model` is the document as JSON: `Some` exactly when `doc` is.
    let (mut doc, mut model, mut history_changes, deltas_before, heads_before, json_bytes_before) =
        match state {
            Cached::Live(live) => {
                let heads = live.doc.get_heads();
                (
                    Some(live.doc),
                    Some(live.json),
                    live.history_changes,
                    live.deltas,
                    Some(heads),
                    live.json_bytes,
                )
            }
            Cached::Absent { .. } => (None, None, 0, 0, None, 0),
        };
    let existed = doc.is_some();
    // A document created (or re-created after a delete) within this transaction gets a
    // snapshot: it has no previous version to be a delta of.
    let mut fresh = false;
    // The JSON bytes of the last mutation that applied.
    let mut json: Option<Vec<u8>> = None;
    let mut changed = false;
    let max = options.max_document_bytes;
    for (index, op) in &mutations.ops {
        let result = match op {
            Op::Delete => {
                doc = None;
                model = None;
                json = None;
                history_changes = 0;
                Ok(())
            }
            Op::Changes(changes) => {
                let created = doc.is_none();
                let mut next = doc
                    .clone()
                    .unwrap_or_else(|| document::empty_doc(ts, *index));
                document::apply_changes(&mut next, changes).and_then(|added| {
                    let map = document::materialize(&next);
                    let bytes = check_size(&map, max)?;
                    fresh |= created;
                    history_changes =
                        history_changes.saturating_add(u32::try_from(added).unwrap_or(u32::MAX));
                    doc = Some(next);
                    model = Some(map);
                    json = Some(bytes);
                    Ok(())
                })
            }
            local => {
                let created = doc.is_none();
                let mut target = doc
                    .take()
                    .unwrap_or_else(|| document::empty_doc(ts, *index));
                target.set_actor(document::actor(ts, *index));
                let mut tx = target.transaction();
                let mut map = model.clone().unwrap_or_default();
                let result = document::apply_local(&mut tx, local).and_then(|()| {
                    document::apply_json(&mut map, local);
                    check_size(&map, max)
                });
                let result = match result {
                    Ok(bytes) => {
                        let (hash, _) = tx.commit_with(document::commit_options(wall_clock_ms));
                        if hash.is_some() {
                            history_changes = history_changes.saturating_add(1);
                        }
                        fresh |= created;
                        model = Some(map);
                        json = Some(bytes);
                        Ok(())
                    }
                    Err(e) => {
                        tx.rollback();
                        Err(e)
                    }
                };
                // A document made for a mutation that failed holds nothing: drop it.
                if result.is_ok() || !created {
                    doc = Some(target);
                }
                result
            }
        };
        match result {
            Ok(()) => changed = true,
            Err(reason) => output.skipped.push(Skipped {
                ts,
                mutation: Some(*index),
                reason,
            }),
        }
    }
    if !changed {
        // Every mutation was skipped and rolled back: the document is as it was.
        output.state = match doc {
            Some(doc) => Cached::Live(Box::new(Live {
                doc,
                latest: latest_before.expect("a live document has a version"),
                history_changes,
                deltas: deltas_before,
                json: model.expect("a live document has its JSON"),
                json_bytes: json_bytes_before,
            })),
            None => Cached::Absent {
                latest: latest_before,
            },
        };
        return;
    }
    let key = keys::version_key(&output.prefix, ts);
    let Some(mut live_doc) = doc else {
        // Deleted. A document that was already absent needs no tombstone.
        if existed {
            output.puts.push((CF_DOCS, key, Record::Tombstone.encode()));
            output.versions_written += 1;
        }
        let latest = if existed { Some(ts) } else { latest_before };
        output.state = Cached::Absent { latest };
        return;
    };
    let hash = u64::from_be_bytes(output.prefix[..8].try_into().expect("hash prefix"));
    output.puts.push((
        CF_BY_COLLECTION,
        keys::collection_key(mutations.collection, hash, mutations.id),
        Vec::new(),
    ));
    let model = model.expect("a live document has its JSON");
    debug_assert_eq!(
        model,
        document::materialize(&live_doc),
        "the JSON model drifted"
    );
    let json_bytes = json.unwrap_or_else(|| document::to_bytes(&model));
    let (segment, automerge) = if history_changes > options.max_history_changes {
        live_doc = document::rebase(&live_doc, ts, wall_clock_ms);
        history_changes = 1;
        (Segment::Snapshot, document::snapshot(&live_doc))
    } else {
        match heads_before {
            Some(heads) if !fresh && deltas_before + 1 < options.snapshot_every_versions => {
                (Segment::Delta, live_doc.save_after(&heads))
            }
            _ => (Segment::Snapshot, document::snapshot(&live_doc)),
        }
    };
    let deltas = match segment {
        Segment::Snapshot => 0,
        Segment::Delta => deltas_before + 1,
    };
    let value = Record::Put {
        segment,
        history_changes,
        deltas,
        json: &json_bytes,
        automerge: &automerge,
    }
    .encode();
    output.puts.push((CF_DOCS, key, value));
    output.versions_written += 1;
    output.state = Cached::Live(Box::new(Live {
        doc: live_doc,
        latest: ts,
        history_changes,
        deltas,
        json: model,
        json_bytes: json_bytes.len(),
    }));
}

/// `f` over `items` on up to `threads` threads (the caller's among them), results in the order
/// of `items`. Items are handed out one at a time, so one slow item does not hold up a thread's
/// whole share. A panic in `f` is re-raised here.
fn parallel_map<T: Send, R: Send>(
    items: Vec<T>,
    threads: usize,
    f: impl Fn(T) -> R + Sync,
) -> Vec<R> {
    let threads = threads.min(items.len() / MIN_DOCUMENTS_PER_THREAD);
    if threads <= 1 {
        return items.into_iter().map(f).collect();
    }
    let count = items.len();
    let slots: Vec<Mutex<Option<T>>> = items.into_iter().map(|i| Mutex::new(Some(i))).collect();
    let next = AtomicUsize::new(0);
    let worker = || {
        let mut done = Vec::new();
        loop {
            let index = next.fetch_add(1, Ordering::Relaxed);
            if index >= count {
                return done;
            }
            let item = slots[index]
                .lock()
                .expect("an item slot is never poisoned")
                .take()
                .expect("each item is handed out once");
            done.push((index, f(item)));
        }
    };
    let mut results = std::thread::scope(|scope| {
        let helpers: Vec<_> = (1..threads).map(|_| scope.spawn(worker)).collect();
        let mut results = worker();
        for helper in helpers {
            match helper.join() {
                Ok(done) => results.extend(done),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        results
    });
    results.sort_unstable_by_key(|(index, _)| *index);
    results.into_iter().map(|(_, result)| result).collect()
}

#[cfg(test)]
mod tests {
    use super::parallel_map;

    #[test]
    fn parallel_map_keeps_order_and_runs_every_item_once() {
        for threads in [0, 1, 2, 8] {
            for count in [0, 1, 3, 4, 100] {
                let items: Vec<u64> = (0..count).collect();
                let out = parallel_map(items, threads, |i| i * 3);
                assert_eq!(out, (0..count).map(|i| i * 3).collect::<Vec<_>>());
            }
        }
    }

    #[test]
    #[should_panic(expected = "item 37")]
    fn parallel_map_reraises_a_panic() {
        parallel_map((0..100).collect::<Vec<u32>>(), 4, |i| {
            assert!(i != 37, "item 37");
            i
        });
    }
}
