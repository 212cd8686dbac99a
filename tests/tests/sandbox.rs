//! The sandbox end to end: a real `vspa serve` with storage, a switch
//! (tap, internal port, netvsp NIC) and hosted clients on both devices
//! runs every thread under seccomp with no_new_privs as the configured
//! user, and refuses a reload that names a file outside its directories;
//! a thread of any kind that makes a denied system call ends the process
//! with a clear message (through the test-only probe binary). A strict
//! sandbox serves two tenants, a VXLAN port, an NBD export (with a client
//! connected and a VHD flusher at work) and an NBD-backed LUN, every
//! thread under its filter.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::{PermissionsExt, chown};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use storage::client::StorvscClient;
use switch::netvsp::client::{NetvscOptions, connect_hosted};
use vmbus::hosted::client::HostedClient;
use vspa_tests::net::names;
use vspa_tests::workspace_bin;

const NOBODY: u32 = 65534;
const NIC: &str = "5a1b2c3d-00a7-4e5f-8a9b-0c1d2e3f4a5b";

fn probe(kind: &str, call: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vspa-sandbox-probe"))
        .args([kind, call])
        .output()
        .expect("run the probe")
}

#[test]
fn a_thread_that_makes_a_denied_call_ends_the_process_with_a_clear_message() {
    let cases = [
        ("storage-worker", "socket", 41, "socket"),
        ("storage-worker", "mmap_exec", 9, "mmap"),
        ("client", "execve", 59, "execve"),
        ("nic", "io_uring_setup", 425, "io_uring_setup"),
        ("switch-worker", "fork", 57, "fork"),
        ("vcpu", "socket", 41, "socket"),
        ("main", "socket", 41, "socket"),
        ("nbd-listen", "execve", 59, "execve"),
        ("nbd-conn", "socket", 41, "socket"),
        ("nbd-conn", "io_uring_setup", 425, "io_uring_setup"),
        // The NBD client reconnects with close-on-exec stream sockets only.
        ("nbd-client", "socket", 41, "socket"),
        ("flusher", "mmap_exec", 9, "mmap"),
    ];
    for (kind, call, nr, name) in cases {
        let out = probe(kind, call);
        let err = String::from_utf8_lossy(&out.stderr);
        let thread = if kind == "main" { "main" } else { "probe" };
        let line = format!(
            "vspa: seccomp: thread {thread} ({kind}) made a denied system call {nr} ({name})"
        );
        assert!(err.contains(&line), "{kind} {call}: {err}");
        assert_eq!(out.status.code(), Some(148), "{kind} {call}: {err}");
        assert!(out.stdout.is_empty(), "{kind} {call}: the call came back");
    }
    // A thread that opens nothing is told the file does not exist (glibc
    // may probe /proc from any thread); the process goes on.
    let out = probe("storage-worker", "open");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        text.contains("open returned -1") && text.contains("os error 2"),
        "{text}"
    );
}

/// `vspa serve` with its stderr collected.
struct Serve {
    child: std::process::Child,
    log: Arc<Mutex<String>>,
}

impl Serve {
    fn start(socket: &Path, config: &Path) -> Serve {
        Serve::start_with(socket, config, &[])
    }

    fn start_with(socket: &Path, config: &Path, extra: &[&str]) -> Serve {
        let mut child = Command::new(workspace_bin("vspa"))
            .args(["serve", "--socket"])
            .arg(socket)
            .arg("--config")
            .arg(config)
            .args([
                "--user",
                &NOBODY.to_string(),
                "--group",
                &NOBODY.to_string(),
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vspa serve");
        let log = Arc::new(Mutex::new(String::new()));
        let (l, stderr) = (log.clone(), child.stderr.take().unwrap());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = l.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        match lines.next() {
            Some(Ok(line)) if line.starts_with("vspa: ready") => {}
            other => panic!(
                "vspa serve did not start: {other:?}\n{}",
                log.lock().unwrap()
            ),
        }
        std::thread::spawn(move || for _ in lines {});
        Serve { child, log }
    }

    fn wait_log(&self, text: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log.lock().unwrap().clone();
            if log.contains(text) {
                return log;
            }
            assert!(Instant::now() < deadline, "no {text:?} in:\n{log}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn reload(&self, config: &Path, body: &str, wait_for: &str) -> String {
        let before = self.log.lock().unwrap().len();
        std::fs::write(config, body).unwrap();
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-HUP", &pid])
                .status()
                .unwrap()
                .success()
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log.lock().unwrap()[before..].to_string();
            if log.contains(wait_for) {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "no {wait_for:?} after reload:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process holds `path` open.
    fn has_open(&self, path: &Path) -> bool {
        let fds = std::fs::read_dir(format!("/proc/{}/fd", self.child.id())).unwrap();
        fds.filter_map(Result::ok)
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .any(|target| target == path)
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn owned_by_nobody(path: &Path) {
    chown(path, Some(NOBODY), Some(NOBODY)).unwrap();
}

fn image(path: &Path) {
    std::fs::write(path, vec![0u8; 4 << 20]).unwrap();
    owned_by_nobody(path);
}

fn config(tap: &str, second: Option<&Path>) -> String {
    let mut text = String::from(
        r#"
[[controller]]
name = "scsi0"
subchannels = 1
[[controller.lun]]
lun = 0
path = "disk.raw"
"#,
    );
    if let Some(path) = second {
        text += &format!(
            "[[controller.lun]]\nlun = 1\npath = \"{}\"\n",
            path.display()
        );
    }
    text += &format!(
        r#"
[[switch]]
name = "sw"
[[switch.port]]
name = "t"
tap = {{ ifname = "{tap}" }}
[[switch.port]]
name = "mgmt"
internal = {{ mac = "02:00:00:00:a7:fe", ip = "10.207.0.254/24", counters_port = 9207 }}
[[switch.port]]
name = "vm"
netvsp = {{ mac = "02:00:00:00:a7:01", instance = "{NIC}" }}
"#
    );
    text
}

fn status_field<'a>(status: &'a str, field: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {field} in {status}"))
}

#[test]
fn every_thread_of_a_serve_is_sandboxed_and_a_reload_outside_it_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    owned_by_nobody(dir.path());
    image(&dir.path().join("disk.raw"));
    let (_, tap) = names("sbx");
    let config_path = dir.path().join("vspa.toml");
    std::fs::write(&config_path, config(&tap, None)).unwrap();
    owned_by_nobody(&config_path);
    let serve = Serve::start(&dir.path().join("vspa.sock"), &config_path);
    let log = serve
        .wait_log("vspa: sandbox best-effort: user 65534 group 65534, no_new_privs, landlock ABI");
    assert!(
        log.contains("seccomp per thread kind") && log.contains("io_uring rings restricted"),
        "{log}"
    );

    // Hosted clients on both devices, so channel workers exist.
    let socket = dir.path().join("vspa.sock");
    let (_host, storvsc) = vspa_tests::connect_scsi(&socket, 16 << 20, 1, 32);
    assert_eq!(storvsc.channels.len(), 2);
    let (_nic_host, _nic) = connect_hosted(
        &socket,
        64 << 20,
        NIC.parse().unwrap(),
        &NetvscOptions::default(),
    )
    .unwrap();

    let names = sandboxed_threads(&serve);
    assert_threads_of_kinds(
        &names,
        &[
            "vspa",
            "vspa-rings",
            "vmbus-accept",
            "vmbus-client",
            "scsi-",
            "nv-sw-",
            "sw-sw-",
        ],
    );

    // A LUN outside the allowed directories: refused, never opened.
    let elsewhere = tempfile::tempdir().unwrap();
    owned_by_nobody(elsewhere.path());
    let outside = elsewhere.path().join("outside.raw");
    image(&outside);
    let log = serve.reload(
        &config_path,
        &config(&tap, Some(&outside)),
        "reload refused",
    );
    assert!(
        log.contains("outside the directories the sandbox allows"),
        "{log}"
    );
    assert!(!serve.has_open(&outside));
    // One inside them (next to the first image) is added.
    let inside = dir.path().join("second.raw");
    image(&inside);
    serve.reload(
        &config_path,
        &config(&tap, Some(&inside)),
        "configuration reloaded",
    );
    assert!(
        serve.has_open(&inside),
        "the LUN inside the sandbox was not opened"
    );
}

/// Each of `kinds` names (as a prefix) at least one of the threads.
fn assert_threads_of_kinds(names: &[String], kinds: &[&str]) {
    for kind in kinds {
        assert!(
            names.iter().any(|n| n.starts_with(kind)),
            "no {kind} thread in {names:?}"
        );
    }
}

/// Checks that every thread of `serve` runs under seccomp with
/// no_new_privs as nobody without capabilities; returns their names.
fn sandboxed_threads(serve: &Serve) -> Vec<String> {
    let mut names = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{}/task", serve.child.id())).unwrap() {
        let task = task.unwrap().path();
        // A thread that ended meanwhile (an NBD connection whose client
        // left) has nothing left to check.
        let (Ok(name), Ok(status)) = (
            std::fs::read_to_string(task.join("comm")),
            std::fs::read_to_string(task.join("status")),
        ) else {
            continue;
        };
        let name = name.trim().to_string();
        assert_eq!(status_field(&status, "Seccomp:"), "2", "{name}");
        assert_eq!(status_field(&status, "NoNewPrivs:"), "1", "{name}");
        assert_eq!(
            status_field(&status, "Uid:"),
            "65534\t65534\t65534\t65534",
            "{name}"
        );
        assert_eq!(
            status_field(&status, "Gid:"),
            "65534\t65534\t65534\t65534",
            "{name}"
        );
        assert_eq!(
            status_field(&status, "CapEff:"),
            "0000000000000000",
            "{name}"
        );
        names.push(name);
    }
    names
}

/// An external NBD server (nbdkit's memory plugin) on a Unix socket that
/// the sandboxed appliance may reach.
struct Nbdkit(std::process::Child);

impl Nbdkit {
    fn start(socket: &Path) -> Nbdkit {
        vspa_tests::require_tool("nbdkit");
        let child = Command::new("nbdkit")
            .args(["--foreground", "--unix"])
            .arg(socket)
            .args(["memory", "16M"])
            .spawn()
            .expect("spawn nbdkit");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "nbdkit did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o777)).unwrap();
        Nbdkit(child)
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn nbd_unix_uri(export: &str, socket: &Path) -> String {
    format!("nbd+unix:///{export}?socket={}", socket.display())
}

/// Two tenants (one with a local disk and a NIC, one with an NBD-backed
/// LUN), a switch with a VXLAN port, and an NBD server exporting a
/// dynamic VHD over a Unix socket and TCP.
fn tenants_config(dir: &Path, nbdkit: &Path, vxlan_port: u16) -> String {
    let remote = nbd_unix_uri("", nbdkit);
    format!(
        r#"
[[controller]]
name = "scsi-a"
[[controller.lun]]
lun = 0
path = "a.raw"
cache = "mapped"

[[controller]]
name = "scsi-b"
[[controller.lun]]
lun = 0
path = "{remote}"

[[switch]]
name = "sw"
[[switch.port]]
name = "vx"
vxlan = {{ local = "127.0.0.1:{vxlan_port}", vni = 42, remotes = ["127.0.0.2"], udp_csum = true }}
[[switch.port]]
name = "nic-a"
netvsp = {{ mac = "02:00:00:00:a7:02", instance = "{NIC}" }}

[[tenant]]
name = "a"
socket = "a.sock"
controllers = ["scsi-a"]
nics = [{{ switch = "sw", port = "nic-a" }}]

[[tenant]]
name = "b"
socket = "b.sock"
controllers = ["scsi-b"]

[[nbd]]
unix = "{}"
tcp = "127.0.0.1:0"
[[nbd.export]]
name = "exp"
path = "exp.vhd"
"#,
        dir.join("nbd.sock").display()
    )
}

/// A write and a read back of 4 KiB at `lba` on LUN 0 through `c`.
fn write_and_read(host: &mut HostedClient, c: &mut StorvscClient, lba: u64) {
    use storage::client::{Buffer, Srb, cdb};
    use storage::protocol::{direction, srb};
    let buf = Buffer {
        pages: host.alloc_pages(1).unwrap(),
        offset: 0,
        len: 4096,
    };
    let data: Vec<u8> = (0..4096).map(|i| (i % 251) as u8).collect();
    host.slice(&buf.pages).write_at(0, &data).unwrap();
    let w = cdb::write_16(lba, 8);
    let r = c
        .execute(0, &Srb::new(0, &w, direction::WRITE, 4096), Some(&buf))
        .unwrap();
    assert_eq!(r.srb().srb_status, srb::SUCCESS, "write");
    host.slice(&buf.pages).write_at(0, &[0u8; 4096]).unwrap();
    let rd = cdb::read_16(lba, 8);
    let r = c
        .execute(0, &Srb::new(0, &rd, direction::READ, 4096), Some(&buf))
        .unwrap();
    assert_eq!(r.srb().srb_status, srb::SUCCESS, "read");
    let mut back = vec![0u8; 4096];
    host.slice(&buf.pages).read_at(0, &mut back).unwrap();
    assert!(back == data, "read back what was written");
}

#[test]
fn a_strict_sandbox_serves_tenants_vxlan_and_nbd_with_every_thread_filtered() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    owned_by_nobody(dir.path());
    image(&dir.path().join("a.raw"));
    let exp = dir.path().join("exp.vhd");
    vhd::create::create_dynamic(&exp, 16 << 20, 2 << 20).unwrap();
    owned_by_nobody(&exp);
    let kit_socket = dir.path().join("kit.sock");
    let _nbdkit = Nbdkit::start(&kit_socket);
    let vxlan_port = 20_000 + (std::process::id() % 20_000) as u16;
    let config_path = dir.path().join("vspa.toml");
    let text = tenants_config(dir.path(), &kit_socket, vxlan_port);
    std::fs::write(&config_path, text).unwrap();
    owned_by_nobody(&config_path);
    let api = dir.path().join("api.sock");
    let metrics = dir.path().join("metrics.sock");
    let serve = Serve::start_with(
        &dir.path().join("vspa.sock"),
        &config_path,
        &[
            "--sandbox",
            "strict",
            "--api-socket",
            api.to_str().unwrap(),
            "--metrics",
            metrics.to_str().unwrap(),
        ],
    );
    let log = serve.wait_log("vspa: sandbox strict: user 65534 group 65534, no_new_privs");
    assert!(log.contains("nbd-client"), "kinds listed: {log}");

    // Each tenant's client does I/O: a local image (cache mode `mapped`: the
    // rewrite is a store into the file's mapping), and the NBD-backed LUN
    // (through the nbd-client thread).
    for socket in ["a.sock", "b.sock"] {
        let (mut host, mut c) = vspa_tests::connect_scsi(&dir.path().join(socket), 16 << 20, 0, 32);
        write_and_read(&mut host, &mut c, 8);
        write_and_read(&mut host, &mut c, 8);
        std::mem::forget((host, c));
    }
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", serve.child.id())).unwrap();
    let a = dir.path().join("a.raw");
    assert!(
        maps.contains(&*a.to_string_lossy()),
        "a.raw is mapped: {maps}"
    );
    // A write and a flush over NBD allocate a VHD block and flush its
    // metadata on the image's flusher thread; a second client stays
    // connected so its connection thread is there to inspect.
    let export = nbd_unix_uri("exp", &dir.path().join("nbd.sock"));
    vspa_tests::require_tool("qemu-io");
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x5a 0 64k", "-c", "flush"])
        .arg(&export)
        .output()
        .unwrap();
    assert!(out.status.success(), "qemu-io: {out:?}");
    let uri: vhd::nbd::NbdUri = export.parse().unwrap();
    let (_held, _) = vhd::nbd::negotiate::connect(&uri, Duration::from_secs(5)).unwrap();

    let names = sandboxed_threads(&serve);
    assert_threads_of_kinds(
        &names,
        &[
            "vspa-rings",
            "vmbus-accept",
            "vmbus-client",
            "scsi-scsi-a",
            "scsi-scsi-b",
            "nbd-listen",
            "nbd-conn",
            "nbd-client",
            "vhd-flush",
            "sw-sw-",
            "vspa-api",
            "vspa-metrics",
        ],
    );
    let acceptors = names.iter().filter(|n| *n == "vmbus-accept").count();
    assert_eq!(acceptors, 2, "one acceptor per tenant: {names:?}");

    // An NBD server named by host name cannot be resolved in the sandbox:
    // the reload is refused before anything is tried.
    let named = tenants_config(dir.path(), &kit_socket, vxlan_port).replace(
        "[[switch]]",
        "[[controller.lun]]\nlun = 1\npath = \"nbd://nbd-server.invalid:10809/x\"\n\n[[switch]]",
    );
    let log = serve.reload(&config_path, &named, "reload refused");
    assert!(log.contains("the sandbox resolves no host names"), "{log}");
    // A reload adds a tenant (its socket and acceptor) and a second VXLAN
    // port (its UDP sockets) from the sandboxed main thread.
    let text = tenants_config(dir.path(), &kit_socket, vxlan_port)
        .replace(
            "[[tenant]]\nname = \"a\"",
            &format!(
                "[[switch.port]]\nname = \"vx2\"\nvxlan = {{ local = \"127.0.0.1:{}\", vni = 43, remotes = [\"127.0.0.3\"], udp_csum = true }}\n\n\
                 [[tenant]]\nname = \"c\"\nsocket = \"c.sock\"\n\n[[tenant]]\nname = \"a\"",
                vxlan_port + 1
            ),
        );
    serve.reload(&config_path, &text, "configuration reloaded");
    HostedClient::connect(&dir.path().join("c.sock"), 16 << 20).expect("the new tenant's socket");
    let names = sandboxed_threads(&serve);
    let acceptors = names.iter().filter(|n| *n == "vmbus-accept").count();
    assert_eq!(acceptors, 3, "the new tenant's acceptor: {names:?}");

    // The metrics endpoint answers; the control API hot-adds a LUN (it
    // opens an image, as a reload does, from its own thread).
    let scrape = http(&metrics, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(
        scrape.starts_with("HTTP/1.1 200") && scrape.contains("vspa_"),
        "{scrape}"
    );
    image(&dir.path().join("hot.raw"));
    let body = r#"{"lun": 1, "path": "hot.raw", "tenant": "a"}"#;
    let request = format!(
        "POST /v1/controllers/scsi-a/luns HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let answer = http(&api, &request);
    assert!(answer.starts_with("HTTP/1.1 20"), "{answer}");
    assert!(serve.has_open(&dir.path().join("hot.raw")), "{answer}");
    sandboxed_threads(&serve);
    assert!(
        !serve.log.lock().unwrap().contains("denied system call"),
        "{}",
        serve.log.lock().unwrap()
    );
}

/// One HTTP exchange over the Unix socket at `path`: the whole answer.
fn http(path: &Path, request: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    answer
}

/// Relative paths on the command line and in the file (as the README's
/// examples use) work under the default sandbox: the process resolves them
/// against its working directory after setup too, and a checkpoint made
/// through the API creates, renames and syncs its files from the API thread.
#[test]
fn relative_paths_and_checkpoints_work_under_the_default_sandbox() {
    let dir = tempfile::tempdir().unwrap();
    vhd::create::create_dynamic(&dir.path().join("d.vhd"), 16 << 20, 2 << 20).unwrap();
    std::fs::write(
        dir.path().join("c.toml"),
        "[[controller]]\nname = \"scsi0\"\n[[controller.lun]]\nlun = 0\npath = \"d.vhd\"\n",
    )
    .unwrap();
    let mut child = Command::new(workspace_bin("vspa"))
        .current_dir(dir.path())
        .args(["serve", "--config", "c.toml", "--socket", "s.sock"])
        .args(["--api-socket", "api.sock"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The readiness line is on stdout; EOF (the process died) ends the wait.
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = lines
        .by_ref()
        .map_while(Result::ok)
        .any(|l| l.starts_with("vspa: ready"));
    assert!(ready, "vspa serve did not get ready");
    eprintln!("ready");
    let ctl = |args: &[&str]| {
        Command::new(workspace_bin("vspa"))
            .current_dir(dir.path())
            .args(["ctl", "--api-socket", "api.sock", "checkpoint"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    for step in ["create", "revert"] {
        let out = ctl(&[step, "scsi0", "0"]);
        eprintln!("{step} done");
        assert!(
            out.status.success(),
            "{step}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut host = HostedClient::connect(&dir.path().join("s.sock"), 16 << 20).unwrap();
    assert!(!host.request_offers().unwrap().is_empty(), "still serving");
    eprintln!("offers");
    assert!(child.try_wait().unwrap().is_none(), "vspa is still running");
    child.kill().unwrap();
    child.wait().unwrap();
}
