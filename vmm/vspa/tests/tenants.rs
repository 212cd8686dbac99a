//! Tenants in process: each tenant's socket offers only its devices; a
//! channel that is not offered answers exactly as one that does not exist;
//! peers with the wrong credentials are refused before any message; limits
//! hold; a reload moves a LUN from one tenant to the other.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use storage::client::{Buffer, Srb, StorvscClient, cdb};
use storage::protocol::direction;
use vmbus::guid::{NETWORK_INTERFACE, SCSI_INTERFACE};
use vmbus::hosted::client::{ClientError, HostedClient};
use vmbus::vsc::Offer;
use vspa::{Appliance, Change, Options, TenantChange, ValidConfig};

/// Set in the environment of the re-executed test binary that plays a
/// client of another uid.
const CHILD_SOCKET: &str = "VSPA_TENANT_TEST_SOCKET";

fn config(dir: &Path, tenants: &str) -> ValidConfig {
    let text = format!(
        r#"
[[controller]]
name = "scsi-a"
[[controller.lun]]
lun = 0
path = "a.img"
[[controller.lun]]
lun = 1
path = "shared.img"
read_only = true

[[controller]]
name = "scsi-b"
[[controller.lun]]
lun = 0
path = "b.img"

[[switch]]
name = "sw"
[[switch.port]]
name = "nic-a"
netvsp = {{}}
[[switch.port]]
name = "nic-b"
netvsp = {{}}
{tenants}"#
    );
    ValidConfig::from_toml(&text, dir).unwrap()
}

const TWO: &str = r#"
[[tenant]]
name = "a"
socket = "a.sock"
controllers = ["scsi-a"]
nics = [{ switch = "sw", port = "nic-a" }]
[tenant.limits]
connections = 2
memory_bytes = 67108864

[[tenant]]
name = "b"
socket = "b.sock"
socket_mode = "0666"
allow_uids = [0]
controllers = ["scsi-b"]
luns = [{ controller = "scsi-a", lun = 1 }]
nics = [{ switch = "sw", port = "nic-b" }]
"#;

fn setup() -> (tempfile::TempDir, Appliance) {
    let dir = tempfile::tempdir().unwrap();
    for name in ["a.img", "b.img", "shared.img"] {
        vhd::create::create_raw(&dir.path().join(name), 4 << 20).unwrap();
    }
    // Another uid must reach b.sock (its mode allows it; the directory too).
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let options = Options {
        serve: Some(dir.path().join("unused.sock")),
        ..Options::default()
    };
    let app = Appliance::start(&config(dir.path(), TWO), &options).unwrap();
    (dir, app)
}

fn offers(socket: &Path) -> (HostedClient, Vec<Offer>) {
    let mut host = HostedClient::connect(socket, 16 << 20).unwrap();
    let offers = host.request_offers().unwrap();
    (host, offers)
}

/// LUN numbers a storvsc client sees behind `offer` (REPORT LUNS).
fn luns(host: &mut HostedClient, offer: &Offer) -> Vec<u8> {
    let mut c = StorvscClient::connect(host, offer, 0, 8).unwrap();
    let b = Buffer {
        pages: host.alloc_pages(1).unwrap(),
        offset: 0,
        len: 256,
    };
    let r = c
        .execute(
            0,
            &Srb::new(0, &cdb::report_luns(256), direction::READ, 256),
            Some(&b),
        )
        .unwrap();
    let n = (r.srb().data_transfer_length.get() as usize - 8) / 8;
    let mut data = vec![0u8; 8 + n * 8];
    host.slice(&b.pages).read_at(0, &mut data).unwrap();
    (0..n).map(|i| data[8 + i * 8 + 1]).collect()
}

fn scsi(offers: &[Offer]) -> Vec<Offer> {
    offers
        .iter()
        .filter(|o| o.interface == SCSI_INTERFACE)
        .cloned()
        .collect()
}

#[test]
fn each_tenant_sees_only_its_own_devices() {
    let (dir, app) = setup();
    let (mut ha, a) = offers(&dir.path().join("a.sock"));
    let (mut hb, b) = offers(&dir.path().join("b.sock"));
    let nic = |o: &[Offer]| {
        o.iter()
            .filter(|o| o.interface == NETWORK_INTERFACE)
            .count()
    };
    assert_eq!((nic(&a), nic(&b)), (1, 1), "one NIC each");
    let (sa, sb) = (scsi(&a), scsi(&b));
    assert_eq!(sa.len(), 1);
    assert_eq!(luns(&mut ha, &sa[0]), [0, 1], "a owns scsi-a whole");
    assert_eq!(sb.len(), 2, "b sees scsi-b and its view of scsi-a");
    let mut seen: Vec<Vec<u8>> = sb.iter().map(|o| luns(&mut hb, o)).collect();
    seen.sort();
    assert_eq!(
        seen,
        [vec![0], vec![1]],
        "b: scsi-b LUN 0, scsi-a LUN 1 only"
    );
    // Each tenant's NIC is a different device.
    let nic_of = |o: &[Offer]| {
        o.iter()
            .find(|o| o.interface == NETWORK_INTERFACE)
            .unwrap()
            .instance
    };
    assert_ne!(nic_of(&a), nic_of(&b));
    drop(app);
}

#[test]
fn a_channel_not_offered_answers_as_one_that_does_not_exist() {
    let (dir, app) = setup();
    let (mut ha, a) = offers(&dir.path().join("a.sock"));
    let answer = |host: &mut HostedClient, relid: u32| {
        let offer = Offer {
            relid,
            interface: SCSI_INTERFACE,
            instance: Default::default(),
            subchannel_index: 0,
            connection_id: 0,
        };
        match host.open_channel(&offer, 4, 4, &[]) {
            Ok(_) => "opened".to_string(),
            Err(ClientError::Refused { what, status }) => format!("{what} {status:#x}"),
            Err(e) => panic!("{e}"),
        }
    };
    let unknown = answer(&mut ha, 4000);
    assert_ne!(unknown, "opened");
    let own: Vec<u32> = a.iter().map(|o| o.relid).collect();
    let counters = app.admission_counters("a").unwrap().clone();
    let before = counters.violations.load(Ordering::Relaxed);
    let mut tried = 0;
    for relid in (1..32).filter(|r| !own.contains(r)) {
        assert_eq!(answer(&mut ha, relid), unknown, "relid {relid}");
        tried += 1;
    }
    assert!(tried > 10);
    assert!(counters.violations.load(Ordering::Relaxed) > before);
}

#[test]
fn peers_of_another_uid_are_refused_before_any_message() {
    let (dir, app) = setup();
    let socket = dir.path().join("b.sock");
    // The child runs a copy of this binary from the test's own directory:
    // uid 65534 may not reach the checkout (a 0700 clone directory).
    let exe = dir.path().join("tenants-test-child");
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let child = std::process::Command::new(&exe)
        .args(["--exact", "wrong_uid_client", "--nocapture"])
        .env(CHILD_SOCKET, &socket)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&child.stdout);
    assert!(
        child.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&child.stderr)
    );
    assert!(out.contains("refused:"), "{out}");
    let c = app.admission_counters("b").unwrap();
    assert_eq!(c.refused_credentials.load(Ordering::Relaxed), 1);
    assert_eq!(c.accepted.load(Ordering::Relaxed), 0);
    // Root, allowed, gets in.
    let (_h, o) = offers(&socket);
    assert!(!o.is_empty());
}

/// Runs only as the child of the test above: a client as uid 65534.
#[test]
fn wrong_uid_client() {
    let Some(socket) = std::env::var_os(CHILD_SOCKET) else {
        return;
    };
    match HostedClient::connect(&PathBuf::from(socket), 1 << 20) {
        Ok(_) => println!("connected: the server let a wrong uid in"),
        Err(e) => println!("refused: {e}"),
    }
}

#[test]
fn connection_and_memory_limits_hold() {
    let (dir, app) = setup();
    let socket = dir.path().join("a.sock");
    let (_h1, _) = offers(&socket);
    let (_h2, _) = offers(&socket);
    assert!(
        HostedClient::connect(&socket, 16 << 20)
            .and_then(|mut h| h.request_offers())
            .is_err(),
        "a third connection is over the limit of 2"
    );
    drop((_h1, _h2));
    std::thread::sleep(Duration::from_millis(200));
    let big = HostedClient::connect(&socket, 128 << 20).and_then(|mut h| h.request_offers());
    assert!(big.is_err(), "128 MiB of memory is over the 64 MiB limit");
    let c = app.admission_counters("a").unwrap();
    assert!(c.limit_hits.load(Ordering::Relaxed) >= 2);
}

#[test]
fn a_reload_moves_a_lun_and_a_nic_between_tenants() {
    let (dir, mut app) = setup();
    let moved = TWO
        .replace(
            "controllers = [\"scsi-a\"]\nnics = [{ switch = \"sw\", port = \"nic-a\" }]",
            "luns = [{ controller = \"scsi-a\", lun = 1 }]\nnics = []",
        )
        .replace(
            "luns = [{ controller = \"scsi-a\", lun = 1 }]\nnics = [{ switch = \"sw\", port = \"nic-b\" }]",
            "luns = [{ controller = \"scsi-a\", lun = 0 }, { controller = \"scsi-a\", lun = 1 }]\n\
             nics = [{ switch = \"sw\", port = \"nic-b\" }, { switch = \"sw\", port = \"nic-a\" }]",
        );
    let (hb, _) = offers(&dir.path().join("b.sock"));
    let r = app.reload(&config(dir.path(), &moved));
    assert!(r.failed.is_empty(), "{r:?}");
    let has = |c: &TenantChange| r.applied.contains(&Change::Tenant(c.clone()));
    assert!(has(&TenantChange::RevokeLun {
        tenant: "a".into(),
        controller: "scsi-a".into(),
        lun: 0
    }));
    assert!(has(&TenantChange::GrantLun {
        tenant: "b".into(),
        controller: "scsi-a".into(),
        lun: 0
    }));
    assert!(has(&TenantChange::RevokeNic {
        tenant: "a".into(),
        switch: "sw".into(),
        port: "nic-a".into()
    }));
    // b's view of scsi-a now holds LUN 0 beside LUN 1.
    drop(hb);
    let (mut hb, b) = offers(&dir.path().join("b.sock"));
    let mut seen: Vec<Vec<u8>> = scsi(&b).iter().map(|o| luns(&mut hb, o)).collect();
    seen.sort();
    assert_eq!(seen, [vec![0], vec![0, 1]]);
    let (_ha, a) = offers(&dir.path().join("a.sock"));
    assert_eq!(
        a.iter()
            .filter(|o| o.interface == NETWORK_INTERFACE)
            .count(),
        0
    );
    assert_eq!(
        app.controller("a", "scsi-a").unwrap().table().numbers(),
        [1]
    );
}

#[test]
fn ownership_rules_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let bad = |tenants: &str| {
        let text = format!(
            "[[controller]]\nname = \"c\"\n[[controller.lun]]\nlun = 0\npath = \"x.img\"\n\
             [[controller.lun]]\nlun = 1\ndvd = true\n{tenants}"
        );
        ValidConfig::from_toml(&text, dir.path())
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let err = bad("[[tenant]]\nname = \"a\"\ncontrollers = [\"c\"]\n[[tenant]]\nname = \"b\"\nluns = [{ controller = \"c\", lun = 0 }]\n")
        .unwrap_err();
    assert!(err.contains("writable and owned by tenants"), "{err}");
    // A DVD drive may be shared.
    bad("[[tenant]]\nname = \"a\"\nluns = [{ controller = \"c\", lun = 0 }, { controller = \"c\", lun = 1 }]\n\
         [[tenant]]\nname = \"b\"\nluns = [{ controller = \"c\", lun = 1 }]\n")
        .unwrap();
    let err = bad("[[tenant]]\nname = \"a\"\ncontrollers = [\"nope\"]\n").unwrap_err();
    assert!(err.contains("no controller"), "{err}");
    let err = bad("[[tenant]]\nname = \"a\"\nsocket_mode = \"rw\"\n").unwrap_err();
    assert!(err.contains("octal"), "{err}");
    let err = bad("[[tenant]]\nname = \"a\"\n[[tenant]]\nname = \"a\"\n").unwrap_err();
    assert!(err.contains("used twice"), "{err}");
}

/// Reads of 4 KiB `client` completes on `chan` in `time`, one at a time.
fn reads_for(
    host: &mut HostedClient,
    client: &mut StorvscClient<vmbus::hosted::client::ClientChannel>,
    chan: usize,
    time: Duration,
) -> u64 {
    let b = Buffer {
        pages: host.alloc_pages(1).unwrap(),
        offset: 0,
        len: 4096,
    };
    let start = std::time::Instant::now();
    let mut n = 0;
    while start.elapsed() < time {
        let r = client
            .execute(
                chan,
                &Srb::new(0, &cdb::read_16(n % 64, 8), direction::READ, 4096),
                Some(&b),
            )
            .unwrap();
        assert_eq!(r.srb().srb_status, 1, "read {n} succeeds");
        n += 1;
    }
    n
}

#[test]
fn a_lun_iops_cap_holds_across_channels() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["a.img", "b.img", "shared.img"] {
        vhd::create::create_raw(&dir.path().join(name), 4 << 20).unwrap();
    }
    let capped = r#"
[[tenant]]
name = "a"
socket = "a.sock"
controllers = ["scsi-a"]
[tenant.limits]
lun_iops = 200

[[tenant]]
name = "b"
socket = "b.sock"
controllers = ["scsi-b"]
"#;
    let options = Options {
        serve: Some(dir.path().join("unused.sock")),
        ..Options::default()
    };
    let app = Appliance::start(&config(dir.path(), capped), &options).unwrap();
    let (mut ha, a) = offers(&dir.path().join("a.sock"));
    let mut ca = StorvscClient::connect(&mut ha, &scsi(&a)[0], 1, 8).unwrap();
    // Two channels, one second each, one after the other: they share the
    // LUN's 200 operations a second (plus the 4 ms burst, under one).
    let time = Duration::from_millis(1000);
    let first = reads_for(&mut ha, &mut ca, 0, time);
    let second = reads_for(&mut ha, &mut ca, 1, time);
    for n in [first, second] {
        assert!(n <= 200 + 2, "{n} reads in a second over a 200 IOPS cap");
        assert!(n >= 50, "only {n} reads in a second under a 200 IOPS cap");
    }
    // Tenant b's LUN is not capped.
    let (mut hb, b) = offers(&dir.path().join("b.sock"));
    let mut cb = StorvscClient::connect(&mut hb, &scsi(&b)[0], 0, 8).unwrap();
    let free = reads_for(&mut hb, &mut cb, 0, time);
    assert!(free > 400, "{free} reads in a second on an uncapped LUN");
    drop(app);
}

#[test]
fn zero_limits_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let text = r#"
[[controller]]
name = "scsi-a"
[[tenant]]
name = "a"
socket = "a.sock"
controllers = ["scsi-a"]
[tenant.limits]
lun_iops = 0
"#;
    let e = ValidConfig::from_toml(text, dir.path()).unwrap_err();
    assert!(e.to_string().contains("lun_iops must be at least 1"), "{e}");
}
