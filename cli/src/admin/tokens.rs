//! `causeway admin tokens create`: a new bearer token for an api-server's tokens file. The token
//! (32 bytes from the operating system's random generator, hex) is printed once, with the
//! entry to paste into the tokens file, which holds only the token's SHA-256: the file is then
//! no secret that opens the API. The api-server reloads the file when it changes.

use anyhow::{Context, Result};
use causeway_api_server::auth::{token_hash, TokenEntry, Tokens};
use clap::{Args as ClapArgs, Subcommand, ValueEnum};
use rand::TryRngCore;
use serde_json::{json, Value};

/// Bytes of entropy of a new token.
const TOKEN_BYTES: usize = 32;
/// The prefix of generated tokens, so they can be recognised (in a leaked log, by a scanner).
const TOKEN_PREFIX: &str = "cw_";

#[derive(Debug, ClapArgs)]
pub struct TokensArgs {
    #[command(subcommand)]
    command: TokensCommand,
}

#[derive(Debug, Subcommand)]
enum TokensCommand {
    /// Prints a new random token once, and its tokens file entry (holding only its hash).
    Create(CreateArgs),
}

#[derive(Debug, ClapArgs)]
struct CreateArgs {
    /// The token's name in logs and metrics (default: `token-` and the start of its hash).
    #[arg(long)]
    name: Option<String>,
    /// What the token may do.
    #[arg(long, value_enum, default_value_t = Role::Admin)]
    role: Role,
    /// The collections a `read`, `write` or `read-write` token may use: names, `prefix*` or
    /// `*`, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "*")]
    collections: Vec<String>,
    /// Print the entry with the token itself instead of its hash (for a tokens file that must
    /// work with api-servers that do not take hashes).
    #[arg(long)]
    plain: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Role {
    /// Reads and writes every collection.
    Admin,
    /// Reads the collections given.
    Read,
    /// Writes the collections given (write does not imply read).
    Write,
    /// Reads and writes the collections given.
    ReadWrite,
}

pub async fn tokens(args: TokensArgs) -> Result<()> {
    match args.command {
        TokensCommand::Create(args) => {
            let token = new_token()?;
            let entry = entry(&args, &token)?;
            println!("token (shown once; keep it secret):\n  {token}");
            println!(
                "tokens file entry (add it to the \"tokens\" list; the api-server reloads the \
                 file):\n  {}",
                serde_json::to_string(&entry)?
            );
            Ok(())
        }
    }
}

/// A new token: [`TOKEN_BYTES`] from the operating system's generator, hex.
fn new_token() -> Result<String> {
    let mut bytes = [0u8; TOKEN_BYTES];
    rand::rngs::OsRng
        .try_fill_bytes(&mut bytes)
        .context("the operating system's random generator failed")?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("{TOKEN_PREFIX}{hex}"))
}

/// The tokens file entry of `token`, checked the way the api-server checks its file.
fn entry(args: &CreateArgs, token: &str) -> Result<Value> {
    let hash = token_hash(token);
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| format!("token-{}", &hash["sha256:".len()..][..8]));
    let stored = if args.plain { token.to_owned() } else { hash };
    let mut entry = json!({"name": name, "token": stored});
    let collections = json!(args.collections);
    match args.role {
        Role::Admin => entry["admin"] = json!(true),
        Role::Read => entry["read"] = collections,
        Role::Write => entry["write"] = collections,
        Role::ReadWrite => {
            entry["read"] = collections.clone();
            entry["write"] = collections;
        }
    }
    let parsed: TokenEntry = serde_json::from_value(entry.clone())?;
    Tokens::from_entries(vec![parsed]).context("the entry would be refused")?;
    Ok(entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request's headers with `Authorization: Bearer <token>`.
    fn bearer(token: &str) -> reqwest::header::HeaderMap {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        h
    }

    fn args(role: Role, collections: &[&str], plain: bool) -> CreateArgs {
        CreateArgs {
            name: None,
            role,
            collections: collections.iter().map(|s| s.to_string()).collect(),
            plain,
        }
    }

    #[test]
    fn tokens_are_new_long_and_their_entries_authenticate_them_by_hash() {
        let a = new_token().unwrap();
        let b = new_token().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), TOKEN_PREFIX.len() + 2 * TOKEN_BYTES);
        let entry = entry(&args(Role::Read, &["orders", "cat_*"], false), &a).unwrap();
        let stored = entry["token"].as_str().unwrap();
        assert!(stored.starts_with("sha256:") && !stored.contains(&a[TOKEN_PREFIX.len()..]));
        assert_eq!(entry["read"], json!(["orders", "cat_*"]));
        assert!(entry.get("write").is_none() && entry.get("admin").is_none());
        let tokens =
            Tokens::from_entries(vec![serde_json::from_value(entry.clone()).unwrap()]).unwrap();
        let principal = tokens.authenticate(&bearer(&a)).unwrap();
        assert!(principal.name.starts_with("token-"));
        assert!(tokens.authenticate(&bearer(&b)).is_err());
        assert!(tokens.authenticate(&bearer(stored)).is_err());

        let admin = entry_of(Role::Admin, &a);
        assert_eq!(admin["admin"], json!(true));
        let plain = super::entry(&args(Role::ReadWrite, &["*"], true), &a).unwrap();
        assert_eq!(plain["token"], json!(a));
        assert_eq!(plain["write"], json!(["*"]));
        // A pattern the api-server would refuse is refused here.
        assert!(super::entry(&args(Role::Read, &["a*b"], false), &a).is_err());
    }

    fn entry_of(role: Role, token: &str) -> Value {
        entry(&args(role, &["*"], false), token).unwrap()
    }
}
