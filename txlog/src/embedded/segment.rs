//! The on-disk format of the embedded log: segment files of framed records.
//!
//! A segment is named after the offset of its first record (`{base:020}.seg`), so record `i` of a
//! segment has offset `base + i` and ts `base + i + 1`. Each record is framed as
//!
//! ```text
//! len: u32 LE | crc: u32 LE | payload: [u8; len]      crc = crc32c(len bytes ‖ payload)
//! ```
//!
//! The CRC covers the length too, so a zero-filled tail (what a filesystem may leave after a crash)
//! never parses as an empty record.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use bytes::{BufMut, Bytes, BytesMut};

/// Bytes of framing before each payload.
pub(crate) const HEADER_BYTES: u64 = 8;

/// A sparse index entry every this many bytes of a segment, so a read from an arbitrary offset
/// scans at most this much.
pub(crate) const INDEX_INTERVAL_BYTES: u64 = 64 * 1024;

const SUFFIX: &str = ".seg";

pub(crate) fn file_name(base: u64) -> String {
    format!("{base:020}{SUFFIX}")
}

/// The base offset of a segment file name, `None` for other files.
pub(crate) fn parse_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn crc(len: u32, payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&len.to_le_bytes()), payload)
}

/// Appends one framed record to `buf`.
pub(crate) fn encode_frame(buf: &mut BytesMut, payload: &[u8]) {
    let len = u32::try_from(payload.len()).expect("record length checked against the limit");
    buf.reserve(HEADER_BYTES as usize + payload.len());
    buf.put_u32_le(len);
    buf.put_u32_le(crc(len, payload));
    buf.put_slice(payload);
}

/// Why a frame could not be read.
#[derive(Debug)]
pub(crate) enum FrameError {
    /// The file ends exactly at a frame boundary.
    End,
    /// The file ends inside the frame (header or payload).
    Short,
    /// The checksum does not match: the frame is damaged.
    Crc,
    Io(io::Error),
}

/// Reads one frame. `remaining` is how many bytes the file holds from here: a length beyond it is
/// a short frame, never an allocation of a corrupt length.
pub(crate) fn read_frame(r: &mut impl Read, remaining: u64) -> Result<Bytes, FrameError> {
    if remaining == 0 {
        return Err(FrameError::End);
    }
    if remaining < HEADER_BYTES {
        return Err(FrameError::Short);
    }
    let mut header = [0u8; HEADER_BYTES as usize];
    r.read_exact(&mut header).map_err(short_or_io)?;
    let len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    let expected = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
    if u64::from(len) > remaining - HEADER_BYTES {
        return Err(FrameError::Short);
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload).map_err(short_or_io)?;
    if crc(len, &payload) != expected {
        return Err(FrameError::Crc);
    }
    Ok(Bytes::from(payload))
}

fn short_or_io(e: io::Error) -> FrameError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        FrameError::Short
    } else {
        FrameError::Io(e)
    }
}

/// What a scan of a segment file found.
#[derive(Debug)]
pub(crate) struct Scan {
    /// Records in the valid prefix.
    pub records: u64,
    /// Bytes of the valid prefix.
    pub valid_bytes: u64,
    /// The length of the file.
    pub file_bytes: u64,
    /// Sparse index of the valid prefix: (offset, byte position).
    pub index: Vec<(u64, u64)>,
    /// Why the scan stopped before the end of the file, if it did.
    pub damage: Option<&'static str>,
}

/// Reads a whole segment, verifying every frame.
pub(crate) fn scan(path: &Path, base: u64) -> io::Result<Scan> {
    let file = File::open(path)?;
    let file_bytes = file.metadata()?.len();
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut scan = Scan {
        records: 0,
        valid_bytes: 0,
        file_bytes,
        index: Vec::new(),
        damage: None,
    };
    let mut last_indexed: Option<u64> = None;
    loop {
        match read_frame(&mut r, file_bytes - scan.valid_bytes) {
            Ok(payload) => {
                if last_indexed.is_none_or(|p| scan.valid_bytes - p >= INDEX_INTERVAL_BYTES) {
                    scan.index.push((base + scan.records, scan.valid_bytes));
                    last_indexed = Some(scan.valid_bytes);
                }
                scan.records += 1;
                scan.valid_bytes += HEADER_BYTES + payload.len() as u64;
            }
            Err(FrameError::End) => return Ok(scan),
            Err(FrameError::Short) => {
                scan.damage = Some("file ends inside a record");
                return Ok(scan);
            }
            Err(FrameError::Crc) => {
                scan.damage = Some("record checksum mismatch");
                return Ok(scan);
            }
            Err(FrameError::Io(e)) => return Err(e),
        }
    }
}

/// An open segment file positioned at a record, for readers.
#[derive(Debug)]
pub(crate) struct Cursor {
    pub base: u64,
    pub path: PathBuf,
    /// Offset of the record at `pos`.
    pub offset: u64,
    /// Byte position of the record `offset`.
    pub pos: u64,
    file: BufReader<File>,
}

impl Cursor {
    /// Opens `path` at byte `pos`, which holds the record `offset`.
    pub(crate) fn open(path: PathBuf, base: u64, offset: u64, pos: u64) -> io::Result<Cursor> {
        let mut file = File::open(&path)?;
        file.seek(SeekFrom::Start(pos))?;
        Ok(Cursor {
            base,
            path,
            offset,
            pos,
            file: BufReader::with_capacity(256 * 1024, file),
        })
    }

    /// Reads the record at the cursor, which the caller knows is durable (so complete).
    /// `segment_bytes` is the durable length of the segment: a damaged length field beyond it
    /// reads as a short frame instead of asking for a huge allocation.
    pub(crate) fn next_frame(&mut self, segment_bytes: u64) -> Result<Bytes, FrameError> {
        let payload = read_frame(&mut self.file, segment_bytes.saturating_sub(self.pos))?;
        self.offset += 1;
        self.pos += HEADER_BYTES + payload.len() as u64;
        Ok(payload)
    }
}
