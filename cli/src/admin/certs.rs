//! `causeway admin certs create`: a cluster CA and the certificates of a deployment's processes
//! for mutual TLS between them (`security.tls` of each component; see
//! `causeway_proto::link`). Each file is written once: an existing file is never replaced.
//!
//! ```text
//! <out>/ca.pem, ca-key.pem                       the CA (keep ca-key.pem off the cluster)
//! <out>/config-manager.pem, config-manager-key.pem
//! <out>/api-server.pem, api-server-key.pem
//! <out>/cdc.pem, cdc-key.pem
//! <out>/admin.pem, admin-key.pem                 for `causeway admin …`
//! <out>/store-node-<id>.pem, store-node-<id>-key.pem
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use causeway_proto::link::certs::Authority;
use causeway_proto::link::Role;
use clap::{Args as ClapArgs, Subcommand};

#[derive(Debug, ClapArgs)]
pub struct CertsArgs {
    #[command(subcommand)]
    command: CertsCommand,
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Makes a CA (or takes an existing one) and the certificates of a deployment.
    Create(CreateArgs),
}

#[derive(Debug, ClapArgs)]
struct CreateArgs {
    /// The directory to write into (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// The store node ids to make certificates for: `1-6` or `1,2,5`.
    #[arg(long, default_value = "")]
    store_nodes: String,
    /// Host names or addresses the certificates also name, comma-separated (only for other
    /// clients that check them: Causeway's own clients check the role's name).
    #[arg(long, value_delimiter = ',')]
    hosts: Vec<String>,
    /// Issue with the CA in `<out>/ca.pem` and `<out>/ca-key.pem` instead of making one (to add
    /// store nodes to a deployment).
    #[arg(long)]
    existing_ca: bool,
}

/// `1-6` or `1,2,5` (ids from 1).
fn parse_ids(text: &str) -> Result<Vec<u64>, String> {
    let mut ids = Vec::new();
    for part in text.split(',').filter(|p| !p.trim().is_empty()) {
        let number = |s: &str| -> Result<u64, String> {
            s.trim()
                .parse::<u64>()
                .map_err(|_| format!("{s:?} is not a node id"))
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (number(a)?, number(b)?);
                if a > b || b - a >= 10_000 {
                    return Err(format!("{part:?} is not a range of at most 10 000 ids"));
                }
                ids.extend(a..=b);
            }
            None => ids.push(number(part)?),
        }
    }
    Ok(ids)
}

pub async fn certs(args: CertsArgs) -> Result<()> {
    let CertsCommand::Create(args) = args.command;
    let ids = parse_ids(&args.store_nodes).map_err(anyhow::Error::msg)?;
    let written = create(&args.out, &ids, &args.hosts, args.existing_ca)?;
    for path in written {
        println!("{}", path.display());
    }
    Ok(())
}

/// Writes the CA (unless `existing_ca`) and the certificates; answers the files written.
fn create(
    out: &Path,
    store_nodes: &[u64],
    hosts: &[String],
    existing_ca: bool,
) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut written = Vec::new();
    let ca = if existing_ca {
        let read = |name: &str| {
            std::fs::read_to_string(out.join(name))
                .with_context(|| format!("cannot read {}", out.join(name).display()))
        };
        Authority::from_pem(&read("ca.pem")?, &read("ca-key.pem")?).context("the existing CA")?
    } else {
        let ca = Authority::new()?;
        written.push(write_new(&out.join("ca.pem"), ca.cert_pem(), 0o644)?);
        written.push(write_new(&out.join("ca-key.pem"), ca.key_pem(), 0o600)?);
        ca
    };
    let mut roles = vec![Role::ConfigManager, Role::ApiServer, Role::Cdc, Role::Admin];
    if existing_ca {
        roles.clear();
    }
    roles.extend(store_nodes.iter().map(|&id| Role::StoreNode(id)));
    for role in roles {
        let name = match role {
            Role::StoreNode(id) => format!("store-node-{id}"),
            other => other.dns_name().trim_end_matches(".causeway").to_owned(),
        };
        let issued = ca.issue(role, hosts)?;
        written.push(write_new(
            &out.join(format!("{name}.pem")),
            &issued.cert_pem,
            0o644,
        )?);
        written.push(write_new(
            &out.join(format!("{name}-key.pem")),
            &issued.key_pem,
            0o600,
        )?);
    }
    Ok(written)
}

/// Writes `text` to a new file with `mode`; an existing file is an error.
fn write_new(path: &Path, text: &str, mode: u32) -> Result<PathBuf> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| {
            format!(
                "cannot create {} (an existing file is never replaced)",
                path.display()
            )
        })?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    Ok(path.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_ranges_or_lists() {
        assert_eq!(parse_ids("1-3").unwrap(), [1, 2, 3]);
        assert_eq!(parse_ids("1,2,5").unwrap(), [1, 2, 5]);
        assert!(parse_ids("3-1").is_err());
        assert!(parse_ids("a").is_err());
        assert!(parse_ids("1-100000").is_err());
        assert_eq!(parse_ids("").unwrap(), Vec::<u64>::new());
    }

    #[test]
    fn a_deployment_gets_every_file_once_and_more_nodes_join_its_ca() {
        let dir = tempfile::tempdir().unwrap();
        let written = create(dir.path(), &[1, 2], &["db.example".into()], false).unwrap();
        assert_eq!(written.len(), 2 + 2 * 6);
        let key = std::fs::metadata(dir.path().join("ca-key.pem")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(key.permissions().mode() & 0o777, 0o600);
        // Again: every file exists, nothing is replaced.
        let ca = std::fs::read(dir.path().join("ca.pem")).unwrap();
        assert!(create(dir.path(), &[1], &[], false).is_err());
        assert_eq!(std::fs::read(dir.path().join("ca.pem")).unwrap(), ca);
        // A third node from the same CA.
        let more = create(dir.path(), &[3], &[], true).unwrap();
        assert_eq!(more.len(), 2);
        assert!(dir.path().join("store-node-3.pem").exists());
    }
}
