//! Starts a throwaway Apache Kafka of `--nodes N` KRaft nodes (default 1) on free loopback ports
//! with `causeway_txlog::testing::Broker`, prints `bootstrap_servers=…`, `replication_factor=…` and
//! `min_insync_replicas=…` lines, and runs until it is killed; the nodes' watchdogs then stop the
//! JVMs and the data goes with the temp dir. `bench/run.sh` runs its Kafka rows on it.
//!
//! `cargo run --release -p causeway-txlog --features testing --example kafka_cluster -- --nodes 3`

use std::io::Write;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mut nodes = 1;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--nodes" => nodes = args.next().ok_or("--nodes needs a number")?.parse()?,
            other => return Err(format!("unknown argument {other} (--nodes N)").into()),
        }
    }
    if !(1..=9).contains(&nodes) {
        return Err("--nodes must be 1 to 9".into());
    }
    let broker = causeway_txlog::testing::Broker::start_cluster(nodes)?;
    let o = broker.log_options("any");
    let mut out = std::io::stdout().lock();
    writeln!(out, "bootstrap_servers={}", broker.bootstrap_servers())?;
    writeln!(out, "replication_factor={}", o.replication_factor)?;
    writeln!(out, "min_insync_replicas={}", o.min_insync_replicas)?;
    writeln!(out, "dir={}", broker.dir().display())?;
    out.flush()?;
    drop(out);
    loop {
        std::thread::park();
    }
}
