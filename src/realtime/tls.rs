//! TLS under the Realtime WebSocket: a non-blocking `Read + Write` adapter over a
//! `rustls::ClientConnection` and the link's `mio::net::TcpStream`, plus the client
//! configuration (ring provider, webpki roots, the optional `realtime.ca_file`).
//!
//! Runs on the loop thread and owns no fd of its own: the socket stays registered by
//! [`crate::realtime::link`] under `reactor::LINK`, which derives its interest from
//! [`TlsStream::wants_write`]. This is not `rustls::StreamOwned` because its write path may
//! read from the socket and swallow an edge of mio's edge-triggered readiness (a known trap of
//! rustls with mio). The contract tungstenite relies on: `read`, `write` and `flush` return
//! `WouldBlock` when nothing can move now and **never `Ok(0)`** except at a true end of
//! stream — tungstenite takes a zero read as the peer closing, a zero write as a reset, and
//! its handshake asserts on a zero write.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mio::net::TcpStream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};

/// Why no TLS client could be set up. All of these are configuration problems: the link
/// reports them as fatal (`LinkEvent::Failed`) and does not retry until told to.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// `realtime.ca_file` could not be opened or parsed; the user fixes the path or the file.
    #[error("cannot read CA file {path}: {reason}")]
    CaFile { path: PathBuf, reason: String },
    /// `realtime.ca_file` parsed but holds no certificate rustls accepts as a trust anchor;
    /// the user points it at a PEM certificate.
    #[error("CA file {0} holds no usable certificate")]
    NoCertificate(PathBuf),
    /// rustls refused the protocol versions for the ring provider (a build problem); report it.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The URL's host is neither a DNS name nor an IP address; the user fixes `realtime.url`.
    #[error("{0:?} is not a valid TLS server name")]
    ServerName(String),
}

/// The largest CA file read (the system bundle of all public roots is about 200 KB).
const MAX_CA_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// The client configuration: the ring provider (half the build time and binary of
/// aws-lc-rs), the webpki roots, and every certificate in `ca_file` as an extra anchor.
pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, TlsConfigError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let ca_error = |reason: String| TlsConfigError::CaFile {
            path: path.to_path_buf(),
            reason,
        };
        // Read through the one safe-open helper: a FIFO or a device named here is refused
        // at once instead of blocking the loop, and a bundle is read up to a cap.
        let pem = crate::files::read_capped(path, MAX_CA_FILE_BYTES)
            .map_err(|e| ca_error(e.to_string()))?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ca_error(e.to_string()))?;
        let (added, _ignored) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(TlsConfigError::NoCertificate(path.to_path_buf()));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The SNI / verification name for a URL host (`[::1]` brackets allowed).
pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsConfigError> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(bare.to_owned()).map_err(|_| TlsConfigError::ServerName(host.to_owned()))
}

/// A TLS client session over a non-blocking socket. `S` is the mio socket in production and
/// a scripted in-memory stream in the tests.
pub struct TlsStream<S = TcpStream> {
    tls: ClientConnection,
    sock: S,
}

impl<S: Read + Write> TlsStream<S> {
    pub fn new(
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
        sock: S,
    ) -> Result<TlsStream<S>, TlsConfigError> {
        Ok(TlsStream {
            tls: ClientConnection::new(config, name)?,
            sock,
        })
    }

    pub fn get_ref(&self) -> &S {
        &self.sock
    }

    /// The socket, for (re)registration with the poll.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.sock
    }

    /// Ciphertext is queued for the socket: the owner wants WRITABLE interest.
    pub fn wants_write(&self) -> bool {
        self.tls.wants_write()
    }

    /// Pushes queued ciphertext to the socket until it is all out (`Ok`) or the socket is
    /// full (`WouldBlock`; the bytes stay queued and go on the next WRITABLE).
    pub fn push_tls(&mut self) -> io::Result<()> {
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

    /// Queues a `close_notify` alert and pushes it best effort (shutdown path).
    pub fn send_close_notify(&mut self) {
        self.tls.send_close_notify();
        let _ = self.push_tls();
    }

    /// Pulls one batch of ciphertext and decrypts it. `Ok(false)` means the socket is at EOF.
    fn pull_tls(&mut self) -> io::Result<bool> {
        let eof = loop {
            match self.tls.read_tls(&mut self.sock) {
                Ok(n) => break n == 0,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        };
        let processed = self.tls.process_new_packets();
        // Handshake replies, key updates and alerts (including the one describing an error
        // below) were queued by processing; send them now if the socket takes them. A full
        // socket is fine: wants_write() keeps the owner's WRITABLE interest on.
        match self.push_tls() {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if processed.is_ok() => return Err(e),
            Err(_) => {}
        }
        // A rustls error (bad certificate, decrypt failure) is fatal for the connection; its
        // text ("invalid peer certificate: UnknownIssuer") travels inside the io::Error.
        processed.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        Ok(!eof)
    }
}

impl<S: Read + Write> Read for TlsStream<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            // Plaintext rustls already holds comes first: the socket may have no new edge for it.
            match self.tls.reader().read(buf) {
                // Ok(0) from the reader means close_notify was received: the true end of stream.
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // UnexpectedEof: TCP closed without close_notify — an error, not a clean EOF.
                Err(e) => return Err(e),
            }
            // Nothing decrypted yet: pull ciphertext until the socket says WouldBlock (which
            // is what we return then), EOF (the reader turns it into Ok(0) or
            // UnexpectedEof on the next turn) or plaintext appears.
            self.pull_tls()?;
        }
    }
}

impl<S: Read + Write> Write for TlsStream<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut accepted = self.tls.writer().write(buf)?;
        if accepted == 0 {
            // rustls' buffer is full and says so with Ok(0); make room by pushing ciphertext.
            match self.push_tls() {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            accepted = self.tls.writer().write(buf)?;
            if accepted == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
        }
        // The plaintext is queued inside rustls now; get the ciphertext moving. A full socket
        // is not an error for this write: the bytes are accepted and go on WRITABLE.
        match self.push_tls() {
            Ok(()) => Ok(accepted),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(accepted),
            Err(e) => Err(e),
        }
    }

    /// `Ok` once every queued ciphertext byte is in the socket, `WouldBlock` while some wait.
    /// Plaintext written before the TLS handshake finishes is not counted: it cannot move
    /// until the server answers, which a read (not a flush) drives.
    fn flush(&mut self) -> io::Result<()> {
        self.push_tls()?;
        self.sock.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::VecDeque;
    use std::rc::Rc;

    use rustls::ServerConnection;
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

    /// Both directions of an in-memory "socket", with the client side's behaviour scripted.
    #[derive(Default)]
    struct Pipes {
        to_client: VecDeque<u8>,
        to_server: VecDeque<u8>,
        /// When false, client reads return WouldBlock even if bytes wait.
        readable: bool,
        /// Bytes the client may still write before writes return WouldBlock.
        write_room: usize,
        /// The "server" closed its side: client reads see EOF once `to_client` is empty.
        eof: bool,
        /// Fail this many upcoming client reads with Interrupted.
        interrupt_reads: usize,
    }

    /// The client's end of [`Pipes`]: a scripted socket (tungstenite's auto_pong_flush style).
    #[derive(Clone)]
    struct ScriptedSock(Rc<RefCell<Pipes>>);

    impl Read for ScriptedSock {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let mut p = self.0.borrow_mut();
            if p.interrupt_reads > 0 {
                p.interrupt_reads -= 1;
                return Err(io::ErrorKind::Interrupted.into());
            }
            if !p.readable {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            if p.to_client.is_empty() {
                return if p.eof {
                    Ok(0)
                } else {
                    Err(io::ErrorKind::WouldBlock.into())
                };
            }
            p.to_client.read(buf)
        }
    }

    impl Write for ScriptedSock {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut p = self.0.borrow_mut();
            if p.write_room == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = p.write_room.min(buf.len());
            p.write_room -= n;
            p.to_server.extend(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct Fixture {
        client: TlsStream<ScriptedSock>,
        server: ServerConnection,
        pipes: Rc<RefCell<Pipes>>,
    }

    fn fixture() -> Fixture {
        let key = rcgen::generate_simple_self_signed(vec!["walkie.test".to_owned()]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, key.cert.pem()).unwrap();
        let client_cfg = client_config(Some(&ca)).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server_cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![key.cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.signing_key.serialize_der())),
            )
            .unwrap();
        let pipes = Rc::new(RefCell::new(Pipes {
            readable: true,
            write_room: usize::MAX,
            ..Pipes::default()
        }));
        let client = TlsStream::new(
            client_cfg,
            server_name("walkie.test").unwrap(),
            ScriptedSock(Rc::clone(&pipes)),
        )
        .unwrap();
        let server = ServerConnection::new(Arc::new(server_cfg)).unwrap();
        Fixture {
            client,
            server,
            pipes,
        }
    }

    impl Fixture {
        /// The server consumes what the client sent and answers; returns its plaintext.
        fn pump_server(&mut self) -> Vec<u8> {
            let mut p = self.pipes.borrow_mut();
            let mut plain = Vec::new();
            while !p.to_server.is_empty() {
                self.server.read_tls(&mut p.to_server).unwrap();
                self.server.process_new_packets().unwrap();
                // Empty rustls' plaintext buffer before it fills and refuses more ciphertext.
                match self.server.reader().read_to_end(&mut plain) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("server read: {e}"),
                }
            }
            while self.server.wants_write() {
                self.server.write_tls(&mut p.to_client).unwrap();
            }
            plain
        }

        /// Reads what the client has; asserts the no-Ok(0) contract on the way.
        fn client_read_available(&mut self) -> Vec<u8> {
            let mut out = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                match self.client.read(&mut buf) {
                    Ok(0) => panic!("Ok(0) without the server closing"),
                    Ok(n) => out.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return out,
                    Err(e) => panic!("client read: {e}"),
                }
            }
        }

        /// Runs the handshake, returning what the server received as plaintext.
        fn handshake(&mut self) -> Vec<u8> {
            let mut received = Vec::new();
            for _ in 0..10 {
                let _ = self.client.flush();
                received.extend(self.pump_server());
                assert!(self.client_read_available().is_empty());
                if !self.server.is_handshaking() && !self.client.tls.is_handshaking() {
                    let _ = self.client.flush();
                    received.extend(self.pump_server());
                    return received;
                }
            }
            panic!("handshake did not finish");
        }
    }

    #[test]
    fn read_without_data_is_wouldblock_never_zero() {
        let mut f = fixture();
        let mut buf = [0u8; 16];
        let err = f.client.read(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        // A socket that says WouldBlock although bytes wait is still WouldBlock, not Ok(0).
        f.client.flush().unwrap();
        f.pump_server();
        f.pipes.borrow_mut().readable = false;
        let err = f.client.read(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn full_plaintext_buffer_is_wouldblock_not_zero() {
        let mut f = fixture();
        // No room on the socket, no handshake yet: rustls buffers 64 KiB and then answers Ok(0),
        // which the adapter must turn into WouldBlock.
        f.pipes.borrow_mut().write_room = 0;
        let chunk = vec![b'x'; 16 * 1024];
        let mut accepted = 0usize;
        let err = loop {
            match f.client.write(&chunk) {
                Ok(0) => panic!("Ok(0) from write"),
                Ok(n) => accepted += n,
                Err(e) => break e,
            }
            assert!(accepted < 10 * 1024 * 1024, "unbounded buffering");
        };
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert!(accepted > 0);
        // The ClientHello is waiting for the socket: flush says so, and the owner must ask
        // for WRITABLE.
        assert!(f.client.wants_write());
        assert_eq!(
            f.client.flush().unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        // The socket drains: everything accepted reaches the server after the handshake.
        f.pipes.borrow_mut().write_room = usize::MAX;
        let mut received = f.handshake();
        while received.len() < accepted {
            f.client.flush().unwrap();
            let more = f.pump_server();
            assert!(
                !more.is_empty(),
                "stalled at {} of {accepted}",
                received.len()
            );
            received.extend(more);
        }
        assert_eq!(received.len(), accepted);
        assert!(received.iter().all(|&b| b == b'x'));
    }

    #[test]
    fn exchange_survives_scheduled_wouldblock_and_interrupts() {
        let mut f = fixture();
        assert_eq!(f.client.write(b"GET / HTTP/1.1\r\n\r\n").unwrap(), 18);
        // The socket takes only a few bytes at a time: writes and flushes may block halfway.
        f.pipes.borrow_mut().write_room = 7;
        let _ = f.client.flush();
        for _ in 0..2000 {
            if !f.client.wants_write() {
                break;
            }
            f.pipes.borrow_mut().write_room = 7;
            match f.client.flush() {
                Ok(()) => {}
                Err(e) => assert_eq!(e.kind(), io::ErrorKind::WouldBlock),
            }
        }
        f.pipes.borrow_mut().write_room = usize::MAX;
        let received = f.handshake();
        assert_eq!(received, b"GET / HTTP/1.1\r\n\r\n");

        // Server data arrives but the socket is not readable yet: WouldBlock; then an EINTR
        // is retried inside the adapter, and the bytes come through.
        f.server.writer().write_all(b"HTTP/1.1 101\r\n").unwrap();
        f.pump_server();
        f.pipes.borrow_mut().readable = false;
        let mut buf = [0u8; 64];
        assert_eq!(
            f.client.read(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        {
            let mut p = f.pipes.borrow_mut();
            p.readable = true;
            p.interrupt_reads = 1;
        }
        assert_eq!(f.client_read_available(), b"HTTP/1.1 101\r\n");
    }

    #[test]
    fn only_close_notify_reads_as_zero() {
        let mut f = fixture();
        f.handshake();
        f.server.writer().write_all(b"bye").unwrap();
        f.server.send_close_notify();
        f.pump_server();
        f.pipes.borrow_mut().eof = true;
        let mut buf = [0u8; 16];
        assert_eq!(f.client.read(&mut buf).unwrap(), 3);
        assert_eq!(&buf[..3], b"bye");
        assert_eq!(f.client.read(&mut buf).unwrap(), 0);
    }

    #[test]
    fn tcp_eof_without_close_notify_is_an_error() {
        let mut f = fixture();
        f.handshake();
        f.pipes.borrow_mut().eof = true;
        let mut buf = [0u8; 16];
        let err = f.client.read(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn untrusted_certificate_is_an_error_naming_the_certificate() {
        let mut f = fixture();
        f.client = TlsStream::new(
            client_config(None).unwrap(),
            server_name("walkie.test").unwrap(),
            ScriptedSock(Rc::clone(&f.pipes)),
        )
        .unwrap();
        f.client.flush().unwrap();
        f.pump_server();
        let mut buf = [0u8; 16];
        let err = f.client.read(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("certificate"), "{err}");
    }

    #[test]
    fn ca_file_problems_are_config_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        assert!(matches!(
            client_config(Some(&missing)),
            Err(TlsConfigError::CaFile { .. })
        ));
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        assert!(matches!(
            client_config(Some(&empty)),
            Err(TlsConfigError::NoCertificate(_))
        ));
        assert!(server_name("[::1]").is_ok());
        assert!(server_name("bad host").is_err());
    }
}
