//! `fake-realtime`: a scripted OpenAI Realtime (GA) server for walkie's tests and demo.
//!
//! The main thread parses the command line, binds the listeners, announces them on stdout
//! and then accepts WebSocket connections ([`server`]); the control port runs on its own
//! thread ([`control`]). It shares no code with walkie on purpose: an independent reading of
//! the protocol catches walkie's mistakes instead of repeating them. See README.md.

#![deny(unsafe_code)]

mod args;
mod control;
mod record;
mod schema;
mod script;
mod server;
mod session;
mod tls;

use std::io::Write;
use std::net::TcpListener;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::script::Script;
use crate::server::{Registry, Shared};

/// Why the tool could not start; printed on stderr, exit code 2 for a bad script (a usage
/// error), 1 otherwise.
#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error("{0}")]
    Script(#[from] script::ScriptError),
    #[error("{0}")]
    Tls(#[from] tls::TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// Log lines go to stderr; `FAKE_REALTIME_LOG=debug|info|warn|error` (default warn).
struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            eprintln!("fake-realtime {}: {}", record.level(), record.args());
        }
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

fn init_logging() {
    let level = match std::env::var("FAKE_REALTIME_LOG").as_deref() {
        Ok("debug") => log::LevelFilter::Debug,
        Ok("info") => log::LevelFilter::Info,
        Ok("error") => log::LevelFilter::Error,
        _ => log::LevelFilter::Warn,
    };
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}

/// Writes through a temporary file and a rename, so a reader polling for the file never
/// sees it half written.
fn write_file(path: &Path, contents: &str) -> Result<(), StartError> {
    let error = |source| StartError::Write {
        path: path.display().to_string(),
        source,
    };
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    std::fs::write(&temporary, contents).map_err(error)?;
    std::fs::rename(&temporary, path).map_err(error)
}

fn bind(addr: std::net::SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr).map_err(|source| StartError::Listen {
        addr: addr.to_string(),
        source,
    })
}

fn start(options: args::Options) -> Result<(), StartError> {
    let started = Instant::now();
    let script = match &options.script {
        Some(path) => Script::from_file(path)?,
        None => Script::default(),
    };
    let tls = if options.tls {
        Some(tls::generate()?)
    } else {
        None
    };
    let listener = bind(options.listen)?;
    let control = bind(options.control)?;
    let port = listener.local_addr().map_err(|source| StartError::Listen {
        addr: options.listen.to_string(),
        source,
    })?;
    let control_addr = control.local_addr().map_err(|source| StartError::Listen {
        addr: options.control.to_string(),
        source,
    })?;
    let recorder =
        match &options.record {
            Some(path) => Some(record::Recorder::create(path, started).map_err(|source| {
                StartError::Write {
                    path: path.display().to_string(),
                    source,
                }
            })?),
            None => None,
        };
    if let (Some(tls), Some(path)) = (&tls, &options.cert_out) {
        write_file(path, &tls.ca_pem)?;
    }
    if let Some(path) = &options.port_file {
        write_file(path, &format!("{}\n", port.port()))?;
    }
    if let Some(path) = &options.control_file {
        write_file(path, &format!("{}\n", control_addr.port()))?;
    }
    let shared = Arc::new(Shared {
        api_key: options.api_key,
        session_seconds: options.session_seconds,
        speed: options.speed,
        tls: tls.map(|tls| tls.config),
        script: Mutex::new(Arc::new(script)),
        recorder,
        reject: Mutex::new(None),
        registry: Mutex::new(Registry::default()),
        events_total: AtomicU64::new(0),
    });
    {
        let shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("fake-realtime-control".to_owned())
            .spawn(move || control::run(control, shared))
            .map_err(|source| StartError::Listen {
                addr: control_addr.to_string(),
                source,
            })?;
    }
    let url = if options.tls {
        format!("wss://localhost:{}", port.port())
    } else {
        format!("ws://{port}")
    };
    // The `listening` line comes last: once a test sees it, everything is ready.
    let mut stdout = std::io::stdout().lock();
    let announced = writeln!(stdout, "control {control_addr}")
        .and_then(|()| writeln!(stdout, "listening {url}"))
        .and_then(|()| stdout.flush());
    drop(stdout);
    if let Err(e) = announced {
        log::warn!("cannot write to stdout: {e}");
    }
    server::run(listener, shared);
    Ok(())
}

fn main() -> ExitCode {
    init_logging();
    let options = match args::parse(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(e) => {
            eprintln!("fake-realtime: {e}\n{}", args::USAGE);
            return ExitCode::from(2);
        }
    };
    if options.help {
        println!("{}", args::USAGE);
        return ExitCode::SUCCESS;
    }
    match start(options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fake-realtime: {e}");
            match e {
                StartError::Script(_) => ExitCode::from(2),
                _ => ExitCode::from(1),
            }
        }
    }
}
