//! Admission control of writes (`core::admission`, after FoundationDB's ratekeeper): the
//! sampler that feeds the [`Ratekeeper`], and the gate every write passes before its append.
//!
//! Every `admission.sample_ms` the sampler asks each store node of the routing configurations
//! for its status at once (within `sample_ms` × 10, and at most `sample_ms` after the first
//! coordinating node answered): the highest UST view of the nodes that
//! coordinate reads (views differ by a few gossip steps; the highest is the cluster's apply
//! progress, and one node cut off from its peers cannot hold every write back), and the
//! highest log end any of them has read, make one [`Sample`]. Each append
//! of this server notes its log end too ([`Admission::appended`]), so the lag of its own writes
//! is measured from the moment they are in the log, however slowly the nodes answer. A node that does not answer coordinates no read this server can reach,
//! and is left out; a round in which none answered adds no sample.
//!
//! [`Admission::admit`] asks the ratekeeper: a write goes at once, waits for its turn (at most
//! `max_queue_ms`), or is refused with `429 throttled` and a `Retry-After`. Reads are never
//! throttled.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use causeway_core::admission::{AdmissionOptions, Admit, Ratekeeper, Sample};
use causeway_proto::v1 as pb;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::problem::{Kind, Problem};
use crate::service::Shared;

/// The admission state of one api-server.
#[derive(Debug)]
pub struct Admission {
    keeper: Mutex<Ratekeeper>,
    /// The origin of the samples' clock.
    epoch: Instant,
}

impl Admission {
    pub fn new(options: AdmissionOptions) -> Admission {
        Admission {
            keeper: Mutex::new(Ratekeeper::new(options)),
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn keeper(&self) -> std::sync::MutexGuard<'_, Ratekeeper> {
        self.keeper.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lets one write go: at once, after its turn, or refused (`429 throttled`).
    pub async fn admit(&self) -> Result<(), Problem> {
        let decision = self.keeper().admit(self.now_ms());
        match decision {
            Admit::Now => Ok(()),
            Admit::After { wait_ms } => {
                tokio::time::sleep(Duration::from_millis(wait_ms)).await;
                Ok(())
            }
            Admit::Refused { retry_after_ms } => {
                let now = self.now_ms();
                let (lag, limit) = {
                    let k = self.keeper();
                    (k.lag_ms(now), k.limit(now).unwrap_or(0.0))
                };
                let retry_s = u32::try_from(retry_after_ms.div_ceil(1000).max(1)).unwrap_or(1);
                Err(Problem::new(
                    Kind::Throttled,
                    format!(
                        "the cluster's visibility is {lag} ms behind the log; writes are \
                         admitted at {limit:.0}/s until it catches up: retry after {retry_s} s"
                    ),
                )
                .retry_after(retry_s))
            }
        }
    }

    /// This server's append of the record at `ts`.
    pub fn appended(&self, ts: u64) {
        let now = self.now_ms();
        self.keeper().log_end(now, ts + 1);
    }

    fn observe(&self, sample: Sample) {
        self.keeper().observe(Sample {
            at_ms: self.now_ms(),
            ..sample
        });
    }

    /// (visibility lag ms, backlog in records, the limit in writes/s or `None`), for metrics.
    pub fn state(&self) -> (u64, u64, Option<f64>) {
        let now = self.now_ms();
        let k = self.keeper();
        (k.lag_ms(now), k.backlog(), k.limit(now))
    }
}

/// Samples the cluster until `stop` says stop.
pub(crate) async fn sample_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let options = shared.options.admission;
    if !options.enabled {
        return;
    }
    let every = Duration::from_millis(options.sample_ms);
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if let Some(sample) = sample(&shared, every * 10).await {
            shared.admission.observe(sample);
            let (lag, backlog, limit) = shared.admission.state();
            shared.metrics.set_admission(lag, backlog, limit);
        }
    }
}

/// One sample: the highest UST view of the coordinating nodes that answered within `deadline`,
/// and the highest log end known. `None` when no coordinating node answered. Once one
/// coordinating node has answered, the others get one more sampling period: a node that does
/// not answer (paused, cut off) must not stretch every round to `deadline`, which made the
/// samples ten times sparser, the UST look `deadline` old, and admission throttle writes
/// that the other replicas applied at once.
async fn sample(shared: &Shared, deadline: Duration) -> Option<Sample> {
    let straggle = deadline / 10;
    let mut calls: FuturesUnordered<_> = shared
        .store
        .routing_nodes()
        .into_iter()
        .filter_map(|addr| shared.store.client(&addr).ok())
        .map(|mut client| async move {
            tokio::time::timeout(deadline, client.status(pb::StatusRequest {}))
                .await
                .ok()
                .and_then(Result::ok)
                .map(tonic::Response::into_inner)
        })
        .collect();
    let mut log_next = shared.log_next.load(Ordering::Relaxed);
    let mut ust: Option<u64> = None;
    let mut until: Option<Instant> = None;
    loop {
        let cutoff = async {
            match until {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let answer = tokio::select! {
            a = calls.next() => match a {
                Some(a) => a,
                None => break,
            },
            () = cutoff => break,
        };
        let Some(status) = answer else { continue };
        log_next = log_next.max(status.log_next);
        // The highest view: views differ by a few gossip steps, and one node whose view is
        // stuck (cut off from its peers' gossip) must not stop every write of the cluster.
        if status.can_coordinate {
            ust = Some(ust.map_or(status.ust, |u| u.max(status.ust)));
            until.get_or_insert_with(|| Instant::now() + straggle);
        }
    }
    Some(Sample {
        at_ms: 0,
        log_next,
        ust: ust?,
    })
}
