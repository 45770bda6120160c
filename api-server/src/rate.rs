//! The request rate of each token: a token bucket per token name (`token_requests_per_s`,
//! `token_burst`). A request takes one unit from its token's bucket; the bucket refills at the
//! rate, up to the burst; an empty bucket answers 429 `rate_limited` with the seconds until a
//! unit is back. Only authenticated requests have a bucket, so there are at most as many buckets
//! as token names the tokens file has had.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The buckets of every token of one api-server.
#[derive(Debug)]
pub struct RateLimiter {
    /// Units per second; 0: no limit.
    rate: f64,
    /// The bucket's size.
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    units: f64,
    at: Instant,
}

impl RateLimiter {
    /// `requests_per_s` per token (0: none), `burst` requests at once (0: one second's worth).
    pub fn new(requests_per_s: u32, burst: u32) -> RateLimiter {
        let rate = f64::from(requests_per_s);
        let burst = if burst == 0 { rate } else { f64::from(burst) };
        RateLimiter {
            rate,
            burst: burst.max(1.0),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one request of `token`'s rate at `now`: `Err(wait)` when its bucket is empty,
    /// with how long until it holds one request again.
    pub fn take(&self, token: &str, now: Instant) -> Result<(), Duration> {
        if self.rate == 0.0 {
            return Ok(());
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let bucket = buckets.entry(token.to_owned()).or_insert(Bucket {
            units: self.burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.units = (bucket.units + elapsed * self.rate).min(self.burst);
        bucket.at = now.max(bucket.at);
        if bucket.units >= 1.0 {
            bucket.units -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.units) / self.rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_gets_its_burst_then_its_rate_and_tokens_do_not_share_a_bucket() {
        let limiter = RateLimiter::new(10, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limiter.take("a", t0).is_ok());
        }
        let wait = limiter.take("a", t0).unwrap_err();
        assert!(wait > Duration::from_millis(90) && wait <= Duration::from_millis(100));
        // Another token has its own bucket.
        assert!(limiter.take("b", t0).is_ok());
        // 100 ms later one more request of "a" goes, and only one.
        let t1 = t0 + Duration::from_millis(100);
        assert!(limiter.take("a", t1).is_ok());
        assert!(limiter.take("a", t1).is_err());
        // A long pause refills the bucket to the burst, not beyond.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(limiter.take("a", t2).is_ok());
        }
        assert!(limiter.take("a", t2).is_err());
    }

    #[test]
    fn rate_zero_is_no_limit_and_burst_zero_is_one_second() {
        let none = RateLimiter::new(0, 0);
        let t0 = Instant::now();
        assert!((0..10_000).all(|_| none.take("a", t0).is_ok()));
        let second = RateLimiter::new(5, 0);
        assert_eq!((0..10).filter(|_| second.take("a", t0).is_ok()).count(), 5);
    }
}
