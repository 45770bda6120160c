//! The embedded log's segment reader and recovery on corrupt files (`txlog/src/embedded`).
//!
//! Each input writes a log directory of segment files: well-framed records (the documented frame:
//! `len u32 LE | crc32c(len ‖ payload) u32 LE | payload`) under chosen base offsets, then damages
//! them (flipped bytes, cut files, appended garbage). Then the log is opened.
//!
//! Properties: open either fails with a typed error or gives a log whose records read back in
//! order, one per ts from `bounds().first` to `bounds().next - 1`, each a payload that was written
//! at that offset (CRCs keep damage from reading as data), with the stream waiting at the end; a
//! log without damage, or whose only damage is a cut of the last segment, opens and keeps every
//! complete record; an append after recovery gets the next ts and reads back; a second open finds
//! the same log.
#![no_main]

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use causeway_txlog::{EmbeddedLog, EmbeddedOptions, Error, Timestamp};
use futures::StreamExt;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input {
    segments: Vec<Segment>,
    damage: Vec<Damage>,
}

#[derive(Debug, Arbitrary)]
struct Segment {
    /// The base offset: right after the previous segment, or any (a gap, an overlap, the end of
    /// the `u64` range).
    base: Option<u64>,
    records: Vec<Vec<u8>>,
}

#[derive(Debug, Arbitrary)]
enum Damage {
    Flip { segment: u8, at: u16, xor: u8 },
    Cut { segment: u8, at: u16 },
    Append { segment: u8, bytes: Vec<u8> },
}

const MAX_RECORD_BYTES: usize = 64;
/// The largest offset the embedded log takes: segments past it are refused as no log of ours.
const MAX_OFFSET: u64 = 1 << 62;
const MAX_SEGMENTS: usize = 4;
const MAX_RECORDS: usize = 16;

fn frame(payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_le_bytes();
    let crc = crc32c::crc32c_append(crc32c::crc32c(&len), payload);
    let mut out = len.to_vec();
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(payload);
    out
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a runtime")
    })
}

fn options(dir: &std::path::Path) -> EmbeddedOptions {
    let mut o = EmbeddedOptions::new(dir);
    o.max_record_bytes = MAX_RECORD_BYTES;
    o.max_group_bytes = 128;
    o.append_queue = 4;
    o.read_buffer_records = 8;
    o
}

/// Reads every record of an open log and checks them against what was written.
async fn read_all(
    log: &EmbeddedLog,
    written: &HashMap<u64, Vec<u8>>,
    forgeable: bool,
) -> Vec<(u64, Bytes)> {
    let bounds = log.bounds().await.expect("bounds of an open log");
    assert!(bounds.first <= bounds.next, "{bounds:?}");
    let mut stream = log.read_from(Timestamp(bounds.first.get().saturating_sub(1)));
    let mut out = Vec::new();
    let mut want = bounds.first.get();
    while want < bounds.next.get() {
        let item = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("a durable record is read within 5 s")
            .expect("the stream does not end before the log does")
            .expect("a record of an opened log reads");
        assert_eq!(item.ts.get(), want, "records out of order");
        let offset = want - 1;
        // Appended bytes may hold a well-formed frame; other damage cannot forge a checksum.
        assert!(
            forgeable || written.get(&offset).map(Vec::as_slice) == Some(&item.payload[..]),
            "ts {want} reads a payload that was not written there"
        );
        out.push((want, item.payload));
        want += 1;
    }
    // Past the end the stream waits for new records.
    assert!(
        tokio::time::timeout(Duration::from_millis(1), stream.next())
            .await
            .is_err(),
        "the stream gave something past the end of the log"
    );
    out
}

fuzz_target!(|input: Input| {
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut written: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut files: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut next = 0u64;
    for seg in input.segments.iter().take(MAX_SEGMENTS) {
        let base = seg.base.unwrap_or(next);
        if files.iter().any(|(b, _)| *b == base) {
            continue;
        }
        let mut bytes = Vec::new();
        for (i, r) in seg.records.iter().take(MAX_RECORDS).enumerate() {
            let payload = &r[..r.len().min(MAX_RECORD_BYTES)];
            bytes.extend_from_slice(&frame(payload));
            if let Some(offset) = base.checked_add(i as u64) {
                written.insert(offset, payload.to_vec());
            }
        }
        next = base.saturating_add(seg.records.len().min(MAX_RECORDS) as u64);
        files.push((base, bytes));
    }
    // A model of the damage: which segments keep all their complete frames.
    let contiguous = files
        .windows(2)
        .all(|w| w[0].0.checked_add(written_count(&w[0].1)) == Some(w[1].0))
        && files.iter().all(|(b, f)| {
            b.checked_add(written_count(f))
                .is_some_and(|e| e <= MAX_OFFSET)
        });
    let sorted = files.windows(2).all(|w| w[0].0 < w[1].0);
    let mut only_tail_cut = true;
    for d in &input.damage {
        if files.is_empty() {
            break;
        }
        let (count, last) = (files.len(), files.len() - 1);
        match *d {
            Damage::Flip { segment, at, xor } => {
                let (_, f) = &mut files[segment as usize % count];
                if !f.is_empty() && xor != 0 {
                    let i = at as usize % f.len();
                    f[i] ^= xor;
                    only_tail_cut = false;
                }
            }
            Damage::Cut { segment, at } => {
                let s = segment as usize % count;
                let f = &mut files[s].1;
                if (at as usize) < f.len() {
                    f.truncate(at as usize);
                    only_tail_cut &= s == last;
                }
            }
            Damage::Append { segment, ref bytes } => {
                let f = &mut files[segment as usize % count].1;
                f.extend_from_slice(&bytes[..bytes.len().min(256)]);
                only_tail_cut = false;
            }
        }
    }
    for (base, bytes) in &files {
        std::fs::write(dir.path().join(format!("{base:020}.seg")), bytes).expect("write a segment");
    }

    runtime().block_on(async {
        let opened = EmbeddedLog::open(options(dir.path())).await;
        let log = match opened {
            Ok(log) => log,
            Err(Error::Corrupt { .. }) => {
                assert!(
                    !(only_tail_cut && contiguous && sorted),
                    "a log whose only damage is a cut of its last segment is refused"
                );
                return;
            }
            Err(e) => panic!("open fails with an unexpected error: {e:?}"),
        };
        let forgeable = input
            .damage
            .iter()
            .any(|d| matches!(d, Damage::Append { .. }));
        let records = read_all(&log, &written, forgeable).await;
        if only_tail_cut && contiguous && sorted {
            // Every complete frame is kept: all segments but the last whole, the last up to its cut.
            let complete: usize = files.iter().map(|(_, f)| complete_frames(f)).sum();
            assert_eq!(records.len(), complete, "recovery dropped complete records");
        }
        let bounds = log.bounds().await.expect("bounds");
        if bounds.next.get() < u64::MAX - 1 {
            let ts = log
                .append(vec![Bytes::from_static(b"after recovery")])
                .await
                .expect("an append after recovery");
            assert_eq!(ts, vec![bounds.next]);
        }
        log.close().await.expect("close");
        drop(log);
        let again = EmbeddedLog::open(options(dir.path()))
            .await
            .expect("a log that opened once opens again");
        let after = again.bounds().await.expect("bounds");
        assert_eq!(after.first, bounds.first);
        assert!(after.next.get() >= bounds.next.get());
        again.close().await.expect("close");
    });
});

/// How many frames a segment was written with (before damage): its frames are valid.
fn written_count(bytes: &[u8]) -> u64 {
    complete_frames(bytes) as u64
}

/// How many whole frames a segment's bytes start with.
fn complete_frames(mut bytes: &[u8]) -> usize {
    let mut n = 0;
    while bytes.len() >= 8 {
        let len = u32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes")) as usize;
        if bytes.len() < 8 + len {
            break;
        }
        bytes = &bytes[8 + len..];
        n += 1;
    }
    n
}
