//! `vspa demo` runs every part (echo, storage, network) and says so.

use std::process::Command;
use vspa_tests::workspace_bin;

#[test]
fn demo_runs_all_parts() {
    let out = Command::new(workspace_bin("vspa"))
        .args(["demo", "--packets", "20000", "--frames", "20000"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "echo: 20000 packets",
        "storage: `vspa image check` on the VHD: clean",
        "netvsc: vm-a resolved 10.77.0.254 to 02:00:00:00:77:fe",
        "netvsc: vm-a and vm-b exchanged 40000 frames",
        "indications [\"MEDIA_DISCONNECT\", \"MEDIA_CONNECT\"]",
        "demo: all parts passed",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
}
