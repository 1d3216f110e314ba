//! rt-bench: walkie's latency and footprint measured from outside, side by side with a
//! Python asyncio + websockets peer doing the same job (tools/peer), in the same run,
//! against the same server and the same load. docs/BENCHMARKS.md explains every figure.
//!
//! ```text
//! rt-bench [--quick] [--out DIR] [--soak SECS] [--only a,b] [--subjects walkie,peer]
//!          [--devices file,pulse] [--walkie PATH] [--walkie-probe PATH]
//!          [--fake-agent PATH] [--python PATH] [--peer PATH]
//! ```
//! `make bench` builds what it needs and runs it; `--quick` is the smoke run of `make test`
//! (every scenario must produce numbers; their values are not checked).

mod clock;
mod mic;
mod procstat;
mod pulse;
mod report;
mod scenarios;
mod server;
mod stats;
mod subject;
mod tls;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde_json::json;

use scenarios::{Bench, Plan};
use subject::{Impl, Programs};

const SCENARIOS: &[&str] = &[
    "ready", "shutdown", "tool", "idle", "playback", "load", "soak",
];

struct Args {
    quick: bool,
    out: Option<PathBuf>,
    soak: u64,
    only: Vec<String>,
    subjects: Vec<Impl>,
    devices: Vec<&'static str>,
    programs: Programs,
}

fn usage() -> ! {
    eprintln!(
        "usage: rt-bench [--quick] [--out DIR] [--soak SECS] [--only {}]\n\
         \x20               [--subjects walkie,peer] [--devices file,pulse]\n\
         \x20               [--walkie PATH] [--walkie-probe PATH] [--fake-agent PATH]\n\
         \x20               [--python PATH] [--peer PATH]",
        SCENARIOS.join(",")
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository")
        .to_path_buf();
    let bin_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| repo.join("target/release"));
    let mut a = Args {
        quick: false,
        out: None,
        soak: 90,
        only: Vec::new(),
        subjects: vec![Impl::Walkie, Impl::Peer],
        devices: vec!["file", "pulse"],
        programs: Programs {
            walkie: bin_dir.join("walkie"),
            walkie_probe: bin_dir.join("walkie-probe"),
            fake_agent: bin_dir.join("fake-agent"),
            python: repo.join(".venv-bench/bin/python"),
            peer_script: repo.join("tools/peer/walkie_peer.py"),
        },
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage());
        match arg.as_str() {
            "--quick" => a.quick = true,
            "--out" => a.out = Some(PathBuf::from(value())),
            "--soak" => a.soak = value().parse().unwrap_or_else(|_| usage()),
            "--only" => a.only = value().split(',').map(str::to_owned).collect(),
            "--subjects" => {
                a.subjects = value()
                    .split(',')
                    .map(|s| match s {
                        "walkie" => Impl::Walkie,
                        "peer" => Impl::Peer,
                        _ => usage(),
                    })
                    .collect()
            }
            "--devices" => {
                a.devices = value()
                    .split(',')
                    .map(|s| match s {
                        "file" => "file",
                        "pulse" => "pulse",
                        _ => usage(),
                    })
                    .collect()
            }
            "--walkie" => a.programs.walkie = value().into(),
            "--walkie-probe" => a.programs.walkie_probe = value().into(),
            "--fake-agent" => a.programs.fake_agent = value().into(),
            "--python" => a.programs.python = value().into(),
            "--peer" => a.programs.peer_script = value().into(),
            "-h" | "--help" => usage(),
            _ => usage(),
        }
    }
    if a.only.iter().any(|s| !SCENARIOS.contains(&s.as_str())) {
        usage();
    }
    a
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The machine and the builds the figures came from.
fn machine(programs: &Programs) -> serde_json::Value {
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let mem_kib: u64 = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let run = |cmd: &str, args: &[&str]| {
        std::process::Command::new(cmd)
            .args(args)
            .output()
            .ok()
            .map(|o| {
                let mut s = String::from_utf8_lossy(&o.stdout).trim().to_owned();
                if s.is_empty() {
                    s = String::from_utf8_lossy(&o.stderr).trim().to_owned();
                }
                s
            })
            .unwrap_or_default()
    };
    json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "memory_gib": (mem_kib as f64 / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "debian": read("/etc/debian_version").trim(),
        "python": run(&programs.python.display().to_string(), &["--version"]),
        "commit": run("git", &["rev-parse", "--short", "HEAD"]),
        "load_at_start": read("/proc/loadavg").split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    })
}

fn main() -> ExitCode {
    let args = parse_args();
    let started = Instant::now();
    for p in [
        &args.programs.walkie,
        &args.programs.walkie_probe,
        &args.programs.fake_agent,
        &args.programs.peer_script,
    ] {
        if !p.exists() {
            eprintln!(
                "rt-bench: {} not found (make bench builds it; see docs/BENCHMARKS.md)",
                p.display()
            );
            return ExitCode::from(2);
        }
    }
    if args.subjects.contains(&Impl::Peer) && !args.programs.python.exists() {
        eprintln!(
            "rt-bench: {} not found: run rt-bench/setup.sh (make bench does)",
            args.programs.python.display()
        );
        return ExitCode::from(2);
    }
    let plan = if args.quick {
        Plan::quick()
    } else {
        Plan::full(Duration::from_secs(args.soak))
    };
    let want = |s: &str| args.only.is_empty() || args.only.iter().any(|o| o == s);
    let mut info = machine(&args.programs);

    // The clocked device: one PulseAudio server for the whole run. Its address goes into
    // our own environment before any thread exists (alsa-lib and libpulse read it there).
    let pulse = if args.devices.contains(&"pulse") && (want("idle") || want("playback")) {
        match pulse::Pulse::start() {
            Ok(mut p) => {
                for (k, v) in p.client_env() {
                    // SAFETY: single-threaded here: nothing else reads the environment.
                    unsafe { std::env::set_var(k, v) };
                }
                if let Err(e) = p.keep_sinks_awake() {
                    eprintln!("rt-bench: {e}");
                    return ExitCode::from(1);
                }
                Some(p)
            }
            Err(e) => {
                eprintln!("rt-bench: {e}");
                return ExitCode::from(1);
            }
        }
    } else {
        None
    };

    let mut bench = Bench {
        programs: args.programs.clone(),
        plan,
        pulse,
        figures: Vec::new(),
        idle_threads: Vec::new(),
        notes: Vec::new(),
    };
    let mut failures = Vec::new();
    let mut step = |name: &str, r: Result<(), String>| {
        eprintln!(
            "rt-bench: {name} done ({:.0} s in)",
            started.elapsed().as_secs_f64()
        );
        if let Err(e) = r {
            eprintln!("rt-bench: {name}: {e}");
            failures.push(format!("{name}: {e}"));
        }
    };
    for &who in &args.subjects {
        let w = who.name();
        if want("ready") {
            step(&format!("ready {w}"), bench.ready(who));
        }
        if want("shutdown") {
            step(&format!("shutdown {w}"), bench.shutdown(who));
        }
        if want("tool") {
            step(&format!("tool {w}"), bench.tool_ack(who));
        }
        for &device in &args.devices {
            if want("idle") {
                step(
                    &format!("idle+mic {w} {device}"),
                    bench.audio_plain(device, who),
                );
            }
            if want("playback") {
                step(
                    &format!("playback {w} {device}"),
                    bench.audio_probe(device, who),
                );
            }
        }
        if want("load") {
            for n in bench.plan.agents.clone() {
                step(&format!("load {w} N={n}"), bench.load(who, n));
            }
        }
    }
    if want("soak") {
        let subjects = args.subjects.clone();
        step("soak", bench.soak(&subjects));
    }

    let rows = report::rows(&bench.figures);
    let table = report::table(&rows);
    println!("{table}");
    for n in &bench.notes {
        eprintln!("rt-bench: note: {n}");
    }
    info["load_at_end"] = json!(
        read("/proc/loadavg")
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    info["seconds"] = json!(started.elapsed().as_secs());

    let out = match &args.out {
        Some(o) => o.clone(),
        None if args.quick => std::env::temp_dir().join("rt-bench-quick"),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("results"),
    };
    if let Err(e) = std::fs::create_dir_all(&out) {
        eprintln!("rt-bench: {}: {e}", out.display());
        return ExitCode::from(1);
    }
    let plots = match report::plots(&bench.figures, &out) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("rt-bench: plots: {e}");
            failures.push(format!("plots: {e}"));
            Vec::new()
        }
    };
    let doc = json!({
        "quick": args.quick,
        "machine": info,
        "plan": format!("{:?}", bench.plan),
        "rows": rows,
        "idle_threads": bench.idle_threads,
        "plots": plots,
        "notes": bench.notes,
        "failures": failures,
        "table": table,
    });
    let json_path = out.join("latest.json");
    if let Err(e) = std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&doc).unwrap_or_default(),
    ) {
        eprintln!("rt-bench: {}: {e}", json_path.display());
        return ExitCode::from(1);
    }
    eprintln!(
        "rt-bench: {} and {} plots in {} ({:.0} s)",
        json_path.display(),
        plots.len(),
        out.display(),
        started.elapsed().as_secs_f64()
    );

    // The smoke run checks only that every scenario produced numbers for every subject.
    let mut missing = Vec::new();
    if args.only.is_empty() {
        let expected: &[(&str, bool)] = &[
            ("ready", true),
            ("shutdown", true),
            ("tool_ack", true),
            ("idle_cpu", true),
            ("idle_wakeups", true),
            ("rss_rest", true),
            ("mic_wire", true),
            ("wire_ring", true),
            ("wire_device", true),
            ("barge_in", true),
            ("loop_stall", true),
            ("ctl_rtt", true),
            ("rss_soak", true),
        ];
        for &who in &args.subjects {
            for (id, _) in expected {
                if !bench
                    .figures
                    .iter()
                    .any(|f| f.id == *id && f.subject == who.name())
                {
                    missing.push(format!("{id} ({})", who.name()));
                }
            }
        }
    }
    if !failures.is_empty() || !missing.is_empty() {
        for f in &failures {
            eprintln!("rt-bench: FAILED {f}");
        }
        if !missing.is_empty() {
            eprintln!("rt-bench: no numbers for: {}", missing.join(", "));
        }
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}
