//! Throwaway certificates for `cellplane dev --tls` (and for tests of TLS): a CA and, for each
//! kind of process, an identity valid for loopback (`localhost`, `127.0.0.1`) as both server
//! and client, written as PEM files.

use std::collections::BTreeMap;
use std::path::Path;

use cellplane_api::auth::AuthConfig;
use cellplane_api::tls::TlsPaths;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// The identities `cellplane dev --tls` makes: the nodes', one per region's agent (and its
/// cells), the operator's (`cellctl`), and an IM front end's (lookups, messaging, sync).
pub fn dev_identity_names() -> Vec<String> {
    ["node", "admin", "reader"]
        .into_iter()
        .map(str::to_string)
        .chain(
            super::regions::LAYOUT
                .iter()
                .map(|(region, _)| agent_name(region)),
        )
        .collect()
}

/// The identity of a region's agent.
pub fn agent_name(region: &str) -> String {
    format!("agent-{region}")
}

/// The roles of the dev identities, for the nodes and the cells alike: each identity
/// `cellplane-<name>` holds the role its name begins with, and each agent acts for its own
/// region only.
pub fn dev_auth() -> AuthConfig {
    let named = |name: &str| vec![format!("cellplane-{name}")];
    let regions = super::regions::LAYOUT.iter().map(|(region, _)| {
        (
            format!("cellplane-{}", agent_name(region)),
            region.to_string(),
        )
    });
    AuthConfig {
        admin: named("admin"),
        agent: regions.clone().map(|(agent, _)| agent).collect(),
        reader: named("reader"),
        node: named("node"),
        regions: regions.collect(),
    }
}

/// A certificate authority that can issue identities.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, PEM.
    pub pem: String,
}

/// An identity: its certificate and private key, PEM.
pub struct Identity {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Ca {
    pub fn new(name: &str) -> Result<Self, rcgen::Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
        ];
        let key = KeyPair::generate()?;
        let pem = params.self_signed(&key)?.pem();
        Ok(Self {
            issuer: Issuer::new(params, key),
            pem,
        })
    }

    /// An identity named `name` for loopback; `expired` makes one whose validity ended years
    /// ago (for tests of what a server refuses).
    pub fn issue(&self, name: &str, expired: bool) -> Result<Identity, rcgen::Error> {
        let mut params = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate()?;
        Ok(Identity {
            cert_pem: params.signed_by(&key, &self.issuer)?.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

impl Identity {
    /// Writes `<name>.pem` and `<name>-key.pem` into `dir`; answers the paths with `ca`.
    pub fn write(&self, dir: &Path, name: &str, ca: &Path) -> std::io::Result<TlsPaths> {
        let paths = TlsPaths {
            ca: ca.to_path_buf(),
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}-key.pem")),
        };
        std::fs::write(&paths.cert, &self.cert_pem)?;
        write_private(&paths.key, &self.key_pem)?;
        Ok(paths)
    }
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?
        .write_all(text.as_bytes())
}

/// The dev identities under `dir`, by name: made on the first run (a new CA and one identity
/// per [`dev_identity_names`]), kept for the next.
pub fn dev_identities(dir: &Path) -> std::io::Result<BTreeMap<String, TlsPaths>> {
    let ca_path = dir.join("ca.pem");
    let existing: BTreeMap<String, TlsPaths> = dev_identity_names()
        .into_iter()
        .map(|name| {
            (
                name.clone(),
                TlsPaths {
                    ca: ca_path.clone(),
                    cert: dir.join(format!("{name}.pem")),
                    key: dir.join(format!("{name}-key.pem")),
                },
            )
        })
        .collect();
    let complete = ca_path.exists() && existing.values().all(|p| p.cert.exists() && p.key.exists());
    if complete {
        return Ok(existing);
    }
    std::fs::create_dir_all(dir)?;
    let ca = Ca::new("cellplane dev CA").map_err(std::io::Error::other)?;
    std::fs::write(&ca_path, &ca.pem)?;
    let mut made = BTreeMap::new();
    for name in dev_identity_names() {
        let identity = ca
            .issue(&format!("cellplane-{name}"), false)
            .map_err(std::io::Error::other)?;
        made.insert(name.clone(), identity.write(dir, &name, &ca_path)?);
    }
    Ok(made)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_identities_are_made_once_and_kept() {
        let dir = tempfile::tempdir().expect("temp dir");
        let first = dev_identities(dir.path()).expect("made");
        assert_eq!(first.len(), dev_identity_names().len());
        let ca = std::fs::read_to_string(dir.path().join("ca.pem")).expect("ca");
        assert!(ca.starts_with("-----BEGIN CERTIFICATE-----"));
        let again = dev_identities(dir.path()).expect("kept");
        assert_eq!(first, again);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("ca.pem")).expect("ca"),
            ca,
            "the same CA on the next run"
        );
        cellplane_api::tls::Tls::load(&first["node"]).expect("loadable");
    }
}
