//! Network partitions between the processes of a [`LocalCluster`](crate::LocalCluster), with
//! iptables on loopback.
//!
//! Every process of a cluster started with `ClusterSpec::isolated` runs with a group id of its
//! own (the test runs as root; the processes stay root, so files are no matter). A partition
//! drops, in a chain of this test process's own that `OUTPUT` jumps to, the packets that a
//! process of one side sends (`-m owner --gid-owner`) to a listening port of a process of the
//! other side, both ways. A process can then neither send a request across nor acknowledge what
//! comes back, so every connection across stalls, as over a cut link, while every process keeps
//! its loopback address and ports: no process binds or advertises anything else. (Network
//! namespaces would cut as well, but every process would have to bind a non-loopback address and
//! the Kafka brokers advertise one reachable from every namespace.)
//!
//! [`Firewall::heal`] removes every rule; dropping the `Firewall` removes its chain.

use std::process::Command;

use anyhow::{bail, Context, Result};

/// The chain of this test process, and whether `OUTPUT` jumps to it yet.
#[derive(Debug)]
pub(crate) struct Firewall {
    chain: String,
    installed: bool,
}

fn iptables(args: &[&str]) -> Result<()> {
    let output = Command::new("iptables")
        .arg("-w")
        .args(args)
        .output()
        .context("running iptables (the partition tests need it, and root)")?;
    if !output.status.success() {
        bail!(
            "iptables {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// The prefix of every test chain; the test process's id and the cluster's number follow.
const PREFIX: &str = "CAUSEWAY-T-";

impl Firewall {
    /// The firewall of cluster `n` of this test process.
    pub(crate) fn new(n: usize) -> Firewall {
        Firewall {
            chain: format!("{PREFIX}{}-{n}", std::process::id()),
            installed: false,
        }
    }

    /// Removes the chains (and their jumps) of test processes that are gone: one killed -9
    /// had no chance to.
    fn remove_stale() {
        let Ok(rules) = Command::new("iptables").args(["-w", "-S"]).output() else {
            return;
        };
        let rules = String::from_utf8_lossy(&rules.stdout);
        for chain in rules
            .lines()
            .filter_map(|l| l.strip_prefix("-N "))
            .filter(|c| c.starts_with(PREFIX))
        {
            let pid = chain[PREFIX.len()..].split('-').next().unwrap_or("");
            if std::path::Path::new("/proc").join(pid).exists() {
                continue;
            }
            let _ = iptables(&["-D", "OUTPUT", "-j", chain]);
            let _ = iptables(&["-F", chain]);
            let _ = iptables(&["-X", chain]);
        }
    }

    /// Drops every TCP packet that a process of group `gid` sends on loopback to one of `ports`.
    pub(crate) fn cut(&mut self, gid: u32, ports: &[u16]) -> Result<()> {
        if ports.is_empty() {
            return Ok(());
        }
        if !self.installed {
            Firewall::remove_stale();
            // A chain left by an earlier process of the same id is reused, emptied.
            let _ = iptables(&["-N", &self.chain]);
            iptables(&["-F", &self.chain])?;
            let _ = iptables(&["-D", "OUTPUT", "-j", &self.chain]);
            iptables(&["-I", "OUTPUT", "-j", &self.chain])?;
            self.installed = true;
        }
        let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
        for chunk in ports.chunks(15) {
            iptables(&[
                "-A",
                &self.chain,
                "-o",
                "lo",
                "-p",
                "tcp",
                "-m",
                "owner",
                "--gid-owner",
                &gid.to_string(),
                "-m",
                "multiport",
                "--dports",
                &chunk.join(","),
                "-j",
                "DROP",
            ])?;
        }
        Ok(())
    }

    /// Removes every rule: the partitions heal.
    pub(crate) fn heal(&mut self) -> Result<()> {
        if self.installed {
            iptables(&["-F", &self.chain])?;
        }
        Ok(())
    }
}

impl Drop for Firewall {
    fn drop(&mut self) {
        if self.installed {
            let _ = iptables(&["-D", "OUTPUT", "-j", &self.chain]);
            let _ = iptables(&["-F", &self.chain]);
            let _ = iptables(&["-X", &self.chain]);
        }
    }
}
