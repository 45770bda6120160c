//! A cluster CA and the certificates of a deployment's processes (`causeway admin certs
//! create`, and the tests).
//!
//! The CA signs certificates only; each process certificate carries its role's URI and DNS
//! name ([`Role::uri`], [`Role::dns_name`]) and may carry host names or addresses for other
//! clients, and serves both as a server and a client certificate.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::pem::PemObject;

use super::Role;

/// The subject of every cluster CA: a certificate's issuer must name it exactly.
const CA_NAME: &str = "Causeway cluster CA";

/// A certificate and its private key, PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A cluster CA that can issue certificates.
#[derive(Debug)]
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    key_pem: String,
}

impl Authority {
    /// A new CA, valid for ten years.
    pub fn new() -> Result<Authority, rcgen::Error> {
        let key = KeyPair::generate()?;
        let params = ca_params(Some(Duration::from_secs(10 * 365 * 86_400)));
        let cert = params.self_signed(&key)?;
        Ok(Authority {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA of an earlier [`Authority::new`], from its certificate and key, to issue more.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Authority, rcgen::Error> {
        let key = KeyPair::from_pem(key_pem)?;
        Ok(Authority {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            issuer: Issuer::new(ca_params(None), key),
        })
    }

    /// The CA certificate, PEM: what every process trusts.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA key, PEM: keep it off the cluster.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// A certificate for `role`, valid for a year, also naming `hosts` (DNS names or IP
    /// addresses) for clients that check those.
    pub fn issue(&self, role: Role, hosts: &[String]) -> Result<Issued, rcgen::Error> {
        let mut params = CertificateParams::default();
        params.distinguished_name = name(&role.uri());
        params.subject_alt_names = vec![
            SanType::URI(role.uri().try_into()?),
            SanType::DnsName(role.dns_name().try_into()?),
        ];
        if role.server_name() != role.dns_name() {
            params
                .subject_alt_names
                .push(SanType::DnsName(role.server_name().try_into()?));
        }
        for host in hosts {
            params.subject_alt_names.push(match host.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(host.clone().try_into()?),
            });
        }
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        validity(&mut params, Duration::from_secs(365 * 86_400));
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn ca_params(valid_for: Option<Duration>) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = name(CA_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    if let Some(d) = valid_for {
        validity(&mut params, d);
    }
    params
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

/// From an hour ago (clocks differ) for `d`.
fn validity(params: &mut CertificateParams, d: Duration) {
    let now = SystemTime::now();
    params.not_before = (now - Duration::from_secs(3600)).into();
    params.not_after = (now + d).into();
}

/// The DER bytes of the first certificate in `pem`.
pub fn pem_to_der(pem: &str) -> Option<Vec<u8>> {
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .ok()
        .map(|c| c.to_vec())
}
