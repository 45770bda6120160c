//! A steady mixed load through the HTTP API, for tests that change the cluster underneath it and
//! must show that no client noticed: what its clients saw ([`History`]) and its checkers.
//!
//! # Layout
//! - [`check`]: the history and its checkers, pure.

pub mod check;

pub use check::{
    Acknowledged, BankRead, History, Kind, KindStats, Outcome, ReadObservation, Report,
    RequestRecord, SessionEvent,
};
