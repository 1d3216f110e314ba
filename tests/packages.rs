//! `make deb` and `make deb-arm64`: the Debian packages carry the binary, the user unit
//! (ExecStart=/usr/bin/walkie), the examples and the docs — and nothing of the test tools.
//! Built here from the test build's binaries (`cargo deb --no-build --profile dev`), so the
//! packaging is checked without a release build; `make deb` packages the release build.

use std::path::Path;
use std::process::Command;

mod common;
use common::{AARCH64, WALKIE, aarch64_built, cargo};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Builds the package for `target` (None: this machine) into `out`; returns its path.
fn build_deb(target: Option<&str>, out: &Path) -> std::path::PathBuf {
    let mut cmd = cargo();
    cmd.args([
        "deb",
        "--locked",
        "-p",
        "walkie",
        "--no-build",
        "--profile",
        "dev",
        "--fast",
    ])
    .arg("-o")
    .arg(out)
    .current_dir(repo());
    if let Some(target) = target {
        cmd.args(["--target", target]);
    }
    // The target dir cargo-deb should read is the one this test build uses.
    let target_dir = Path::new(WALKIE).parent().unwrap().parent().unwrap();
    cmd.env("CARGO_TARGET_DIR", target_dir);
    let printed = ok(&mut cmd);
    let deb = printed
        .lines()
        .rev()
        .find(|l| l.ends_with(".deb"))
        .unwrap_or_else(|| panic!("cargo deb printed no .deb path: {printed}"));
    std::path::PathBuf::from(deb.trim())
}

fn contents(deb: &Path) -> Vec<(String, String)> {
    ok(Command::new("dpkg-deb").arg("-c").arg(deb))
        .lines()
        .filter_map(|l| {
            let mode = l.split_whitespace().next()?.to_string();
            let path = l
                .split_whitespace()
                .last()?
                .trim_start_matches('.')
                .to_string();
            Some((mode, path))
        })
        .collect()
}

fn extract(deb: &Path, file: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    ok(Command::new("dpkg-deb").arg("-x").arg(deb).arg(dir.path()));
    std::fs::read(dir.path().join(file.trim_start_matches('/'))).unwrap()
}

#[test]
fn the_debs_carry_the_binary_the_user_unit_the_examples_and_the_docs() {
    aarch64_built();
    ok(Command::new(repo().join("tools/dist.sh")).env("WALKIE", WALKIE));
    let out = tempfile::tempdir().unwrap();
    let example = ok(Command::new(WALKIE).args(["config", "example"]));
    for (target, arch, machine) in [(None, "amd64", 62u16), (Some(AARCH64), "arm64", 183)] {
        let deb = build_deb(target, out.path());
        assert!(
            deb.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .ends_with(&format!("_{arch}.deb")),
            "{deb:?}"
        );
        let files = contents(&deb);
        let has = |path: &str, mode_start: &str| {
            files
                .iter()
                .any(|(mode, p)| p == path && mode.starts_with(mode_start))
        };
        for (path, mode) in [
            ("/usr/bin/walkie", "-rwxr-xr-x"),
            ("/usr/lib/systemd/user/walkie.service", "-rw-r--r--"),
            ("/usr/share/doc/walkie/examples/config.toml", "-rw-r--r--"),
            ("/usr/share/doc/walkie/examples/env", "-rw-r--r--"),
            ("/usr/share/doc/walkie/README.md", "-rw-r--r--"),
            ("/usr/share/doc/walkie/copyright", "-rw-r--r--"),
            ("/usr/share/doc/walkie/docs/CONFIGURATION.md", "-rw-r--r--"),
        ] {
            assert!(has(path, mode), "{arch}: no {path} ({mode}) in {files:#?}");
        }
        assert!(
            !files.iter().any(|(_, p)| p.contains("fake")),
            "{arch}: a test tool is packaged: {files:#?}"
        );
        let fields = ok(Command::new("dpkg-deb").args(["-f"]).arg(&deb).args([
            "Package",
            "Architecture",
            "Depends",
            "Suggests",
        ]));
        assert!(fields.contains("Package: walkie"), "{fields}");
        assert!(
            fields.contains(&format!("Architecture: {arch}")),
            "{fields}"
        );
        assert!(fields.contains("libasound2"), "{fields}");
        // Loaded with dlopen by the pulse backend: named, not required.
        assert!(fields.contains("Suggests: libpulse0"), "{fields}");
        let bin = extract(&deb, "/usr/bin/walkie");
        assert_eq!(
            u16::from_le_bytes([bin[18], bin[19]]),
            machine,
            "{arch}: /usr/bin/walkie is for another machine"
        );
        let unit =
            String::from_utf8(extract(&deb, "/usr/lib/systemd/user/walkie.service")).unwrap();
        assert!(unit.contains("\nExecStart=/usr/bin/walkie run\n"), "{unit}");
        assert!(
            unit.contains("\nType=notify\n") && !unit.contains('@'),
            "{unit}"
        );
        assert_eq!(
            String::from_utf8(extract(&deb, "/usr/share/doc/walkie/examples/config.toml")).unwrap(),
            example
        );
        let copyright =
            String::from_utf8(extract(&deb, "/usr/share/doc/walkie/copyright")).unwrap();
        assert!(copyright.contains("MIT"), "{copyright}");
    }
}
