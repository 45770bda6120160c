//! A parser of server-sent events (the `text/event-stream` format of the WHATWG HTML standard,
//! "Server-sent events", §9.2.6): bytes in, events out, with the chunk boundaries anywhere (in a
//! line, in a CRLF, in a UTF-8 sequence).
//!
//! Lines end with LF, CRLF or a lone CR. A line starting with `:` is a comment; `field: value`
//! sets a field (one space after the colon is dropped); `data` lines are joined with `\n`; a
//! blank line ends the event. An event with no `data` is not dispatched (its `id` still counts),
//! and whatever is pending when the stream ends is dropped: only complete events come out.
//!
//! The parser is pure: no IO, no clock, so the tests below feed it every split of the input.

use std::fmt;

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The last event id the stream set, at or before this event (the `Last-Event-ID` to resume
    /// after it); `None` while the stream has set none.
    pub id: Option<String>,
    /// The `event` field, `message` when the event had none.
    pub event: String,
    /// The `data` lines, joined with `\n`.
    pub data: String,
}

/// An event or a line grew beyond the parser's limit: the stream is not what it claims to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLarge {
    pub limit_bytes: usize,
}

impl fmt::Display for TooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "a server-sent event is larger than {} bytes",
            self.limit_bytes
        )
    }
}

impl std::error::Error for TooLarge {}

/// The parser's state between chunks.
#[derive(Debug)]
pub struct Parser {
    /// Bytes of the line not yet ended.
    line: Vec<u8>,
    /// The previous chunk ended with CR: an LF starting this one belongs to that line break.
    after_cr: bool,
    /// Still at the stream's start, where one UTF-8 byte order mark is skipped.
    at_start: bool,
    data: String,
    /// Whether a `data` field was seen in the current event (even an empty one).
    has_data: bool,
    event: String,
    last_id: Option<String>,
    /// The reconnection time the server asked for (`retry:`), in milliseconds.
    retry_ms: Option<u64>,
    /// The most bytes a line plus the event's data may hold.
    limit_bytes: usize,
}

/// The UTF-8 byte order mark.
const BOM: &[u8] = b"\xEF\xBB\xBF";

impl Parser {
    /// A parser refusing events (or lines) larger than `limit_bytes`.
    pub fn new(limit_bytes: usize) -> Parser {
        Parser {
            line: Vec::new(),
            after_cr: false,
            at_start: true,
            data: String::new(),
            has_data: false,
            event: String::new(),
            last_id: None,
            retry_ms: None,
            limit_bytes,
        }
    }

    /// The reconnection time of the latest valid `retry:` field.
    pub fn retry_ms(&self) -> Option<u64> {
        self.retry_ms
    }

    /// Parses the next chunk of the stream, appending the events it completes to `out`.
    pub fn push(&mut self, mut chunk: &[u8], out: &mut Vec<Event>) -> Result<(), TooLarge> {
        if self.at_start {
            // The mark may itself be split across chunks: hold its prefix back until it is
            // complete or proven absent.
            let mut pending = std::mem::take(&mut self.line);
            pending.extend_from_slice(chunk);
            if pending.len() < BOM.len() && BOM.starts_with(&pending) {
                self.line = pending;
                return Ok(());
            }
            self.at_start = false;
            let body = pending.strip_prefix(BOM).unwrap_or(&pending).to_vec();
            return self.push(&body, out);
        }
        if self.after_cr && !chunk.is_empty() {
            self.after_cr = false;
            if let Some(rest) = chunk.strip_prefix(b"\n") {
                chunk = rest;
            }
        }
        while let Some(end) = chunk.iter().position(|&b| b == b'\n' || b == b'\r') {
            self.append_line(&chunk[..end])?;
            let line = std::mem::take(&mut self.line);
            self.line_ended(&line, out);
            self.line = line;
            self.line.clear();
            let crlf = chunk[end] == b'\r';
            chunk = &chunk[end + 1..];
            if crlf {
                match chunk.first() {
                    Some(b'\n') => chunk = &chunk[1..],
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
        }
        self.append_line(chunk)
    }

    fn append_line(&mut self, bytes: &[u8]) -> Result<(), TooLarge> {
        if self.line.len() + bytes.len() + self.data.len() > self.limit_bytes {
            return Err(TooLarge {
                limit_bytes: self.limit_bytes,
            });
        }
        self.line.extend_from_slice(bytes);
        Ok(())
    }

    /// Interprets one complete line.
    fn line_ended(&mut self, line: &[u8], out: &mut Vec<Event>) {
        if line.is_empty() {
            self.dispatch(out);
            return;
        }
        if line[0] == b':' {
            return;
        }
        let line = String::from_utf8_lossy(line);
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (&*line, ""),
        };
        match field {
            "event" => self.event = value.to_owned(),
            "data" => {
                self.data.push_str(value);
                self.data.push('\n');
                self.has_data = true;
            }
            // An id with NUL is ignored, as the standard says.
            "id" if !value.contains('\0') => self.last_id = Some(value.to_owned()),
            "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                self.retry_ms = value.parse().ok();
            }
            _ => {}
        }
    }

    /// A blank line: the pending event, if it has data.
    fn dispatch(&mut self, out: &mut Vec<Event>) {
        let event = std::mem::take(&mut self.event);
        if !self.has_data {
            self.data.clear();
            return;
        }
        self.has_data = false;
        let mut data = std::mem::take(&mut self.data);
        data.pop(); // the `\n` after the last data line
        out.push(Event {
            id: self.last_id.clone().filter(|id| !id.is_empty()),
            event: if event.is_empty() {
                "message".to_owned()
            } else {
                event
            },
            data,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_chunks(chunks: &[&[u8]]) -> Vec<Event> {
        let mut parser = Parser::new(1 << 20);
        let mut out = Vec::new();
        for c in chunks {
            parser.push(c, &mut out).unwrap();
        }
        out
    }

    fn event(id: Option<&str>, event: &str, data: &str) -> Event {
        Event {
            id: id.map(str::to_owned),
            event: event.to_owned(),
            data: data.to_owned(),
        }
    }

    /// What the api-server sends, with comments, a multi-line event and mixed line endings.
    const STREAM: &[u8] = b"\xEF\xBB\xBFretry: 1000\n: causeway changes\n\n\
id: 00000000000000000042.0000000000\nevent: causeway.document.created\n\
data: {\"specversion\":\"1.0\",\"data\":{\"op\":\"c\"}}\n\n\
: a comment between events\r\n\
id:00000000000000000042.0000000001\r\nevent: causeway.document.updated\r\n\
data: first\r\ndata:  second\r\ndata\r\n\r\n\
event: causeway.resolved\rdata: {\"data\":{\"resolved\":42}}\r\r\
id: 7\nevent: cut\ndata: never ended";

    fn expected() -> Vec<Event> {
        vec![
            event(
                Some("00000000000000000042.0000000000"),
                "causeway.document.created",
                "{\"specversion\":\"1.0\",\"data\":{\"op\":\"c\"}}",
            ),
            // One space after the colon is dropped, the next is kept; `data` alone adds an
            // empty line.
            event(
                Some("00000000000000000042.0000000001"),
                "causeway.document.updated",
                "first\n second\n",
            ),
            // No id of its own: the last id set.
            event(
                Some("00000000000000000042.0000000001"),
                "causeway.resolved",
                "{\"data\":{\"resolved\":42}}",
            ),
        ]
    }

    #[test]
    fn a_whole_stream_gives_its_complete_events() {
        assert_eq!(parse_chunks(&[STREAM]), expected());
        let mut parser = Parser::new(1 << 20);
        parser.push(STREAM, &mut Vec::new()).unwrap();
        assert_eq!(parser.retry_ms(), Some(1000));
    }

    #[test]
    fn every_split_into_two_or_three_chunks_gives_the_same_events() {
        for i in 0..=STREAM.len() {
            let (a, b) = STREAM.split_at(i);
            assert_eq!(parse_chunks(&[a, b]), expected(), "split at {i}");
        }
        for i in (0..=STREAM.len()).step_by(3) {
            for j in i..=STREAM.len() {
                let (a, rest) = STREAM.split_at(i);
                let (b, c) = rest.split_at(j - i);
                assert_eq!(parse_chunks(&[a, b, c]), expected(), "split at {i}, {j}");
            }
        }
        let bytes: Vec<&[u8]> = STREAM.chunks(1).collect();
        assert_eq!(parse_chunks(&bytes), expected(), "byte by byte");
    }

    #[test]
    fn a_cr_then_lf_in_the_next_chunk_is_one_line_break() {
        // Were the LF a second line break, the blank line would end the event early.
        let out = parse_chunks(&[b"data: a\r", b"", b"\ndata: b\r", b"\n\r", b"\n"]);
        assert_eq!(out, vec![event(None, "message", "a\nb")]);
    }

    #[test]
    fn events_without_data_are_not_dispatched_but_their_id_counts() {
        let out = parse_chunks(&[b"id: 5\nevent: x\n\ndata: d\n\n"]);
        // The `event: x` belonged to the event without data and went with it.
        assert_eq!(out, vec![event(Some("5"), "message", "d")]);
        // An empty id clears it.
        let out = parse_chunks(&[b"id: 5\ndata: a\n\nid\ndata: b\n\n"]);
        assert_eq!(
            out,
            vec![
                event(Some("5"), "message", "a"),
                event(None, "message", "b")
            ]
        );
    }

    #[test]
    fn utf8_split_across_chunks_is_kept_and_bad_retry_is_ignored() {
        let text = "data: é✓\n\n".as_bytes();
        let out = parse_chunks(&[&text[..7], &text[7..9], &text[9..]]);
        assert_eq!(out, vec![event(None, "message", "é✓")]);
        let mut parser = Parser::new(1 << 20);
        parser
            .push(b"retry: 12x\nretry\n\n", &mut Vec::new())
            .unwrap();
        assert_eq!(parser.retry_ms(), None);
    }

    #[test]
    fn an_event_over_the_limit_is_refused() {
        let mut parser = Parser::new(16);
        let mut out = Vec::new();
        parser.push(b"data: 0123456789\n", &mut out).unwrap();
        // The data held plus the new line pass the limit, whichever chunk brings them.
        assert_eq!(
            parser.push(b"data: ab", &mut out),
            Err(TooLarge { limit_bytes: 16 })
        );
        let mut parser = Parser::new(16);
        assert!(parser.push(&[b'x'; 17], &mut out).is_err());
        assert!(out.is_empty());
    }
}
