//! The embedded log: the transaction log in a local directory of segment files.
//!
//! It backs `causeway dev` and fast tests; it is not a replacement for Kafka in a cluster (one
//! process, one disk, no replication).
//!
//! Design:
//! - One writer thread owns the active segment. Appenders queue their batches on a bounded channel;
//!   the writer takes every batch waiting (up to `max_group_bytes`), writes them with one `write`
//!   and makes them durable with one `fdatasync` (group commit), then answers them all. A batch
//!   larger than `max_group_bytes` is written and synced in several chunks, so at most
//!   `max_group_bytes` plus one record is ever unsynced.
//! - The durable end (the offset the next record gets) is published on a `watch` channel after
//!   each fsync. Readers never read at or past it, so they only see complete, durable records, and
//!   they wait on the channel to tail.
//! - On open every segment is scanned and its CRCs checked. A damaged frame in the last segment
//!   within the unsynced window of its end is a torn write of a batch that was never acknowledged:
//!   the file is truncated there. Damage anywhere else is corruption: open fails with
//!   [`Error::Corrupt`] rather than drop acknowledged records.
//! - Retention by size: when the segments hold more than `retention_bytes`, whole segments are
//!   deleted from the oldest; `bounds().first` moves up and reads from below it fail with
//!   [`Error::Truncated`]. A reader already inside a deleted segment finishes it through its open
//!   file handle.
//! - A `LOCK` file held with an exclusive lock keeps a second process (or handle) off the
//!   directory.

mod segment;

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use causeway_core::Timestamp;
use futures::Stream;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error, info, warn};

use crate::error::{Error, Result};
use crate::{Bounds, ChannelStream, Record};
use segment::{Cursor, FrameError, HEADER_BYTES, INDEX_INTERVAL_BYTES};

/// The largest offset a log may reach (see `open_blocking`).
const MAX_OFFSET: u64 = 1 << 62;

/// Options of the embedded log. Only `dir` is required; the other fields have the defaults below.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedOptions {
    /// Directory of the segment files, created if missing. One log per directory.
    pub dir: PathBuf,
    /// The largest record payload accepted. Default 1 MiB (as Kafka's default `message.max.bytes`,
    /// so a workload that fits here fits on Kafka).
    #[serde(default = "defaults::max_record_bytes")]
    pub max_record_bytes: usize,
    /// A new segment is started once the active one holds this many bytes. Retention drops whole
    /// segments, so this is also its granularity. Default 64 MiB.
    #[serde(default = "defaults::segment_bytes")]
    pub segment_bytes: u64,
    /// Keep at most about this many bytes of records, dropping the oldest whole segments (the
    /// active segment is never dropped). `None` (the default) keeps everything.
    #[serde(default)]
    pub retention_bytes: Option<u64>,
    /// The most bytes written per fsync. Concurrent appends are grouped up to this size. It also
    /// bounds the torn tail recovery looks for on open. Default 4 MiB.
    #[serde(default = "defaults::max_group_bytes")]
    pub max_group_bytes: usize,
    /// Append calls that may wait for the writer; more wait in `append` (backpressure).
    /// Default 1024.
    #[serde(default = "defaults::append_queue")]
    pub append_queue: usize,
    /// Records buffered per reader between its task and its stream. Default 1024.
    #[serde(default = "defaults::read_buffer_records")]
    pub read_buffer_records: usize,
}

mod defaults {
    pub(super) fn max_record_bytes() -> usize {
        1 << 20
    }
    pub(super) fn segment_bytes() -> u64 {
        64 << 20
    }
    pub(super) fn max_group_bytes() -> usize {
        4 << 20
    }
    pub(super) fn append_queue() -> usize {
        1024
    }
    pub(super) fn read_buffer_records() -> usize {
        1024
    }
}

impl EmbeddedOptions {
    /// The defaults, in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> EmbeddedOptions {
        EmbeddedOptions {
            dir: dir.into(),
            max_record_bytes: defaults::max_record_bytes(),
            segment_bytes: defaults::segment_bytes(),
            retention_bytes: None,
            max_group_bytes: defaults::max_group_bytes(),
            append_queue: defaults::append_queue(),
            read_buffer_records: defaults::read_buffer_records(),
        }
    }

    fn validate(&self) -> Result<()> {
        if self.max_record_bytes == 0 || self.max_record_bytes > u32::MAX as usize {
            return Err(Error::config("max_record_bytes must be in 1..=4294967295"));
        }
        if self.segment_bytes == 0 || self.max_group_bytes == 0 {
            return Err(Error::config(
                "segment_bytes and max_group_bytes must be positive",
            ));
        }
        if self.append_queue == 0 || self.read_buffer_records == 0 {
            return Err(Error::config(
                "append_queue and read_buffer_records must be positive",
            ));
        }
        Ok(())
    }

    /// Bytes at the end of the last segment that may be unsynced after a crash.
    fn torn_window_bytes(&self) -> u64 {
        self.max_group_bytes as u64 + self.max_record_bytes as u64 + HEADER_BYTES
    }
}

/// A handle to an embedded log. Cheap to clone; the log stays open while a clone is alive or
/// until [`EmbeddedLog::close`].
#[derive(Debug, Clone)]
pub struct EmbeddedLog {
    handle: Arc<Handle>,
}

#[derive(Debug)]
struct Handle {
    shared: Arc<Shared>,
    /// `None` once closed.
    appends: Mutex<Option<mpsc::Sender<AppendRequest>>>,
}

/// What the writer, the handles and the readers share.
#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    options: EmbeddedOptions,
    segments: RwLock<VecDeque<SegmentMeta>>,
    durable: watch::Sender<Durable>,
}

/// The durable end of the log, published by the writer after each fsync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Durable {
    /// The offset the next record gets: every record below it is fsynced.
    next: u64,
    /// The writer has stopped (closed, or failed): no more records will come.
    stopped: bool,
}

#[derive(Debug, Clone)]
struct SegmentMeta {
    /// Offset of the first record.
    base: u64,
    /// Offset after the last durable record.
    end: u64,
    /// Durable length in bytes.
    bytes: u64,
    path: PathBuf,
    /// Sparse (offset, byte position) entries, one per `INDEX_INTERVAL_BYTES`.
    index: Vec<(u64, u64)>,
}

impl SegmentMeta {
    /// The indexed position at or before `offset`.
    fn seek_point(&self, offset: u64) -> (u64, u64) {
        let i = self.index.partition_point(|&(o, _)| o <= offset);
        if i == 0 {
            (self.base, 0)
        } else {
            self.index[i - 1]
        }
    }
}

#[derive(Debug)]
struct AppendRequest {
    records: Vec<Bytes>,
    reply: oneshot::Sender<Result<Vec<Timestamp>>>,
}

impl EmbeddedLog {
    /// Opens the log in `options.dir`, creating it if needed, recovering a torn tail.
    pub async fn open(options: EmbeddedOptions) -> Result<EmbeddedLog> {
        options.validate()?;
        tokio::task::spawn_blocking(move || EmbeddedLog::open_blocking(options))
            .await
            .expect("embedded log open panicked")
    }

    fn open_blocking(options: EmbeddedOptions) -> Result<EmbeddedLog> {
        let dir = options.dir.clone();
        fs::create_dir_all(&dir).map_err(|e| Error::io("create directory", &dir, e))?;
        let lock_path = dir.join("LOCK");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| Error::io("open", &lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(Error::config(format!(
                    "the log directory {} is in use by another open log",
                    dir.display()
                )))
            }
            Err(fs::TryLockError::Error(e)) => return Err(Error::io("lock", &lock_path, e)),
        }

        let mut bases = Vec::new();
        for entry in fs::read_dir(&dir).map_err(|e| Error::io("list", &dir, e))? {
            let entry = entry.map_err(|e| Error::io("list", &dir, e))?;
            if let Some(base) = entry
                .file_name()
                .to_str()
                .and_then(segment::parse_file_name)
            {
                bases.push(base);
            }
        }
        bases.sort_unstable();
        if bases.is_empty() {
            create_segment(&dir, 0)?;
            bases.push(0);
        }

        let mut segments = VecDeque::with_capacity(bases.len());
        for (i, &base) in bases.iter().enumerate() {
            let path = dir.join(segment::file_name(base));
            let last = i + 1 == bases.len();
            let scan = segment::scan(&path, base).map_err(|e| Error::io("read", &path, e))?;
            if let Some(damage) = scan.damage {
                let tail = scan.file_bytes - scan.valid_bytes;
                if !last || tail > options.torn_window_bytes() {
                    return Err(Error::corrupt(format!(
                        "{damage} in {} at byte {} ({} bytes before its end): \
                         acknowledged records are damaged",
                        path.display(),
                        scan.valid_bytes,
                        tail
                    )));
                }
                warn!(
                    segment = %path.display(),
                    valid_bytes = scan.valid_bytes,
                    dropped_bytes = tail,
                    damage,
                    "truncating the torn tail of the log (an unacknowledged write)"
                );
                truncate(&path, scan.valid_bytes)?;
            }
            // A segment whose name puts its records past the largest offset is no log of ours
            // (a stray or damaged file name): no log reaches 2^62 records, and one near `u64`'s
            // end would overflow the timestamps (offset + 1) of its records and appends.
            let end = base
                .checked_add(scan.records)
                .filter(|&end| end <= MAX_OFFSET)
                .ok_or_else(|| {
                    Error::corrupt(format!(
                        "segment {} starts at offset {base}: its {} records end past the \
                         largest offset",
                        path.display(),
                        scan.records
                    ))
                })?;
            if let Some(&next_base) = bases.get(i + 1) {
                if next_base != end {
                    return Err(Error::corrupt(format!(
                        "segment {} ends at offset {end} but the next segment starts at {next_base}",
                        path.display()
                    )));
                }
            }
            segments.push_back(SegmentMeta {
                base,
                end,
                bytes: scan.valid_bytes,
                path,
                index: scan.index,
            });
        }
        let active = segments.back().expect("at least one segment");
        let next = active.end;
        let active_path = active.path.clone();
        let active_bytes = active.bytes;
        let mut file = OpenOptions::new()
            .append(true)
            .open(&active_path)
            .map_err(|e| Error::io("open", &active_path, e))?;
        file.seek(SeekFrom::End(0))
            .map_err(|e| Error::io("seek", &active_path, e))?;
        info!(
            dir = %dir.display(),
            segments = segments.len(),
            first_ts = segments.front().map_or(0, |s| s.base) + 1,
            next_ts = next + 1,
            "opened embedded transaction log"
        );

        let (durable, _) = watch::channel(Durable {
            next,
            stopped: false,
        });
        let shared = Arc::new(Shared {
            dir,
            options: options.clone(),
            segments: RwLock::new(segments),
            durable,
        });
        let (tx, rx) = mpsc::channel(options.append_queue);
        let writer = Writer {
            shared: shared.clone(),
            file,
            active_bytes,
            next,
            lock,
        };
        std::thread::Builder::new()
            .name("causeway-txlog-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| Error::io("spawn writer thread for", &active_path, e))?;
        Ok(EmbeddedLog {
            handle: Arc::new(Handle {
                shared,
                appends: Mutex::new(Some(tx)),
            }),
        })
    }

    /// See [`crate::TxLog::append`]. Returns once the records are fsynced.
    pub async fn append(&self, records: Vec<Bytes>) -> Result<Vec<Timestamp>> {
        let max = self.handle.shared.options.max_record_bytes;
        if let Some(r) = records.iter().find(|r| r.len() > max) {
            return Err(Error::RecordTooLarge { size: r.len(), max });
        }
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let sender = self
            .handle
            .appends
            .lock()
            .expect("append sender lock poisoned")
            .clone()
            .ok_or(Error::Closed)?;
        let (reply, rx) = oneshot::channel();
        sender
            .send(AppendRequest { records, reply })
            .await
            .map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)?
    }

    /// See [`crate::TxLog::read_from`].
    pub fn read_from(&self, position: Timestamp) -> Reader {
        let shared = self.handle.shared.clone();
        let (tx, rx) = mpsc::channel(shared.options.read_buffer_records);
        tokio::spawn(read_task(shared, position.get(), tx));
        Reader(ChannelStream::new(rx))
    }

    /// See [`crate::TxLog::bounds`].
    pub async fn bounds(&self) -> Result<Bounds> {
        Ok(self.handle.shared.bounds())
    }

    /// The largest payload [`EmbeddedLog::append`] accepts.
    pub fn max_record_bytes(&self) -> usize {
        self.handle.shared.options.max_record_bytes
    }

    /// The directory of the log.
    pub fn dir(&self) -> &Path {
        &self.handle.shared.dir
    }

    /// Stops the writer once the appends already queued are durable, and releases the directory.
    /// Appends after this fail with [`Error::Closed`]; readers deliver what is durable, then end
    /// with [`Error::Closed`].
    pub async fn close(&self) -> Result<()> {
        let sender = self
            .handle
            .appends
            .lock()
            .expect("append sender lock poisoned")
            .take();
        drop(sender);
        let mut rx = self.handle.shared.durable.subscribe();
        // The writer drains its queue (bounded) and exits; fsyncs of a few MiB take well under
        // this on any working disk.
        let stopped = tokio::time::timeout(Duration::from_secs(30), async {
            rx.wait_for(|d| d.stopped).await.map(|_| ())
        })
        .await;
        match stopped {
            Ok(_) => Ok(()),
            Err(_) => Err(Error::io(
                "close",
                &self.handle.shared.dir,
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the writer did not stop within 30 s",
                ),
            )),
        }
    }
}

impl Shared {
    fn bounds(&self) -> Bounds {
        let next = self.durable.borrow().next;
        let segments = self.segments.read().expect("segments lock poisoned");
        let first = segments.front().map_or(next, |s| s.base.min(next));
        Bounds {
            first: Timestamp::from_offset(first),
            next: Timestamp::from_offset(next),
        }
    }

    fn truncated(&self, offset: u64) -> Error {
        Error::Truncated {
            after: Timestamp(offset),
            first_available: self.bounds().first,
        }
    }
}

fn create_segment(dir: &Path, base: u64) -> Result<File> {
    let path = dir.join(segment::file_name(base));
    let file = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&path)
        .map_err(|e| Error::io("create", &path, e))?;
    sync_dir(dir)?;
    Ok(file)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("fsync directory", dir, e))
}

fn truncate(path: &Path, len: u64) -> Result<()> {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| Error::io("open", path, e))?;
    file.set_len(len)
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::io("truncate", path, e))
}

/// The single writer of the log, on its own thread (fsync blocks).
struct Writer {
    shared: Arc<Shared>,
    file: File,
    /// Bytes in the active segment.
    active_bytes: u64,
    /// The offset the next record gets.
    next: u64,
    /// Held for the writer's life: the directory lock.
    lock: File,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<AppendRequest>) {
        let max_group = self.shared.options.max_group_bytes;
        let mut group: Vec<AppendRequest> = Vec::new();
        let mut buf = BytesMut::with_capacity(max_group + 64 * 1024);
        while let Some(first) = rx.blocking_recv() {
            let mut group_bytes = request_bytes(&first);
            group.push(first);
            while group_bytes < max_group {
                match rx.try_recv() {
                    Ok(req) => {
                        group_bytes += request_bytes(&req);
                        group.push(req);
                    }
                    Err(_) => break,
                }
            }
            match self.write_group(&group, &mut buf) {
                Ok(timestamps) => {
                    for (req, ts) in group.drain(..).zip(timestamps) {
                        // The appender may have given up waiting; the records are in the log.
                        let _ = req.reply.send(Ok(ts));
                    }
                }
                Err(e) => {
                    // After a failed write or fsync the state of the file is unknown (and the
                    // kernel may have dropped the dirty pages): stop, so nothing is acknowledged
                    // on top of it. Reopening recovers from what is on disk.
                    error!(error = %e, source = ?std::error::Error::source(&e), "embedded log write failed; the log stops accepting appends");
                    let detail = format!("{e}");
                    for req in group.drain(..) {
                        let _ = req.reply.send(Err(Error::io(
                            "append to",
                            &self.shared.dir,
                            io::Error::other(detail.clone()),
                        )));
                    }
                    break;
                }
            }
        }
        rx.close();
        while let Ok(req) = rx.try_recv() {
            let _ = req.reply.send(Err(Error::Closed));
        }
        debug!(dir = %self.shared.dir.display(), "embedded log writer stopped");
        // Release the files, the lock last, before announcing the stop: `close` returning means
        // the directory can be opened again.
        let Writer {
            shared, file, lock, ..
        } = self;
        drop(file);
        drop(lock);
        shared.durable.send_modify(|d| d.stopped = true);
    }

    /// Writes and fsyncs the group, in chunks of at most `max_group_bytes`, and returns the
    /// timestamps of each request.
    fn write_group(
        &mut self,
        group: &[AppendRequest],
        buf: &mut BytesMut,
    ) -> Result<Vec<Vec<Timestamp>>> {
        let max_group = self.shared.options.max_group_bytes;
        let mut out = Vec::with_capacity(group.len());
        // Records written to `buf` but not yet in the shared index: (offset, position).
        let mut pending: Vec<(u64, u64)> = Vec::new();
        if self.active_bytes >= self.shared.options.segment_bytes {
            self.roll()?;
        }
        for req in group {
            let mut ts = Vec::with_capacity(req.records.len());
            for payload in &req.records {
                if buf.len() >= max_group {
                    self.flush(buf, &mut pending)?;
                    if self.active_bytes >= self.shared.options.segment_bytes {
                        self.roll()?;
                    }
                }
                pending.push((self.next, self.active_bytes + buf.len() as u64));
                segment::encode_frame(buf, payload);
                ts.push(Timestamp::from_offset(self.next));
                self.next += 1;
            }
            out.push(ts);
        }
        self.flush(buf, &mut pending)?;
        Ok(out)
    }

    /// Writes `buf`, fsyncs, then publishes the records to readers.
    fn flush(&mut self, buf: &mut BytesMut, pending: &mut Vec<(u64, u64)>) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let path = self.active_path();
        self.file
            .write_all(buf)
            .map_err(|e| Error::io("write", &path, e))?;
        self.file
            .sync_data()
            .map_err(|e| Error::io("fsync", &path, e))?;
        self.active_bytes += buf.len() as u64;
        buf.clear();
        let end = pending.last().map_or(self.next, |&(o, _)| o + 1);
        {
            let mut segments = self
                .shared
                .segments
                .write()
                .expect("segments lock poisoned");
            let active = segments.back_mut().expect("an active segment");
            let mut last_indexed = active.index.last().map(|&(_, p)| p);
            for &(offset, pos) in pending.iter() {
                if last_indexed.is_none_or(|p| pos - p >= INDEX_INTERVAL_BYTES) {
                    active.index.push((offset, pos));
                    last_indexed = Some(pos);
                }
            }
            assert!(end >= active.end, "the durable end moves forward");
            active.end = end;
            active.bytes = self.active_bytes;
        }
        pending.clear();
        self.shared.durable.send_modify(|d| d.next = end);
        Ok(())
    }

    fn active_path(&self) -> PathBuf {
        let segments = self.shared.segments.read().expect("segments lock poisoned");
        segments.back().expect("an active segment").path.clone()
    }

    /// Seals the active segment and starts a new one at `next`, then applies retention.
    fn roll(&mut self) -> Result<()> {
        let dir = self.shared.dir.clone();
        self.file = create_segment(&dir, self.next)?;
        self.active_bytes = 0;
        let mut removed = Vec::new();
        {
            let mut segments = self
                .shared
                .segments
                .write()
                .expect("segments lock poisoned");
            segments.push_back(SegmentMeta {
                base: self.next,
                end: self.next,
                bytes: 0,
                path: dir.join(segment::file_name(self.next)),
                index: Vec::new(),
            });
            if let Some(limit) = self.shared.options.retention_bytes {
                let mut total: u64 = segments.iter().map(|s| s.bytes).sum();
                while total > limit && segments.len() > 1 {
                    let old = segments.pop_front().expect("more than one segment");
                    total -= old.bytes;
                    removed.push(old);
                }
            }
        }
        debug!(base_ts = self.next + 1, "started a new log segment");
        if !removed.is_empty() {
            for old in &removed {
                fs::remove_file(&old.path).map_err(|e| Error::io("delete", &old.path, e))?;
            }
            sync_dir(&dir)?;
            info!(
                segments = removed.len(),
                first_ts = removed.last().map_or(0, |s| s.end) + 1,
                "retention dropped old log segments"
            );
        }
        Ok(())
    }
}

fn request_bytes(req: &AppendRequest) -> usize {
    req.records
        .iter()
        .map(|r| r.len() + HEADER_BYTES as usize)
        .sum()
}

/// The stream of [`EmbeddedLog::read_from`].
#[derive(Debug)]
pub struct Reader(ChannelStream);

impl Stream for Reader {
    type Item = Result<Record>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.0).poll_next(cx)
    }
}

/// Records read per blocking read, so a reader shares the blocking pool fairly.
const CHUNK_RECORDS: usize = 512;
const CHUNK_BYTES: usize = 4 << 20;

async fn read_task(shared: Arc<Shared>, position: u64, tx: mpsc::Sender<Result<Record>>) {
    let mut durable_rx = shared.durable.subscribe();
    let bounds = shared.bounds();
    // The reader wants offsets >= position (ts > position).
    if position + 1 < bounds.first.get() {
        let _ = tx.send(Err(shared.truncated(position))).await;
        return;
    }
    if position > bounds.next.get() - 1 {
        let _ = tx
            .send(Err(Error::BeyondEnd {
                position: Timestamp(position),
                next: bounds.next,
            }))
            .await;
        return;
    }
    let mut offset = position;
    let mut cursor: Option<Cursor> = None;
    loop {
        let durable = *durable_rx.borrow_and_update();
        if offset < durable.next {
            let s = shared.clone();
            let chunk =
                tokio::task::spawn_blocking(move || read_chunk(&s, cursor, offset, durable.next))
                    .await
                    .expect("log read panicked");
            cursor = chunk.cursor;
            for record in chunk.records {
                offset = record.ts.get();
                if tx.send(Ok(record)).await.is_err() {
                    return;
                }
            }
            if let Some(e) = chunk.error {
                let _ = tx.send(Err(e)).await;
                return;
            }
        } else if durable.stopped {
            let _ = tx.send(Err(Error::Closed)).await;
            return;
        } else {
            tokio::select! {
                changed = durable_rx.changed() => {
                    if changed.is_err() {
                        let _ = tx.send(Err(Error::Closed)).await;
                        return;
                    }
                }
                () = tx.closed() => return,
            }
        }
    }
}

struct Chunk {
    cursor: Option<Cursor>,
    records: Vec<Record>,
    error: Option<Error>,
}

/// Reads records from `offset` (below `durable`), up to a chunk.
fn read_chunk(shared: &Shared, mut cursor: Option<Cursor>, mut offset: u64, durable: u64) -> Chunk {
    let mut records = Vec::new();
    let mut bytes = 0usize;
    let mut error = None;
    // The limits of the cursor's segment: end offset and durable byte length.
    let mut limits: Option<(u64, u64)> = None;
    while offset < durable && records.len() < CHUNK_RECORDS && bytes < CHUNK_BYTES {
        let usable = match (&cursor, limits) {
            (Some(c), Some((end, _))) => c.offset == offset && offset < end,
            _ => false,
        };
        if !usable {
            let reuse = cursor.take().filter(|c| c.offset == offset);
            match position_cursor(shared, reuse, offset, durable) {
                Ok((c, end, seg_bytes)) => {
                    cursor = Some(c);
                    limits = Some((end, seg_bytes));
                }
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        let c = cursor.as_mut().expect("positioned");
        let (_, seg_bytes) = limits.expect("positioned");
        match c.next_frame(seg_bytes) {
            Ok(payload) => {
                bytes += payload.len();
                records.push(Record {
                    ts: Timestamp::from_offset(offset),
                    payload,
                });
                offset += 1;
            }
            Err(e) => {
                error = Some(frame_error(&c.path, c.pos, e));
                cursor = None;
                break;
            }
        }
    }
    Chunk {
        cursor,
        records,
        error,
    }
}

fn frame_error(path: &Path, pos: u64, e: FrameError) -> Error {
    match e {
        FrameError::Io(e) => Error::io("read", path, e),
        FrameError::Crc => Error::corrupt(format!(
            "record checksum mismatch in {} at byte {pos}",
            path.display()
        )),
        FrameError::End | FrameError::Short => Error::corrupt(format!(
            "{} ends inside a durable record at byte {pos}",
            path.display()
        )),
    }
}

/// A cursor at `offset` and the limits of its segment: (end offset readable, durable bytes).
/// Reuses `reuse` (already at `offset`) when it is still in the right segment.
fn position_cursor(
    shared: &Shared,
    reuse: Option<Cursor>,
    offset: u64,
    durable: u64,
) -> Result<(Cursor, u64, u64)> {
    let (meta, is_last) = {
        let segments = shared.segments.read().expect("segments lock poisoned");
        let front = segments.front().expect("at least one segment");
        if offset < front.base {
            drop(segments);
            return Err(shared.truncated(offset));
        }
        let i = segments.partition_point(|s| s.base <= offset) - 1;
        let seg = &segments[i];
        let is_last = i + 1 == segments.len();
        // A sealed segment that ends at `offset` means the record is in the next one.
        if !is_last && offset >= seg.end {
            let next = &segments[i + 1];
            (
                SegmentMeta {
                    index: Vec::new(),
                    ..next.clone()
                },
                i + 2 == segments.len(),
            )
        } else {
            (seg.clone(), is_last)
        }
    };
    // While the segment is the active one, everything below the durable end we were given is in it.
    let end = if is_last { durable } else { meta.end };
    assert!(
        offset < end,
        "reading offset {offset} beyond segment end {end}"
    );
    if let Some(c) = reuse.filter(|c| c.base == meta.base) {
        return Ok((c, end, meta.bytes));
    }
    let (mut at, pos) = meta.seek_point(offset);
    let mut cursor = match Cursor::open(meta.path.clone(), meta.base, at, pos) {
        Ok(c) => c,
        // Retention deleted it after we looked.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(shared.truncated(offset)),
        Err(e) => return Err(Error::io("open", &meta.path, e)),
    };
    while at < offset {
        let pos = cursor.pos;
        cursor
            .next_frame(meta.bytes)
            .map_err(|e| frame_error(&meta.path, pos, e))?;
        at += 1;
    }
    Ok((cursor, end, meta.bytes))
}
