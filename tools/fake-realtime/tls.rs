//! `--tls`: a throwaway CA and a server certificate for `localhost` and 127.0.0.1.
//!
//! Generated at start-up, in memory; only the CA certificate is written out (`--cert-out`),
//! for walkie's `realtime.ca_file`. A separate CA (rather than one self-signed leaf) keeps the
//! chain shaped like a real endpoint's, so walkie's verifier sees a normal path.

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::ServerConfig;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

/// Why TLS could not be set up; the tool exits 1.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Certificate generation failed (a bug or an unusable RNG).
    #[error("cannot generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the generated chain or key.
    #[error("cannot build the TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

pub struct Tls {
    pub config: Arc<ServerConfig>,
    /// The CA certificate, PEM: what a client must trust.
    pub ca_pem: String,
}

pub fn generate() -> Result<Tls, TlsError> {
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "walkie fake-realtime test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

    let mut leaf_params =
        CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let leaf_key = KeyPair::generate()?;
    let leaf = leaf_params.signed_by(&leaf_key, &ca)?;

    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![leaf.der().clone(), ca.der().clone()], key)?;
    Ok(Tls {
        config: Arc::new(config),
        ca_pem: ca.pem(),
    })
}
