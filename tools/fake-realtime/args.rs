//! Command-line options of `fake-realtime`.

use std::net::SocketAddr;
use std::path::PathBuf;

pub const USAGE: &str = "\
usage: fake-realtime [--listen 127.0.0.1:0] [--tls] [--cert-out FILE] [--port-file FILE]
                     [--api-key KEY] [--record FILE] [--script FILE]
                     [--control 127.0.0.1:0] [--control-file FILE]
                     [--session-seconds N] [--speed X]
A scripted OpenAI Realtime (GA) server for tests and the demo; see tools/fake-realtime/README.md.";

/// A command line that cannot be used; the tool prints it with the usage and exits 2.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error("unknown option {0}")]
    Unknown(String),
    #[error("{0} needs a value")]
    MissingValue(String),
    #[error("bad value {value:?} for {option}: {reason}")]
    BadValue {
        option: String,
        value: String,
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    pub listen: SocketAddr,
    pub tls: bool,
    pub cert_out: Option<PathBuf>,
    pub port_file: Option<PathBuf>,
    pub api_key: Option<String>,
    pub record: Option<PathBuf>,
    pub script: Option<PathBuf>,
    pub control: SocketAddr,
    pub control_file: Option<PathBuf>,
    pub session_seconds: u64,
    pub speed: f64,
    pub help: bool,
}

impl Default for Options {
    fn default() -> Options {
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        Options {
            listen: loopback,
            tls: false,
            cert_out: None,
            port_file: None,
            api_key: None,
            record: None,
            script: None,
            control: loopback,
            control_file: None,
            session_seconds: 3600,
            speed: 4.0,
            help: false,
        }
    }
}

fn parse_value<T: std::str::FromStr>(option: &str, value: &str) -> Result<T, UsageError>
where
    T::Err: std::fmt::Display,
{
    value.parse().map_err(|e: T::Err| UsageError::BadValue {
        option: option.to_owned(),
        value: value.to_owned(),
        reason: e.to_string(),
    })
}

/// Parses the arguments after the program name; `--opt value` and `--opt=value` both work.
pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Options, UsageError> {
    let mut options = Options::default();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((name, value)) if name.starts_with("--") => {
                (name.to_owned(), Some(value.to_owned()))
            }
            _ => (arg.clone(), None),
        };
        match name.as_str() {
            "--tls" => options.tls = true,
            "--help" | "-h" => options.help = true,
            "--listen" | "--cert-out" | "--port-file" | "--api-key" | "--record" | "--script"
            | "--control" | "--control-file" | "--session-seconds" | "--speed" => {
                let value = match inline {
                    Some(value) => value,
                    None => args
                        .next()
                        .ok_or_else(|| UsageError::MissingValue(name.clone()))?,
                };
                match name.as_str() {
                    "--listen" => options.listen = parse_value(&name, &value)?,
                    "--cert-out" => options.cert_out = Some(value.into()),
                    "--port-file" => options.port_file = Some(value.into()),
                    "--api-key" => options.api_key = Some(value),
                    "--record" => options.record = Some(value.into()),
                    "--script" => options.script = Some(value.into()),
                    "--control" => options.control = parse_value(&name, &value)?,
                    "--control-file" => options.control_file = Some(value.into()),
                    "--session-seconds" => options.session_seconds = parse_value(&name, &value)?,
                    _ => {
                        let speed: f64 = parse_value(&name, &value)?;
                        if !(speed.is_finite() && speed > 0.0) {
                            return Err(UsageError::BadValue {
                                option: name,
                                value,
                                reason: "must be a positive number".to_owned(),
                            });
                        }
                        options.speed = speed;
                    }
                }
            }
            _ => return Err(UsageError::Unknown(arg)),
        }
    }
    Ok(options)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn parses_both_forms_and_keeps_defaults() {
        let options = parse(args(&[
            "--tls",
            "--speed=2",
            "--api-key",
            "k",
            "--session-seconds",
            "5",
        ]))
        .expect("valid");
        assert!(options.tls);
        assert_eq!(options.speed, 2.0);
        assert_eq!(options.api_key.as_deref(), Some("k"));
        assert_eq!(options.session_seconds, 5);
        assert_eq!(options.listen, SocketAddr::from(([127, 0, 0, 1], 0)));
    }

    #[test]
    fn refuses_unknown_options_missing_values_and_bad_speeds() {
        assert!(matches!(
            parse(args(&["--bogus"])),
            Err(UsageError::Unknown(_))
        ));
        assert!(matches!(
            parse(args(&["--record"])),
            Err(UsageError::MissingValue(_))
        ));
        assert!(matches!(
            parse(args(&["--speed", "0"])),
            Err(UsageError::BadValue { .. })
        ));
        assert!(matches!(
            parse(args(&["--listen", "nowhere"])),
            Err(UsageError::BadValue { .. })
        ));
    }
}
