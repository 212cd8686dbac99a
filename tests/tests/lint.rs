//! Source hygiene as part of the suite: rustfmt, clippy with warnings as
//! errors, the out-of-workspace fuzz crates still compiling, and CI running
//! the README's test command.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    // A separate target dir: the outer `cargo test` owns the main one.
    c.env("CARGO_TARGET_DIR", root().join("target/lint"));
    c
}

fn run(mut c: Command, what: &str) {
    let out = c.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn rustfmt_clean() {
    let mut c = cargo();
    c.args(["fmt", "--all", "--check"]);
    run(c, "cargo fmt --check");
}

#[test]
fn clippy_clean() {
    let mut c = cargo();
    c.args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--quiet",
        "--",
        "-D",
        "warnings",
    ]);
    run(c, "cargo clippy");
}

#[test]
#[allow(clippy::single_element_loop)] // more fuzz crates join the list
fn fuzz_crates_compile() {
    for dir in [
        "vmbus/fuzz",
        "vmbus/ic/fuzz",
        "vhd/fuzz",
        "storage/fuzz",
        "switch/fuzz",
    ] {
        let mut c = cargo();
        c.args(["check", "--quiet", "--manifest-path"])
            .arg(root().join(dir).join("Cargo.toml"));
        run(c, &format!("cargo check {dir}"));
    }
}

/// The README's test command (the indented line after "Run the whole test
/// suite") is the command `.ci/run` ends with.
#[test]
fn ci_runs_the_readme_test_command() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let after = readme
        .split("Run the whole test suite")
        .nth(1)
        .expect("README names the test command");
    let command = after
        .lines()
        .find_map(|l| l.strip_prefix("    "))
        .expect("an indented command")
        .trim();
    assert!(command.starts_with("cargo test"), "{command}");
    let ci = std::fs::read_to_string(root().join(".ci/run")).unwrap();
    let last = ci
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty() && !l.starts_with('#'))
        .unwrap();
    assert_eq!(last, command);
}

/// The README's configuration example is a file `vspa serve` accepts: every
/// key exists and the switch settings validate.
#[test]
fn readme_configuration_example_parses() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let block = readme
        .split("```toml\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a toml block in the README");
    let example = vspa::ApplianceConfig::parse(block, Path::new("README.md")).unwrap();
    let valid = example.validate(Path::new("/etc/vspa")).unwrap();
    assert_eq!(valid.controllers[0].settings.cpus, [1]);
    assert_eq!(valid.switches[0].settings.cpus, [1]);
}
