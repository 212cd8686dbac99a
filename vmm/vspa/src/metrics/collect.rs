//! What a scrape reads: every counter of the running appliance, as metric
//! families. Readings only: the counters live with the workers that keep
//! them (storage per worker and LUN, rings per channel, switch ports,
//! NICs, tenant sockets), and this sums and labels them.

use storage::stats::{ErrorKind, IoOp, LATENCY_BUCKETS_US, LunTotals};

use super::exposition::{Exposition, Labels};
use crate::Appliance;

/// Every metric of `appliance`.
pub fn collect(appliance: &Appliance) -> Exposition {
    let mut e = Exposition::default();
    tenants(&mut e, appliance);
    luns(&mut e, appliance);
    switches(&mut e, appliance);
    nics(&mut e, appliance);
    e
}

fn tenants(e: &mut Exposition, a: &Appliance) {
    for t in &a.tenants {
        let l: Labels<'_> = &[("tenant", &t.spec.name)];
        let c = &t.counters;
        let get = |v: &std::sync::atomic::AtomicU64| v.load(std::sync::atomic::Ordering::Relaxed);
        e.gauge(
            "vspa_tenant_connections",
            "Hosted-mode clients connected to the tenant's socket now.",
            l,
            get(&c.connected),
        );
        e.counter(
            "vspa_tenant_connections_accepted_total",
            "Hosted-mode connections accepted at the tenant's socket.",
            l,
            get(&c.accepted),
        );
        e.counter(
            "vspa_tenant_refused_credentials_total",
            "Connections refused because the peer's uid/gid is not allowed.",
            l,
            get(&c.refused_credentials),
        );
        e.counter(
            "vspa_tenant_limit_hits_total",
            "Connections or memory refused by the tenant's limits.",
            l,
            get(&c.limit_hits),
        );
        e.counter(
            "vspa_tenant_violations_total",
            "Requests for channels not offered to the tenant (isolation violations).",
            l,
            get(&c.violations),
        );
        channels(e, &t.spec.name, &t.registry);
    }
}

/// The open channels of one tenant's registry, and its channel resets.
fn channels(e: &mut Exposition, tenant: &str, registry: &vmbus::server::Registry) {
    for ch in registry.channel_stats() {
        let info = ch.info();
        let s = ch.snapshot();
        let (conn, relid, sub) = (
            info.peer.to_string(),
            info.relid.to_string(),
            info.subchannel_index.to_string(),
        );
        let base = [
            ("tenant", tenant),
            ("device", info.device.as_str()),
            ("connection", conn.as_str()),
            ("relid", relid.as_str()),
            ("subchannel", sub.as_str()),
        ];
        for (dir, packets, bytes, signals) in [
            ("in", s.packets_in, s.bytes_in, s.signals_in),
            ("out", s.packets_out, s.bytes_out, s.signals_out),
        ] {
            let l = with(&base, ("direction", dir));
            e.counter(
                "vspa_channel_packets_total",
                "VMBus packets read from (in) and written to (out) the channel's rings.",
                &l,
                packets,
            );
            e.counter(
                "vspa_channel_ring_bytes_total",
                "Ring bytes (descriptors, payload, padding, trailers) consumed (in) and produced (out).",
                &l,
                bytes,
            );
            e.counter(
                "vspa_channel_signals_total",
                "Signals from the guest (in: doorbell rings) and to it (out: interrupts).",
                &l,
                signals,
            );
        }
        e.counter(
            "vspa_channel_wakeups_total",
            "Times the channel's worker woke from sleep because the guest signalled.",
            &base,
            s.wakeups,
        );
    }
    for (device, n) in registry.channel_resets() {
        e.counter(
            "vspa_channel_resets_total",
            "Channels reset after a protocol violation, per device.",
            &[("tenant", tenant), ("device", &device)],
            n,
        );
    }
}

/// `base` plus one more label.
fn with<'a>(base: &[(&'a str, &'a str)], extra: (&'a str, &'a str)) -> Vec<(&'a str, &'a str)> {
    let mut l = base.to_vec();
    l.push(extra);
    l
}

fn luns(e: &mut Exposition, a: &Appliance) {
    for c in &a.controllers {
        for v in &c.views {
            // Every LUN the view holds, served yet or not.
            let mut luns = v.controller.io_stats().luns();
            let owner = a.tenant(&v.tenant);
            for n in c.luns.keys() {
                if owner.is_some_and(|t| t.spec.owns.owns_lun(&c.spec.name, *n)) {
                    luns.entry(*n).or_default();
                }
            }
            for (lun, totals) in luns {
                let lun = lun.to_string();
                let base = [
                    ("tenant", v.tenant.as_str()),
                    ("controller", c.spec.name.as_str()),
                    ("lun", lun.as_str()),
                ];
                lun_metrics(e, &base, &totals);
            }
        }
    }
}

fn lun_metrics(e: &mut Exposition, base: Labels<'_>, t: &LunTotals) {
    e.gauge(
        "vspa_lun_in_flight",
        "SCSI I/O commands the LUN's workers have in flight (queue depth).",
        base,
        t.in_flight(),
    );
    e.counter(
        "vspa_lun_throttled_total",
        "Times the tenant's per-LUN rate cap (limits.lun_iops, limits.lun_mbps) paused a worker.",
        base,
        t.throttled,
    );
    for op in IoOp::ALL {
        let i = op as usize;
        let l = with(base, ("op", op.name()));
        e.counter(
            "vspa_lun_operations_total",
            "SCSI I/O commands completed (read, write, flush, unmap, write_same), failed ones included.",
            &l,
            t.ops(op),
        );
        if matches!(op, IoOp::Read | IoOp::Write) {
            e.counter(
                "vspa_lun_bytes_total",
                "Bytes read and written by successful commands.",
                &l,
                t.bytes[i],
            );
        }
        let buckets: Vec<(f64, u64)> = LATENCY_BUCKETS_US
            .iter()
            .map(|us| *us as f64 / 1e6)
            .chain([f64::INFINITY])
            .zip(t.latency[i])
            .collect();
        e.histogram(
            "vspa_lun_latency_seconds",
            "Time from a command's arrival to its completion.",
            &l,
            &buckets,
            t.latency_sum_ns[i] as f64 / 1e9,
        );
    }
    for kind in ErrorKind::ALL {
        e.counter(
            "vspa_lun_errors_total",
            "Failed I/O commands by kind: medium (image I/O failed), check (other CHECK CONDITION), refused (bad request).",
            &with(base, ("kind", kind.name())),
            t.errors[kind as usize],
        );
    }
}

fn switches(e: &mut Exposition, a: &Appliance) {
    for sw in a.runtime().switches() {
        let name = sw.name();
        let l: Labels<'_> = &[("switch", name)];
        e.gauge(
            "vspa_switch_mac_entries",
            "Live entries in the switch's MAC table.",
            l,
            sw.mac_entries() as u64,
        );
        sw.stats().each(|k, v| {
            let family = format!("vspa_switch_{k}_total");
            e.counter(&family, help(k), l, v);
        });
        sw.each_port(|port, stats| {
            let base = [("switch", name), ("port", port)];
            stats.each(|k, v| family_counter(e, "vspa_port", &base, k, v));
        });
    }
}

fn nics(e: &mut Exposition, a: &Appliance) {
    for n in &a.nics {
        let tenant = n.offered.as_ref().map_or("", |(t, _)| t.as_str());
        let base = [
            ("switch", n.switch.as_str()),
            ("port", n.port.as_str()),
            ("tenant", tenant),
        ];
        e.gauge(
            "vspa_nic_link_up",
            "1 if the guest NIC's link is up.",
            &base,
            u64::from(n.dev.link_up()),
        );
        n.dev
            .stats()
            .each(|k, v| family_counter(e, "vspa_nic", &base, k, v));
    }
}

/// One counter of a switch port's or NIC's set: `drop_REASON` counters
/// become one `drops_total` family with a `reason` label, `rx_X`/`tx_X`
/// frames, bytes and packets one `X_total` family with a `direction`
/// label, the rest a family each.
fn family_counter(e: &mut Exposition, prefix: &str, base: Labels<'_>, k: &str, v: u64) {
    if let Some(reason) = k.strip_prefix("drop_") {
        let family = format!("{prefix}_drops_total");
        return e.counter(&family, help("drops"), &with(base, ("reason", reason)), v);
    }
    if let Some((dir, what)) = k.split_once('_')
        && matches!(dir, "rx" | "tx")
        && matches!(what, "frames" | "bytes" | "packets")
    {
        let family = format!("{prefix}_{what}_total");
        return e.counter(&family, help(what), &with(base, ("direction", dir)), v);
    }
    let family = format!("{prefix}_{k}_total");
    e.counter(&family, help(k), base, v);
}

/// Help text of the counters named in switch and NIC counter sets.
fn help(k: &str) -> &'static str {
    match k {
        "drops" => "Frames dropped, by reason.",
        "frames" => "Frames received from (rx) and sent to (tx) the port.",
        "bytes" => "Bytes received from (rx) and sent to (tx) the port.",
        "packets" => "Transfer-page packets with frames sent to the guest (rx).",
        "tx_errors" => "Frames the port failed to write.",
        "flooded" => "Received frames flooded (unknown unicast, broadcast, multicast).",
        "learn_table_full" => "Source MACs not learned because the MAC table was full.",
        "mac_moves" => "Stations seen moving to another port.",
        "bad_nvsp" => "Malformed or unknown NVSP messages from the guest.",
        "bad_control" => "Malformed or unknown RNDIS control messages from the guest.",
        "bad_completions" => "Completions from the guest that matched no packet in flight.",
        "control_messages" => "RNDIS control messages handled.",
        "link_indications" => "Link status indications sent to the guest.",
        "channel_resets" => "NIC channels reset after a ring violation.",
        _ => "A vspa counter.",
    }
}
