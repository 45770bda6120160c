//! Change data capture (DESIGN.md §11): every committed change, in ts order, with transaction
//! boundaries and resolved watermarks, to Kafka topics, signed webhooks and (through the
//! api-server) server-sent events.
//!
//! A feed follows the log and asks the store nodes only for what the log cannot say (see
//! [`follow`]); its events are CloudEvents ([`event`]); its checkpoint is durable in its sink
//! ([`sink`]) and holds the cluster's GC timestamp ([`hold`]).
//!
//! # Layout
//! - [`feed`]: [`FeedSpec`] (what an operator configures) and [`feed::Selection`] (collections,
//!   filter, before-images, as the follower applies them).
//! - [`event`]: [`Event`] and its CloudEvents forms (structured JSON, Kafka binary headers).
//! - [`follow`]: [`Follower`], one feed's events from a cursor; the initial scan.
//! - [`sink`]: the Kafka sink (exactly once, with Kafka transactions) and the webhook sink
//!   (batches, Standard Webhooks signatures, backoff, block or dead letters).
//! - [`hold`]: a feed's hold on the GC timestamp at its checkpoint.
//! - [`run`]: one feed at work: start, follow, batch, deliver, checkpoint, resolved events.
//! - [`options`], [`error`], [`service`] ([`Service`], [`Handle`]), [`http`] (the admin API),
//!   [`metrics`] (`causeway_cdc_*`).

pub mod error;
pub mod event;
pub mod feed;
pub mod follow;
pub mod hold;
pub mod http;
pub mod metrics;
pub mod options;
pub mod run;
pub mod service;
pub mod sink;

pub use error::Error;
pub use event::Event;
pub use feed::FeedSpec;
pub use follow::Follower;
pub use options::Options;
pub use service::{Handle, Service};
