//! Embedded-only tests: what a crash or a bad disk leaves in the segment files.

mod common;

use std::fs::{self, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Result};
use bytes::Bytes;
use causeway_txlog::{EmbeddedLog, EmbeddedOptions, Error, Timestamp};
use common::{next_error, payload, WAIT};
use futures::StreamExt;

fn options(dir: &Path) -> EmbeddedOptions {
    let mut o = EmbeddedOptions::new(dir.join("log"));
    o.max_record_bytes = 64 * 1024;
    o
}

fn segments(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = fs::read_dir(dir.join("log"))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    out.retain(|p| p.extension().is_some_and(|e| e == "seg"));
    out.sort();
    Ok(out)
}

async fn append(log: &EmbeddedLog, tag: &str, n: usize, size: usize) -> Result<Vec<Timestamp>> {
    let mut out = Vec::new();
    for i in 0..n {
        out.extend(log.append(vec![payload(tag, i, size)]).await?);
    }
    Ok(out)
}

async fn read_all(log: &EmbeddedLog, n: usize) -> Result<Vec<Bytes>> {
    let mut stream = log.read_from(Timestamp::ZERO);
    let mut out = Vec::new();
    while out.len() < n {
        match tokio::time::timeout(WAIT, stream.next()).await {
            Ok(Some(Ok(r))) => {
                ensure!(
                    r.ts == Timestamp(out.len() as u64 + 1),
                    "ts {} at {}",
                    r.ts,
                    out.len()
                );
                out.push(r.payload);
            }
            other => bail!("after {} records: {other:?}", out.len()),
        }
    }
    Ok(out)
}

/// Each record takes 8 bytes of framing plus its payload.
const FRAME: u64 = 8;

#[tokio::test]
async fn a_torn_tail_is_truncated_on_open() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let log = EmbeddedLog::open(options(dir.path())).await?;
    append(&log, "t", 10, 100).await?;
    log.close().await?;
    let seg = segments(dir.path())?.pop().expect("a segment");
    let len = fs::metadata(&seg)?.len();
    ensure!(len == 10 * (FRAME + 100));

    // A crash in the middle of writing the 11th record (header and half the payload)...
    let mut f = OpenOptions::new().append(true).open(&seg)?;
    f.write_all(&[150, 0, 0, 0, 1, 2, 3, 4])?;
    f.write_all(&[b'x'; 60])?;
    drop(f);
    let log = EmbeddedLog::open(options(dir.path())).await?;
    ensure!(
        fs::metadata(&seg)?.len() == len,
        "the torn record was not cut off"
    );
    ensure!(log.bounds().await?.next == Timestamp(11));
    // ...and the next append continues right after the last complete record.
    let ts = log.append(vec![Bytes::from_static(b"after")]).await?;
    ensure!(ts == vec![Timestamp(11)]);
    let all = read_all(&log, 11).await?;
    ensure!(all[9] == payload("t", 9, 100) && all[10] == Bytes::from_static(b"after"));
    log.close().await?;

    // A torn header (a crash after 3 bytes of it), and a zero-filled tail.
    for tail in [vec![9u8, 0, 0], vec![0u8; 4096]] {
        let before = fs::metadata(&seg)?.len();
        let mut f = OpenOptions::new().append(true).open(&seg)?;
        f.write_all(&tail)?;
        drop(f);
        let log = EmbeddedLog::open(options(dir.path())).await?;
        ensure!(fs::metadata(&seg)?.len() == before);
        ensure!(log.bounds().await?.next == Timestamp(12));
        log.close().await?;
    }

    // The last record cut short: it was never acknowledged, so it goes.
    let f = OpenOptions::new().write(true).open(&seg)?;
    let len = f.metadata()?.len();
    f.set_len(len - 2)?;
    drop(f);
    let log = EmbeddedLog::open(options(dir.path())).await?;
    ensure!(log.bounds().await?.next == Timestamp(11));
    let all = read_all(&log, 10).await?;
    ensure!(all[9] == payload("t", 9, 100));
    log.close().await?;
    Ok(())
}

/// A segment whose file name puts its records past the largest offset (found by the fuzz
/// target `log_segments`): a clear error, not an overflow.
#[tokio::test]
async fn a_segment_named_near_the_largest_offset_fails_open() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let o = options(dir.path());
    let log = EmbeddedLog::open(o.clone()).await?;
    append(&log, "m", 2, 10).await?;
    log.close().await?;
    let segs = segments(dir.path())?;
    ensure!(segs.len() == 1, "{} segments", segs.len());
    let named = segs[0].with_file_name(format!("{}.seg", u64::MAX));
    fs::rename(&segs[0], named)?;
    match EmbeddedLog::open(o).await {
        Err(Error::Corrupt { what }) => ensure!(what.contains("largest offset"), "{what}"),
        other => bail!("expected Corrupt, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn a_damaged_record_in_a_sealed_segment_fails_open() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut o = options(dir.path());
    o.segment_bytes = 1024;
    let log = EmbeddedLog::open(o.clone()).await?;
    append(&log, "c", 40, 100).await?;
    log.close().await?;
    let segs = segments(dir.path())?;
    ensure!(segs.len() >= 3, "{} segments", segs.len());
    // Flip one payload byte of the second record of the first segment.
    let mut f = OpenOptions::new().read(true).write(true).open(&segs[0])?;
    f.seek(SeekFrom::Start(FRAME + 100 + FRAME + 10))?;
    f.write_all(b"#")?;
    drop(f);
    match EmbeddedLog::open(o).await {
        Err(Error::Corrupt { what }) => ensure!(what.contains("checksum"), "{what}"),
        other => bail!("expected Corrupt, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn damage_far_from_the_end_of_the_last_segment_fails_open() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut o = options(dir.path());
    // A small group size makes the torn window small: damage older than it is not a torn write.
    o.max_group_bytes = 1024;
    o.max_record_bytes = 1024;
    let log = EmbeddedLog::open(o.clone()).await?;
    append(&log, "d", 100, 100).await?;
    log.close().await?;
    let seg = segments(dir.path())?.pop().expect("a segment");
    let mut f = OpenOptions::new().read(true).write(true).open(&seg)?;
    f.seek(SeekFrom::Start(5 * (FRAME + 100) + FRAME))?;
    f.write_all(b"#")?;
    drop(f);
    match EmbeddedLog::open(o).await {
        Err(Error::Corrupt { what }) => ensure!(what.contains("acknowledged"), "{what}"),
        other => bail!("expected Corrupt, got {other:?}"),
    }
    ensure!(
        fs::metadata(&seg)?.len() == 100 * (FRAME + 100),
        "open changed the file"
    );
    Ok(())
}

#[tokio::test]
async fn readers_detect_damage_while_the_log_is_open() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let log = EmbeddedLog::open(options(dir.path())).await?;
    append(&log, "r", 20, 100).await?;
    let seg = segments(dir.path())?.pop().expect("a segment");
    let mut f = OpenOptions::new().read(true).write(true).open(&seg)?;
    f.seek(SeekFrom::Start(7 * (FRAME + 100) + FRAME + 3))?;
    f.write_all(b"#")?;
    f.sync_all()?;
    drop(f);
    let mut stream = log.read_from(Timestamp::ZERO);
    for i in 0..7 {
        match tokio::time::timeout(WAIT, stream.next()).await {
            Ok(Some(Ok(r))) => ensure!(r.ts == Timestamp(i + 1)),
            other => bail!("record {i}: {other:?}"),
        }
    }
    match tokio::time::timeout(WAIT, stream.next()).await {
        Ok(Some(Err(Error::Corrupt { what }))) => ensure!(what.contains("checksum"), "{what}"),
        other => bail!("expected Corrupt at ts 8, got {other:?}"),
    }
    // An error ends the stream.
    ensure!(tokio::time::timeout(WAIT, stream.next()).await?.is_none());
    log.close().await?;
    Ok(())
}

#[tokio::test]
async fn retention_drops_whole_old_segments() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut o = options(dir.path());
    o.segment_bytes = 2048;
    o.retention_bytes = Some(4096);
    let log = EmbeddedLog::open(o.clone()).await?;
    append(&log, "k", 200, 100).await?;
    let b = log.bounds().await?;
    ensure!(b.next == Timestamp(201));
    ensure!(b.first > Timestamp(150), "retention kept too much: {b:?}");
    let segs = segments(dir.path())?;
    let bytes: u64 = segs
        .iter()
        .map(|s| fs::metadata(s).map(|m| m.len()).unwrap_or(0))
        .sum();
    ensure!(
        bytes <= 4096 + 2048 + FRAME + 100,
        "{bytes} bytes in {} segments",
        segs.len()
    );
    // The first retained segment's name is the first retained offset.
    ensure!(
        segs[0].file_name().unwrap().to_str().unwrap() == format!("{:020}.seg", b.first.get() - 1)
    );
    match next_error_embedded(&log, Timestamp(b.first.get() - 2)).await? {
        Error::Truncated {
            after,
            first_available,
        } => {
            ensure!(after == Timestamp(b.first.get() - 2) && first_available == b.first)
        }
        e => bail!("expected Truncated, got {e:?}"),
    }
    log.close().await?;
    // The start survives reopening.
    let log = EmbeddedLog::open(o).await?;
    ensure!(log.bounds().await? == b);
    log.close().await?;
    Ok(())
}

async fn next_error_embedded(log: &EmbeddedLog, position: Timestamp) -> Result<Error> {
    let mut stream = causeway_txlog::RecordStream::Embedded(log.read_from(position));
    next_error(&mut stream).await
}

#[tokio::test]
async fn a_reader_behind_retention_gets_truncated_never_skips() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut o = options(dir.path());
    o.segment_bytes = 2048;
    // Two full segments (19 records of 108 bytes each) fit.
    o.retention_bytes = Some(4200);
    o.read_buffer_records = 1;
    let log = EmbeddedLog::open(o).await?;
    append(&log, "s", 30, 100).await?;
    let mut stream = log.read_from(Timestamp::ZERO);
    // The reader is in the first segment when retention deletes it.
    let first = tokio::time::timeout(WAIT, stream.next()).await?;
    ensure!(
        matches!(first, Some(Ok(ref r)) if r.ts == Timestamp(1)),
        "{first:?}"
    );
    append(&log, "s2", 60, 100).await?;
    ensure!(log.bounds().await?.first > Timestamp(20));
    // It delivers what it can still read, then reports the gap, never skipping across it.
    let mut last = Timestamp(1);
    loop {
        match tokio::time::timeout(WAIT, stream.next()).await? {
            Some(Ok(r)) => {
                ensure!(
                    r.ts == Timestamp(last.get() + 1),
                    "skipped from {last} to {}",
                    r.ts
                );
                last = r.ts;
                ensure!(last.get() <= 90, "runaway");
            }
            Some(Err(Error::Truncated { after, .. })) => {
                ensure!(after == last, "truncated after {after}, last read {last}");
                break;
            }
            other => bail!("{other:?}"),
        }
    }
    log.close().await?;
    Ok(())
}

#[tokio::test]
async fn a_second_open_of_the_same_directory_is_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let log = EmbeddedLog::open(options(dir.path())).await?;
    match EmbeddedLog::open(options(dir.path())).await {
        Err(Error::Config { what }) => ensure!(what.contains("in use"), "{what}"),
        other => bail!("expected a refusal, got {other:?}"),
    }
    log.close().await?;
    // Closing releases it.
    let log = EmbeddedLog::open(options(dir.path())).await?;
    log.close().await?;
    Ok(())
}

#[tokio::test]
async fn closing_fails_later_appends_and_ends_readers() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let log = EmbeddedLog::open(options(dir.path())).await?;
    append(&log, "z", 3, 10).await?;
    let mut stream = log.read_from(Timestamp::ZERO);
    let clone = log.clone();
    log.close().await?;
    ensure!(matches!(
        clone.append(vec![Bytes::from_static(b"late")]).await,
        Err(Error::Closed)
    ));
    for i in 1..=3 {
        match tokio::time::timeout(WAIT, stream.next()).await? {
            Some(Ok(r)) => ensure!(r.ts == Timestamp(i)),
            other => bail!("{other:?}"),
        }
    }
    ensure!(matches!(
        tokio::time::timeout(WAIT, stream.next()).await?,
        Some(Err(Error::Closed))
    ));
    Ok(())
}

#[tokio::test]
async fn large_batches_span_segments_and_read_back() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut o = options(dir.path());
    o.segment_bytes = 64 * 1024;
    o.max_group_bytes = 16 * 1024;
    let log = EmbeddedLog::open(o.clone()).await?;
    let batch: Vec<Bytes> = (0..2000).map(|i| payload("big", i, 100)).collect();
    let ts = log.append(batch.clone()).await?;
    ensure!(ts.first() == Some(&Timestamp(1)) && ts.last() == Some(&Timestamp(2000)));
    ensure!(segments(dir.path())?.len() > 2);
    log.close().await?;
    let log = EmbeddedLog::open(o).await?;
    ensure!(read_all(&log, 2000).await? == batch);
    log.close().await?;
    Ok(())
}
