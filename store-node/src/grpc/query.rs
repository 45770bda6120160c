//! Collection queries: the pages a coordinator answers (`Query`), each over every partition at
//! one read timestamp, and a replica's scan of its own storage (`ScanAt`).
//!
//! # Pages
//!
//! A page is bounded by its `limit` and by its work: documents examined (`max_scanned`), bytes
//! of JSON gathered (`query_max_page_bytes`) and time (`query_max_page_ms`). Each partition
//! scans its share of the budget in key order (key hash, then id); the *frontier* is the first
//! position past which some partition has not looked yet, and nothing past it is used.
//!
//! An unordered page is the first matches in key order, up to the frontier; its cursor is the
//! last key it covered. An ordered page needs every match before it can say which comes first:
//! it makes a *pass* over the collection, which may span pages when the collection is larger
//! than a page's work. While a pass goes on, the cursor carries where the pass stands and the
//! best candidates so far (by id, as many as the cursor holds: at least one), and the page is
//! empty and `partial`. When the pass ends, the candidates are the next documents in order.
//! A candidate dropped for room ends the set there (a pass never takes a later document in
//! place of a dropped one), so the pages together return every match once, in order.
//!
//! # Cursors
//!
//! A cursor names positions by document id only: the position of a document in the order is
//! (its sort key, key hash, id), and the sort key is read back from the document at the
//! cursor's read timestamp, which does not change. So a position round-trips exactly, whatever
//! the sort key is (missing, an array element, a float). Each page renews a lease on the read
//! timestamp ([`crate::state::ActiveReads::lease`]), so the GC timestamp does not pass it while
//! the client pages.

use std::cmp::Ordering as CmpOrdering;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use causeway_core::query::{Filter, Order, Query, QueryLimits};
use causeway_core::{
    ClusterConfig, DocKey, Epoch, Interval, KeyHash, KeyLimits, NodeId, PartitionId, ReadTimestamp,
    Timestamp,
};
use causeway_proto::v1 as pb;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use tonic::{Response, Status};

use super::{
    document, interval_from_proto, interval_to_proto, read_ts_to_proto, storage_status, Attempt,
    Hedge, Retries, Server,
};
use crate::state::Shared;
use crate::storage::{self, ScanCursor};

/// Keys a replica's scan examines per storage call, between its checks of the page's byte and
/// time budgets.
const SCAN_STEP: usize = 256;

impl Server {
    /// One page of a query (the `Query` RPC).
    pub(super) async fn query_page(
        &self,
        req: pb::QueryRequest,
    ) -> Result<pb::QueryResponse, Status> {
        causeway_core::key::validate_collection(&req.collection, &KeyLimits::default())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let query = if req.query.is_empty() {
            Query::default()
        } else {
            Query::parse_str(&req.query, &QueryLimits::default())
                .map_err(|e| Status::invalid_argument(format!("query: {e}")))?
        };
        let tuning = &self.shared.tuning;
        let cursor = if req.cursor.is_empty() {
            None
        } else {
            Some(Cursor::decode(
                &req.cursor,
                &req.collection,
                query.order.is_some(),
            )?)
        };
        let started = Instant::now();
        let budget = Budget {
            max_scanned: if req.max_scanned == 0 {
                tuning.query_max_scanned
            } else {
                req.max_scanned.min(tuning.query_max_scanned)
            }
            .max(1),
            max_bytes: tuning.query_max_page_bytes.max(1),
            until: started + Duration::from_millis(u64::from(tuning.query_max_page_ms)),
        };
        let deadline = started + self.timeout(req.timeout_ms);
        let mut retries = Retries::new(tuning.read_attempts, deadline);
        loop {
            // A cursor binds the read timestamp of the first page.
            let (at, config) = match &cursor {
                Some(c) => {
                    let at = ReadTimestamp::new(Epoch(c.epoch), Timestamp(c.ts));
                    let config = self.shared.configs().at(at.epoch).cloned().ok_or_else(|| {
                        Status::failed_precondition(
                            "the cursor's configuration is gone; start the query again",
                        )
                    })?;
                    (at, config)
                }
                None => match req.at_ts {
                    // An exact snapshot (an initial scan over several collections).
                    Some(ts) => {
                        let (at, config) = self.read_timestamp(Timestamp(ts), deadline).await?;
                        (ReadTimestamp::new(at.epoch, Timestamp(ts)), config)
                    }
                    None => self.read_timestamp(Timestamp(req.min_ts), deadline).await?,
                },
            };
            // GC may have passed the timestamp before the read registered: that is a snapshot
            // too old, handled as one below.
            let held = self.hold_read(at);
            let answer = match &held {
                Ok(_) => {
                    self.query_at(
                        &config,
                        at,
                        &req.collection,
                        &query,
                        cursor.as_ref(),
                        &budget,
                    )
                    .await
                }
                Err(_) => Err(Attempt::TooOld),
            };
            match answer {
                Ok(page) => {
                    self.shared.metrics.query_seconds.observe(started.elapsed());
                    let cursor = page.cursor.map(|next| {
                        // Leased while this page's read still holds the timestamp, so that
                        // the GC timestamp cannot pass it in between.
                        let until =
                            Instant::now() + Duration::from_millis(tuning.query_cursor_lease_ms);
                        if !self.shared.reads.lease(
                            at.ts,
                            until,
                            Duration::from_millis(tuning.query_cursor_max_age_ms),
                            tuning.query_max_cursor_leases,
                        ) {
                            tracing::warn!(
                                ts = %at.ts,
                                max = tuning.query_max_cursor_leases,
                                "too many cursor leases: this cursor holds no lease"
                            );
                        }
                        Cursor {
                            epoch: at.epoch.get(),
                            ts: at.ts.get(),
                            collection: req.collection.clone(),
                            ordered: query.order.is_some(),
                            after: next.after,
                            pass: next.pass,
                        }
                        .encode()
                    });
                    drop(held);
                    return Ok(pb::QueryResponse {
                        at: Some(read_ts_to_proto(at)),
                        documents: page.documents,
                        cursor,
                        partial: page.partial,
                        scanned: page.scanned,
                    });
                }
                Err(Attempt::TooOld) if req.at_ts.is_some() && cursor.is_none() => {
                    return Err(storage_status(storage::Error::SnapshotTooOld {
                        requested: at.ts,
                        gc: at.ts,
                    }));
                }
                Err(Attempt::TooOld) if cursor.is_some() => {
                    return Err(Status::failed_precondition(
                        "the cursor's snapshot was garbage collected; start the query again",
                    ));
                }
                Err(attempt) => retries.after(attempt, &self.shared.metrics).await?,
            }
        }
    }

    /// One page of a query over every partition at `at`.
    async fn query_at(
        &self,
        config: &ClusterConfig,
        at: ReadTimestamp,
        collection: &str,
        query: &Query,
        cursor: Option<&Cursor>,
        budget: &Budget,
    ) -> Result<Page, Attempt> {
        let replicas = self.replicas(config, at).await?;
        let limit = query
            .limit
            .unwrap_or(self.shared.tuning.query_max_limit)
            .min(self.shared.tuning.query_max_limit)
            .max(1) as usize;
        let scan = Scan {
            config,
            replicas: &replicas,
            at,
            collection,
            filter: serde_json::to_string(&query.filter).expect("filters serialize"),
            budget,
        };
        match &query.order {
            None => {
                self.unordered_page(&scan, limit, cursor.and_then(|c| c.after.as_deref()))
                    .await
            }
            Some(order) => self.ordered_page(&scan, order, limit, cursor).await,
        }
    }

    /// The first matches in key order after `after`, up to the frontier.
    async fn unordered_page(
        &self,
        scan: &Scan<'_>,
        limit: usize,
        after: Option<&str>,
    ) -> Result<Page, Attempt> {
        let chunk = self.scan_chunk(scan, after, limit as u32).await?;
        let mut docs = chunk.docs;
        let kept = fitting(docs.iter().map(|f| f.doc.json.len()), scan.budget.max_bytes)
            .min(limit)
            .min(docs.len());
        let more = docs.len() > kept || chunk.frontier.is_some();
        docs.truncate(kept);
        let after = if more {
            docs.last()
                .map(|f| f.id.clone())
                .or_else(|| chunk.frontier.map(|(_, id)| id))
        } else {
            None
        };
        Ok(Page {
            partial: more && docs.len() < limit,
            documents: docs.into_iter().map(|f| f.doc).collect(),
            cursor: after.map(|after| Next {
                after: Some(after),
                pass: None,
            }),
            scanned: chunk.scanned,
        })
    }

    /// The next matches in `order` after the cursor's last document: one step of a pass over
    /// the collection, and the documents when the pass ends.
    async fn ordered_page(
        &self,
        scan: &Scan<'_>,
        order: &Order,
        limit: usize,
        cursor: Option<&Cursor>,
    ) -> Result<Page, Attempt> {
        let after_id = cursor.and_then(|c| c.after.clone());
        let pass = cursor.and_then(|c| c.pass.clone());
        // The documents the cursor names, read back at the cursor's snapshot: the last one
        // returned (for its sort key) and the pass's candidates so far.
        let named: Vec<&String> = after_id
            .iter()
            .chain(pass.iter().flat_map(|p| &p.best))
            .collect();
        let mut read = if named.is_empty() {
            Vec::new()
        } else {
            let keys: Vec<pb::DocumentKey> = named
                .iter()
                .map(|id| pb::DocumentKey {
                    collection: scan.collection.to_owned(),
                    id: (*id).clone(),
                })
                .collect();
            let docs = self.read_at(scan.config, scan.at, &keys, false).await?;
            docs.into_iter()
                .map(|d| {
                    if d.found {
                        Found::new(d)
                    } else {
                        Err(Attempt::Failed(Status::invalid_argument(
                            "invalid cursor: it names a document the snapshot does not hold",
                        )))
                    }
                })
                .collect::<Result<Vec<_>, _>>()?
        };
        let after = after_id.is_some().then(|| read.remove(0));
        let path = order.field_path();
        let cmp = |a: &Found, b: &Found| {
            order
                .compare_keys(path.lookup(&a.json), path.lookup(&b.json))
                .then_with(|| (a.hash, &a.id).cmp(&(b.hash, &b.id)))
        };
        let (scanned_to, previous, mut more) = match pass {
            Some(p) => (Some(p.to), read.len(), p.more),
            None => (None, 0, false),
        };
        let chunk = self
            .scan_chunk(scan, scanned_to.as_deref(), scan.budget.max_scanned)
            .await?;
        let mut candidates = read;
        candidates.extend(chunk.docs.into_iter().filter(|f| {
            after
                .as_ref()
                .is_none_or(|a| cmp(f, a) == CmpOrdering::Greater)
        }));
        candidates.sort_by(&cmp);
        // Once a candidate was dropped, the set never grows again: a later document may come
        // before the dropped one only if it is among the kept ones' equals or betters.
        let cap = if more { previous.max(1) } else { limit };
        if candidates.len() > cap {
            candidates.truncate(cap);
            more = true;
        }
        if let Some((_, to)) = chunk.frontier {
            let base = Cursor {
                epoch: scan.at.epoch.get(),
                ts: scan.at.ts.get(),
                collection: scan.collection.to_owned(),
                ordered: true,
                after: after_id.clone(),
                pass: Some(Pass {
                    to: to.clone(),
                    best: Vec::new(),
                    more,
                }),
            }
            .encode()
            .len();
            let room = self
                .shared
                .tuning
                .query_max_cursor_bytes
                .saturating_sub(base);
            // Hex of the JSON string and its comma: at least one, so a pass always ends.
            let fit = fitting(
                candidates
                    .iter()
                    .map(|f| 2 * (serde_json::to_string(&f.id).map_or(0, |s| s.len()) + 1)),
                room as u64,
            );
            if fit < candidates.len() {
                candidates.truncate(fit);
                more = true;
            }
            return Ok(Page {
                documents: Vec::new(),
                cursor: Some(Next {
                    after: after_id,
                    pass: Some(Pass {
                        to,
                        best: candidates.into_iter().map(|f| f.id).collect(),
                        more,
                    }),
                }),
                partial: true,
                scanned: chunk.scanned,
            });
        }
        // The pass is over: the candidates are the next documents in order.
        let kept = fitting(
            candidates.iter().map(|f| f.doc.json.len()),
            scan.budget.max_bytes,
        );
        if kept < candidates.len() {
            candidates.truncate(kept);
            more = true;
        }
        let next = more.then(|| candidates.last()).flatten().map(|last| Next {
            after: Some(last.id.clone()),
            pass: None,
        });
        Ok(Page {
            partial: next.is_some() && candidates.len() < limit,
            documents: candidates.into_iter().map(|f| f.doc).collect(),
            cursor: next,
            scanned: chunk.scanned,
        })
    }

    /// Every partition's matches after `after` (in key order), as far as the page's budget
    /// goes, cut at the frontier.
    async fn scan_chunk(
        &self,
        scan: &Scan<'_>,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Chunk, Attempt> {
        let config = scan.config;
        let parts = config.slicing.partitions().count().max(1);
        let start = after.map(|id| (KeyHash::of(scan.collection, id).get(), id.to_owned()));
        let left_ms = scan
            .budget
            .until
            .saturating_duration_since(Instant::now())
            .as_millis();
        let requests = config.slicing.partitions().map(|p| {
            let request = pb::ScanAtRequest {
                at: Some(read_ts_to_proto(scan.at)),
                collection: scan.collection.to_owned(),
                intervals: config
                    .slicing
                    .intervals_of(p)
                    .iter()
                    .map(interval_to_proto)
                    .collect(),
                filter: scan.filter.clone(),
                after_hash: start.as_ref().map(|s| s.0),
                after_id: start.as_ref().map(|s| s.1.clone()).unwrap_or_default(),
                limit: limit.max(1),
                max_scanned: (scan.budget.max_scanned / parts as u32).max(1),
                with_automerge: false,
                max_bytes: (scan.budget.max_bytes / parts as u64).max(1),
                max_ms: left_ms.clamp(1, u128::from(u32::MAX)) as u32,
            };
            self.scan_from(config, &scan.replicas[&p], request)
        });
        let results = futures::future::join_all(requests).await;
        let mut docs = Vec::new();
        let mut scanned = 0u32;
        let mut frontier: Option<(u64, String)> = None;
        for result in results {
            let page = result?;
            scanned = scanned.saturating_add(page.scanned);
            if !page.done {
                let stop = (page.last_hash, page.last_id.clone());
                if frontier.as_ref().is_none_or(|f| stop < *f) {
                    frontier = Some(stop);
                }
            }
            for d in page.documents {
                docs.push(Found::new(d)?);
            }
        }
        docs.sort_by(|a, b| (a.hash, &a.id).cmp(&(b.hash, &b.id)));
        if let Some(f) = &frontier {
            docs.retain(|d| (d.hash, &d.id) <= (f.0, &f.1));
        }
        Ok(Chunk {
            docs,
            scanned,
            frontier,
        })
    }

    async fn scan_from(
        &self,
        config: &ClusterConfig,
        replicas: &[NodeId],
        request: pb::ScanAtRequest,
    ) -> Result<pb::ScanAtResponse, Attempt> {
        let timeout = Duration::from_millis(self.shared.tuning.peer_rpc_timeout_ms * 4);
        self.hedged(
            config,
            replicas,
            Hedge::WhenSilent,
            timeout,
            || local_scan(&self.shared, request.clone()),
            |mut client| {
                let request = request.clone();
                async move { client.scan_at(request).await.map(Response::into_inner) }
            },
        )
        .await
    }
}

/// How many of `sizes`, from the first, add up to at most `budget`: at least one, so that a
/// page always makes progress.
fn fitting(sizes: impl Iterator<Item = usize>, budget: u64) -> usize {
    let mut total = 0u64;
    let mut n = 0;
    for size in sizes {
        total = total.saturating_add(size as u64);
        if n > 0 && total > budget {
            break;
        }
        n += 1;
    }
    n
}

/// The work one page may do.
#[derive(Debug)]
struct Budget {
    /// Documents examined over all partitions.
    max_scanned: u32,
    /// Bytes of JSON gathered over all partitions, and returned.
    max_bytes: u64,
    /// When the partitions' scans stop.
    until: Instant,
}

/// What every partition's scan of one page shares.
struct Scan<'a> {
    config: &'a ClusterConfig,
    replicas: &'a BTreeMap<PartitionId, Vec<NodeId>>,
    at: ReadTimestamp,
    collection: &'a str,
    filter: String,
    budget: &'a Budget,
}

/// A matching document of a page, with its key and parsed JSON.
struct Found {
    hash: u64,
    id: String,
    json: Json,
    doc: pb::Document,
}

impl Found {
    fn new(doc: pb::Document) -> Result<Found, Attempt> {
        let json = serde_json::from_slice(&doc.json)
            .map_err(|e| Attempt::Failed(Status::internal(format!("stored json: {e}"))))?;
        Ok(Found {
            hash: KeyHash::of(&doc.collection, &doc.id).get(),
            id: doc.id.clone(),
            json,
            doc,
        })
    }
}

/// The matches of every partition up to the frontier, in key order.
struct Chunk {
    docs: Vec<Found>,
    scanned: u32,
    /// The last position every partition examined, when some stopped before the end.
    frontier: Option<(u64, String)>,
}

/// A page of a query, and where the next one starts.
struct Page {
    documents: Vec<pb::Document>,
    cursor: Option<Next>,
    partial: bool,
    scanned: u32,
}

/// The positions a cursor carries to the next page.
struct Next {
    after: Option<String>,
    pass: Option<Pass>,
}

/// Where the next page starts, bound to the read timestamp of the first page. Positions are
/// document ids of `collection` (their key hash follows from the id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Cursor {
    epoch: u64,
    ts: u64,
    collection: String,
    /// Whether the query is ordered: `after` means a key position in one, a document's place
    /// in the order in the other.
    ordered: bool,
    /// Unordered: the last key every partition examined. Ordered: the last document returned.
    /// None: from the start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    after: Option<String>,
    /// Ordered: the pass under way, if one spans pages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pass: Option<Pass>,
}

/// An ordered query's pass over the collection, between pages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Pass {
    /// Every partition has examined the keys up to this one.
    to: String,
    /// The best documents after `after` seen so far, in order.
    best: Vec<String>,
    /// Some documents after `after` were left out of `best`.
    more: bool,
}

impl Cursor {
    fn encode(&self) -> String {
        let json = serde_json::to_vec(self).expect("cursor serializes");
        json.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Decodes a cursor given back for `collection`, ordered or not; anything else is an
    /// invalid argument.
    fn decode(text: &str, collection: &str, ordered: bool) -> Result<Cursor, Status> {
        let invalid = || Status::invalid_argument("invalid cursor");
        if !text.len().is_multiple_of(2) || text.len() > 64 * 1024 {
            return Err(invalid());
        }
        let bytes: Option<Vec<u8>> = (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
            .collect();
        let cursor: Cursor =
            serde_json::from_slice(&bytes.ok_or_else(invalid)?).map_err(|_| invalid())?;
        if cursor.collection != collection {
            return Err(Status::invalid_argument(
                "the cursor belongs to another collection",
            ));
        }
        if cursor.ordered != ordered || (cursor.pass.is_some() && !ordered) {
            return Err(Status::invalid_argument(
                "the cursor belongs to a query with another order",
            ));
        }
        let limits = KeyLimits::default();
        let ids = cursor.after.iter().chain(
            cursor
                .pass
                .iter()
                .flat_map(|p| std::iter::once(&p.to).chain(&p.best)),
        );
        for id in ids {
            DocKey::new(collection, id, &limits).map_err(|_| invalid())?;
        }
        Ok(cursor)
    }
}

/// A scan of this node's own storage, restricted to the request's intervals: it seeks to each
/// interval rather than walking the keys of other partitions, and stops at the request's limit,
/// documents examined, bytes gathered or time, whichever comes first.
pub(super) async fn local_scan(
    shared: &Arc<Shared>,
    req: pb::ScanAtRequest,
) -> Result<pb::ScanAtResponse, Status> {
    let started = Instant::now();
    let ts = Timestamp(req.at.map_or(0, |a| a.ts));
    let mut intervals: Vec<Interval> = req
        .intervals
        .iter()
        .map(interval_from_proto)
        .collect::<Result<_, _>>()?;
    intervals.sort_by_key(|i| i.start);
    let filter = if req.filter.is_empty() {
        Filter::default()
    } else {
        Filter::parse_str(&req.filter, &QueryLimits::default())
            .map_err(|e| Status::invalid_argument(format!("filter: {e}")))?
    };
    causeway_core::key::validate_collection(&req.collection, &KeyLimits::default())
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    if req.after_hash.is_some() {
        DocKey::new(&req.collection, &req.after_id, &KeyLimits::default())
            .map_err(|e| Status::invalid_argument(format!("scan position: {e}")))?;
    }
    let tuning = &shared.tuning;
    let store = Arc::clone(&shared.store);
    let max_scanned =
        (req.max_scanned.max(1) as usize).min(tuning.query_max_scanned.max(1) as usize);
    let max_bytes = match req.max_bytes {
        0 => tuning.query_max_page_bytes,
        b => b.min(tuning.query_max_page_bytes),
    };
    let max_ms = match req.max_ms {
        0 => tuning.query_max_page_ms,
        ms => ms.min(tuning.query_max_page_ms),
    };
    let until = started + Duration::from_millis(u64::from(max_ms));
    let limit = req.limit.max(1) as usize;
    tokio::task::spawn_blocking(move || {
        let collection = req.collection.as_str();
        // The last key examined (or the position to resume after).
        let mut last = req.after_hash.map(|h| (h, req.after_id.clone()));
        let mut out = pb::ScanAtResponse::default();
        let mut bytes = 0u64;
        loop {
            // The first interval that may hold keys after `last`; the keys before it belong to
            // other partitions.
            let next = intervals
                .iter()
                .find(|i| last.as_ref().is_none_or(|(h, _)| u128::from(*h) < i.end));
            let Some(interval) = next else {
                out.done = true;
                return Ok(out);
            };
            let from = match &last {
                Some((h, id)) if *h >= interval.start => {
                    storage::collection_key(collection, *h, id)
                }
                // Before every key of the interval's first hash: ids are never empty.
                _ => storage::collection_key(collection, interval.start, ""),
            };
            let step = (max_scanned - out.scanned as usize).clamp(1, SCAN_STEP);
            let page = store
                .scan(
                    collection,
                    ts,
                    &|d| filter.matches(d),
                    limit - out.documents.len(),
                    Some(&ScanCursor(from)),
                    step,
                )
                .map_err(storage_status)?;
            out.scanned += page.scanned as u32;
            for d in page.documents {
                let h = KeyHash::of(collection, &d.id);
                if intervals.iter().any(|i| i.contains(h)) {
                    let id = d.id.clone();
                    let doc = document(collection, &id, Some(d));
                    bytes += doc.json.len() as u64;
                    out.documents.push(doc);
                }
            }
            match page.next {
                None => {
                    out.done = true;
                    return Ok(out);
                }
                Some(next) => {
                    let (_, hash, id) = storage::collection_key_parts(&next.0);
                    out.last_hash = hash;
                    out.last_id = id.to_owned();
                    last = Some((hash, id.to_owned()));
                }
            }
            if out.documents.len() >= limit
                || out.scanned as usize >= max_scanned
                || bytes >= max_bytes
                || Instant::now() >= until
            {
                return Ok(out);
            }
        }
    })
    .await
    .map_err(|e| Status::internal(format!("scan task: {e}")))?
}
