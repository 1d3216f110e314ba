//! Both sides of the rig. On the host, the first kernel test to run builds the guest
//! (tools/vm/mkguest.sh), boots it once (tools/vm/boot.sh) with this very test binary as
//! the guest's program, and every test then reads its own result from what the guest
//! wrote. In the guest (`WALKIE_KERNEL_GUEST` names the share), each test runs its body
//! and records the outcome for the host.
//!
//! Nothing here passes silently: no qemu, no kernel, a boot that runs out of time or a test
//! the guest never reported are failures that say what went wrong.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

use serde_json::{Value, json};

/// The guest runs every selected test in one boot; this bounds it (the suite takes about
/// two minutes on a 2-core machine).
const BOOT_LIMIT_S: u64 = 420;
/// Set in the guest to the share's path.
const GUEST_ENV: &str = "WALKIE_KERNEL_GUEST";
/// Set in the guest to the group a test process runs (its files in the share are its own).
const GROUP_ENV: &str = "WALKIE_KERNEL_GROUP";
/// The groups run side by side in the guest, one test at a time within each: the button
/// tests (uinput devices) and the audio tests (the loopback card) do not share a device.
/// The audio tests' own button uses a key the button tests never look for.
const GROUPS: [&str; 2] = ["button", "audio"];

/// Runs kernel test `name` of module `module`: its body in the guest, its guest result on
/// the host.
pub fn run(module: &str, name: &str, body: impl FnOnce()) {
    match std::env::var_os(GUEST_ENV) {
        // Each group's process runs its own module's tests only. The `--skip` filters say
        // so too, but with `--exact` libtest matches them whole, and a test selected by
        // its full name would otherwise run in both processes at once.
        Some(_)
            if std::env::var(GROUP_ENV)
                .is_ok_and(|group| module.rsplit("::").next() != Some(group.as_str())) => {}
        Some(share) => in_guest(Path::new(&share), name, body),
        None => on_host(name),
    }
}

/// The share directory, in the guest.
pub fn share() -> PathBuf {
    PathBuf::from(std::env::var_os(GUEST_ENV).expect("only in the guest"))
}

/// Records a measurement (guest side) for the host to print and the docs to quote.
pub fn report(test: &str, figures: Value) {
    append(
        &share().join(format!("measurements-{}.jsonl", group())),
        &json!({"test": test, "figures": figures}),
    );
}

/// This process's group of tests, in the guest.
fn group() -> String {
    std::env::var(GROUP_ENV).unwrap_or_else(|_| "all".into())
}

fn append(path: &Path, line: &Value) {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    writeln!(f, "{line}").unwrap();
}

fn in_guest(share: &Path, name: &str, body: impl FnOnce()) {
    eprintln!("=== kernel test {name}: start");
    let started = Instant::now();
    let outcome = catch_unwind(AssertUnwindSafe(body));
    let ms = started.elapsed().as_millis() as u64;
    let error = outcome.as_ref().err().map(|payload| {
        payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panicked".into())
    });
    append(
        &share.join(format!("results-{}.jsonl", group())),
        &json!({"test": name, "ok": error.is_none(), "ms": ms, "error": error}),
    );
    eprintln!("=== kernel test {name}: end ({ms} ms)");
    if let Err(payload) = outcome {
        resume_unwind(payload);
    }
}

struct GuestResult {
    ok: bool,
    ms: u64,
    error: String,
}

struct GuestRun {
    results: HashMap<String, GuestResult>,
    /// Everything the guest's tests printed.
    console: String,
    /// What went wrong with the boot itself, if anything.
    problem: Option<String>,
    measurements: Vec<Value>,
    seconds: f64,
}

static RUN: OnceLock<Result<GuestRun, String>> = OnceLock::new();

fn on_host(name: &str) {
    let run = match RUN.get_or_init(boot) {
        Ok(run) => run,
        Err(e) => panic!("the kernel tests could not run: {e}"),
    };
    for m in run.measurements.iter().filter(|m| m["test"] == name) {
        eprintln!("{name}: measured in the guest: {}", m["figures"]);
    }
    match run.results.get(name) {
        Some(r) if r.ok => eprintln!("{name}: passed in the guest ({} ms)", r.ms),
        Some(r) => panic!(
            "failed in the guest after {} ms: {}\n--- the guest's output for this test ---\n{}",
            r.ms,
            r.error,
            section(&run.console, name)
        ),
        None => panic!(
            "the guest did not report {name} (boot of {:.0} s: {})\n--- the end of the guest's output ---\n{}",
            run.seconds,
            run.problem.as_deref().unwrap_or("it ended normally"),
            tail(&run.console, 80)
        ),
    }
}

fn section(console: &str, name: &str) -> String {
    let start = format!("=== kernel test {name}: start");
    let end = format!("=== kernel test {name}: end");
    let Some(from) = console.find(&start) else {
        return tail(console, 60);
    };
    let to = console[from..]
        .find(&end)
        .map_or(console.len(), |i| from + i + end.len());
    tail(&console[from..to], 150)
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The host's test filters, for the guest to select the same tests.
fn forwarded_args() -> Vec<String> {
    let mut out = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--exact" | "--ignored" | "--include-ignored" => out.push(arg),
            "--skip" => {
                out.push(arg);
                out.extend(args.next());
            }
            // Options that take a value this runner does not forward.
            "--test-threads" | "--color" | "--format" | "--logfile" | "-Z" | "--shuffle-seed" => {
                args.next();
            }
            a if a.starts_with('-') => {}
            _ => out.push(arg),
        }
    }
    out
}

/// Shares of earlier runs whose test process is gone (each run keeps its own, so two test
/// runs in one tree do not mix their results).
fn remove_stale_shares(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("run-")) else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn boot() -> Result<GuestRun, String> {
    if cfg!(not(target_arch = "x86_64")) {
        return Err(
            "the guest is an x86-64 Debian kernel running this host's binaries: x86-64 hosts only"
                .into(),
        );
    }
    // The guest runs them but cannot build them.
    crate::common::fakes_built();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kernel-vm");
    let guest = base.join("guest");
    let built = Command::new(repo.join("tools/vm/mkguest.sh"))
        .arg(&guest)
        .output()
        .map_err(|e| format!("cannot run tools/vm/mkguest.sh: {e}"))?;
    if !built.status.success() {
        return Err(format!(
            "cannot build the guest (tools/vm/mkguest.sh): {}",
            String::from_utf8_lossy(&built.stderr).trim()
        ));
    }
    remove_stale_shares(&base);
    let share = base.join(format!("run-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&share);
    std::fs::create_dir_all(&share).map_err(|e| format!("{}: {e}", share.display()))?;
    let exe = std::env::current_exe().map_err(|e| format!("no path to this test binary: {e}"))?;
    let args: Vec<String> = forwarded_args().iter().map(|a| shell_quote(a)).collect();
    // One test process per group, side by side; the script's status is the worst of them.
    let quoted_share = shell_quote(&share.display().to_string());
    let mut script = format!(
        "cd {repo}\n\
         export HOME=/tmp LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n\
         export {GUEST_ENV}={quoted_share} WALKIE_FAKES_BUILT=1 RUST_BACKTRACE=0\n\
         share={quoted_share}\n",
        repo = shell_quote(&repo.display().to_string()),
    );
    for group in GROUPS {
        let skips: Vec<String> = GROUPS
            .iter()
            .filter(|g| **g != group)
            .map(|g| format!("--skip {g}::"))
            .collect();
        script.push_str(&format!(
            "{{ {GROUP_ENV}={group} {exe} --test-threads=1 --nocapture {skips} {args} \
             > \"$share/console-{group}.log\" 2>&1; echo $? > \"$share/status-{group}\"; }} &\n",
            exe = shell_quote(&exe.display().to_string()),
            skips = skips.join(" "),
            args = args.join(" "),
        ));
    }
    script.push_str(&format!(
        "wait\nworst=0\nfor g in {}; do\n  s=$(cat \"$share/status-$g\" 2>/dev/null || echo 125)\n  \
         [ \"$s\" -gt \"$worst\" ] && worst=$s\ndone\nexit $worst\n",
        GROUPS.join(" ")
    ));
    std::fs::write(share.join("run"), script).map_err(|e| e.to_string())?;

    let started = Instant::now();
    // A checkout or target directory under /tmp is hidden by the guest's own /tmp unless
    // it is named.
    let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap_or(repo)
        .to_path_buf();
    let booted = Command::new(repo.join("tools/vm/boot.sh"))
        .arg(&guest)
        .arg(&share)
        .arg(BOOT_LIMIT_S.to_string())
        .arg(repo)
        .arg(&target)
        .output()
        .map_err(|e| format!("cannot run tools/vm/boot.sh: {e}"))?;
    let seconds = started.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&booted.stderr).trim().to_string();
    let problem = match booted.status.code() {
        // 0: every test passed; 101: libtest saw failures, reported one by one.
        Some(0) | Some(101) => None,
        Some(124) => Some(format!(
            "the guest ran out of time ({BOOT_LIMIT_S} s): {stderr}"
        )),
        // boot.sh's own 127 (no qemu) says why; the guest script's 127 is a command it
        // could not find, and its output says which.
        Some(127) if !stderr.is_empty() => return Err(stderr),
        code => Some(format!("the guest's run ended with {code:?}: {stderr}")),
    };
    let read_all = |prefix: &str, ext: &str| -> String {
        GROUPS
            .iter()
            .map(|g| {
                std::fs::read_to_string(share.join(format!("{prefix}-{g}.{ext}")))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let console = std::fs::read_to_string(share.join("console.log")).unwrap_or_default()
        + &read_all("console", "log");
    let results: HashMap<String, GuestResult> = read_all("results", "jsonl")
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|v| {
            let r = GuestResult {
                ok: v["ok"] == true,
                ms: v["ms"].as_u64().unwrap_or(0),
                error: v["error"].as_str().unwrap_or("").to_string(),
            };
            (v["test"].as_str().unwrap_or("").to_string(), r)
        })
        .collect();
    if results.is_empty() && problem.is_some() {
        return Err(format!(
            "{}\n--- the end of the guest's output ---\n{}",
            problem.unwrap_or_default(),
            tail(&console, 60)
        ));
    }
    let measurements = read_all("measurements", "jsonl")
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    eprintln!(
        "kernel tests: one guest boot ran {} test(s) in {seconds:.1} s; its output: {}/console-*.log",
        results.len(),
        share.display()
    );
    Ok(GuestRun {
        results,
        console,
        problem,
        measurements,
        seconds,
    })
}
