//! The txlog conformance suite: the same test functions against both backends, the embedded log
//! on a temp dir and Kafka on a real broker (one Apache Kafka per test process, a topic per test;
//! without the broker these fail).

mod common;

use std::collections::{BTreeMap, HashSet};

use anyhow::{ensure, Result};
use bytes::Bytes;
use causeway_txlog::{Error, Timestamp, TxLog};
use common::{append_n, next_error, payload, take, Fixture};

/// Runs each conformance test against both backends.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() -> anyhow::Result<()> {
                    super::$name(super::Fixture::embedded()?).await
                }
            )*
        }
        mod kafka {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() -> anyhow::Result<()> {
                    let fixture = tokio::task::block_in_place(|| super::Fixture::kafka(stringify!($name)))?;
                    super::$name(fixture).await
                }
            )*
        }
    };
}

conformance!(
    an_empty_log_has_empty_bounds,
    concurrent_appenders_get_one_total_order,
    reads_start_after_any_position,
    tailing_readers_see_every_append_in_order,
    appends_survive_reopening,
    oversized_records_are_refused,
    a_truncated_start_is_reported,
    a_position_beyond_the_end_is_reported,
);

async fn an_empty_log_has_empty_bounds(fixture: Fixture) -> Result<()> {
    let log = fixture.open().await?;
    let b = log.bounds().await?;
    ensure!(b.first == Timestamp(1) && b.next == Timestamp(1), "{b:?}");
    ensure!(log.append(vec![]).await?.is_empty());
    let ts = log.append(vec![Bytes::from_static(b"one")]).await?;
    ensure!(ts == vec![Timestamp(1)], "{ts:?}");
    let b = log.bounds().await?;
    ensure!(b.first == Timestamp(1) && b.next == Timestamp(2), "{b:?}");
    log.close().await?;
    Ok(())
}

async fn concurrent_appenders_get_one_total_order(fixture: Fixture) -> Result<()> {
    let log = fixture.open().await?;
    const WRITERS: usize = 6;
    const CALLS: usize = 40;
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            for call in 0..CALLS {
                // Batches of 1 to 3 records.
                let batch: Vec<Bytes> = (0..1 + call % 3)
                    .map(|j| payload(&format!("w{w}-c{call}"), j, 40))
                    .collect();
                let ts = log.append(batch.clone()).await?;
                anyhow::ensure!(
                    ts.len() == batch.len(),
                    "{} timestamps for {} records",
                    ts.len(),
                    batch.len()
                );
                mine.extend(ts.into_iter().zip(batch));
            }
            anyhow::Ok(mine)
        }));
    }
    let mut assigned: BTreeMap<Timestamp, Bytes> = BTreeMap::new();
    for task in tasks {
        let mine = task.await??;
        // Each writer's records are in the order it appended them.
        ensure!(
            mine.windows(2).all(|w| w[0].0 < w[1].0),
            "a writer's timestamps went backwards"
        );
        for (ts, p) in mine {
            ensure!(assigned.insert(ts, p).is_none(), "ts {ts} assigned twice");
        }
    }
    let total = assigned.len();
    let expected: usize = WRITERS * (0..CALLS).map(|c| 1 + c % 3).sum::<usize>();
    ensure!(total == expected, "{total} records, expected {expected}");
    let last = *assigned.keys().next_back().expect("records");
    let b = log.bounds().await?;
    ensure!(b.next > last, "bounds {b:?} behind the last ts {last}");
    if !fixture.is_kafka() {
        // Dense on the embedded log.
        ensure!(
            last == Timestamp(total as u64),
            "last ts {last} for {total} records"
        );
    }
    // Every reader sees exactly that order.
    let mut stream = log.read_from(Timestamp::ZERO);
    let read = take(&mut stream, total).await?;
    for (r, (ts, p)) in read.iter().zip(&assigned) {
        ensure!(
            r.ts == *ts && r.payload == *p,
            "read {} where {ts} was assigned",
            r.ts
        );
    }
    log.close().await?;
    Ok(())
}

async fn reads_start_after_any_position(fixture: Fixture) -> Result<()> {
    let log = fixture.open().await?;
    let ts = append_n(&log, "r", 120, 100).await?;
    ensure!(ts.len() == 120);
    // Records appended by earlier rounds, after the first 120.
    let mut extra: Vec<(Timestamp, Bytes)> = Vec::new();
    for position in [0usize, 1, 37, 64, 119, 120] {
        let from = if position == 0 {
            Timestamp::ZERO
        } else {
            ts[position - 1]
        };
        let mut stream = log.read_from(from);
        let read = take(&mut stream, 120 - position + extra.len()).await?;
        for (i, r) in read.iter().enumerate() {
            let (want_ts, want) = match ts.get(position + i) {
                Some(&t) => (t, payload("r", position + i, 100)),
                None => extra[position + i - 120].clone(),
            };
            ensure!(
                r.ts == want_ts && r.payload == want,
                "from {from}: got ts {} at {i}",
                r.ts
            );
        }
        // Nothing skipped or extra: the next record is the next append.
        let p = payload("more", position, 10);
        let more = log.append(vec![p.clone()]).await?;
        let next = take(&mut stream, 1).await?;
        ensure!(next[0].ts == more[0] && next[0].payload == p);
        extra.push((more[0], p));
        // A stream from just before that record starts with it.
        let again = take(&mut log.read_from(Timestamp(more[0].get() - 1)), 1).await?;
        ensure!(again[0].ts == more[0]);
    }
    log.close().await?;
    Ok(())
}

async fn tailing_readers_see_every_append_in_order(fixture: Fixture) -> Result<()> {
    let log = fixture.open().await?;
    append_n(&log, "before", 10, 50).await?;
    const READERS: usize = 4;
    const WRITERS: usize = 3;
    const PER_WRITER: usize = 60;
    // Readers from different positions, started before the appends.
    let mut readers = Vec::new();
    for r in 0..READERS {
        let log = log.clone();
        let start = Timestamp(r as u64 * 3);
        let expect = 10 - start.get() as usize + WRITERS * PER_WRITER;
        readers.push(tokio::spawn(async move {
            let mut stream = log.read_from(start);
            take(&mut stream, expect).await
        }));
    }
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let log = log.clone();
        writers.push(tokio::spawn(async move {
            append_n(&log, &format!("tail{w}"), PER_WRITER, 200).await
        }));
    }
    for w in writers {
        w.await??;
    }
    let mut all = take(
        &mut log.read_from(Timestamp::ZERO),
        10 + WRITERS * PER_WRITER,
    )
    .await?;
    let seen: HashSet<Timestamp> = all.iter().map(|r| r.ts).collect();
    ensure!(seen.len() == all.len(), "duplicate timestamps");
    for (i, reader) in readers.into_iter().enumerate() {
        let got = reader.await??;
        let start = i * 3;
        ensure!(got.len() == all.len() - start);
        ensure!(
            got[..] == all[start..],
            "reader {i} saw a different sequence"
        );
    }
    all.clear();
    log.close().await?;
    Ok(())
}

async fn appends_survive_reopening(fixture: Fixture) -> Result<()> {
    let log = fixture.open().await?;
    let first = append_n(&log, "a", 50, 300).await?;
    // A reader open across the producer's restart.
    let mut reader = log.read_from(Timestamp::ZERO);
    let bounds = log.bounds().await?;
    log.close().await?;
    drop(log);

    let log = fixture.open().await?;
    ensure!(
        log.bounds().await? == bounds,
        "bounds changed across reopening"
    );
    let second = append_n(&log, "b", 20, 300).await?;
    ensure!(
        second[0] > first[49],
        "ts went backwards: {} after {}",
        second[0],
        first[49]
    );
    let read = take(&mut log.read_from(Timestamp::ZERO), 70).await?;
    for (i, r) in read.iter().enumerate() {
        let (want_ts, want) = if i < 50 {
            (first[i], payload("a", i, 300))
        } else {
            (second[i - 50], payload("b", i - 50, 300))
        };
        ensure!(
            r.ts == want_ts && r.payload == want,
            "record {i} is ts {}",
            r.ts
        );
    }
    if let TxLog::Kafka(_) = &log {
        // The consumer of the old handle keeps reading across the producer restart.
        let old = take(&mut reader, 70).await?;
        ensure!(
            old == read,
            "the reader from before the restart saw something else"
        );
    }
    log.close().await?;
    Ok(())
}

async fn oversized_records_are_refused(fixture: Fixture) -> Result<()> {
    let log = fixture.open().await?;
    let max = log.max_record_bytes();
    let before = log.bounds().await?;
    let big = Bytes::from(vec![7u8; max + 1]);
    match log.append(vec![Bytes::from_static(b"small"), big]).await {
        Err(Error::RecordTooLarge { size, max: m }) => {
            ensure!(size == max + 1 && m == max, "size {size} max {m}")
        }
        other => anyhow::bail!("expected RecordTooLarge, got {other:?}"),
    }
    ensure!(
        log.bounds().await? == before,
        "a refused batch appended something"
    );
    // Exactly the limit is fine, and reads back intact.
    let exact = Bytes::from(vec![9u8; max]);
    let ts = log.append(vec![exact.clone()]).await?;
    let read = take(&mut log.read_from(Timestamp(ts[0].get() - 1)), 1).await?;
    ensure!(read[0].ts == ts[0] && read[0].payload == exact);
    log.close().await?;
    Ok(())
}

async fn a_truncated_start_is_reported(mut fixture: Fixture) -> Result<()> {
    fixture.with_retention();
    let log = fixture.open().await?;
    append_n(&log, "old", 20, 256).await?;
    let log = fixture.drop_old_records(&log, 0).await?;
    let b = log.bounds().await?;
    ensure!(b.first > Timestamp(1), "nothing was dropped: {b:?}");
    // Reading from before the start fails with the start, and never skips.
    for position in [Timestamp::ZERO, Timestamp(b.first.get() - 2)] {
        match next_error(&mut log.read_from(position)).await? {
            Error::Truncated {
                after,
                first_available,
            } => ensure!(
                after == position && first_available >= b.first,
                "after {after} first {first_available} for {b:?}"
            ),
            e => anyhow::bail!("expected Truncated from {position}, got {e:?}"),
        }
    }
    // From just below the start works, up to the end.
    let fresh = log.append(vec![Bytes::from_static(b"fresh")]).await?;
    let b2 = log.bounds().await?;
    let mut stream = log.read_from(Timestamp(b2.first.get() - 1));
    let mut last = Timestamp::ZERO;
    let mut count = 0;
    while last < fresh[0] {
        let r = take(&mut stream, 1).await?.remove(0);
        ensure!(r.ts > last, "out of order");
        ensure!(
            r.ts >= b2.first,
            "read ts {} below the start {}",
            r.ts,
            b2.first
        );
        last = r.ts;
        count += 1;
        ensure!(count <= 100_000, "runaway read");
    }
    ensure!(last == fresh[0]);
    log.close().await?;
    Ok(())
}

async fn a_position_beyond_the_end_is_reported(fixture: Fixture) -> Result<()> {
    let log = fixture.open().await?;
    append_n(&log, "x", 3, 10).await?;
    match next_error(&mut log.read_from(Timestamp(10))).await? {
        Error::BeyondEnd { position, next } => {
            ensure!(
                position == Timestamp(10) && next == Timestamp(4),
                "{position} {next}"
            )
        }
        e => anyhow::bail!("expected BeyondEnd, got {e:?}"),
    }
    // The end itself is a fine place to tail from.
    let mut stream = log.read_from(Timestamp(3));
    let ts = log.append(vec![Bytes::from_static(b"y")]).await?;
    ensure!(take(&mut stream, 1).await?[0].ts == ts[0]);
    log.close().await?;
    Ok(())
}
