//! `causeway cdc …`: change data capture from the terminal.
//!
//! # Layout
//! - [`tail`]: `causeway cdc tail`: an api-server's change stream (`GET /v1/changes`), one line
//!   per event, resumed with `Last-Event-ID` when the server ends it.
//! - [`sse`]: the server-sent events parser (pure: bytes in, events out).

pub mod sse;
pub mod tail;

pub use tail::{tail, TailArgs};
