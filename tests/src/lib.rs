//! End-to-end tests of the whole vspa appliance.
//!
//! The tests in `tests/tests/` start the real `vspa` binary, drive it with
//! client processes over hosted mode and check results with independent tools
//! (qemu-img, vhdimount, xorriso, tshark, iperf3). This library holds the small
//! helpers they share: locating the built binaries and requiring external tools
//! (a missing tool fails the test; it never skips).
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::Command;

/// Path of a binary built by this workspace (`vspa`, `vspa-bench`), in the
/// same profile as the running test.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("test binary lives in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not built; run the suite with `cargo test --workspace --release`",
        path.display()
    );
    path
}

/// Panics with a clear message when an external tool the test relies on is
/// missing: CI installs every tool, so a missing one is a failure, not a skip.
pub fn require_tool(tool: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "required tool `{tool}` is not installed (run .ci/run)"
    );
}
