//! The webhook sink: batches of events POSTed as `application/cloudevents-batch+json`, signed
//! per the Standard Webhooks specification, retried with exponential backoff and jitter.
//!
//! - Signature: `webhook-signature: v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`,
//!   one per configured secret (space-separated), so a receiver can rotate secrets;
//!   `webhook-id` is the feed and the batch's first event id (the same on every retry, the
//!   receiver's dedupe key), `webhook-timestamp` the Unix seconds of the attempt.
//! - A 2xx acknowledges the batch. A 429 or 503 with `Retry-After` (seconds) waits that long
//!   (bounded by `backoff_max_ms`); other failures (a 3xx, since redirects are never followed; a
//!   4xx or 5xx; a timeout; a refused connection) back off exponentially with jitter.
//! - After `max_attempts` the batch is [`Delivery::Exhausted`]: the feed either keeps trying at
//!   the longest backoff (block, the default: order is kept) or moves the batch to its dead
//!   letters (see `sink::Sink`).

use std::time::Duration;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::event::{Event, BATCH_CONTENT_TYPE};
use crate::feed::WebhookSinkSpec;

/// Whether a batch got through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    Delivered,
    /// Every attempt of the budget failed; the last failure.
    Exhausted(String),
}

/// The key of a `whsec_<base64>` secret (the prefix is optional).
pub fn secret_key(secret: &str) -> Result<Vec<u8>, String> {
    let b64 = secret.strip_prefix("whsec_").unwrap_or(secret);
    let key = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| "a webhook secret is `whsec_` followed by base64".to_owned())?;
    if key.len() < 16 {
        return Err("a webhook secret's key has at least 16 bytes".to_owned());
    }
    Ok(key)
}

/// The `webhook-signature` header of `body` under every key.
pub fn sign(keys: &[Vec<u8>], msg_id: &str, timestamp: u64, body: &[u8]) -> String {
    keys.iter()
        .map(|key| {
            let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key");
            mac.update(msg_id.as_bytes());
            mac.update(b".");
            mac.update(timestamp.to_string().as_bytes());
            mac.update(b".");
            mac.update(body);
            format!(
                "v1,{}",
                base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether `signature` (a header of space-separated `v1,<base64>`) holds a valid signature of
/// `body` under one of `keys`: what a receiver checks.
pub fn verify(
    keys: &[Vec<u8>],
    msg_id: &str,
    timestamp: u64,
    body: &[u8],
    signature: &str,
) -> bool {
    signature.split(' ').any(|sig| {
        let Some(b64) = sig.strip_prefix("v1,") else {
            return false;
        };
        let Ok(given) = base64::engine::general_purpose::STANDARD.decode(b64) else {
            return false;
        };
        keys.iter().any(|key| {
            let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key");
            mac.update(msg_id.as_bytes());
            mac.update(b".");
            mac.update(timestamp.to_string().as_bytes());
            mac.update(b".");
            mac.update(body);
            mac.verify_slice(&given).is_ok()
        })
    })
}

/// The pause before attempt `attempt + 1` (0-based): `first · 2^attempt`, at most `max`, times a
/// jitter factor in [0.5, 1) from `unit` in [0, 1) (so retries of many feeds spread out).
pub fn backoff(attempt: u32, first: Duration, max: Duration, unit: f64) -> Duration {
    let exp = first.saturating_mul(1u32 << attempt.min(20)).min(max);
    exp.mul_f64(0.5 + unit.clamp(0.0, 1.0) / 2.0)
}

/// A `Retry-After` header in seconds (dates are not honoured: the backoff applies).
fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    let value = response.headers().get(reqwest::header::RETRY_AFTER)?;
    let secs: u64 = value.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(secs))
}

/// One feed's webhook endpoint.
#[derive(Debug)]
pub struct Webhook {
    spec: WebhookSinkSpec,
    keys: Vec<Vec<u8>>,
    client: reqwest::Client,
    feed: String,
    source: String,
}

impl Webhook {
    pub fn new(feed: &str, source: &str, spec: &WebhookSinkSpec) -> Result<Webhook, String> {
        let keys = spec
            .secrets
            .iter()
            .map(|s| secret_key(s))
            .collect::<Result<Vec<_>, _>>()?;
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_millis(spec.timeout_ms))
            .connect_timeout(Duration::from_millis(spec.timeout_ms.min(5_000)))
            .build()
            .map_err(|e| format!("webhook client: {e}"))?;
        Ok(Webhook {
            spec: spec.clone(),
            keys,
            client,
            feed: feed.to_owned(),
            source: source.to_owned(),
        })
    }

    pub fn spec(&self) -> &WebhookSinkSpec {
        &self.spec
    }

    /// The batch body.
    pub fn body(&self, events: &[Event]) -> Vec<u8> {
        let list: Vec<_> = events.iter().map(|e| e.to_json(&self.source)).collect();
        serde_json::to_vec(&list).expect("events serialize")
    }

    /// Sends one batch until it is acknowledged or `attempts` tries failed (`u32::MAX`: until
    /// it is acknowledged).
    pub async fn deliver(&self, events: &[Event], attempts: u32) -> Delivery {
        let Some(first) = events.first() else {
            return Delivery::Delivered;
        };
        let body = self.body(events);
        let msg_id = format!("{}-{}", self.feed, first.id());
        let first_pause = Duration::from_millis(self.spec.backoff_first_ms);
        let max_pause = Duration::from_millis(self.spec.backoff_max_ms);
        let mut last = String::new();
        for attempt in 0..attempts {
            let timestamp = crate::follow::now_ms() / 1000;
            let signature = sign(&self.keys, &msg_id, timestamp, &body);
            let sent = self
                .client
                .post(&self.spec.url)
                .header(reqwest::header::CONTENT_TYPE, BATCH_CONTENT_TYPE)
                .header("webhook-id", &msg_id)
                .header("webhook-timestamp", timestamp.to_string())
                .header("webhook-signature", signature)
                .body(body.clone())
                .send()
                .await;
            let mut pause = backoff(attempt, first_pause, max_pause, rand::random::<f64>());
            match sent {
                Ok(r) if r.status().is_success() => return Delivery::Delivered,
                Ok(r) => {
                    if let Some(wait) = retry_after(&r) {
                        pause = wait.min(max_pause);
                    }
                    last = format!("the endpoint answered {}", r.status());
                }
                Err(e) => last = format!("the request failed: {e}"),
            }
            tracing::debug!(feed = %self.feed, attempt, %last, "webhook delivery failed");
            if attempt + 1 < attempts {
                tokio::time::sleep(pause).await;
            }
        }
        Delivery::Exhausted(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks specification.
    #[test]
    fn signatures_match_the_specification_example() {
        let key = secret_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        let sig = sign(
            std::slice::from_ref(&key),
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            body,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert!(verify(
            std::slice::from_ref(&key),
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            body,
            &sig
        ));
        assert!(!verify(
            &[key],
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265331,
            body,
            &sig
        ));
    }

    #[test]
    fn every_secret_signs_so_that_a_receiver_can_rotate() {
        let old = secret_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let new = vec![7u8; 32];
        let sig = sign(&[old.clone(), new.clone()], "m", 1, b"{}");
        assert_eq!(sig.split(' ').count(), 2);
        assert!(verify(&[new], "m", 1, b"{}", &sig));
        assert!(verify(&[old], "m", 1, b"{}", &sig));
        assert!(!verify(&[vec![8u8; 32]], "m", 1, b"{}", &sig));
    }

    #[test]
    fn bad_secrets_are_refused() {
        assert!(secret_key("whsec_!!!").is_err());
        assert!(secret_key("whsec_c2hvcnQ=").is_err(), "5 bytes");
    }

    #[test]
    fn backoff_doubles_to_its_ceiling_with_jitter() {
        let (first, max) = (Duration::from_millis(100), Duration::from_secs(2));
        assert_eq!(backoff(0, first, max, 0.0), Duration::from_millis(50));
        assert_eq!(backoff(3, first, max, 0.0), Duration::from_millis(400));
        assert_eq!(backoff(30, first, max, 0.0), Duration::from_secs(1));
        assert!(backoff(3, first, max, 0.999) < Duration::from_millis(800));
    }
}
