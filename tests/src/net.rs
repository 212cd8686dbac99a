//! Helpers of the network end-to-end tests: network namespaces the tests
//! create (and delete), a `vspa serve --config` process, and the internal
//! port's counters service.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};

/// Runs a command and returns its output.
pub fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"))
}

/// Runs a command that must succeed; returns its stdout.
pub fn run_ok(cmd: &str, args: &[&str]) -> String {
    let out = run(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns(pub String);

impl Netns {
    pub fn new(name: String) -> Self {
        let _ = run("ip", &["netns", "del", &name]);
        run_ok("ip", &["netns", "add", &name]);
        run_ok("ip", &["-n", &name, "link", "set", "lo", "up"]);
        Netns(name)
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]).args(args);
        c
    }

    pub fn output(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("ip netns exec")
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.output(args);
        assert!(
            out.status.success(),
            "in {}: {args:?} failed: {}{}",
            self.0,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Moves tap `dev` (created by vspa) into the namespace and addresses it.
    pub fn take(&self, dev: &str, cidr: &str) {
        run_ok("ip", &["link", "set", dev, "netns", &self.0]);
        run_ok("ip", &["-n", &self.0, "addr", "add", cidr, "dev", dev]);
        run_ok("ip", &["-n", &self.0, "link", "set", dev, "up"]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.0]);
    }
}

/// A host link (bridge, veth) a test or benchmark created; deleted on drop.
#[derive(Debug)]
pub struct Link(pub String);

impl Link {
    /// Runs `ip link add NAME <args>` and owns the result.
    pub fn add(name: &str, args: &[&str]) -> Self {
        let _ = run("ip", &["link", "del", name]);
        let mut all = vec!["link", "add", name];
        all.extend_from_slice(args);
        run_ok("ip", &all);
        Link(name.to_string())
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = run("ip", &["link", "del", &self.0]);
    }
}

/// iperf3 from `client` to a one-shot server at `addr` in `server`
/// (`extra` client options, e.g. `-t 3`, `-u`, `-C cubic`): the JSON
/// report. The one iperf3 runner of tests and benchmarks.
pub fn iperf3(server: &Netns, client: &Netns, addr: &str, extra: &[&str]) -> serde_json::Value {
    let mut srv = server
        .cmd(&["iperf3", "-s", "-1", "-B", addr])
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn the iperf3 server");
    let mut report = None;
    for _ in 0..50 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let mut args = vec!["iperf3", "-c", addr, "-J"];
        args.extend_from_slice(extra);
        let out = client.output(&args);
        if out.status.success() {
            report = Some(serde_json::from_slice(&out.stdout).expect("iperf3 JSON"));
            break;
        }
    }
    let _ = srv.kill();
    let _ = srv.wait();
    report.expect("iperf3 client never connected")
}

/// Gbit/s the iperf3 receiver counted in `report`.
pub fn received_gbps(report: &serde_json::Value) -> f64 {
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("no sum_received in {report}"))
        / 1e9
}

/// Names unique to this process and test.
pub fn names(test: &str) -> (String, String) {
    let id = std::process::id() % 100_000;
    (format!("vsw{id}{test}"), format!("vs{id}{test}"))
}

/// Reads the internal port's counters service from inside `ns`.
pub fn counters_over_tcp(ns: &Netns, addr: &str, port: u16) -> String {
    let script = format!("exec 3<>/dev/tcp/{addr}/{port} && timeout 5 cat <&3");
    ns.ok(&["bash", "-c", &script])
}

/// The value of counter `name` in the service's text.
pub fn counter(text: &str, name: &str) -> u64 {
    let line = text
        .lines()
        .find(|l| l.split(' ').next() == Some(name))
        .unwrap_or_else(|| panic!("no counter {name} in\n{text}"));
    line.split(' ').nth(1).unwrap().parse().unwrap()
}

/// tshark capturing on `dev` inside a namespace, one line per packet (the
/// requested fields, tab-separated) as it sees them; killed on drop.
#[derive(Debug)]
pub struct Tshark {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Tshark {
    pub fn start(ns: &Netns, dev: &str, filter: &str, fields: &[&str]) -> Self {
        let mut args = vec!["tshark", "-l", "-i", dev, "-f", filter, "-T", "fields"];
        for f in fields {
            args.extend(["-e", f]);
        }
        let mut child = ns
            .cmd(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn tshark");
        let (tx, lines) = std::sync::mpsc::channel();
        let out = child.stdout.take().expect("piped stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Tshark { child, lines }
    }

    /// The next packet's line, if one comes within `timeout`.
    pub fn next(&self, timeout: std::time::Duration) -> Option<String> {
        self.lines.recv_timeout(timeout).ok()
    }

    /// Up to `n` lines whose fields satisfy `keep`, waiting at most
    /// `timeout` in all.
    pub fn collect(
        &self,
        n: usize,
        timeout: std::time::Duration,
        keep: impl Fn(&[&str]) -> bool,
    ) -> Vec<String> {
        let deadline = std::time::Instant::now() + timeout;
        let mut lines = Vec::new();
        while lines.len() < n && std::time::Instant::now() < deadline {
            if let Some(l) = self.next(std::time::Duration::from_millis(100))
                && keep(&l.split('\t').collect::<Vec<_>>())
            {
                lines.push(l);
            }
        }
        lines
    }
}

impl Drop for Tshark {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// From a netvsc client at `me`: resolves `there` with ARP, pings it until
/// `tshark` shows it is capturing (sequence numbers from 100), then sends
/// three echo requests (0, 1, 2) that must each get a reply with the same
/// payload and a valid checksum. Returns the peer's MAC and tshark's lines
/// for those six packets (`seq_field`: index of `icmp.seq` in its fields).
pub fn ping_seen_by_tshark<C: vmbus::vsc::VscChannel>(
    c: &mut switch::netvsp::client::NetvscClient<C>,
    me: [u8; 4],
    there: [u8; 4],
    tshark: &Tshark,
    seq_field: usize,
) -> (switch::wire::MacAddr, Vec<String>) {
    use std::time::{Duration, Instant};
    use switch::netvsp::client::packets::{ping, resolve};
    let mac = resolve(c, me, there).unwrap().expect("ARP reply");
    let deadline = Instant::now() + Duration::from_secs(20);
    for seq in 100.. {
        assert!(Instant::now() < deadline, "tshark never saw a packet");
        ping(c, me, there, mac, seq).unwrap();
        if tshark.next(Duration::from_millis(200)).is_some() {
            break;
        }
    }
    for seq in 0..3 {
        let rtt = ping(c, me, there, mac, seq).unwrap();
        assert!(rtt.is_some(), "echo {seq}: same payload, valid checksum");
    }
    let lines = tshark.collect(6, Duration::from_secs(10), |f| {
        f.get(seq_field)
            .is_some_and(|s| s.parse::<u16>().is_ok_and(|s| s < 100))
    });
    (mac, lines)
}
