//! Logging to stderr, one line per event, readable under journald.
//!
//! Under journald (`JOURNAL_STREAM` set) each line starts with a `<N>` syslog priority, which
//! journald turns into the entry's level and strips; elsewhere a timestamp and the level
//! name lead. The level comes from `WALKIE_LOG` (`error`, `warn`, `info`, `debug`, `trace`;
//! default `info`). Real-time audio threads never log: they report through atomics and the
//! main loop logs for them.

use log::{Level, LevelFilter, Log, Metadata, Record};

struct StderrLogger {
    journald: bool,
}

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        // Other crates stay at info and above: tungstenite logs the raw upgrade request
        // (with the Authorization header) at trace level, and the key must never be logged.
        let ours = metadata.target().starts_with("walkie");
        metadata.level() <= log::max_level() && (ours || metadata.level() <= Level::Info)
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        // One write per line so concurrent helper threads never interleave within a line.
        let msg = record.args().to_string().replace('\n', " ⏎ ");
        let line = if self.journald {
            let prio = match record.level() {
                Level::Error => 3,
                Level::Warn => 4,
                Level::Info => 6,
                Level::Debug | Level::Trace => 7,
            };
            format!("<{prio}>{}: {msg}\n", short_target(record.target()))
        } else {
            let now = std::time::SystemTime::now();
            let ms = crate::clock::unix_ms(now) % 1000;
            let ts = crate::clock::rfc3339(now);
            format!(
                "{}.{ms:03}Z {:<5} {}: {msg}\n",
                ts.trim_end_matches('Z'),
                record.level(),
                short_target(record.target())
            )
        };
        // In the library's own unit tests the harness captures eprint! per test (and shows it
        // only for a failing one); a direct write would spill every test's log into the
        // output of a passing `make test`.
        #[cfg(test)]
        eprint!("{line}");
        #[cfg(not(test))]
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
    }

    fn flush(&self) {}
}

fn short_target(target: &str) -> &str {
    target.strip_prefix("walkie::").unwrap_or(target)
}

/// Parses a `WALKIE_LOG` value.
pub fn parse_level(s: &str) -> Option<LevelFilter> {
    match s.trim().to_ascii_lowercase().as_str() {
        "off" => Some(LevelFilter::Off),
        "error" => Some(LevelFilter::Error),
        "warn" | "warning" => Some(LevelFilter::Warn),
        "info" => Some(LevelFilter::Info),
        "debug" => Some(LevelFilter::Debug),
        "trace" => Some(LevelFilter::Trace),
        _ => None,
    }
}

/// Installs the stderr logger once; later calls are no-ops.
pub fn init() {
    let level = std::env::var("WALKIE_LOG")
        .ok()
        .and_then(|v| parse_level(&v))
        .unwrap_or(LevelFilter::Info);
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    if log::set_boxed_logger(Box::new(StderrLogger { journald })).is_ok() {
        log::set_max_level(level);
    }
}
