//! Where a feed's events go, and where its checkpoint lives.
//!
//! - [`kafka`]: the checkpoint is written in the Kafka transaction of the events before it.
//! - [`webhook`]: the checkpoint is a file of the feed, written (fsync, rename) after each
//!   acknowledged batch.
//!
//! Either way the checkpoint is the highest position below which every event is acknowledged
//! by the sink: a restarted feed resumes after it, so duplicates can only come after it, and
//! their ids say which.

pub mod kafka;
pub mod webhook;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use causeway_core::cdc::Position;

use crate::event::{Body, Event};
use crate::feed::{Exhausted, FeedSpec, SinkSpec};

/// A feed's sink.
#[derive(Debug)]
pub enum Sink {
    Kafka(Arc<std::sync::Mutex<kafka::KafkaSink>>),
    Webhook {
        hook: Box<webhook::Webhook>,
        checkpoint_file: PathBuf,
    },
}

/// What delivering a batch did.
#[derive(Debug)]
pub enum Delivered {
    /// Every event of the batch is acknowledged; the checkpoint is after them.
    All,
    /// The retry budget was spent and the batch went to the dead letters: the feed emits this
    /// `causeway.gap` event next.
    Gap(Event),
}

impl Sink {
    /// Opens the sink of `spec` and reads the feed's checkpoint. Blocking for Kafka.
    pub async fn open(
        spec: &FeedSpec,
        state_dir: &Path,
    ) -> Result<(Sink, Option<Position>), String> {
        let source = source_of(&spec.name);
        match &spec.sink {
            SinkSpec::Kafka(k) => {
                let (name, k) = (spec.name.clone(), k.clone());
                let (sink, checkpoint) =
                    tokio::task::spawn_blocking(move || kafka::KafkaSink::open(&name, &source, &k))
                        .await
                        .map_err(|e| e.to_string())??;
                Ok((
                    Sink::Kafka(Arc::new(std::sync::Mutex::new(sink))),
                    checkpoint,
                ))
            }
            SinkSpec::Webhook(w) => {
                let hook = Box::new(webhook::Webhook::new(&spec.name, &source, w)?);
                let checkpoint_file = state_dir
                    .join("checkpoints")
                    .join(format!("{}.txt", spec.name));
                let checkpoint = match std::fs::read_to_string(&checkpoint_file) {
                    Ok(text) => Some(
                        text.trim()
                            .parse::<Position>()
                            .map_err(|e| format!("{}: {e}", checkpoint_file.display()))?,
                    ),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                    Err(e) => return Err(format!("{}: {e}", checkpoint_file.display())),
                };
                Ok((
                    Sink::Webhook {
                        hook,
                        checkpoint_file,
                    },
                    checkpoint,
                ))
            }
        }
    }

    /// The most events one batch may hold, and its most bytes (of CloudEvents JSON).
    pub fn batch_limits(&self) -> (usize, usize, std::time::Duration) {
        match self {
            Sink::Kafka(_) => (5_000, 16 << 20, std::time::Duration::from_millis(50)),
            Sink::Webhook { hook, .. } => (
                hook.spec().max_events,
                hook.spec().max_bytes,
                std::time::Duration::from_millis(hook.spec().max_delay_ms),
            ),
        }
    }

    /// Delivers `events` (in order) and makes the checkpoint after them durable (none: the
    /// events of an initial scan). Keeps trying
    /// while the sink refuses (a webhook in block mode, Kafka), until `stop` fires.
    pub async fn deliver(
        &mut self,
        events: Vec<Event>,
        checkpoint: Option<Position>,
        stop: &tokio::sync::watch::Receiver<bool>,
    ) -> Result<Delivered, String> {
        match self {
            Sink::Kafka(sink) => {
                let events = Arc::new(events);
                let mut attempt = 0;
                loop {
                    let (sink, batch) = (Arc::clone(sink), Arc::clone(&events));
                    let result = tokio::task::spawn_blocking(move || {
                        sink.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .deliver(&batch, checkpoint)
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                    match result {
                        Ok(()) => return Ok(Delivered::All),
                        Err(e) => {
                            tracing::warn!(error = %e, attempt, "kafka delivery failed; trying again");
                            attempt += 1;
                            if *stop.borrow() {
                                return Err("stopped".into());
                            }
                            let pause = webhook::backoff(
                                attempt,
                                std::time::Duration::from_millis(100),
                                std::time::Duration::from_secs(5),
                                rand::random(),
                            );
                            tokio::time::sleep(pause).await;
                        }
                    }
                }
            }
            Sink::Webhook {
                hook,
                checkpoint_file,
            } => {
                let budget = hook.spec().max_attempts;
                let outcome = match hook.deliver(&events, budget).await {
                    webhook::Delivery::Delivered => Delivered::All,
                    webhook::Delivery::Exhausted(why) => match hook.spec().on_exhausted.clone() {
                        Exhausted::Block => {
                            tracing::warn!(%why, "webhook retry budget spent; blocking (order is kept)");
                            loop {
                                if *stop.borrow() {
                                    return Err("stopped".into());
                                }
                                if hook.deliver(&events, 1).await == webhook::Delivery::Delivered {
                                    break Delivered::All;
                                }
                                tokio::time::sleep(std::time::Duration::from_millis(
                                    hook.spec().backoff_max_ms,
                                ))
                                .await;
                            }
                        }
                        Exhausted::DeadLetter { file } => {
                            let body = hook.body(&events);
                            append_dead_letter(&file, &body)
                                .map_err(|e| format!("dead letter {}: {e}", file.display()))?;
                            tracing::warn!(%why, file = %file.display(), "webhook batch moved to the dead letters");
                            let first = events.first().map(|e| e.position).unwrap_or_default();
                            let last = events.last().map(|e| e.position).unwrap_or_default();
                            Delivered::Gap(Event {
                                position: last,
                                time_ms: crate::follow::now_ms(),
                                body: Body::Gap {
                                    first,
                                    last,
                                    dead_letter: file.display().to_string(),
                                },
                            })
                        }
                    },
                };
                if let Some(c) = checkpoint {
                    write_checkpoint(checkpoint_file, c)
                        .map_err(|e| format!("checkpoint {}: {e}", checkpoint_file.display()))?;
                }
                Ok(outcome)
            }
        }
    }
}

/// The CloudEvents `source` of a feed's events.
pub fn source_of(feed: &str) -> String {
    format!("/causeway/feeds/{feed}")
}

fn write_checkpoint(file: &Path, checkpoint: Position) -> std::io::Result<()> {
    let dir = file.parent().expect("a checkpoint file has a directory");
    std::fs::create_dir_all(dir)?;
    let tmp = file.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(checkpoint.id().as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, file)?;
    std::fs::File::open(dir)?.sync_all()
}

fn append_dead_letter(file: &Path, body: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)?;
    f.write_all(body)?;
    f.write_all(b"\n")?;
    f.sync_all()
}
