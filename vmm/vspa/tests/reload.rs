//! The appliance's reload in process: typed reports of what was applied,
//! what failed and what waits for a restart, for storage and switch
//! changes, with the devices offered and rescinded as the report says.

use std::path::Path;

use storage::config::{StorageChange, StorageRestart};
use switch::config::{PortChange, SwitchRestart};
use vspa::{Appliance, Change, Options, ReloadReport, Restart, ValidConfig};

fn config(dir: &Path, text: &str) -> ValidConfig {
    ValidConfig::from_toml(text, dir).unwrap()
}

fn controller(extra: &str, luns: &str) -> String {
    format!(
        "[[controller]]\nname = \"scsi0\"\n{extra}\n[[controller.lun]]\nlun = 0\npath = \"a.img\"\n{luns}"
    )
}

fn switch(spin: u32, ports: &str) -> String {
    format!(
        "[[switch]]\nname = \"sw0\"\nspin_us = {spin}\n\
         [[switch.port]]\nname = \"mgmt\"\n\
         internal = {{ mac = \"02:00:00:00:00:fe\", ip = \"10.99.0.254/24\", counters_port = 9199 }}\n{ports}"
    )
}

const LUN1: &str = "[[controller.lun]]\nlun = 1\npath = \"b.img\"\n";
const NIC: &str = "[[switch.port]]\nname = \"vm\"\nnetvsp = {}\n";

fn applied(r: &ReloadReport) -> Vec<String> {
    r.applied.iter().map(ToString::to_string).collect()
}

#[test]
fn reload_reports_what_it_applied_what_failed_and_what_needs_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    vhd::create::create_raw(&d.join("a.img"), 4 << 20).unwrap();
    vhd::create::create_raw(&d.join("b.img"), 4 << 20).unwrap();
    let base = format!("{}\n{}", controller("", ""), switch(50, ""));
    let mut app = Appliance::start(&config(d, &base), &Options::default()).unwrap();
    assert_eq!(app.summary().nics, 0);

    // The same file, and the same configuration written differently:
    // nothing to do.
    assert!(app.reload(&config(d, &base)).is_empty());
    let spelled = format!(
        "{}\n{}",
        controller("subchannels = 4\nqueue_depth = 256", ""),
        switch(50, "").replace(
            "spin_us = 50",
            "spin_us = 50\nworkers = 1\nmac_age_secs = 300"
        )
    );
    assert_eq!(app.reload(&config(d, &spelled)), ReloadReport::default());

    // A LUN and a guest NIC come.
    let more = format!("{}\n{}", controller("", LUN1), switch(50, NIC));
    let r = app.reload(&config(d, &more));
    assert_eq!(
        applied(&r),
        ["scsi0: LUN 1 added", "guest NIC vm added to switch sw0"]
    );
    assert!(r.failed.is_empty() && r.needs_restart.is_empty(), "{r:?}");
    assert_eq!(
        app.controller("default", "scsi0")
            .unwrap()
            .table()
            .numbers(),
        [0, 1]
    );
    assert_eq!(app.summary().nics, 1);
    assert_eq!(app.running(), config(d, &more));

    // Switch and controller settings wait for a restart, said at every
    // reload, while LUNs and ports follow the file.
    let later = format!(
        "{}\n{}",
        controller("queue_depth = 64", ""),
        switch(500, NIC)
    );
    for _ in 0..2 {
        let r = app.reload(&config(d, &later));
        assert_eq!(
            r.needs_restart,
            [
                Restart::Storage(StorageRestart::ControllerSettings("scsi0".into())),
                Restart::Switch(SwitchRestart::Settings("sw0".into()))
            ]
        );
        assert!(r.failed.is_empty(), "{r:?}");
    }
    assert_eq!(
        app.controller("default", "scsi0")
            .unwrap()
            .table()
            .numbers(),
        [0]
    );

    // A LUN whose image is missing fails, the rest applies, and the next
    // reload tries it again.
    let missing = format!(
        "{}\n{}",
        controller("", "[[controller.lun]]\nlun = 2\npath = \"gone.img\"\n"),
        switch(50, "")
    );
    let r = app.reload(&config(d, &missing));
    assert_eq!(applied(&r), ["guest NIC vm removed from switch sw0"]);
    assert_eq!(r.failed.len(), 1);
    let (change, why) = &r.failed[0];
    assert!(
        matches!(change, Change::Storage(StorageChange::AddLun { lun, .. }) if lun.lun == 2),
        "{change:?}"
    );
    assert!(why.contains("gone.img"), "{why}");
    assert_eq!(app.summary().nics, 0);
    vhd::create::create_raw(&d.join("gone.img"), 4 << 20).unwrap();
    let r = app.reload(&config(d, &missing));
    assert_eq!(applied(&r), ["scsi0: LUN 2 added"]);
    app.shutdown();
}

#[test]
fn a_changed_port_is_replaced_and_a_new_switch_waits() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut app = Appliance::start(&config(d, &switch(50, NIC)), &Options::default()).unwrap();
    let nic9000 = "[[switch.port]]\nname = \"vm\"\nnetvsp = { mtu = 9000 }\n";
    let r = app.reload(&config(d, &switch(50, nic9000)));
    assert!(matches!(
        &r.applied[..],
        [
            Change::Switch(PortChange::Remove { nic: true, .. }),
            Change::Switch(PortChange::Add { .. })
        ]
    ));
    let nic = app.network().netvsp_devices().next().unwrap().clone();
    assert_eq!(nic.config().mtu, 9000);
    let r = app.reload(&config(
        d,
        &format!("{}\n[[switch]]\nname = \"sw1\"\n", switch(50, nic9000)),
    ));
    assert_eq!(
        r.needs_restart,
        [Restart::Switch(SwitchRestart::Added("sw1".into()))]
    );
    assert!(app.switch("sw1").is_none());
}
