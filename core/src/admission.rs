//! Admission control of writes, after FoundationDB's ratekeeper: an api-server measures how far
//! the cluster's visibility is behind the log and, past a bound, admits writes only at the rate
//! the cluster applies them, so that the backlog (and with it the visibility lag, and every
//! `Causeway-After` wait) stays bounded whatever load is offered.
//!
//! The api-server samples, every few milliseconds, the end of the log the store nodes saw and the
//! highest UST view of the nodes it routes to, and notes the log end of each of its own appends.
//! From those alone, with time passed in:
//!
//! - **lag**: how long the oldest record that is not yet visible has been in the log: `now − t`,
//!   where `t` is when the log end first rose past the current UST (the api-server records the
//!   log end at every append it makes, and at every sample). It needs no estimate of rates, and
//!   grows between samples;
//! - **apply rate**: how fast the UST moved over the last `rate_window_ms`;
//! - **limit**: none while the lag is at most half of `max_lag_ms`; above that, the apply rate
//!   times a factor that falls from 1 at half the bound to 0 at the bound (a proportional
//!   controller: the admitted rate follows the rate the cluster absorbs, a little below it, and
//!   the lag settles between half the bound and the bound). Once the lag is back under half
//!   the bound, writes stay limited (while any record is not yet visible) to 1.25 × the rate
//!   measured while it was past it for two rate windows: a cluster that applies in large
//!   groups catches up in jumps, and letting everything through at each jump would make the
//!   lag swing past the bound. Several api-servers each admit up
//!   to the limit: together they overshoot, the lag rises, and each one's factor falls until the
//!   sum fits.
//!
//! [`Ratekeeper::admit`] then spends one token of a bucket filled at the limit: a write that
//! finds no token waits for the next one if it comes within `max_queue_ms`, and is refused
//! otherwise (the api-server answers 429 with `Retry-After`). A write is never refused while
//! the lag is under half the bound.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// The settings of admission control.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdmissionOptions {
    /// Whether writes are throttled at all. Default true.
    pub enabled: bool,
    /// The visibility lag the limit keeps the cluster under, in ms. Default 500.
    pub max_lag_ms: u64,
    /// The longest a write waits for its turn before it is refused. Default 100.
    pub max_queue_ms: u64,
    /// The window over which the apply rate is measured, in ms. Default 1000.
    pub rate_window_ms: u64,
    /// How often the api-server samples the cluster's progress, in ms. Default 20.
    pub sample_ms: u64,
}

impl Default for AdmissionOptions {
    fn default() -> Self {
        AdmissionOptions {
            enabled: true,
            max_lag_ms: 500,
            max_queue_ms: 100,
            rate_window_ms: 1000,
            sample_ms: 20,
        }
    }
}

impl AdmissionOptions {
    /// Why the settings cannot work, if they cannot.
    pub fn problem(&self) -> Option<&'static str> {
        if self.max_lag_ms < 2 {
            return Some("admission.max_lag_ms must be at least 2");
        }
        if self.rate_window_ms == 0 {
            return Some("admission.rate_window_ms must be positive");
        }
        if self.sample_ms == 0 || self.sample_ms >= self.max_lag_ms {
            return Some("admission.sample_ms must be positive and below max_lag_ms");
        }
        None
    }
}

/// One reading of the cluster's progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// When it was taken (a monotonic clock, in ms).
    pub at_ms: u64,
    /// The log's next ts (one past the newest record known).
    pub log_next: u64,
    /// The highest UST view of the nodes that coordinate reads.
    pub ust: u64,
}

/// What [`Ratekeeper::admit`] decided for one write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Go now.
    Now,
    /// Go after waiting this long (at most `max_queue_ms`): the turn is taken.
    After { wait_ms: u64 },
    /// Refused: the next turn is further than `max_queue_ms` away, or the cluster applies
    /// nothing. Try again after about this long.
    Refused { retry_after_ms: u64 },
}

/// The admission state of one api-server.
#[derive(Debug, Clone)]
pub struct Ratekeeper {
    options: AdmissionOptions,
    /// When the log end rose past each value (both increasing), from the first point not yet
    /// visible on (and one before it): the lag is the age of the first point past the UST.
    log: VecDeque<(u64, u64)>,
    /// UST readings over the last `rate_window_ms` (and one before), for the apply rate.
    ust: VecDeque<(u64, u64)>,
    /// The token bucket: tokens (negative once turns are handed out ahead) as of `bucket_at_ms`.
    tokens: f64,
    bucket_at_ms: u64,
    /// The apply rate measured the last time the lag was past half the bound: what the cluster
    /// absorbs when it is behind.
    capacity: f64,
    /// Until when, after the lag was last past half the bound, writes stay limited to
    /// `RECOVERY` × the capacity rather than let through unlimited.
    engaged_until_ms: u64,
}

/// Log-end points closer than this in time are merged into one (the earlier time stays).
const MERGE_MS: u64 = 2;
/// Points kept at most in each history (a bound whatever the rates): past it a point after the
/// oldest two goes, so the one whose age is the lag stays.
const MAX_POINTS: usize = 4096;
/// Tokens the bucket holds at most, in seconds of the limit: a short burst passes at once.
const BURST_S: f64 = 0.02;
/// After the lag falls back under half the bound, writes are admitted up to this many times the
/// capacity measured while it was past it, for `COOLDOWN` rate windows: a cluster that just
/// caught up is not handed at once what the clients queued meanwhile.
const RECOVERY: f64 = 1.25;
const COOLDOWN: u64 = 2;
/// The bucket while cooling down, in seconds of the limit.
const COOLDOWN_BURST_S: f64 = 0.25;

impl Ratekeeper {
    pub fn new(options: AdmissionOptions) -> Ratekeeper {
        Ratekeeper {
            options,
            log: VecDeque::new(),
            ust: VecDeque::new(),
            tokens: 0.0,
            bucket_at_ms: 0,
            capacity: 0.0,
            engaged_until_ms: 0,
        }
    }

    pub fn options(&self) -> &AdmissionOptions {
        &self.options
    }

    /// The log end known at `at_ms` (from an append's ts or a node's status). Only a rise is
    /// recorded; times never go back.
    pub fn log_end(&mut self, at_ms: u64, log_next: u64) {
        let Some(&(last_at, last_next)) = self.log.back() else {
            self.log.push_back((at_ms, log_next));
            return;
        };
        if log_next <= last_next {
            return;
        }
        let at_ms = at_ms.max(last_at);
        if at_ms - last_at < MERGE_MS && self.log.len() > 1 {
            self.log.back_mut().expect("not empty").1 = log_next;
        } else {
            self.log.push_back((at_ms, log_next));
        }
        if self.log.len() > MAX_POINTS {
            // The first two points are the last visible one and the first not visible (whose
            // age is the lag): a later one goes.
            self.log.remove(2);
        }
    }

    /// A UST reading at `at_ms`; it never goes back.
    pub fn ust_at(&mut self, at_ms: u64, ust: u64) {
        let (at_ms, ust) = match self.ust.back() {
            Some(&(last_at, last_ust)) => (at_ms.max(last_at), ust.max(last_ust)),
            None => (at_ms, ust),
        };
        self.ust.push_back((at_ms, ust));
        let start = at_ms.saturating_sub(self.options.rate_window_ms);
        while self.ust.len() > 2 && self.ust[1].0 <= start {
            self.ust.pop_front();
        }
        if self.ust.len() > MAX_POINTS {
            self.ust.remove(1);
        }
        // Log points fully visible go, but for the last of them.
        while self.log.len() > 1 && self.log[1].1 <= ust.saturating_add(1) {
            self.log.pop_front();
        }
        self.engage(at_ms);
    }

    /// Notes, when the lag is past half the bound, the apply rate as the capacity, and starts
    /// the cooldown.
    fn engage(&mut self, now_ms: u64) {
        if self.options.enabled && self.lag_ms(now_ms) > self.options.max_lag_ms / 2 {
            self.capacity = self.apply_rate();
            self.engaged_until_ms = now_ms + COOLDOWN * self.options.rate_window_ms;
        }
    }

    /// Takes in a sample: its log end and its UST.
    pub fn observe(&mut self, sample: Sample) {
        self.log_end(sample.at_ms, sample.log_next);
        self.ust_at(sample.at_ms, sample.ust);
    }

    fn current_ust(&self) -> u64 {
        self.ust.back().map_or(0, |&(_, u)| u)
    }

    /// How long, at `now_ms`, the oldest record not yet visible has been in the log: 0 when
    /// every record known is visible.
    pub fn lag_ms(&self, now_ms: u64) -> u64 {
        if self.ust.is_empty() {
            // No node has told its UST yet (none known, or none coordinates): nothing to go by.
            return 0;
        }
        let visible_to = self.current_ust().saturating_add(1);
        self.log
            .iter()
            .find(|&&(_, next)| next > visible_to)
            .map_or(0, |&(at, _)| now_ms.saturating_sub(at))
    }

    /// Records per second by which the UST moved over the window (0 with fewer than two
    /// readings).
    pub fn apply_rate(&self) -> f64 {
        let (Some(&(first_at, first)), Some(&(last_at, last))) =
            (self.ust.front(), self.ust.back())
        else {
            return 0.0;
        };
        let span_ms = last_at.saturating_sub(first_at);
        if span_ms == 0 {
            return 0.0;
        }
        (last - first) as f64 * 1000.0 / span_ms as f64
    }

    /// Records in the log that a read at the UST does not see.
    pub fn backlog(&self) -> u64 {
        let log_next = self.log.back().map_or(0, |&(_, n)| n);
        log_next.saturating_sub(self.current_ust().saturating_add(1))
    }

    /// Writes per second admitted at `now_ms`, `None` for no limit.
    pub fn limit(&self, now_ms: u64) -> Option<f64> {
        if !self.options.enabled {
            return None;
        }
        let half = self.options.max_lag_ms / 2;
        let lag = self.lag_ms(now_ms);
        if lag <= half {
            // Cooling down only while records wait to be seen: with none, the writes come no
            // faster than the cluster applies them (a trickle after a stall, whose capacity
            // measured while the UST stood still says nothing, is not held back).
            return (now_ms < self.engaged_until_ms && self.backlog() > 0)
                .then(|| self.capacity.max(self.apply_rate()) * RECOVERY);
        }
        let span = (self.options.max_lag_ms - half) as f64;
        let factor = ((self.options.max_lag_ms as f64 - lag as f64) / span).clamp(0.0, 1.0);
        Some(self.apply_rate() * factor)
    }

    /// Decides for one write arriving at `now_ms` (the clock of the samples).
    pub fn admit(&mut self, now_ms: u64) -> Admit {
        self.engage(now_ms);
        let Some(limit) = self.limit(now_ms) else {
            self.tokens = 0.0;
            self.bucket_at_ms = now_ms;
            return Admit::Now;
        };
        let retry_after_ms = self.options.max_lag_ms.max(1);
        if limit < 1e-3 {
            return Admit::Refused { retry_after_ms };
        }
        let burst = if self.lag_ms(now_ms) <= self.options.max_lag_ms / 2 {
            // Cooling down, with the cluster caught up: a burst of a quarter second passes.
            (limit * COOLDOWN_BURST_S).max(1.0)
        } else {
            (limit * BURST_S).max(1.0)
        };
        let elapsed_s = now_ms.saturating_sub(self.bucket_at_ms) as f64 / 1000.0;
        self.bucket_at_ms = self.bucket_at_ms.max(now_ms);
        self.tokens = (self.tokens + elapsed_s * limit).min(burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Admit::Now;
        }
        let wait_ms = ((1.0 - self.tokens) / limit * 1000.0).ceil() as u64;
        if wait_ms > self.options.max_queue_ms {
            // The limit follows the lag, which moves within the bound: the turn computed at
            // today's limit says little about when to come back.
            return Admit::Refused { retry_after_ms };
        }
        self.tokens -= 1.0;
        Admit::After { wait_ms }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keeper(max_lag_ms: u64) -> Ratekeeper {
        Ratekeeper::new(AdmissionOptions {
            max_lag_ms,
            ..AdmissionOptions::default()
        })
    }

    fn sample(at_ms: u64, log_next: u64, ust: u64) -> Sample {
        Sample {
            at_ms,
            log_next,
            ust,
        }
    }

    #[test]
    fn after_a_stall_a_caught_up_cluster_takes_a_trickle_of_writes() {
        let mut k = keeper(500);
        // A record waits while the UST stands still (a node died): past half the bound, the
        // rate measured (nothing applied) becomes the cooldown's capacity.
        k.observe(sample(0, 2, 0));
        k.observe(sample(400, 2, 0));
        assert!(k.limit(400).is_some());
        // Every record is visible again: a write goes at once, though the cooldown runs.
        k.observe(sample(450, 2, 1));
        assert_eq!(k.backlog(), 0);
        assert_eq!(k.limit(460), None);
        assert_eq!(k.admit(460), Admit::Now);
        // A record not yet visible: the cooldown limits again.
        k.log_end(470, 3);
        assert!(
            k.limit(470).is_some(),
            "no limit with a backlog in the cooldown"
        );
    }

    #[test]
    fn lag_is_the_age_of_the_oldest_record_not_yet_visible() {
        let mut k = keeper(500);
        k.observe(sample(0, 1, 0));
        assert_eq!(k.lag_ms(0), 0, "an empty log has no lag");
        k.observe(sample(10, 11, 0));
        k.observe(sample(20, 21, 5));
        k.observe(sample(30, 31, 10));
        // Records up to ts 10 were visible at 30; ts 11.. arrived by 20.
        assert_eq!(k.lag_ms(30), 10);
        assert_eq!(k.lag_ms(45), 25, "the lag grows between samples");
        // An append between samples: the log end rises at 41, the UST covers all before it.
        k.log_end(41, 40);
        k.observe(sample(50, 31, 30));
        assert_eq!(k.lag_ms(50), 9, "ts 31.. arrived at 41");
        k.observe(sample(60, 40, 39));
        assert_eq!(k.lag_ms(60), 0, "everything is visible");
    }

    #[test]
    fn no_limit_under_half_the_bound_and_nothing_admitted_past_it() {
        let mut k = keeper(200);
        // The UST moves by 1 record per ms, the log by 2: the lag grows.
        for t in 0..=1000u64 {
            k.observe(sample(t, 2 * t + 1, t));
            if k.lag_ms(t) <= 100 {
                assert_eq!(k.limit(t), None, "at {t} with lag {}", k.lag_ms(t));
                assert_eq!(k.admit(t), Admit::Now);
            }
        }
        assert!(k.lag_ms(1000) > 200);
        assert_eq!(k.limit(1000), Some(0.0));
        assert!(matches!(k.admit(1000), Admit::Refused { .. }));
    }

    #[test]
    fn limited_admissions_follow_the_apply_rate() {
        let mut k = keeper(200);
        // Apply 1,000 records/s; the oldest unseen record is 150 ms old: factor 0.5.
        for t in 0..=1000u64 {
            let ust = t;
            let log_next = if t >= 150 { t + 151 } else { ust + 1 };
            k.observe(sample(t, log_next, ust));
        }
        let limit = k.limit(1000).expect("limited");
        assert!((limit - 500.0).abs() < 20.0, "limit {limit}");
        // Over one second of arrivals every ms (with the cluster moving on as before), `limit`
        // get in, plus the burst the bucket held (10) and the turns handed out ahead to the
        // queue (at most `max_queue_ms` of the limit).
        let mut admitted = 0;
        for t in 1001..2000u64 {
            k.observe(sample(t, t + 151, t));
            if !matches!(k.admit(t), Admit::Refused { .. }) {
                admitted += 1;
            }
        }
        assert!((490..=580).contains(&admitted), "admitted {admitted}");
    }

    #[test]
    fn without_a_ust_reading_nothing_is_limited() {
        // An api-server that knows no store node: its appends are all it sees.
        let mut k = keeper(200);
        for t in 0..2000u64 {
            k.log_end(t, t + 2);
            assert_eq!(k.admit(t), Admit::Now, "at {t}");
        }
        assert_eq!(k.lag_ms(2000), 0);
    }

    #[test]
    fn the_oldest_record_not_visible_survives_the_point_bound() {
        let mut k = keeper(500);
        k.observe(sample(0, 1, 0));
        for t in 1..=3 * MAX_POINTS as u64 {
            k.log_end(t * MERGE_MS, t + 1);
        }
        assert_eq!(
            k.lag_ms(10_000),
            10_000 - MERGE_MS,
            "the first unseen point is kept"
        );
    }

    #[test]
    fn disabled_admits_everything() {
        let mut k = Ratekeeper::new(AdmissionOptions {
            enabled: false,
            ..AdmissionOptions::default()
        });
        for t in 0..5000u64 {
            k.observe(sample(t, 10 * t + 1, 0));
        }
        assert_eq!(k.admit(5000), Admit::Now);
    }
}
