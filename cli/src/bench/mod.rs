//! `causeway bench`: HTTP workloads against an api-server, and a raw log-append baseline.
//!
//! Closed loop: `--concurrency` workers each send a request when the previous one is answered;
//! latency is the request's own time. Open loop (`--rate`): requests are scheduled at fixed
//! intended times, at most `--concurrency` in flight; each latency is counted from the INTENDED
//! send time, so a stall (of the server or of this client) shows up in the percentiles instead of
//! silently lowering the rate (no coordinated omission).
//!
//! Visibility lag is sampled: after some acknowledged writes (at most a few probes at once), a
//! probe reads the written document with `Causeway-After: <commit ts>` until it answers, and
//! records the time from the acknowledgement.
//!
//! Everything is bounded: the duration, the number of requests (`--requests`), the key count,
//! the concurrency, every request's timeout; by default only loopback targets are accepted.
//!
//! # Layout
//! - [`zipf`]: uniform and scrambled zipfian key choosers.
//! - [`report`]: latency histograms and the report.
//! - [`workload`]: the workloads and their HTTP requests.

pub mod report;
pub mod workload;
pub mod zipf;

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use causeway_txlog::{LogOptions, TxLog};
use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::sync::Semaphore;

use report::{Latencies, Report, Step, Sustained};
use workload::{Http, Op, Outcome, Workload};
use zipf::KeyChooser;

/// Longest run accepted.
const MAX_DURATION_S: u64 = 3600;
/// Most requests in flight accepted.
const MAX_CONCURRENCY: usize = 4096;
/// Visibility probes in flight at most; a write is sampled only when one is free.
const MAX_PROBES: usize = 4;
/// One write in this many is considered for a visibility probe.
const PROBE_EVERY: u64 = 16;
/// How long a closed-loop worker pauses after a 429.
const THROTTLED_PAUSE: Duration = Duration::from_millis(50);
/// How long the load phase may take.
const LOAD_DEADLINE: Duration = Duration::from_secs(1800);

/// Flags of `causeway bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The api-server, e.g. http://127.0.0.1:7300.
    #[arg(long, required_unless_present = "raw_log")]
    pub url: Option<String>,
    /// A bearer token with read and write permission on the bench collections.
    #[arg(long, env = "CAUSEWAY_TOKEN", required_unless_present = "raw_log")]
    pub token: Option<String>,
    #[arg(long, value_enum, default_value_t = Workload::Write)]
    pub workload: Workload,
    /// Seconds of measurement (after the load phase).
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Workers (closed loop) or most requests in flight (open loop).
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Open loop: requests per second, on a fixed schedule.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Stop after this many requests, even before the duration.
    #[arg(long)]
    pub requests: Option<u64>,
    /// Distinct documents (or accounts, for `transfer`).
    #[arg(long, default_value_t = 10_000)]
    pub keys: u64,
    /// Zipfian exponent of the key choice, in [0, 1); 0 is uniform.
    #[arg(long, default_value_t = 0.99)]
    pub zipf: f64,
    /// Size of each document's JSON.
    #[arg(long, default_value_t = 256)]
    pub doc_bytes: usize,
    /// The collection the documents go to (`transfer` uses `<collection>_accounts`).
    #[arg(long, default_value = "bench")]
    pub collection: String,
    /// Skip writing every key before a workload that reads.
    #[arg(long)]
    pub no_load: bool,
    /// Documents per transaction in the load phase (1: one PUT each). At most 256, the
    /// api-server's default bound on mutations per transaction.
    #[arg(long, default_value_t = 1)]
    pub load_batch: u64,
    /// Only load the keys, then stop (no measured phase).
    #[arg(long)]
    pub load_only: bool,
    /// Accept a target that is not on the loopback interface.
    #[arg(long)]
    pub allow_remote: bool,
    /// Instead of HTTP: append records of --doc-bytes straight to this log (LogOptions JSON,
    /// e.g. '{"backend":"embedded","dir":"/tmp/rawlog"}'), the baseline of the write path.
    #[arg(long, conflicts_with_all = ["url", "rate"])]
    pub raw_log: Option<String>,
    /// Seed of the key choice (default: random).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// After the run (closed loop), search the sustained rate: the highest open-loop rate at
    /// which write p99 stays under --max-p99-ms and visibility lag p99 under
    /// --max-lag-p99-ms, with no error and no 429, over a step of --step-duration seconds.
    #[arg(long, conflicts_with_all = ["raw_log", "rate"])]
    pub sustained: bool,
    #[arg(long, default_value_t = 50.0)]
    pub max_p99_ms: f64,
    #[arg(long, default_value_t = 20.0)]
    pub max_lag_p99_ms: f64,
    #[arg(long, default_value_t = 10)]
    pub step_duration: u64,
    /// Steps of the search at most.
    #[arg(long, default_value_t = 6)]
    pub steps: u32,
}

impl Args {
    fn validate(&self) -> Result<()> {
        ensure!(
            (1..=MAX_DURATION_S).contains(&self.duration),
            "--duration must be in 1..={MAX_DURATION_S} seconds"
        );
        ensure!(
            (1..=MAX_CONCURRENCY).contains(&self.concurrency),
            "--concurrency must be in 1..={MAX_CONCURRENCY}"
        );
        ensure!(
            (16..=256 << 10).contains(&self.doc_bytes),
            "--doc-bytes must be in 16..=262144"
        );
        ensure!(
            (1..=256).contains(&self.load_batch),
            "--load-batch must be in 1..=256"
        );
        ensure!(
            (1..=MAX_DURATION_S).contains(&self.step_duration) && (1..=32).contains(&self.steps),
            "--step-duration must be in 1..={MAX_DURATION_S} and --steps in 1..=32"
        );
        ensure!(
            self.max_p99_ms > 0.0 && self.max_lag_p99_ms > 0.0,
            "--max-p99-ms and --max-lag-p99-ms must be positive"
        );
        if let Some(rate) = self.rate {
            ensure!(
                rate.is_finite() && rate > 0.0 && rate <= 1_000_000.0,
                "--rate must be in (0, 1000000]"
            );
        }
        if let Some(url) = &self.url {
            let parsed = reqwest::Url::parse(url).with_context(|| format!("bad --url {url}"))?;
            ensure!(parsed.scheme() == "http", "--url must be http:// (no TLS)");
            let loopback = match parsed.host_str() {
                Some("localhost") => true,
                Some(host) => host
                    .trim_matches(['[', ']'])
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback()),
                None => false,
            };
            ensure!(
                loopback || self.allow_remote,
                "{url} is not a loopback address: pass --allow-remote to benchmark it"
            );
        }
        Ok(())
    }
}

/// Shared between the workers: counters for the progress line and the recorded outcomes.
#[derive(Debug, Default)]
struct Recorder {
    ok: AtomicU64,
    errors: AtomicU64,
    inner: Mutex<Recorded>,
}

#[derive(Debug, Default)]
struct Recorded {
    all: Latencies,
    by_op: BTreeMap<&'static str, Latencies>,
    errors: BTreeMap<String, u64>,
    lag: Latencies,
    writes: u64,
    reads: u64,
    /// Writes refused with 429 by admission control (not errors: they changed nothing).
    throttled: u64,
}

impl Recorder {
    fn record(&self, op: &'static str, is_write: bool, latency: Duration, outcome: &Outcome) {
        let mut r = self.inner.lock().expect("recorder poisoned");
        match outcome {
            Outcome::Ok { .. } => {
                self.ok.fetch_add(1, Ordering::Relaxed);
                r.all.record(latency);
                r.by_op.entry(op).or_default().record(latency);
                if is_write {
                    r.writes += 1;
                } else {
                    r.reads += 1;
                }
            }
            Outcome::Throttled => r.throttled += 1,
            Outcome::Error(kind) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                *r.errors.entry(format!("{op}: {kind}")).or_default() += 1;
            }
        }
    }

    fn record_lag(&self, lag: Duration) {
        self.inner
            .lock()
            .expect("recorder poisoned")
            .lag
            .record(lag);
    }

    fn error(&self, kind: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        *self
            .inner
            .lock()
            .expect("recorder poisoned")
            .errors
            .entry(kind)
            .or_default() += 1;
    }
}

/// Prints a progress line on stderr every second (every five when stderr is not a terminal)
/// until `done`.
fn progress(
    label: String,
    recorder: Arc<Recorder>,
    total: Duration,
    done: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let tty = std::io::stderr().is_terminal();
        let every = Duration::from_secs(if tty { 1 } else { 5 });
        let start = Instant::now();
        let mut last = (start, 0u64);
        let mut done = done;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = done.wait_for(|d| *d) => break,
            }
            let now = Instant::now();
            let ok = recorder.ok.load(Ordering::Relaxed);
            let errors = recorder.errors.load(Ordering::Relaxed);
            let rate = (ok - last.1) as f64 / (now - last.0).as_secs_f64();
            last = (now, ok);
            let elapsed = start.elapsed().min(total);
            let filled = ((elapsed.as_secs_f64() / total.as_secs_f64()) * 30.0) as usize;
            let bar = format!("{}{}", "#".repeat(filled), ".".repeat(30 - filled.min(30)));
            let text = format!(
                "{label} [{bar}] {:>4.0}/{:.0} s  {ok} ok  {rate:.0}/s  {errors} errors",
                elapsed.as_secs_f64(),
                total.as_secs_f64()
            );
            if tty {
                eprint!("\r{text}   ");
            } else {
                eprintln!("{text}");
            }
        }
        if tty {
            eprintln!();
        }
    })
}

/// Runs `causeway bench`.
pub async fn run(args: Args) -> Result<()> {
    args.validate()?;
    let report = match &args.raw_log {
        Some(log) => raw_log(&args, log).await?,
        None => http(&args).await?,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report::render(&report));
    }
    Ok(())
}

/// The deadline and request budget of the measured phase.
#[derive(Debug, Clone, Copy)]
struct Budget {
    until: Instant,
    requests: u64,
}

impl Budget {
    fn new(args: &Args) -> Budget {
        Budget {
            until: Instant::now() + Duration::from_secs(args.duration),
            requests: args.requests.unwrap_or(u64::MAX),
        }
    }
}

async fn http(args: &Args) -> Result<Report> {
    let url = args.url.clone().context("--url is required")?;
    let token = args.token.clone().context("--token is required")?;
    let keys = KeyChooser::new(args.keys, args.zipf).map_err(anyhow::Error::msg)?;
    let client = Http::new(&url, &token, args)?;
    client
        .check()
        .await
        .with_context(|| format!("{url} does not answer as a Causeway api-server"))?;

    let mut loaded = None;
    if args.workload.loads() && !args.no_load {
        let started = Instant::now();
        let last_ts = load(&client, args).await?;
        // Reads without a causal token see the UST: wait until every loaded document is
        // visible, so the measured reads do not count 404s for documents still in flight.
        let probe = workload::Probe {
            account: args.workload.accounts(),
            key: 0,
        };
        // A large load may take a while to apply: probe again until the load deadline.
        let until = started + LOAD_DEADLINE;
        loop {
            match client.probe_visible(&probe, last_ts).await {
                Ok(()) => break,
                Err(kind) if Instant::now() >= until => {
                    bail!("the loaded documents did not become visible: {kind}")
                }
                Err(_) => {}
            }
        }
        loaded = Some((args.keys, started.elapsed().as_secs_f64()));
    }

    let seed = args.seed.unwrap_or_else(rand::random);
    let budget = match args.load_only {
        true => Budget {
            until: Instant::now(),
            requests: 0,
        },
        false => Budget::new(args),
    };
    let ctx = Ctx::new(&client, &keys, args.workload);
    let mut report = phase(&ctx, args, args.rate, budget, seed).await?;
    report.loaded_docs = loaded.map(|l| l.0);
    report.load_s = loaded.map(|l| l.1);
    if args.sustained && !args.load_only {
        report.sustained = Some(sustained(&ctx, args, &report, seed).await?);
    }
    report.invariant = match args.workload {
        Workload::Transfer => Some(match client.bank_total(args.keys).await {
            Ok((0, accounts, _)) => format!("ok: {accounts} accounts sum to 0"),
            Ok((sum, accounts, _)) => format!("VIOLATED: {accounts} accounts sum to {sum}"),
            Err(e) => format!("not checked: {e:#}"),
        }),
        Workload::TransferIf | Workload::Withdraw => {
            let opening = workload::OPENING_BALANCE * args.keys as i64;
            let conserved = args.workload == Workload::TransferIf;
            Some(match client.bank_total(args.keys).await {
                Ok((sum, accounts, lowest)) if lowest < 0 => {
                    format!("VIOLATED: {accounts} accounts, one at {lowest}, sum {sum}")
                }
                Ok((sum, accounts, _)) if conserved && sum != opening => {
                    format!("VIOLATED: {accounts} accounts sum to {sum}, not {opening}")
                }
                Ok((sum, accounts, lowest)) => {
                    format!("ok: {accounts} accounts, none below 0 (lowest {lowest}), sum {sum}")
                }
                Err(e) => format!("not checked: {e:#}"),
            })
        }
        _ => None,
    };
    Ok(report)
}

/// One measured run: closed loop (`rate` None) or open loop at `rate`, within `budget`.
async fn phase(
    ctx: &Ctx,
    args: &Args,
    rate: Option<f64>,
    budget: Budget,
    seed: u64,
) -> Result<Report> {
    let ctx = ctx.fresh();
    let recorder = ctx.recorder.clone();
    let (done_tx, done_rx) = tokio::sync::watch::channel(false);
    let length = budget.until.saturating_duration_since(Instant::now());
    let label = match rate {
        Some(rate) => format!("{} at {rate:.0}/s", args.workload.name()),
        None => args.workload.name().to_string(),
    };
    let bar = progress(label, recorder.clone(), length, done_rx);
    let started = Instant::now();
    let sent = Arc::new(AtomicU64::new(0));
    let mut intended = None;
    match rate {
        None => {
            let workers: Vec<_> = (0..args.concurrency)
                .map(|i| {
                    let ctx = ctx.clone();
                    let sent = sent.clone();
                    let mut rng = StdRng::seed_from_u64(seed.wrapping_add(i as u64));
                    tokio::spawn(async move {
                        while Instant::now() < budget.until
                            && sent.fetch_add(1, Ordering::Relaxed) < budget.requests
                        {
                            let op = ctx.workload.next_op(&ctx.keys, &mut rng);
                            let start = Instant::now();
                            if ctx.execute(op, start).await == Outcome::Throttled {
                                // A refused write comes back at once: a closed-loop client that
                                // sent again at once would only spin.
                                tokio::time::sleep(THROTTLED_PAUSE).await;
                            }
                        }
                    })
                })
                .collect();
            for w in workers {
                w.await?;
            }
        }
        Some(rate) => {
            let interval = Duration::from_secs_f64(1.0 / rate);
            let in_flight = Arc::new(Semaphore::new(args.concurrency));
            let mut rng = StdRng::seed_from_u64(seed);
            let mut tasks = tokio::task::JoinSet::new();
            let mut n: u64 = 0;
            loop {
                let at = started + interval.mul_f64(n as f64);
                if at >= budget.until || n >= budget.requests {
                    break;
                }
                tokio::time::sleep_until(at.into()).await;
                // Waiting here for a free slot delays the send, not the intended time: the
                // wait is part of the latency.
                let permit = in_flight.clone().acquire_owned().await?;
                if Instant::now() >= budget.until {
                    break;
                }
                let op = ctx.workload.next_op(&ctx.keys, &mut rng);
                let ctx = ctx.clone();
                tasks.spawn(async move {
                    ctx.execute(op, at).await;
                    drop(permit);
                });
                n += 1;
                sent.store(n, Ordering::Relaxed);
                while tasks.try_join_next().is_some() {}
            }
            while tasks.join_next().await.is_some() {}
            let scheduled = (length.as_secs_f64() * rate) as u64;
            intended = Some(scheduled.min(budget.requests));
        }
    }
    let duration = started.elapsed();
    // Let the visibility probes still running finish (each is bounded).
    let _ = tokio::time::timeout(
        workload::PROBE_DEADLINE,
        ctx.probes.acquire_many(MAX_PROBES as u32),
    )
    .await;
    let _ = done_tx.send(true);
    let _ = bar.await;

    let r = recorder.inner.lock().expect("recorder poisoned");
    let secs = duration.as_secs_f64();
    Ok(Report {
        target: ctx.client.base().to_owned(),
        workload: args.workload.name().into(),
        mode: if rate.is_some() { "open" } else { "closed" }.into(),
        concurrency: args.concurrency,
        rate,
        keys: args.keys,
        zipf: args.zipf,
        doc_bytes: args.doc_bytes,
        duration_s: secs,
        ok: recorder.ok.load(Ordering::Relaxed),
        errors: recorder.errors.load(Ordering::Relaxed),
        throttled: r.throttled,
        throughput_ops_s: recorder.ok.load(Ordering::Relaxed) as f64 / secs,
        writes_per_s: r.writes as f64 / secs,
        reads_per_s: r.reads as f64 / secs,
        latency: r.all.summary(),
        by_op: r
            .by_op
            .iter()
            .filter_map(|(op, h)| h.summary().map(|s| (op.to_string(), s)))
            .collect(),
        errors_by_kind: r.errors.clone(),
        visibility_lag: r.lag.summary(),
        intended,
        sent: rate.map(|_| sent.load(Ordering::Relaxed)),
        loaded_docs: None,
        load_s: None,
        invariant: None,
        sustained: None,
    })
}

/// The sustained rate (module docs): open-loop steps of `--step-duration` seconds, the first at
/// 80 % of the closed loop's rate, then bisecting between the highest rate that held the bounds
/// and the lowest that did not. Each step starts once the previous one's writes are visible.
async fn sustained(ctx: &Ctx, args: &Args, closed: &Report, seed: u64) -> Result<Sustained> {
    let closed_rate = closed.throughput_ops_s.max(1.0);
    let (mut good, mut bad) = (0.0f64, closed_rate * 1.25);
    let mut rate = closed_rate * 0.8;
    let mut steps = Vec::new();
    for i in 0..args.steps {
        settle(ctx).await;
        let budget = Budget {
            until: Instant::now() + Duration::from_secs(args.step_duration),
            requests: u64::MAX,
        };
        let report = phase(
            ctx,
            args,
            Some(rate),
            budget,
            seed.wrapping_add(u64::from(i) + 1),
        )
        .await?;
        let step = Step::of(&report, rate, args.max_p99_ms, args.max_lag_p99_ms);
        if step.held {
            good = good.max(rate);
        } else {
            bad = bad.min(rate);
        }
        steps.push(step);
        rate = if good == 0.0 {
            bad / 2.0
        } else {
            (good + bad) / 2.0
        };
        if bad - good < closed_rate * 0.05 {
            break;
        }
    }
    let best = steps
        .iter()
        .filter(|s| s.held)
        .max_by(|a, b| a.rate.total_cmp(&b.rate))
        .cloned();
    Ok(Sustained {
        max_p99_ms: args.max_p99_ms,
        max_lag_p99_ms: args.max_lag_p99_ms,
        rate: best.as_ref().map(|s| s.rate),
        ops_per_s: best.as_ref().map(|s| s.ops_per_s),
        steps,
    })
}

/// Waits (bounded) until a fresh write is visible: the previous run's backlog is applied.
async fn settle(ctx: &Ctx) {
    let mut rng = StdRng::seed_from_u64(0);
    for _ in 0..100 {
        let op = ctx.workload.next_op(&ctx.keys, &mut rng);
        let Some(probe) = op.probe_key() else {
            continue;
        };
        if let Outcome::Ok { ts: Some(ts) } = ctx.client.send(&op).await {
            let until = Instant::now() + Duration::from_secs(60);
            while Instant::now() < until && ctx.client.probe_visible(&probe, ts).await.is_err() {}
            return;
        }
    }
}

/// What every request of a run shares.
#[derive(Clone)]
struct Ctx {
    client: Http,
    keys: KeyChooser,
    workload: Workload,
    recorder: Arc<Recorder>,
    probes: Arc<Semaphore>,
    /// Acknowledged writes so far (which of them to probe).
    writes: Arc<AtomicU64>,
}

impl Ctx {
    fn new(client: &Http, keys: &KeyChooser, workload: Workload) -> Ctx {
        Ctx {
            client: client.clone(),
            keys: keys.clone(),
            workload,
            recorder: Arc::new(Recorder::default()),
            probes: Arc::new(Semaphore::new(MAX_PROBES)),
            writes: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The same, with nothing recorded yet (for the next run).
    fn fresh(&self) -> Ctx {
        Ctx::new(&self.client, &self.keys, self.workload)
    }

    /// Sends `op` and records its latency from `intended`; answers what it came to.
    async fn execute(&self, op: Op, intended: Instant) -> Outcome {
        let outcome = self.client.send(&op).await;
        let acked = Instant::now();
        self.recorder
            .record(op.name(), op.is_write(), acked - intended, &outcome);
        if let (Outcome::Ok { ts: Some(ts) }, Some(probe)) = (&outcome, op.probe_key()) {
            let n = self.writes.fetch_add(1, Ordering::Relaxed);
            if n.is_multiple_of(PROBE_EVERY) {
                if let Ok(permit) = self.probes.clone().try_acquire_owned() {
                    let client = self.client.clone();
                    let recorder = self.recorder.clone();
                    let ts = *ts;
                    tokio::spawn(async move {
                        match client.probe_visible(&probe, ts).await {
                            Ok(()) => recorder.record_lag(acked.elapsed()),
                            Err(kind) => recorder.error(format!("visibility probe: {kind}")),
                        }
                        drop(permit);
                    });
                }
            }
        }
        outcome
    }
}

/// Writes every key once, `concurrency` at a time, so reads find documents; answers the highest
/// commit ts of the load.
async fn load(client: &Http, args: &Args) -> Result<u64> {
    let next = Arc::new(AtomicU64::new(0));
    let last_ts = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + LOAD_DEADLINE;
    let workers: Vec<_> = (0..args.concurrency)
        .map(|_| {
            let client = client.clone();
            let next = next.clone();
            let failures = failures.clone();
            let last_ts = last_ts.clone();
            let workload = args.workload;
            let batch = args.load_batch;
            tokio::spawn(async move {
                loop {
                    let key = next.fetch_add(batch, Ordering::Relaxed);
                    if key >= client.keys() || Instant::now() >= deadline {
                        return;
                    }
                    let op = workload.load_op(key, batch.min(client.keys() - key));
                    // A 429 changed nothing: the same batch again after a pause, until the
                    // load deadline.
                    loop {
                        match client.send(&op).await {
                            Outcome::Ok { ts } => {
                                last_ts.fetch_max(ts.unwrap_or(0), Ordering::Relaxed);
                            }
                            Outcome::Throttled if Instant::now() < deadline => {
                                tokio::time::sleep(THROTTLED_PAUSE).await;
                                continue;
                            }
                            Outcome::Throttled | Outcome::Error(_) => {
                                failures.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        break;
                    }
                }
            })
        })
        .collect();
    let tty = std::io::stderr().is_terminal();
    if tty {
        eprint!("loading {} documents...", args.keys);
    }
    for w in workers {
        w.await?;
    }
    if tty {
        eprintln!(" done");
    }
    let failed = failures.load(Ordering::Relaxed);
    if failed > 0 {
        bail!("the load phase had {failed} failed writes");
    }
    if Instant::now() >= deadline {
        bail!("the load phase did not finish within {LOAD_DEADLINE:?}");
    }
    Ok(last_ts.load(Ordering::Relaxed))
}

/// The baseline: records of `--doc-bytes` appended straight to a log, closed loop.
async fn raw_log(args: &Args, log_json: &str) -> Result<Report> {
    let options: LogOptions =
        serde_json::from_str(log_json).context("--raw-log is not LogOptions JSON")?;
    let target = match &options {
        LogOptions::Embedded(o) => format!("raw embedded log in {}", o.dir.display()),
        LogOptions::Kafka(o) => format!("raw Kafka log {} on {}", o.topic, o.bootstrap_servers),
    };
    let log = TxLog::open(options).await.context("opening the log")?;
    let payload = Bytes::from(workload::document(0, args.doc_bytes).to_string());
    let recorder = Arc::new(Recorder::default());
    let (done_tx, done_rx) = tokio::sync::watch::channel(false);
    let bar = progress(
        "raw-log".into(),
        recorder.clone(),
        Duration::from_secs(args.duration),
        done_rx,
    );
    let budget = Budget::new(args);
    let sent = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..args.concurrency)
        .map(|_| {
            let log = log.clone();
            let payload = payload.clone();
            let recorder = recorder.clone();
            let sent = sent.clone();
            tokio::spawn(async move {
                while Instant::now() < budget.until
                    && sent.fetch_add(1, Ordering::Relaxed) < budget.requests
                {
                    let start = Instant::now();
                    let outcome = match log.append(vec![payload.clone()]).await {
                        Ok(ts) => Outcome::Ok {
                            ts: ts.first().map(|t| t.0),
                        },
                        Err(e) => Outcome::Error(format!("append: {e}")),
                    };
                    recorder.record("append", true, start.elapsed(), &outcome);
                }
            })
        })
        .collect();
    for w in workers {
        w.await?;
    }
    let duration = started.elapsed();
    let _ = done_tx.send(true);
    let _ = bar.await;
    log.close().await.context("closing the log")?;
    let r = recorder.inner.lock().expect("recorder poisoned");
    let secs = duration.as_secs_f64();
    Ok(Report {
        target,
        workload: "append".into(),
        mode: "closed".into(),
        concurrency: args.concurrency,
        rate: None,
        keys: 0,
        zipf: 0.0,
        doc_bytes: payload.len(),
        duration_s: secs,
        ok: recorder.ok.load(Ordering::Relaxed),
        errors: recorder.errors.load(Ordering::Relaxed),
        throttled: 0,
        throughput_ops_s: recorder.ok.load(Ordering::Relaxed) as f64 / secs,
        writes_per_s: r.writes as f64 / secs,
        reads_per_s: 0.0,
        latency: r.all.summary(),
        by_op: r
            .by_op
            .iter()
            .filter_map(|(op, h)| h.summary().map(|s| (op.to_string(), s)))
            .collect(),
        errors_by_kind: r.errors.clone(),
        visibility_lag: None,
        intended: None,
        sent: None,
        loaded_docs: None,
        load_s: None,
        invariant: None,
        sustained: None,
    })
}
