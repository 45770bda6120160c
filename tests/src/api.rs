//! `causeway-api-server` processes of a [`LocalCluster`]: each on its own loopback port, against
//! the cluster's config manager and log topic, accepting the one admin token [`API_TOKEN`].

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};

use crate::process::{binary, free_addr, Proc};
use crate::{until, LocalCluster};

/// The bearer token every api-server of a `LocalCluster` accepts, with admin rights (read and
/// write on every collection).
pub const API_TOKEN: &str = "local-cluster-admin-token";

/// One api-server process.
#[derive(Debug)]
pub(crate) struct ApiServer {
    pub(crate) proc: Proc,
    pub(crate) addr: SocketAddr,
}

impl LocalCluster {
    /// Starts `n` more api-servers and waits until each answers `/readyz` with 200 (it knows
    /// the store nodes of the routing configuration).
    pub async fn start_api_servers(&mut self, n: usize) -> Result<()> {
        let tokens = self.root.join("tokens.json");
        if !tokens.exists() {
            let file = serde_json::json!({"tokens": [
                {"name": "local-cluster", "token": API_TOKEN, "admin": true}
            ]});
            std::fs::write(&tokens, serde_json::to_vec_pretty(&file)?)?;
        }
        let mut started = Vec::new();
        for _ in 0..n {
            let addr = free_addr()?;
            let proc = self.spawn_api_server(self.api_servers.len() + 1, addr)?;
            self.api_servers.push(ApiServer { proc, addr });
            started.push(addr);
        }
        self.wait_api_servers_ready(started).await
    }

    /// An api-server process, the `i`-th, listening on `addr`.
    fn spawn_api_server(&self, i: usize, addr: SocketAddr) -> Result<Proc> {
        let log = serde_json::to_string(&self.log_options)?;
        let config = self.root.join(format!("api-server-{i}.json"));
        std::fs::write(
            &config,
            serde_json::to_vec_pretty(&serde_json::json!({ "security": self.member_security() }))?,
        )?;
        let mut command = Command::new(binary("causeway-api-server")?);
        command
            .arg("--config")
            .arg(&config)
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--config-manager")
            .arg(self.cm_addr.to_string())
            .arg("--log")
            .arg(&log)
            .arg("--tokens-file")
            .arg(self.root.join("tokens.json"));
        crate::with_gid(&mut command, self.gid(crate::Member::ApiServer(i - 1)));
        Proc::spawn(command, self.root.join(format!("api-server-{i}.log")))
    }

    async fn wait_api_servers_ready(&self, addrs: Vec<SocketAddr>) -> Result<()> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        for addr in addrs {
            let ready = until(
                &format!("the api-server on {addr} to be ready"),
                Duration::from_secs(30),
                || {
                    let http = http.clone();
                    async move {
                        let r = http
                            .get(format!("http://{addr}/readyz"))
                            .send()
                            .await
                            .ok()?;
                        r.status().is_success().then_some(())
                    }
                },
            )
            .await;
            ready.map_err(|e| anyhow!("{e}\n{}", self.logs()))?;
        }
        Ok(())
    }

    /// kill -9 of api-server `i` (in start order).
    pub fn kill_api_server(&mut self, i: usize) -> Result<()> {
        let api = self
            .api_servers
            .get_mut(i)
            .ok_or_else(|| anyhow!("no api-server {i}"))?;
        api.proc.kill();
        Ok(())
    }

    /// Starts killed api-server `i` again on its address, and waits until it is ready.
    pub async fn restart_api_server(&mut self, i: usize) -> Result<()> {
        let api = self
            .api_servers
            .get(i)
            .ok_or_else(|| anyhow!("no api-server {i}"))?;
        if api.proc.is_running() {
            bail!("api-server {i} is running");
        }
        let addr = api.addr;
        self.api_servers[i].proc = self.spawn_api_server(i + 1, addr)?;
        self.wait_api_servers_ready(vec![addr]).await
    }

    /// The base URLs (`http://127.0.0.1:port`) of the api-servers, in start order.
    pub fn api_urls(&self) -> Vec<String> {
        self.api_servers
            .iter()
            .map(|a| format!("http://{}", a.addr))
            .collect()
    }
}
