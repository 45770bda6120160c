//! The api-server: Causeway's HTTP document API (DESIGN.md §3, §8, §12, §13). It authenticates
//! and validates every request, turns writes into one `Transaction` record each (a wall-clock
//! millis set once here) appended to the transaction log, and answers their commit ts; it runs
//! reads on a coordinating store node of the routing configuration (learnt from the config
//! manager) and answers their read timestamp. Bad input gets a 4xx `application/problem+json`
//! and never reaches the log. The endpoints, headers and error types are in `API.md`.
//!
//! # Layout
//! - [`options`]: [`Options`], [`Limits`] and [`Timeouts`], with documented defaults.
//! - [`error`]: [`Error`], why the service could not start or keep serving.
//! - [`problem`]: [`Problem`], the error answer of a request, with a stable `type` per kind.
//! - [`auth`]: bearer tokens from a file (plain or SHA-256), reloaded when it changes,
//!   per-collection permissions, constant-time comparison.
//! - [`rate`]: the request rate of each token (a token bucket per token).
//! - [`tls`]: HTTPS: the certificate, reloaded when its files change.
//! - `server`: the accept loop (connection cap, TLS, header timeout, graceful stop), and
//!   problem+json bodies for hyper's own answers to unparsable requests.
//! - [`body`]: reading bodies within the limits: content type, size, UTF-8, depth, then JSON.
//! - [`body_checks`]: the pure checks `body` makes on the media type and the JSON text.
//! - [`headers`]: the `Causeway-*` headers.
//! - [`admission`]: admission control of writes: the cluster's progress sampled, the gate.
//! - `visible`: `?wait=visible`: every store node of the routing configurations is asked.
//! - [`changes`]: the server-sent events of committed changes (`/v1/changes`).
//! - [`routes`]: the handlers, request and answer bodies, and the metrics/concurrency middleware.
//! - [`openapi`]: the OpenAPI 3 document served at `/v1/openapi.json`.
//! - [`metrics`]: the Prometheus metrics (`causeway_api_*`).
//! - [`service`]: [`Service`] (bind, run) and the clonable [`Handle`].

pub mod admission;
pub mod auth;
pub mod body;
pub mod body_checks;
pub mod changes;
pub mod error;
pub mod headers;
pub mod metrics;
pub mod openapi;
pub mod options;
pub mod outcome;
pub mod problem;
pub mod rate;
pub mod routes;
mod server;
pub mod service;
pub mod tls;
mod visible;

pub use error::Error;
pub use options::{ChangesOptions, HttpsOptions, Limits, Options, Timeouts};
pub use problem::{Kind, Problem};
pub use service::{Handle, Service};
