//! How Causeway's processes reach each other over gRPC, and how a server knows who calls it.
//!
//! # Modes
//! - **Mutual TLS** ([`Security::tls`]): every link is TLS with certificates of one cluster CA,
//!   and a server refuses a client without a certificate of that CA. A certificate names its
//!   holder in a URI subject alternative name ([`Role::uri`]): `causeway://store-node/7`,
//!   `causeway://config-manager`, `causeway://api-server`, `causeway://cdc` or
//!   `causeway://admin`. Servers present the DNS name of their role ([`Role::dns_name`]), which
//!   is what clients check, whatever address they dial.
//! - **Cluster secret** ([`Security::cluster_secret_file`]): plaintext links, and every call
//!   carries the shared secret in `causeway-cluster-secret`; a call without it is refused.
//! - **Open**: neither. Anyone who reaches the port is trusted; a server in this mode must
//!   listen on loopback only ([`Link::check_listen`]).
//!
//! The admin calls of the config manager (bootstrap, reshape, mark failed, replace, abort) need
//! more: a certificate of role `admin`, or the admin token ([`Security::admin_token_file`]) in
//! `causeway-admin-token`. In the open mode with no admin token configured, they are open too.
//!
//! [`certs`] makes a CA and the certificates of a deployment.

pub mod certs;
mod secret;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig};
use tonic::{Request, Status};

/// The metadata key of the cluster secret.
pub const SECRET_HEADER: &str = "causeway-cluster-secret";
/// The metadata key of the admin token.
pub const ADMIN_HEADER: &str = "causeway-admin-token";
/// The longest a server waits for a client's TLS handshake.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

use secret::Secret;
pub use secret::{MIN_SECRET_BYTES, RELOAD_EVERY};

/// How a process authenticates its gRPC links: part of every component's options. The default
/// is the open mode.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Security {
    /// Mutual TLS with the cluster CA.
    pub tls: Option<TlsFiles>,
    /// A file holding the shared cluster secret: lines of at least 16 bytes, the first sent and
    /// every one accepted, read again when it changes (see [`RELOAD_EVERY`]), so that the
    /// secret rotates without a restart. Ignored when `tls` is set.
    pub cluster_secret_file: Option<PathBuf>,
    /// A file holding the admin token, in the same form: a config manager accepts admin calls
    /// bearing any of its lines; a client sends the first.
    pub admin_token_file: Option<PathBuf>,
    /// Allows serving in the open mode on an address that is not loopback (default false).
    pub allow_open_non_loopback: bool,
}

/// The PEM files of mutual TLS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The cluster CA's certificate: the only root trusted, on both ends of every link.
    pub ca: PathBuf,
    /// This process's certificate (chain).
    pub cert: PathBuf,
    /// This process's private key.
    pub key: PathBuf,
}

/// Who holds a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    StoreNode(u64),
    ConfigManager,
    ApiServer,
    Cdc,
    Admin,
}

impl Role {
    /// The URI subject alternative name naming this role in a certificate.
    pub fn uri(self) -> String {
        match self {
            Role::StoreNode(id) => format!("causeway://store-node/{id}"),
            other => format!("causeway://{}", other.name()),
        }
    }

    /// Parses [`Role::uri`]'s form.
    pub fn from_uri(uri: &str) -> Option<Role> {
        let rest = uri.strip_prefix("causeway://")?;
        if let Some(id) = rest.strip_prefix("store-node/") {
            // Digits only: `u64::from_str` would also take a leading `+`.
            if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            return id.parse().ok().map(Role::StoreNode);
        }
        [Role::ConfigManager, Role::ApiServer, Role::Cdc, Role::Admin]
            .into_iter()
            .find(|r| r.name() == rest)
    }

    /// The DNS name every server of this role presents (`store-node.causeway`).
    pub fn dns_name(self) -> String {
        format!("{}.causeway", self.name())
    }

    /// The DNS name clients check: a store node's names its id (`n7.store-node.causeway`), so
    /// that a client reaching another node at a stale or forged address notices.
    pub fn server_name(self) -> String {
        match self {
            Role::StoreNode(id) => format!("n{id}.store-node.causeway"),
            other => other.dns_name(),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Role::StoreNode(_) => "store-node",
            Role::ConfigManager => "config-manager",
            Role::ApiServer => "api-server",
            Role::Cdc => "cdc",
            Role::Admin => "admin",
        }
    }
}

/// Who made a call, as the server's [`Link::authorize`] found: in the request's extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    /// The role of the client's certificate (mutual TLS only).
    pub role: Option<Role>,
    /// Whether the call may use the admin calls.
    pub admin: bool,
}

impl Caller {
    /// The caller of `request`; a request that did not pass [`Link::authorize`] (a handler
    /// called directly, in tests) has no role and no admin right.
    pub fn of<T>(request: &Request<T>) -> Caller {
        request
            .extensions()
            .get::<Caller>()
            .copied()
            .unwrap_or(Caller {
                role: None,
                admin: false,
            })
    }

    /// Refuses a caller whose certificate names another store node than `node` (a caller
    /// without a certificate role, under the cluster secret or the open mode, passes).
    pub fn check_store_node(&self, node: u64) -> Result<(), Status> {
        match self.role {
            None => Ok(()),
            Some(Role::StoreNode(id)) if id == node => Ok(()),
            Some(role) => Err(Status::permission_denied(format!(
                "the caller's certificate names {}, not store node {node}",
                role.uri()
            ))),
        }
    }

    /// Refuses a caller whose certificate names a role `allowed` denies, unless it has the
    /// admin right (a caller without a certificate role, under the cluster secret or the open
    /// mode, passes: those modes tell no roles apart). `call` names the call in the refusal.
    pub fn check_role(&self, allowed: impl Fn(Role) -> bool, call: &str) -> Result<(), Status> {
        match self.role {
            None => Ok(()),
            Some(role) if allowed(role) || self.admin => Ok(()),
            Some(role) => Err(Status::permission_denied(format!(
                "{} may not call {call}",
                role.uri()
            ))),
        }
    }

    /// Refuses a caller without the admin right: `PermissionDenied` for a certificate of
    /// another role, `Unauthenticated` for a call without the admin token.
    pub fn check_admin(&self) -> Result<(), Status> {
        const WHY: &str = "an admin call needs the admin token or a certificate of role admin";
        match self.role {
            _ if self.admin => Ok(()),
            Some(_) => Err(Status::permission_denied(WHY)),
            None => Err(Status::unauthenticated(WHY)),
        }
    }
}

/// Why the security settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("an address that is not loopback ({0}) needs tls or cluster_secret_file (or allow_open_non_loopback)")]
    OpenNonLoopback(SocketAddr),
    #[error("certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("tls: {0}")]
    Tls(#[from] tonic::transport::Error),
}

/// [`Security`] loaded: what a process uses to make channels and to check its callers.
#[derive(Clone)]
pub struct Link {
    tls: Option<Tls>,
    secret: Option<Secret>,
    admin_token: Option<Secret>,
    allow_open_non_loopback: bool,
}

#[derive(Clone)]
struct Tls {
    ca: Certificate,
    identity: Identity,
    /// The role this process's certificate names.
    role: Option<Role>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("tls", &self.tls.is_some())
            .field("secret", &self.secret.is_some())
            .field("admin_token", &self.admin_token.is_some())
            .finish()
    }
}

/// A channel whose calls carry this process's credentials.
pub type Channel = InterceptedService<tonic::transport::Channel, Credentials>;

/// The metadata a client adds to every call: the secrets' current values.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    secret: Option<Secret>,
    admin_token: Option<Secret>,
}

impl tonic::service::Interceptor for Credentials {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(s) = &self.secret {
            request.metadata_mut().insert(SECRET_HEADER, s.sent());
        }
        if let Some(t) = &self.admin_token {
            request.metadata_mut().insert(ADMIN_HEADER, t.sent());
        }
        Ok(request)
    }
}

impl Link {
    /// The open mode: no TLS, no secret, no admin token.
    pub fn open() -> Link {
        Link {
            tls: None,
            secret: None,
            admin_token: None,
            allow_open_non_loopback: false,
        }
    }

    /// Reads the files `security` names.
    pub fn load(security: &Security) -> Result<Link, LinkError> {
        let tls = match &security.tls {
            Some(files) => {
                let cert = read(&files.cert)?;
                let role = std::str::from_utf8(&cert)
                    .ok()
                    .and_then(certs::pem_to_der)
                    .and_then(|der| cert_role(&der));
                Some(Tls {
                    ca: Certificate::from_pem(read(&files.ca)?),
                    identity: Identity::from_pem(cert, read(&files.key)?),
                    role,
                })
            }
            None => None,
        };
        let secret = |path: &Option<PathBuf>| -> Result<Option<Secret>, LinkError> {
            path.as_deref().map(Secret::load).transpose()
        };
        Ok(Link {
            secret: if tls.is_some() {
                None
            } else {
                secret(&security.cluster_secret_file)?
            },
            admin_token: secret(&security.admin_token_file)?,
            tls,
            allow_open_non_loopback: security.allow_open_non_loopback,
        })
    }

    /// A link with these credentials, built in code (`causeway dev`, tests).
    pub fn with_secrets(secret: Option<String>, admin_token: Option<String>) -> Link {
        Link {
            secret: secret.as_deref().map(Secret::fixed),
            admin_token: admin_token.as_deref().map(Secret::fixed),
            ..Link::open()
        }
    }

    /// Mutual TLS with PEM texts, built in code (tests).
    pub fn with_tls(ca: &str, cert: &str, key: &str) -> Link {
        Link {
            tls: Some(Tls {
                ca: Certificate::from_pem(ca),
                identity: Identity::from_pem(cert, key),
                role: certs::pem_to_der(cert).and_then(|der| cert_role(&der)),
            }),
            ..Link::open()
        }
    }

    /// Under mutual TLS, refuses a certificate that does not name `role`: a process started
    /// with another's certificate would be refused by every peer, call by call.
    pub fn check_own_role(&self, role: Role) -> Result<(), LinkError> {
        match &self.tls {
            Some(tls) if tls.role != Some(role) => Err(LinkError::Invalid(format!(
                "the TLS certificate names {}, not {}",
                tls.role
                    .map_or_else(|| "no Causeway role".to_owned(), Role::uri),
                role.uri()
            ))),
            _ => Ok(()),
        }
    }

    /// This link without the admin token: for channels to other servers than the config
    /// manager, which need not see it.
    pub fn without_admin_token(&self) -> Link {
        Link {
            admin_token: None,
            ..self.clone()
        }
    }

    /// Refuses to serve in the open mode on an address other processes can reach.
    pub fn check_listen(&self, addr: SocketAddr) -> Result<(), LinkError> {
        let open = self.tls.is_none() && self.secret.is_none();
        if open && !addr.ip().is_loopback() && !self.allow_open_non_loopback {
            return Err(LinkError::OpenNonLoopback(addr));
        }
        Ok(())
    }

    /// The endpoint of the server `to` at `addr` (`host:port`, or a URI): `https` with this
    /// process's certificate under TLS, checking that the server's certificate names `to`'s
    /// [`Role::server_name`] (for a store node, its id).
    pub fn endpoint(&self, addr: &str, to: Role) -> Result<Endpoint, String> {
        self.endpoint_named(addr, &to.server_name())
    }

    /// The endpoint of some store node at `addr` whose id is not known: any store node's
    /// certificate is taken.
    pub fn endpoint_any_store_node(&self, addr: &str) -> Result<Endpoint, String> {
        self.endpoint_named(addr, &Role::StoreNode(0).dns_name())
    }

    fn endpoint_named(&self, addr: &str, server_name: &str) -> Result<Endpoint, String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let uri = match addr.split_once("://") {
            Some((_, rest)) => format!("{scheme}://{rest}"),
            None => format!("{scheme}://{addr}"),
        };
        let endpoint = Endpoint::from_shared(uri).map_err(|_| addr.to_string())?;
        match &self.tls {
            Some(tls) => endpoint
                .tls_config(
                    ClientTlsConfig::new()
                        .ca_certificate(tls.ca.clone())
                        .identity(tls.identity.clone())
                        .domain_name(server_name),
                )
                .map_err(|e| format!("{addr}: {e}")),
            None => Ok(endpoint),
        }
    }

    /// `channel` with this process's credentials on every call.
    pub fn channel(&self, channel: tonic::transport::Channel) -> Channel {
        InterceptedService::new(channel, self.credentials())
    }

    /// The metadata this process sends.
    pub fn credentials(&self) -> Credentials {
        Credentials {
            secret: self.secret.clone(),
            admin_token: self.admin_token.clone(),
        }
    }

    /// A server builder: TLS that requires a client certificate of the cluster CA, when set.
    pub fn server(&self) -> Result<Server, LinkError> {
        let builder = Server::builder();
        Ok(match &self.tls {
            Some(tls) => builder.tls_config(
                ServerTlsConfig::new()
                    .identity(tls.identity.clone())
                    .client_ca_root(tls.ca.clone())
                    .timeout(HANDSHAKE_TIMEOUT),
            )?,
            None => builder,
        })
    }

    /// The server's check of every call: refuses one without the credentials this mode needs,
    /// and records the [`Caller`] in the request's extensions. Use it as a tonic interceptor.
    pub fn authorize(&self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let header = |key: &str| {
            request
                .metadata()
                .get(key)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let admin_by_token = matches(&self.admin_token, header(ADMIN_HEADER).as_deref());
        let caller = if self.tls.is_some() {
            let role = request
                .peer_certs()
                .and_then(|certs| certs.first().and_then(|c| cert_role(c.as_ref())));
            let Some(role) = role else {
                return Err(Status::unauthenticated(
                    "the client certificate names no Causeway role",
                ));
            };
            Caller {
                role: Some(role),
                admin: role == Role::Admin || admin_by_token,
            }
        } else if self.secret.is_some() {
            if !admin_by_token && !matches(&self.secret, header(SECRET_HEADER).as_deref()) {
                return Err(Status::unauthenticated(
                    "the call does not carry the cluster secret",
                ));
            }
            Caller {
                role: None,
                admin: admin_by_token,
            }
        } else {
            Caller {
                role: None,
                admin: self.admin_token.is_none() || admin_by_token,
            }
        };
        request.extensions_mut().insert(caller);
        Ok(request)
    }

    /// [`Link::authorize`] as a tonic interceptor.
    pub fn interceptor(
        &self,
    ) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone + Send + Sync + 'static
    {
        let link = self.clone();
        move |request| link.authorize(request)
    }
}

/// Whether a presented value is one the configured secret accepts (in constant time); no
/// configured secret matches nothing.
fn matches(expected: &Option<Secret>, presented: Option<&str>) -> bool {
    match (expected, presented) {
        (Some(e), Some(p)) => e.accepts(p),
        _ => false,
    }
}

/// The role a DER certificate names, if exactly one.
fn cert_role(der: &[u8]) -> Option<Role> {
    let der = rustls_pki_types::CertificateDer::from(der);
    let cert = webpki::EndEntityCert::try_from(&der).ok()?;
    let mut roles = cert.valid_uri_names().filter_map(Role::from_uri);
    let role = roles.next()?;
    roles.next().is_none().then_some(role)
}

fn read(path: &Path) -> Result<Vec<u8>, LinkError> {
    std::fs::read(path).map_err(|source| LinkError::Read {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_role_round_trips_through_its_uri_and_odd_uris_name_none() {
        for role in [
            Role::StoreNode(0),
            Role::StoreNode(u64::MAX),
            Role::ConfigManager,
            Role::ApiServer,
            Role::Cdc,
            Role::Admin,
        ] {
            assert_eq!(Role::from_uri(&role.uri()), Some(role));
        }
        for odd in [
            "causeway://store-node/",
            "causeway://store-node/+1",
            "causeway://store-node/1/2",
            "causeway://store-node/18446744073709551616",
            "causeway://root",
            "https://admin",
            "causeway://admin/",
        ] {
            assert_eq!(Role::from_uri(odd), None, "{odd}");
        }
    }

    #[test]
    fn a_certificate_names_its_role() {
        let ca = certs::Authority::new().unwrap();
        let node = ca.issue(Role::StoreNode(7), &[]).unwrap();
        let der = certs::pem_to_der(&node.cert_pem).unwrap();
        assert_eq!(cert_role(&der), Some(Role::StoreNode(7)));
        let admin = ca.issue(Role::Admin, &[]).unwrap();
        let der = certs::pem_to_der(&admin.cert_pem).unwrap();
        assert_eq!(cert_role(&der), Some(Role::Admin));
    }

    #[test]
    fn the_open_mode_refuses_a_non_loopback_address_unless_allowed() {
        let public: SocketAddr = "10.0.0.1:7400".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:7400".parse().unwrap();
        assert!(Link::open().check_listen(local).is_ok());
        assert!(Link::open().check_listen(public).is_err());
        let secret = Link::with_secrets(Some("s".repeat(32)), None);
        assert!(secret.check_listen(public).is_ok());
    }

    #[test]
    fn the_cluster_secret_is_required_and_the_admin_token_grants_admin() {
        let link = Link::with_secrets(Some("s".repeat(32)), Some("a".repeat(32)));
        let call = |headers: &[(&'static str, String)]| {
            let mut r = Request::new(());
            for (k, v) in headers {
                r.metadata_mut().insert(*k, v.parse().unwrap());
            }
            link.authorize(r).map(|r| Caller::of(&r))
        };
        assert_eq!(call(&[]).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert!(call(&[(SECRET_HEADER, "x".repeat(32))]).is_err());
        assert!(!call(&[(SECRET_HEADER, "s".repeat(32))]).unwrap().admin);
        assert!(call(&[(ADMIN_HEADER, "a".repeat(32))]).unwrap().admin);
        assert!(
            !call(&[
                (SECRET_HEADER, "s".repeat(32)),
                (ADMIN_HEADER, "b".repeat(32))
            ])
            .unwrap()
            .admin
        );
        // The open mode with an admin token: calls pass, admin calls need the token.
        let open = Link::with_secrets(None, Some("a".repeat(32)));
        assert!(!Caller::of(&open.authorize(Request::new(())).unwrap()).admin);
    }

    #[test]
    fn a_link_without_the_admin_token_sends_the_secret_and_not_the_token() {
        use tonic::service::Interceptor;
        let link = Link::with_secrets(Some("s".repeat(32)), Some("a".repeat(32)));
        let sent = |link: &Link| {
            let r = link.credentials().call(Request::new(())).unwrap();
            let header = |k| r.metadata().get(k).map(|v| v.to_str().unwrap().to_owned());
            (header(SECRET_HEADER), header(ADMIN_HEADER))
        };
        assert_eq!(sent(&link), (Some("s".repeat(32)), Some("a".repeat(32))));
        assert_eq!(
            sent(&link.without_admin_token()),
            (Some("s".repeat(32)), None)
        );
    }

    #[test]
    fn a_loaded_link_takes_a_rotated_secret_without_a_restart() {
        use tonic::service::Interceptor;
        let (old, new) = ("o".repeat(32), "n".repeat(32));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret");
        std::fs::write(&file, &old).unwrap();
        let link = Link::load(&Security {
            cluster_secret_file: Some(file.clone()),
            ..Security::default()
        })
        .unwrap();
        let mut credentials = link.credentials();
        let sent = |c: &mut Credentials| {
            let r = c.call(Request::new(())).unwrap();
            r.metadata()
                .get(SECRET_HEADER)
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned()
        };
        let accepted = |secret: &str| {
            let mut r = Request::new(());
            r.metadata_mut()
                .insert(SECRET_HEADER, secret.parse().unwrap());
            link.authorize(r).is_ok()
        };
        assert_eq!(sent(&mut credentials), old);
        std::fs::write(&file, format!("{new}\n{old}\n")).unwrap();
        for _ in 0..2 {
            // Two looks at the file: a change is taken when read the same twice.
            std::thread::sleep(RELOAD_EVERY + std::time::Duration::from_millis(50));
            sent(&mut credentials);
        }
        assert_eq!(
            sent(&mut credentials),
            new,
            "a channel made before sends the new secret"
        );
        assert!(accepted(&old) && accepted(&new));
        std::fs::write(&file, &new).unwrap();
        for _ in 0..2 {
            // Two looks at the file: a change is taken when read the same twice.
            std::thread::sleep(RELOAD_EVERY + std::time::Duration::from_millis(50));
            sent(&mut credentials);
        }
        assert!(!accepted(&old) && accepted(&new));
    }

    #[test]
    fn a_caller_naming_another_store_node_is_refused() {
        let caller = |role| Caller { role, admin: false };
        assert!(caller(None).check_store_node(3).is_ok());
        assert!(caller(Some(Role::StoreNode(3))).check_store_node(3).is_ok());
        assert!(caller(Some(Role::StoreNode(4)))
            .check_store_node(3)
            .is_err());
        assert!(caller(Some(Role::ApiServer)).check_store_node(3).is_err());
        let store_nodes = |r| matches!(r, Role::StoreNode(_));
        assert!(caller(None).check_role(store_nodes, "Backfill").is_ok());
        assert!(caller(Some(Role::StoreNode(4)))
            .check_role(store_nodes, "Backfill")
            .is_ok());
        let err = caller(Some(Role::ApiServer))
            .check_role(store_nodes, "Backfill")
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        let admin = Caller {
            role: Some(Role::Admin),
            admin: true,
        };
        assert!(admin.check_role(store_nodes, "Backfill").is_ok());
        assert_eq!(
            caller(Some(Role::Cdc)).check_admin().unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        assert_eq!(
            caller(None).check_admin().unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    }
}
