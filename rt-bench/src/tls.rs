//! TLS for the bench's Realtime server: a throwaway CA and a `localhost` certificate made at
//! start-up (the CA goes to a file both subjects trust), and a non-blocking `Read + Write`
//! over a `rustls::ServerConnection` and a mio socket for tungstenite.
//!
//! The adapter keeps tungstenite's contract: `WouldBlock` when nothing can move now, `Ok(0)`
//! only at the peer's end of stream, never a zero write.

use std::io::{self, Read, Write};
use std::sync::Arc;

use mio::net::TcpStream;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::{ServerConfig, ServerConnection};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

/// The server configuration and the CA certificate (PEM) clients must trust.
pub fn server_config() -> Result<(Arc<ServerConfig>, String), String> {
    let err = |e: &dyn std::fmt::Display| format!("TLS set-up: {e}");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(|e| err(&e))?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "rt-bench test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().map_err(|e| err(&e))?)
        .map_err(|e| err(&e))?;
    let mut leaf_params =
        CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .map_err(|e| err(&e))?;
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let leaf_key = KeyPair::generate().map_err(|e| err(&e))?;
    let leaf = leaf_params.signed_by(&leaf_key, &ca).map_err(|e| err(&e))?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| err(&e))?
            .with_no_client_auth()
            .with_single_cert(vec![leaf.der().clone(), ca.der().clone()], key)
            .map_err(|e| err(&e))?;
    Ok((Arc::new(config), ca.pem()))
}

/// A TLS server session over a non-blocking socket.
pub struct TlsIo {
    pub tls: ServerConnection,
    pub sock: TcpStream,
}

impl TlsIo {
    /// Pushes queued ciphertext until done (`Ok`) or the socket is full (`WouldBlock`).
    fn push(&mut self) -> io::Result<()> {
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut self.sock) {
                Ok(0) => return Err(io::ErrorKind::WouldBlock.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl Read for TlsIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.tls.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            // Handshake records and alerts may need answering before any plaintext.
            match self.push() {
                Ok(()) | Err(_) => {}
            }
            match self.tls.read_tls(&mut self.sock) {
                Ok(0) => return Ok(0),
                Ok(_) => {
                    self.tls
                        .process_new_packets()
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl Write for TlsIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.tls.writer().write(buf)?;
        let _ = self.push();
        if n == 0 && !buf.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.tls.writer().flush()?;
        self.push()
    }
}
