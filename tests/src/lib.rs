//! End-to-end tests of the whole vspa appliance.
//!
//! The tests in `tests/tests/` start the real `vspa` binary, drive it with
//! client processes over hosted mode and check results with independent tools
//! (qemu-img, vhdimount, xorriso, tshark, iperf3). This library holds the small
//! helpers they share: locating the built binaries and requiring external tools
//! (a missing tool fails the test; it never skips).
#![forbid(unsafe_code)]

pub mod net;

use std::path::{Path, PathBuf};
use std::process::Command;

use storage::client::StorvscClient;
use vmbus::guid::SCSI_INTERFACE;
use vmbus::hosted::client::HostedClient;

/// A hosted guest with `memory` bytes of shared memory connected to
/// `socket`, and its storvsc on the first SCSI controller offered:
/// `subchannels` sub-channels asked for, `depth` requests in flight.
pub fn connect_scsi(
    socket: &Path,
    memory: u64,
    subchannels: u16,
    depth: u64,
) -> (HostedClient, StorvscClient) {
    let mut host = HostedClient::connect(socket, memory).expect("hosted connect");
    let offer = host
        .request_offers()
        .expect("offers")
        .into_iter()
        .find(|o| o.interface == SCSI_INTERFACE)
        .expect("SCSI controller offered");
    let client = StorvscClient::connect(&mut host, &offer, subchannels, depth).expect("storvsc");
    (host, client)
}

/// Path of a binary built by this workspace (`vspa`, `vspa-bench`), in the
/// same profile as the running test. `cargo test` does not build other
/// packages' binaries, so this builds them (once per test process; a no-op
/// when they are up to date).
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("test binary lives in target/<profile>/deps")
        .to_path_buf();
    static BUILT: std::sync::Once = std::sync::Once::new();
    BUILT.call_once(|| build_bins(&dir));
    let path = dir.join(name);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

fn build_bins(profile_dir: &std::path::Path) {
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--quiet",
        "-p",
        "vspa",
        "--bin",
        "vspa",
        "-p",
        "vspa-bench",
        "--bin",
        "vspa-bench",
    ]);
    if release {
        cmd.arg("--release");
    }
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"));
    let status = cmd.status().expect("run cargo build");
    assert!(status.success(), "building the vspa binaries failed");
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

/// A `vspa serve` process for the duration of a test (or a benchmark):
/// its own directory, socket and optional configuration file; killed on
/// drop. The one harness for `vspa serve`.
#[derive(Debug)]
pub struct VspaServe {
    pub child: std::process::Child,
    pub socket: PathBuf,
    dir: tempfile::TempDir,
}

impl VspaServe {
    /// Starts `vspa serve --socket <tmp> <extra args>` and waits until it
    /// accepts connections.
    pub fn start(extra: &[&str]) -> Self {
        Self::spawn(None, None, extra)
    }

    /// Starts `vspa serve` on configuration `config` (`@DIR@` in it is the
    /// instance's directory) and waits until it accepts connections.
    pub fn with_config(config: &str) -> Self {
        Self::spawn(None, Some(config), &[])
    }

    /// Like [`VspaServe::with_config`], with more arguments for `serve`.
    pub fn with_config_args(config: &str, extra: &[&str]) -> Self {
        Self::spawn(None, Some(config), extra)
    }

    /// Like [`VspaServe::with_config`], inside network namespace `netns`
    /// (its taps and sockets are created there).
    pub fn with_config_in(netns: &net::Netns, config: &str) -> Self {
        Self::spawn(Some(netns), Some(config), &[])
    }

    fn spawn(netns: Option<&net::Netns>, config: Option<&str>, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("vspa.sock");
        let vspa = workspace_bin("vspa");
        let mut cmd = match netns {
            // `ip netns exec` execs vspa: the child is vspa itself.
            Some(ns) => {
                let mut c = ns.cmd(&[]);
                c.arg(vspa);
                c
            }
            None => Command::new(vspa),
        };
        cmd.arg("serve").arg("--socket").arg(&socket).args(extra);
        if let Some(text) = config {
            let path = dir.path().join("vspa.toml");
            let dir_name = dir.path().display().to_string();
            std::fs::write(&path, text.replace("@DIR@", &dir_name)).expect("write config");
            cmd.arg("--config").arg(path);
        }
        let child = cmd
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn vspa serve");
        let mut serve = VspaServe { child, socket, dir };
        serve.wait_ready();
        serve
    }

    /// Waits for the readiness line, printed once every device exists and
    /// the socket accepts.
    fn wait_ready(&mut self) {
        use std::io::BufRead;
        let stdout = self.child.stdout.take().expect("piped stdout");
        let mut lines = std::io::BufReader::new(stdout).lines();
        match lines.next() {
            Some(Ok(line)) if line.starts_with("vspa: ready") => {}
            other => panic!("vspa serve did not start: {other:?}"),
        }
        // Keep draining so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
    }

    /// A file in the instance's directory (`@DIR@` in the config).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The hosted-mode socket clients connect to.
    pub fn socket(&self) -> PathBuf {
        self.socket.clone()
    }

    /// Rewrites the configuration file and sends SIGHUP (reload).
    pub fn reload(&self, config: &str) {
        let dir_name = self.dir.path().display().to_string();
        std::fs::write(self.path("vspa.toml"), config.replace("@DIR@", &dir_name))
            .expect("write config");
        let pid = self.child.id().to_string();
        let status = Command::new("kill").args(["-HUP", &pid]).status().unwrap();
        assert!(status.success(), "kill -HUP {pid}");
    }

    /// True while the server process runs.
    pub fn is_alive(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }
}

impl Drop for VspaServe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
