//! Change data capture's reads (DESIGN.md §11): for a list of `(ts, document)`, whether the
//! transaction at ts wrote the document, the version it wrote and the one before it.
//!
//! A change feed reads the log itself (the order, the transactions' documents, their wall
//! clock) and asks the store nodes only for what the log cannot say: whether each transaction
//! committed (a transaction that aborted or was a duplicate wrote no version) and the JSON of
//! the versions. Every version carries its JSON, so this is two seeks per document and no
//! automerge work. The coordinator waits for its UST to reach the highest ts asked (a feed only
//! follows the UST), then asks one replica per partition of the routing configuration, like a
//! multi-get. A replica that has pruned the history below some ts − 1 answers "snapshot too
//! old", and the coordinator passes it on instead of retrying at a fresh timestamp: the feed's
//! history is gone.

use std::sync::Arc;
use std::time::Instant;

use causeway_core::{ReadTimestamp, Timestamp};
use causeway_proto::v1 as pb;
use tonic::Status;

use crate::grpc::{
    by_partition, parse_key, read_ts_to_proto, storage_status, Attempt, Retries, Server,
};
use crate::state::Shared;
use crate::storage;

/// The most keys one request may name.
pub const MAX_KEYS: usize = 10_000;

/// Serves `Changes`: waits for the UST, then reads each partition's keys on one replica.
pub async fn coordinate(
    server: &Server,
    req: pb::ChangesRequest,
) -> Result<pb::ChangesResponse, Status> {
    validate(&req.keys)?;
    let Some(highest) = req.keys.iter().map(|k| k.ts).max() else {
        return Ok(pb::ChangesResponse::default());
    };
    let lowest = req.keys.iter().map(|k| k.ts).min().unwrap_or(highest);
    let shared = &server.shared;
    let deadline = Instant::now() + server.timeout(req.timeout_ms);
    let mut retries = Retries::new(1, deadline);
    loop {
        let (at, config) = server.read_timestamp(Timestamp(highest), deadline).await?;
        // Holds the history this read needs while it runs.
        let _held = shared
            .reads
            .register(ReadTimestamp::new(at.epoch, Timestamp(lowest - 1)));
        let replicas = server.replicas(&config, at).await?;
        let by_partition = by_partition(
            &config,
            req.keys
                .iter()
                .map(|k| (k.collection.as_str(), k.id.as_str())),
        );
        let reads = by_partition.iter().map(|(p, indexes)| {
            let keys: Vec<pb::ChangeKey> = indexes.iter().map(|&i| req.keys[i].clone()).collect();
            let (config, replicas, with_before) = (&config, &replicas[p], req.with_before);
            async move {
                let keys = &keys;
                server
                    .first_replica(
                        config,
                        replicas,
                        || local(shared, at.ts, keys.clone(), with_before),
                        |mut client| {
                            let request = pb::ChangesAtRequest {
                                at: Some(read_ts_to_proto(at)),
                                keys: keys.clone(),
                                with_before,
                            };
                            async move {
                                client
                                    .changes_at(request)
                                    .await
                                    .map(|r| r.into_inner().changes)
                            }
                        },
                    )
                    .await
            }
        });
        let results = futures::future::join_all(reads).await;
        let mut out: Vec<Option<pb::Change>> = vec![None; req.keys.len()];
        let mut failed = None;
        for ((_, indexes), result) in by_partition.iter().zip(results) {
            match result {
                Ok(changes) => {
                    for (&i, c) in indexes.iter().zip(changes) {
                        out[i] = Some(c);
                    }
                }
                Err(Attempt::TooOld) => {
                    return Err(storage_status(storage::Error::SnapshotTooOld {
                        requested: Timestamp(lowest - 1),
                        gc: Timestamp(lowest - 1),
                    }))
                }
                Err(a) => failed = Some(a),
            }
        }
        match failed {
            None => {
                return Ok(pb::ChangesResponse {
                    changes: out
                        .into_iter()
                        .map(|c| c.expect("every key read"))
                        .collect(),
                })
            }
            Some(attempt) => retries.after(attempt, &shared.metrics).await?,
        }
    }
}

/// The sub-read from this node's own storage at `at`.
pub async fn local(
    shared: &Arc<Shared>,
    at: Timestamp,
    keys: Vec<pb::ChangeKey>,
    with_before: bool,
) -> Result<Vec<pb::Change>, Status> {
    validate(&keys)?;
    if keys.iter().any(|k| k.ts > at.get()) {
        return Err(Status::invalid_argument(
            "a change above the read timestamp",
        ));
    }
    let store = Arc::clone(&shared.store);
    tokio::task::spawn_blocking(move || {
        let asked: Vec<(&str, &str, Timestamp)> = keys
            .iter()
            .map(|k| (k.collection.as_str(), k.id.as_str(), Timestamp(k.ts)))
            .collect();
        let changes = store
            .changes(&asked, at, with_before)
            .map_err(storage_status)?;
        Ok(changes
            .into_iter()
            .map(|c| pb::Change {
                written: c.written,
                after_found: c.after.is_some(),
                after: c.after.unwrap_or_default(),
                before_found: c.before_found,
                before: c.before.unwrap_or_default(),
            })
            .collect())
    })
    .await
    .map_err(|e| Status::internal(format!("changes task: {e}")))?
}

fn validate(keys: &[pb::ChangeKey]) -> Result<(), Status> {
    if keys.len() > MAX_KEYS {
        return Err(Status::invalid_argument(format!(
            "{} keys in one request; at most {MAX_KEYS}",
            keys.len()
        )));
    }
    for k in keys {
        if k.ts == 0 {
            return Err(Status::invalid_argument("a change at ts 0"));
        }
        parse_key(&k.collection, &k.id)?;
    }
    Ok(())
}
