//! Metrics end to end: a real `vspa serve --metrics` with hosted clients
//! doing SCSI I/O and sending frames through the switch. Scrapes must pass
//! `promtool check metrics` and count exactly what the clients did; a real
//! Prometheus server scrapes vspa and its query API returns the counts.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use storage::client::{Buffer, Srb, StorvscClient, cdb};
use storage::protocol::{direction, srb};
use switch::netvsp::client::{NetvscClient, NetvscOptions, TxFrame, connect_hosted};
use vmbus::hosted::client::HostedClient;
use vspa_tests::{VspaServe, require_tool};

const NIC_A: &str = "6b1b2c3d-0001-4e5f-8a9b-0c1d2e3f4a5b";
const NIC_B: &str = "6b1b2c3d-0002-4e5f-8a9b-0c1d2e3f4a5b";
const DISK: u64 = 4 << 20;
const CHUNK: u32 = 64 * 1024;

/// A controller with one dynamic VHD and a switch with two guest NICs.
fn start(image_dir: &Path, metrics: &str) -> VspaServe {
    let image = image_dir.join("disk.vhd");
    vhd::create::create_dynamic(&image, DISK, 2 << 20).unwrap();
    let config = format!(
        r#"
[[controller]]
name = "scsi0"
[[controller.lun]]
lun = 0
path = "{}"

[[switch]]
name = "sw"
[[switch.port]]
name = "vm-a"
netvsp = {{ mac = "02:00:00:00:06:0a", instance = "{NIC_A}" }}
[[switch.port]]
name = "vm-b"
netvsp = {{ mac = "02:00:00:00:06:0b", instance = "{NIC_B}" }}
"#,
        image.display()
    );
    VspaServe::with_config_args(&config, &["--metrics", metrics])
}

/// The clients: one storvsc and two netvsc, each its own connection.
struct Clients {
    host: HostedClient,
    scsi: StorvscClient,
    buf: Buffer,
    a: (HostedClient, NetvscClient),
    b: (HostedClient, NetvscClient),
}

fn connect(serve: &VspaServe) -> Clients {
    let (mut host, scsi) = vspa_tests::connect_scsi(&serve.socket, 4 << 20, 0, 32);
    let buf = Buffer {
        pages: host.alloc_pages((CHUNK / 4096) as u64).unwrap(),
        offset: 0,
        len: CHUNK,
    };
    let nic = |instance: &str| {
        connect_hosted(
            &serve.socket(),
            16 << 20,
            instance.parse().unwrap(),
            &NetvscOptions::default(),
        )
        .unwrap()
    };
    let (a, b) = (nic(NIC_A), nic(NIC_B));
    Clients {
        host,
        scsi,
        buf,
        a,
        b,
    }
}

impl Clients {
    /// Runs one SRB on LUN 0; returns its SRB status.
    fn srb(&mut self, cdb: &[u8], dir: u8, len: u32) -> u8 {
        let buffer = (len > 0).then_some(&self.buf);
        let r = self
            .scsi
            .execute(0, &Srb::new(0, cdb, dir, len), buffer)
            .unwrap();
        r.srb().srb_status
    }

    /// `writes` and `reads` chunks; returns nothing, asserts success.
    fn storage_io(&mut self, writes: u32, reads: u32) {
        let blocks = CHUNK / 512;
        self.host
            .slice(&self.buf.pages)
            .write_at(0, &vec![0x5a; CHUNK as usize])
            .unwrap();
        for i in 0..writes {
            let w = cdb::write_16(u64::from(i * blocks), blocks);
            assert_eq!(self.srb(&w, direction::WRITE, CHUNK), srb::SUCCESS);
        }
        for i in 0..reads {
            let r = cdb::read_16(u64::from(i * blocks), blocks);
            assert_eq!(self.srb(&r, direction::READ, CHUNK), srb::SUCCESS);
        }
    }

    /// A sends `n` frames to B, which receives them all.
    fn frames(&mut self, n: usize) {
        let (dst, src) = (self.b.1.mac, self.a.1.mac);
        let mut frame = vec![0u8; 200];
        frame[..6].copy_from_slice(&dst.0);
        frame[6..12].copy_from_slice(&src.0);
        frame[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
        let (mut sent, mut got) = (0, 0);
        let deadline = Instant::now() + Duration::from_secs(30);
        while got < n && Instant::now() < deadline {
            if sent < n && sent - got < 64 {
                let batch: Vec<TxFrame> = (0..(n - sent).min(16))
                    .map(|_| TxFrame::new(&frame))
                    .collect();
                sent += self.a.1.send(0, &batch).unwrap();
            }
            self.b
                .1
                .poll(0, |f| {
                    if f.to_vec()[12..14] == [0x88, 0xb5] {
                        got += 1;
                    }
                })
                .unwrap();
        }
        assert_eq!(got, n, "B received every frame");
    }
}

/// GET `path` over `stream`; returns the body of a 200 answer.
fn http_get(mut stream: impl Read + Write, path: &str) -> String {
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "GET {path}: {head}");
    body.to_string()
}

fn scrape_unix(path: &Path) -> String {
    let body = http_get(
        std::os::unix::net::UnixStream::connect(path).unwrap(),
        "/metrics",
    );
    assert!(body.contains("# TYPE vspa_lun_operations_total counter"));
    body
}

fn scrape_tcp(addr: &str) -> String {
    http_get(std::net::TcpStream::connect(addr).unwrap(), "/metrics")
}

/// The value of the sample of family `name` whose labels include `labels`
/// (summed when several match; 0 when none does).
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, v) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            let ok = n == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            ok.then(|| v.parse::<f64>().unwrap() as u64)
        })
        .sum()
}

/// Re-scrapes until `check` holds (a worker publishes its ring totals just
/// after it completes a request), up to 5 s; returns the last scrape.
fn settle(scrape: impl Fn() -> String, check: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = scrape();
        if check(&text) || Instant::now() > deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn promtool_check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn scrape_passes_promtool_and_counts_what_clients_did() {
    require_tool("promtool");
    let dir = tempfile::tempdir().unwrap();
    let sock = dir
        .path()
        .join(format!("metrics-{}.sock", std::process::id()));
    let serve = start(dir.path(), sock.to_str().unwrap());
    let mut c = connect(&serve);
    let scrape = || scrape_unix(&sock);
    let before = scrape();
    let lun = |op: &'static str| [("controller", "scsi0"), ("lun", "0"), ("op", op)];
    let scsi_in = [("device", "scsi0"), ("direction", "in")];

    c.storage_io(6, 3);
    assert_eq!(
        c.srb(&cdb::synchronize_cache(), direction::NONE, 0),
        srb::SUCCESS
    );
    // A read past the end: CHECK CONDITION, counted as an error.
    let past = cdb::read_16(DISK / 512, 1);
    assert_ne!(c.srb(&past, direction::READ, 512), srb::SUCCESS);
    c.frames(100);
    let srbs = 6 + 3 + 2;

    let delta = |text: &str, name: &str, labels: &[(&str, &str)]| {
        value(text, name, labels) - value(&before, name, labels)
    };
    let after = settle(scrape, |t| {
        delta(t, "vspa_channel_packets_total", &scsi_in) == srbs
    });
    promtool_check(&after);

    let ops = "vspa_lun_operations_total";
    assert_eq!(value(&after, ops, &lun("write")), 6);
    assert_eq!(value(&after, ops, &lun("read")), 3);
    assert_eq!(value(&after, ops, &lun("flush")), 1);
    let bytes = "vspa_lun_bytes_total";
    assert_eq!(value(&after, bytes, &lun("write")), 6 * u64::from(CHUNK));
    assert_eq!(value(&after, bytes, &lun("read")), 3 * u64::from(CHUNK));
    let lat = "vspa_lun_latency_seconds_count";
    assert_eq!(value(&after, lat, &lun("write")), 6);
    let le_inf = [("op", "read"), ("le", "+Inf")];
    assert_eq!(value(&after, "vspa_lun_latency_seconds_bucket", &le_inf), 3);
    let errors = "vspa_lun_errors_total";
    assert_eq!(value(&after, errors, &[("kind", "check")]), 1);
    assert_eq!(value(&after, errors, &[("kind", "medium")]), 0);
    assert_eq!(value(&after, "vspa_lun_in_flight", &[("lun", "0")]), 0);

    // Rings: every SRB in, every completion out, and signals both ways.
    let scsi_out = [("device", "scsi0"), ("direction", "out")];
    assert_eq!(delta(&after, "vspa_channel_packets_total", &scsi_in), srbs);
    assert_eq!(delta(&after, "vspa_channel_packets_total", &scsi_out), srbs);
    assert!(delta(&after, "vspa_channel_signals_total", &scsi_in) >= 1);
    assert!(delta(&after, "vspa_channel_signals_total", &scsi_out) >= 1);
    assert!(delta(&after, "vspa_channel_ring_bytes_total", &scsi_in) >= srbs * 64);

    // The switch forwarded A's 100 frames to B.
    let frames = "vspa_port_frames_total";
    let a_rx = [("port", "vm-a"), ("direction", "rx")];
    let b_tx = [("port", "vm-b"), ("direction", "tx")];
    assert_eq!(delta(&after, frames, &a_rx), 100);
    assert_eq!(delta(&after, frames, &b_tx), 100);
    assert_eq!(delta(&after, "vspa_port_bytes_total", &a_rx), 100 * 200);
    assert_eq!(
        value(&after, "vspa_tenant_connections", &[("tenant", "default")]),
        3
    );
}

/// A port nothing listens on now (bound, then released).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Percent-encodes a PromQL query for a URL.
fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The value Prometheus at `addr` answers for `query` (None while it has
/// no sample).
fn prom_query(addr: &str, query: &str) -> Option<u64> {
    let stream = std::net::TcpStream::connect(addr).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let body = http_get(stream, &format!("/api/v1/query?query={}", encode(query)));
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    let v = json["data"]["result"][0]["value"][1].as_str()?;
    Some(v.parse::<f64>().unwrap() as u64)
}

/// Stops the Prometheus server when the test ends.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn prometheus_scrapes_vspa_and_answers_queries() {
    require_tool("prometheus");
    let dir = tempfile::tempdir().unwrap();
    let metrics = format!("127.0.0.1:{}", free_port());
    let serve = start(dir.path(), &metrics);
    let mut c = connect(&serve);
    let frames_before = value(
        &scrape_tcp(&metrics),
        "vspa_port_frames_total",
        &[("port", "vm-a"), ("direction", "rx")],
    );
    c.storage_io(5, 0);
    c.frames(50);

    let config: PathBuf = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: vspa\n    static_configs:\n      - targets: ['{metrics}']\n"
        ),
    )
    .unwrap();
    let web = format!("127.0.0.1:{}", free_port());
    let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let _prometheus = Killed(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus"),
    );

    let writes = r#"vspa_lun_operations_total{job="vspa",controller="scsi0",lun="0",op="write"}"#;
    let frames = r#"vspa_port_frames_total{job="vspa",switch="sw",port="vm-a",direction="rx"}"#;
    let deadline = Instant::now() + Duration::from_secs(90);
    let (mut w, mut f) = (None, None);
    while Instant::now() < deadline && (w.is_none() || f.is_none()) {
        std::thread::sleep(Duration::from_millis(500));
        w = prom_query(&web, writes);
        f = prom_query(&web, frames);
    }
    let log = std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default();
    assert_eq!(w, Some(5), "LUN writes through Prometheus; its log:\n{log}");
    assert_eq!(
        f,
        Some(frames_before + 50),
        "port frames through Prometheus"
    );
    drop(serve);
}

/// A client that connects and trickles its request holds up no scrape
/// (each connection has its own thread), and is cut off once its request
/// has taken longer than the 5 s limit, however slowly it sends.
#[test]
fn a_stalled_client_holds_up_no_scrape() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir
        .path()
        .join(format!("metrics-stall-{}.sock", std::process::id()));
    let _serve = start(dir.path(), sock.to_str().unwrap());
    let mut stalled = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    stalled.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();

    let start = Instant::now();
    scrape_unix(&sock);
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "a scrape waited {:?} behind a stalled connection",
        start.elapsed()
    );

    // One byte every 2 s keeps each read under its own timeout; the
    // request's limit still ends the connection.
    let trickled = Instant::now();
    let mut closed = false;
    for _ in 0..8 {
        std::thread::sleep(Duration::from_secs(2));
        if stalled.write_all(b"X").is_err() {
            closed = true;
            break;
        }
    }
    assert!(closed, "the trickling client was never cut off");
    assert!(
        trickled.elapsed() < Duration::from_secs(12),
        "cut off after {:?}",
        trickled.elapsed()
    );
}
