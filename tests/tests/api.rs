//! The control API end to end: a real `vspa serve --api-socket`, driven
//! with `vspa ctl` and with curl over the raw socket, while this test is a
//! hosted-mode storvsc client that sees the effects (REPORT LUNS, media
//! change sense) and checks that refused requests change nothing.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use storage::client::{Buffer, Srb, StorvscClient, cdb};
use storage::protocol::{direction, operation};
use switch::netvsp::client::packets::{ping, resolve};
use switch::netvsp::client::{NetvscClient, NetvscOptions, connect_hosted};
use vmbus::hosted::client::HostedClient;
use vspa_tests::{VspaServe, require_tool, workspace_bin};

/// `vspa ctl --api-socket API ARGS...`.
fn ctl(api: &Path, args: &[&str]) -> Output {
    Command::new(workspace_bin("vspa"))
        .arg("ctl")
        .arg("--api-socket")
        .arg(api)
        .args(args)
        .output()
        .expect("run vspa ctl")
}

/// `vspa ctl --json ...`, which must succeed; its answer.
fn ctl_json(api: &Path, args: &[&str]) -> Value {
    let out = ctl(api, &[&["--json"], args].concat());
    assert!(out.status.success(), "vspa ctl {args:?}: {out:?}");
    serde_json::from_slice(&out.stdout).expect("vspa ctl --json prints JSON")
}

/// One request with curl over the Unix socket: (status, JSON body).
fn curl(api: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-s",
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
        "-X",
        method,
        "--unix-socket",
    ])
    .arg(api);
    if let Some(b) = body {
        cmd.args(["-H", "Content-Type: application/json", "--data-binary", b]);
    }
    let out = cmd
        .arg(format!("http://vspa{path}"))
        .output()
        .expect("run curl");
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, status) = text.rsplit_once('\n').expect("status line");
    (
        status.parse().expect("HTTP status"),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

/// Starts `vspa serve` on `config` (written into `dir`) with the API on
/// `dir/api.sock` and these extra options.
fn serve(dir: &Path, config: &str, extra: &[&str]) -> VspaServe {
    let path = dir.join("vspa.toml");
    std::fs::write(&path, config).unwrap();
    let api = dir.join("api.sock");
    let mut args = vec!["--config", path.to_str().unwrap()];
    args.extend(["--api-socket", api.to_str().unwrap()]);
    args.extend(extra);
    VspaServe::start(&args)
}

fn storvsc(serve: &VspaServe) -> (HostedClient, StorvscClient) {
    vspa_tests::connect_scsi(&serve.socket, 16 << 20, 0, 32)
}

fn report_luns(c: &mut StorvscClient, b: &Buffer) -> u32 {
    let report = cdb::report_luns(255);
    let srb = Srb::new(0, &report, direction::READ, 255);
    let r = c.execute(0, &srb, Some(b)).unwrap();
    (r.srb().data_transfer_length.get() - 8) / 8
}

fn wait_luns(c: &mut StorvscClient, b: &Buffer, want: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while report_luns(c, b) != want {
        assert!(Instant::now() < deadline, "REPORT LUNS never listed {want}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// TEST UNIT READY on `lun`: (sense key, ASC), (0, 0) when ready.
fn test_unit_ready(c: &mut StorvscClient, lun: u8) -> (u8, u8) {
    let r = c
        .execute(
            0,
            &Srb::new(lun, &cdb::test_unit_ready(), direction::READ, 0),
            None,
        )
        .unwrap();
    let s = r.sense();
    if r.srb().scsi_status == 0 {
        (0, 0)
    } else {
        (s[2] & 0xf, s[12])
    }
}

fn make_iso(dir: &Path) {
    let src = dir.join("iso");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("README.TXT"), b"media for the API test\n").unwrap();
    let out = Command::new("xorriso")
        .args(["-as", "mkisofs", "-R", "-V", "APITEST", "-o"])
        .arg(dir.join("media.iso"))
        .arg(&src)
        .output()
        .unwrap();
    assert!(out.status.success(), "xorriso: {out:?}");
}

const STORAGE: &str = "[[controller]]\nname = \"scsi0\"\nsubchannels = 0\n\n\
    [[controller.lun]]\nlun = 0\npath = \"a.img\"\n\n\
    [[controller.lun]]\nlun = 1\ndvd = true\npath = \"media.iso\"\n";

#[test]
fn luns_and_media_change_through_the_api_and_bad_requests_change_nothing() {
    require_tool("curl");
    require_tool("xorriso");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    vhd::create::create_raw(&d.join("a.img"), 4 << 20).unwrap();
    vhd::create::create_dynamic(&d.join("b.vhd"), 8 << 20, 2 << 20).unwrap();
    make_iso(d);
    let serve = serve(d, STORAGE, &["--api-socket-mode", "0640"]);
    let api = d.join("api.sock");
    let mode = std::fs::metadata(&api).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o640, "API socket mode");
    let (mut host, mut c) = storvsc(&serve);
    let b = Buffer {
        pages: host.alloc_pages(1).unwrap(),
        offset: 0,
        len: 255,
    };
    assert_eq!(report_luns(&mut c, &b), 2);

    // A LUN hot-added through `vspa ctl` is offered to the client.
    let out = ctl(&api, &["lun", "add", "scsi0", "lun=2", "path=b.vhd"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "applied: scsi0: LUN 2 added\n"
    );
    wait_luns(&mut c, &b, 3);
    assert!(c.unsolicited.contains(&operation::ENUMERATE_BUS));
    let lun = ctl_json(&api, &["lun", "show", "scsi0", "2"]);
    assert_eq!(lun["device"]["size_bytes"], 8 << 20, "{lun}");

    // Bad requests get clear errors and change nothing.
    let luns = "/v1/controllers/scsi0/luns";
    let refused = [
        (
            curl(&api, "POST", luns, Some("{\"lun\": 3, ")),
            400,
            "bad_request",
            "malformed JSON",
        ),
        (
            curl(
                &api,
                "POST",
                luns,
                Some("{\"lun\": 3, \"path\": \"b.vhd\", \"colour\": 1}"),
            ),
            422,
            "invalid",
            "unknown field `colour`",
        ),
        (curl(&api, "POST", luns, Some("[1, 2]")), 422, "invalid", ""),
        (
            curl(
                &api,
                "POST",
                luns,
                Some("{\"lun\": 2, \"path\": \"b.vhd\"}"),
            ),
            409,
            "conflict",
            "already has LUN 2",
        ),
        (
            curl(
                &api,
                "POST",
                luns,
                Some("{\"lun\": 3, \"path\": \"missing.vhd\"}"),
            ),
            422,
            "",
            "missing.vhd",
        ),
        (
            curl(
                &api,
                "POST",
                "/v1/controllers/nope/luns",
                Some("{\"lun\": 3, \"path\": \"b.vhd\"}"),
            ),
            404,
            "not_found",
            "nope",
        ),
        (
            curl(&api, "DELETE", "/v1/controllers/scsi0/luns/7", None),
            404,
            "not_found",
            "LUN 7",
        ),
        (
            curl(&api, "PUT", luns, None),
            405,
            "method_not_allowed",
            "PUT",
        ),
        (
            curl(&api, "GET", "/v1/nothing", None),
            404,
            "not_found",
            "/v1/nothing",
        ),
    ];
    for ((status, body), want, code, text) in refused {
        assert_eq!(status, want, "{body}");
        let message = body["error"].as_str().expect("an error message");
        assert!(message.contains(text), "{message:?} lacks {text:?}");
        assert!(code.is_empty() || body["code"] == code, "{body}");
    }
    let out = ctl(&api, &["lun", "add", "scsi0", "lun=2", "path=b.vhd"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("error 409"),
        "{out:?}"
    );
    assert_eq!(report_luns(&mut c, &b), 3);
    let overrides = ctl_json(&api, &["overrides"]);
    assert_eq!(overrides.as_array().unwrap().len(), 1, "{overrides}");
    assert_eq!(overrides[0]["kind"], "add_lun");

    // Ejected media: MEDIUM NOT PRESENT; media inserted again: the
    // media-change unit attention, then ready.
    assert_eq!(test_unit_ready(&mut c, 1), (0, 0));
    let out = ctl(&api, &["media", "eject", "scsi0", "1"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(test_unit_ready(&mut c, 1), (2, 0x3a));
    let (status, body) = curl(
        &api,
        "PUT",
        "/v1/controllers/scsi0/luns/1/media",
        Some("{\"path\": \"media.iso\"}"),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(test_unit_ready(&mut c, 1), (6, 0x28));
    assert_eq!(test_unit_ready(&mut c, 1), (0, 0));

    // A reload of the unchanged file keeps the overrides; dropping them
    // goes back to the file.
    let pid = serve.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(report_luns(&mut c, &b), 3);
    let out = ctl(&api, &["overrides", "--drop", "all"]);
    assert!(out.status.success(), "{out:?}");
    wait_luns(&mut c, &b, 2);
    assert_eq!(ctl_json(&api, &["overrides"]), serde_json::json!([]));
}

#[test]
fn clients_devices_and_switch_ports_through_the_api() {
    require_tool("curl");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    vhd::create::create_raw(&d.join("a.img"), 4 << 20).unwrap();
    let config = format!(
        "[[controller]]\nname = \"scsi0\"\nsubchannels = 0\n\n[[controller.lun]]\nlun = 0\npath = \"a.img\"\n\n\
         [[switch]]\nname = \"sw0\"\n\n[[switch.port]]\nname = \"p0\"\npcap = {{ path = \"{}/p0.pcap\" }}\n",
        d.display()
    );
    let serve = serve(d, &config, &[]);
    let api = d.join("api.sock");
    let mode = std::fs::metadata(&api).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "API socket mode by default");

    // This process, connected as a client with an open storvsc channel.
    let (_host, _c) = storvsc(&serve);
    let clients = ctl_json(&api, &["clients", "default"]);
    assert_eq!(clients.as_array().unwrap().len(), 1, "{clients}");
    assert_eq!(clients[0]["pid"], std::process::id());
    let channels = ctl_json(&api, &["channels", "default"]);
    let scsi: Vec<&Value> = channels
        .as_array()
        .unwrap()
        .iter()
        .filter(|ch| ch["kind"] == "scsi")
        .collect();
    assert_eq!(scsi.len(), 1, "{channels}");
    assert_eq!(scsi[0]["state"], "open");
    let devices = ctl(&api, &["devices", "default"]);
    assert!(
        String::from_utf8_lossy(&devices.stdout).contains("scsi"),
        "{devices:?}"
    );

    // A port added over the raw socket, refused twice, removed with ctl.
    let port = format!(
        "{{\"name\": \"p1\", \"pcap\": {{\"path\": \"{}/p1.pcap\"}}}}",
        d.display()
    );
    let (status, body) = curl(&api, "POST", "/v1/switches/sw0/ports", Some(&port));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["applied"][0], "port p1 added to switch sw0", "{body}");
    let (status, body) = curl(&api, "POST", "/v1/switches/sw0/ports", Some(&port));
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some("conflict")),
        "{body}"
    );
    let sw = ctl_json(&api, &["switches", "sw0"]);
    let names: Vec<&str> = sw["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["p0", "p1"]);
    let out = ctl(&api, &["port", "remove", "sw0", "p1"]);
    assert!(out.status.success(), "{out:?}");
    let (status, _) = curl(&api, "GET", "/v1/switches/sw0/ports/p1", None);
    assert_eq!(status, 404);
    // Not HTTP, and a body over the limit: refused, and the API goes on.
    for (raw, status) in [
        (b"NOT HTTP AT ALL\r\n\r\n".to_vec(), "400"),
        (
            b"POST /v1/controllers HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n".to_vec(),
            "413",
        ),
    ] {
        let mut s = std::os::unix::net::UnixStream::connect(&api).unwrap();
        s.write_all(&raw).unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        assert!(text.starts_with(&format!("HTTP/1.1 {status} ")), "{text}");
        assert!(text.contains("\"error\""), "{text}");
    }
    let table = ctl(&api, &["switches"]);
    assert_eq!(
        String::from_utf8_lossy(&table.stdout),
        "NAME  PORTS  MAC_ENTRIES\nsw0   1      0\n"
    );
}

/// Polls `f` for up to 10 s.
fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn integration_services_through_the_api() {
    use ic::Service;
    use ic::guest::{GuestIc, GuestRunner};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let config = "[[tenant]]\nname = \"vm1\"\nsocket = \"vm1.sock\"\n\n\
        [tenant.ic]\nheartbeat_period_ms = 100\nkvp_external = { role = \"web\" }\n";
    let _serve = serve(d, config, &[]);
    let api = d.join("api.sock");
    // This process is vm1's guest, answering as Linux's hv_utils does.
    let mut client = HostedClient::connect(&d.join("vm1.sock"), 1 << 20).unwrap();
    let mut guests = Vec::new();
    for offer in client.request_offers().unwrap() {
        let service = Service::from_interface(&offer.interface).expect("only ICs offered");
        let ch = ic::guest::open(&mut client, &offer).unwrap();
        let mut g = GuestIc::new(service);
        g.auto.ipv4 = vec!["10.9.8.7".into()];
        guests.push((service, GuestRunner::spawn(ch, g)));
    }
    let guest = |s: Service| &guests.iter().find(|(x, _)| *x == s).unwrap().1;

    until("a live heartbeat", || {
        ctl_json(&api, &["ic", "heartbeat", "vm1"])["health"] == "alive"
    });
    let state = ctl_json(&api, &["ic", "show", "vm1"]);
    assert_eq!(
        state["kvp"]["channel"]["status"]["state"], "ready",
        "{state}"
    );

    // KVP: the file's host value and one set through the API reach the
    // guest; the guest's automatic pool is read back.
    let kvp = guest(Service::Kvp);
    let has = |k: &str, v: &str| kvp.with(|g| g.pools[0].contains(&(k.into(), v.into())));
    until("the file's KVP value", || has("role", "web"));
    let out = ctl(&api, &["ic", "kvp-set", "vm1", "external", "owner", "ops"]);
    assert!(out.status.success(), "{out:?}");
    assert!(has("owner", "ops"));
    let auto = ctl_json(&api, &["ic", "kvp", "vm1", "auto"]);
    assert!(
        auto.as_array()
            .unwrap()
            .iter()
            .any(|e| e["value"] == "10.9.8.7"),
        "{auto}"
    );
    let (status, body) = curl(
        &api,
        "DELETE",
        "/v1/tenants/vm1/ic/kvp/external/owner",
        None,
    );
    assert_eq!(status, 200, "{body}");
    assert!(!has("owner", "ops"));
    let (status, body) = curl(&api, "GET", "/v1/tenants/vm1/ic/kvp/nopool", None);
    assert_eq!(status, 404, "{body}");

    // Shutdown: a reboot request reaches the guest, which acknowledges it.
    let out = ctl_json(&api, &["ic", "shutdown", "vm1", "--kind", "reboot"]);
    assert_eq!(out["outcome"], "acknowledged", "{out}");
    assert_eq!(
        guest(Service::Shutdown).with(|g| g.observed.shutdowns.clone()),
        [2]
    );
    let (status, body) = curl(
        &api,
        "POST",
        "/v1/tenants/vm1/ic/shutdown",
        Some("{\"kind\": \"nap\"}"),
    );
    assert_eq!(
        (status, body["code"].as_str()),
        (422, Some("invalid")),
        "{body}"
    );
    let (status, body) = curl(&api, "GET", "/v1/tenants/nobody/ic", None);
    assert_eq!(status, 404, "{body}");
}

const NIC_A: &str = "5a1b2c3d-00a1-4e5f-8a9b-0c1d2e3f4a5b";
const NIC_B: &str = "5a1b2c3d-00a2-4e5f-8a9b-0c1d2e3f4a5b";

/// A guest NIC added through the API is offered and joins the switch; its
/// link goes down and up; a port removed through the API stops forwarding.
#[test]
fn guest_nics_links_and_ports_through_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let config = format!(
        "[[switch]]\nname = \"sw\"\n\
         [[switch.port]]\nname = \"vm-a\"\nnetvsp = {{ mac = \"02:00:00:00:07:0a\", instance = \"{NIC_A}\" }}\n\
         [[switch.port]]\nname = \"mgmt\"\n\
         internal = {{ mac = \"02:00:00:00:07:fe\", ip = \"10.207.0.254/24\", counters_port = 9100 }}\n"
    );
    let serve = serve(d, &config, &[]);
    let api = d.join("api.sock");
    let opts = NetvscOptions::default();
    let (_ha, mut a) =
        connect_hosted(&serve.socket(), 64 << 20, NIC_A.parse().unwrap(), &opts).unwrap();
    let (me_a, mgmt_ip) = ([10, 207, 0, 1], [10, 207, 0, 254]);
    let mgmt = resolve(&mut a, me_a, mgmt_ip)
        .unwrap()
        .expect("mgmt answers ARP");
    let pings =
        |c: &mut NetvscClient<_>, me, seq| ping(c, me, mgmt_ip, mgmt, seq).unwrap().is_some();
    assert!(pings(&mut a, me_a, 1));

    // A NIC added with `vspa ctl` is offered to the running client and
    // reaches the switch.
    let nic_b: vmbus::Guid = NIC_B.parse().unwrap();
    let mut host = HostedClient::connect(&serve.socket(), 64 << 20).unwrap();
    assert!(
        !host
            .request_offers()
            .unwrap()
            .iter()
            .any(|o| o.instance == nic_b)
    );
    let out = ctl(
        &api,
        &[
            "port",
            "add",
            "sw",
            "name=vm-b",
            "netvsp.mac=02:00:00:00:07:0b",
            &format!("netvsp.instance={NIC_B}"),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let offer = loop {
        let o = host.wait_offer().unwrap();
        if o.instance == nic_b {
            break o;
        }
    };
    let mut b = NetvscClient::connect(&mut host, &offer, &opts).unwrap();
    assert_eq!(b.friendly_name.as_deref(), Some("vm-b"));
    let me_b = [10, 207, 0, 2];
    assert_eq!(resolve(&mut b, me_b, mgmt_ip).unwrap(), Some(mgmt));
    assert!(pings(&mut b, me_b, 2));
    let port = ctl_json(&api, &["port", "show", "sw", "vm-b"]);
    assert_eq!(
        (port["state"].as_str(), port["nic"]["open"].as_bool()),
        (Some("forwarding"), Some(true)),
        "{port}"
    );

    // Link down: the guest is told, and nothing passes; up again: it does.
    assert!(ctl(&api, &["link", "sw", "vm-a", "down"]).status.success());
    until("MEDIA_DISCONNECT", || {
        a.poll(0, |_| {}).unwrap();
        !a.state.link_up
    });
    assert_eq!(
        ctl_json(&api, &["port", "show", "sw", "vm-a"])["state"],
        "link_down"
    );
    assert!(
        !pings(&mut a, me_a, 3),
        "a ping passed a disconnected cable"
    );
    assert!(ctl(&api, &["link", "sw", "vm-a", "up"]).status.success());
    until("MEDIA_CONNECT", || {
        a.poll(0, |_| {}).unwrap();
        a.state.link_up
    });
    assert!(pings(&mut a, me_a, 4));
    let (status, body) = refused_link(&api, "mgmt");
    assert_eq!(status, 409, "{body}");

    // The internal port removed through the API stops answering.
    let out = ctl(&api, &["port", "remove", "sw", "mgmt"]);
    assert!(out.status.success(), "{out:?}");
    assert!(!pings(&mut a, me_a, 5), "a removed port still forwards");
    let overrides = ctl_json(&api, &["overrides"]);
    let kinds: Vec<&str> = overrides
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["add_port", "link", "remove_port"]);
}

/// `vspa ctl link` on a port that is not a guest NIC: (status, answer).
fn refused_link(api: &Path, port: &str) -> (u16, Value) {
    let out = ctl(api, &["--json", "link", "sw", port, "down"]);
    assert!(!out.status.success());
    let body: Value = serde_json::from_slice(&out.stdout).unwrap();
    let status = String::from_utf8_lossy(&out.stderr)
        .split("error ")
        .nth(1)
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, body)
}

/// `vspa run --api-socket`: the API serves while the VM runs and its
/// socket goes away with the VM.
#[test]
fn vspa_run_serves_the_api_while_the_vm_runs() {
    let dir = tempfile::tempdir().unwrap();
    let guest = dir.path().join("spin.bin");
    // mov dx,0x3f8; mov al,'!'; out dx,al; jmp $ (prints, then spins).
    std::fs::write(
        &guest,
        [0x66, 0xba, 0xf8, 0x03, 0xb0, b'!', 0xee, 0xeb, 0xfe],
    )
    .unwrap();
    let api = dir.path().join("api.sock");
    let mut child = Command::new(workspace_bin("vspa"))
        .args([
            "run",
            "--kernel-format",
            "flat",
            "--memory",
            "16",
            "--kernel",
        ])
        .arg(&guest)
        .arg("--api-socket")
        .arg(&api)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut byte = [0u8];
    child
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut byte)
        .unwrap();
    assert_eq!(&byte, b"!", "the guest runs");
    let status = ctl_json(&api, &["status"]);
    assert_eq!(status["tenants"], 1, "{status}");
    let ic = ctl_json(&api, &["ic", "show", "default"]);
    assert_eq!(
        ic["shutdown"]["channel"]["status"]["state"], "offline",
        "{ic}"
    );
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "vspa run ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!api.exists(), "the API socket outlived vspa run");
}

/// A client that connects and sends nothing holds up no one else (each
/// connection has its own thread); past `MAX_CONNECTIONS` (8) open at once
/// a new client waits to be accepted until one of them ends, and a stalled
/// client is cut off with a 408 at the request deadline.
#[test]
fn a_stalled_client_holds_up_no_other_request() {
    require_tool("curl");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    vhd::create::create_raw(&d.join("a.img"), 4 << 20).unwrap();
    let config = "[[controller]]\nname = \"scsi0\"\nsubchannels = 0\n\n\
        [[controller.lun]]\nlun = 0\npath = \"a.img\"\n";
    let _serve = serve(d, config, &[]);
    let api = d.join("api.sock");
    let stall = || {
        let mut s = std::os::unix::net::UnixStream::connect(&api).unwrap();
        s.write_all(b"GET /v1 HTTP/1.1\r\n").unwrap(); // and no more
        s
    };

    let first = stall();
    let start = Instant::now();
    let (status, body) = curl(&api, "GET", "/v1", None);
    assert_eq!(status, 200, "{body}");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "a request waited {:?} behind a stalled connection",
        start.elapsed()
    );

    let mut more: Vec<_> = (0..7).map(|_| stall()).collect();
    let api2 = api.clone();
    let ninth = std::thread::spawn(move || {
        let (status, _) = curl(&api2, "GET", "/v1", None);
        (status, Instant::now())
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!ninth.is_finished(), "served past eight open connections");
    let freed = Instant::now();
    drop(first);
    let (status, served) = ninth.join().unwrap();
    assert_eq!(status, 200);
    assert!(
        served.duration_since(freed) < Duration::from_secs(2),
        "the waiting client was served {:?} after a connection ended",
        served.duration_since(freed)
    );

    let mut last = more.pop().unwrap();
    let mut reply = String::new();
    last.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 408 "), "{reply}");
}
