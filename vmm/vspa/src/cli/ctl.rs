//! `vspa ctl`: the client of the control API (`vspa serve --api-socket`).
//! Each subcommand is one request; the answer prints as a table (lists),
//! `key: value` lines (one object) or the changes made, or as the raw JSON
//! with `--json`. An error answer prints its message and exits with 1.
//!
//! Bodies of additions are written like the configuration file's keys:
//! `vspa ctl lun add scsi0 lun=1 path=disk.vhd read_only=true`, where each
//! value is a TOML value (a bare word is a string) and dotted keys make
//! tables (`pcap.path=/tmp/p.pcap`).

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use serde_json::{Value, json};
use vspa::api::http::{self, percent_encode};

#[derive(Debug, clap::Args)]
pub struct CtlArgs {
    /// The control API socket of a running `vspa serve --api-socket`.
    #[arg(long, default_value = "/run/vspa-api.sock", value_name = "PATH")]
    pub api_socket: PathBuf,
    /// Print the API's JSON answer instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum CtlCommand {
    /// What runs: counts, overrides and every endpoint.
    Status,
    /// Tenants, or one tenant.
    Tenants { name: Option<String> },
    /// Clients connected to a tenant's socket.
    Clients { tenant: String },
    /// VMBus devices offered to a tenant.
    Devices { tenant: String },
    /// Each client's channels of a tenant.
    Channels { tenant: String },
    /// SCSI controllers and their LUNs, or one controller.
    Controllers { name: Option<String> },
    /// Add or remove a SCSI controller.
    #[command(subcommand)]
    Controller(ControllerCmd),
    /// Show, hot-add or hot-remove a LUN.
    #[command(subcommand)]
    Lun(LunCmd),
    /// Insert or eject DVD media.
    #[command(subcommand)]
    Media(MediaCmd),
    /// Switches and their ports, or one switch.
    Switches { name: Option<String> },
    /// Show, add or remove a switch port.
    #[command(subcommand)]
    Port(PortCmd),
    /// Connect (`up`) or disconnect (`down`) a guest NIC's cable.
    Link {
        switch: String,
        port: String,
        #[arg(value_parser = ["up", "down"])]
        state: String,
    },
    /// A tenant's integration services.
    #[command(subcommand)]
    Ic(IcCmd),
    /// The runtime overrides, or drop them.
    Overrides {
        /// Drop override ID (`all`: every one) and go back to the file.
        #[arg(long, value_name = "ID|all")]
        drop: Option<String>,
    },
    /// Any request: `vspa ctl call POST /v1/... '{"json": 1}'`.
    Call {
        method: String,
        path: String,
        body: Option<String>,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum ControllerCmd {
    /// `name=scsi1 lun=[{lun=0,path="d.vhd"}]`: a `[[controller]]` table.
    Add {
        #[arg(required = true)]
        keys: Vec<String>,
        /// Give the tenant the whole controller.
        #[arg(long)]
        tenant: Option<String>,
    },
    Remove {
        name: String,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum LunCmd {
    Show {
        controller: String,
        lun: u8,
    },
    /// `lun=1 path=d.vhd [read_only=true dvd=true format=vhd ...]`: a
    /// `[[controller.lun]]` table.
    Add {
        controller: String,
        #[arg(required = true)]
        keys: Vec<String>,
        /// Grant the LUN to this tenant.
        #[arg(long)]
        tenant: Option<String>,
    },
    Remove {
        controller: String,
        lun: u8,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum MediaCmd {
    Insert {
        controller: String,
        lun: u8,
        path: String,
    },
    Eject {
        controller: String,
        lun: u8,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum PortCmd {
    Show {
        switch: String,
        port: String,
    },
    /// `name=p1 pcap.path=/tmp/p.pcap`: a `[[switch.port]]` table.
    Add {
        switch: String,
        #[arg(required = true)]
        keys: Vec<String>,
        /// Offer a guest NIC port to this tenant.
        #[arg(long)]
        tenant: Option<String>,
    },
    Remove {
        switch: String,
        port: String,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum IcCmd {
    /// Every service's state.
    Show {
        tenant: String,
    },
    Heartbeat {
        tenant: String,
    },
    /// Ask the guest to shut down.
    Shutdown {
        tenant: String,
        #[arg(long, default_value = "power_off", value_parser = ["power_off", "reboot", "hibernate"])]
        kind: String,
    },
    /// KVP values as last known, or a pool read from the guest.
    Kvp {
        tenant: String,
        pool: Option<String>,
    },
    /// Set a value in a host pool.
    KvpSet {
        tenant: String,
        pool: String,
        key: String,
        value: String,
    },
}

/// One request: method, path, body, and how a success prints.
struct Request {
    method: &'static str,
    path: String,
    body: Option<Value>,
    shape: Shape,
}

/// How an answer prints without `--json`.
enum Shape {
    /// A list, with these columns.
    Table(&'static [&'static str]),
    /// One object.
    Object,
    /// What a change did.
    Report,
}

const TENANT_COLUMNS: &[&str] = &["name", "socket", "connections", "integration_services"];
const CLIENT_COLUMNS: &[&str] = &[
    "id",
    "pid",
    "uid",
    "gid",
    "vmbus_version",
    "channels",
    "open_channels",
];
const DEVICE_COLUMNS: &[&str] = &["id", "kind", "name", "instance"];
const CHANNEL_COLUMNS: &[&str] = &["client", "relid", "kind", "name", "subchannel", "state"];
const CONTROLLER_COLUMNS: &[&str] = &["name", "luns", "subchannels", "tenants"];
const SWITCH_COLUMNS: &[&str] = &["name", "ports", "mac_entries"];
const OVERRIDE_COLUMNS: &[&str] = &["id", "kind", "change"];

fn path(parts: &[&str]) -> String {
    let mut p = String::from("/v1");
    for s in parts {
        p.push('/');
        p.push_str(&percent_encode(s));
    }
    p
}

fn get(parts: &[&str], shape: Shape) -> Request {
    Request {
        method: "GET",
        path: path(parts),
        body: None,
        shape,
    }
}

fn change(method: &'static str, parts: &[&str], body: Option<Value>) -> Request {
    Request {
        method,
        path: path(parts),
        body,
        shape: Shape::Report,
    }
}

/// `KEY=VALUE` words as a JSON object: each value a TOML value, a bare
/// word a string; dotted keys nest.
fn keys_to_json(words: &[String], tenant: Option<&str>) -> anyhow::Result<Value> {
    let mut text = String::new();
    for w in words {
        let (k, v) = w
            .split_once('=')
            .with_context(|| format!("{w:?} is not KEY=VALUE"))?;
        let line = format!("{k} = {v}\n");
        if line.parse::<toml::Table>().is_ok() {
            text.push_str(&line);
        } else {
            text.push_str(&format!("{k} = {}\n", toml::Value::String(v.into())));
        }
    }
    let table: toml::Table = text.parse().context("the KEY=VALUE words")?;
    let mut body = serde_json::to_value(table)?;
    if let Some(t) = tenant {
        body["tenant"] = json!(t);
    }
    Ok(body)
}

fn request(cmd: &CtlCommand) -> anyhow::Result<Request> {
    use CtlCommand as C;
    Ok(match cmd {
        C::Status => get(&[], Shape::Object),
        C::Tenants { name: None } => get(&["tenants"], Shape::Table(TENANT_COLUMNS)),
        C::Tenants { name: Some(n) } => get(&["tenants", n], Shape::Object),
        C::Clients { tenant } => get(
            &["tenants", tenant, "clients"],
            Shape::Table(CLIENT_COLUMNS),
        ),
        C::Devices { tenant } => get(
            &["tenants", tenant, "devices"],
            Shape::Table(DEVICE_COLUMNS),
        ),
        C::Channels { tenant } => get(
            &["tenants", tenant, "channels"],
            Shape::Table(CHANNEL_COLUMNS),
        ),
        C::Controllers { name: None } => get(&["controllers"], Shape::Table(CONTROLLER_COLUMNS)),
        C::Controllers { name: Some(n) } => get(&["controllers", n], Shape::Object),
        C::Controller(ControllerCmd::Add { keys, tenant }) => change(
            "POST",
            &["controllers"],
            Some(keys_to_json(keys, tenant.as_deref())?),
        ),
        C::Controller(ControllerCmd::Remove { name }) => {
            change("DELETE", &["controllers", name], None)
        }
        C::Lun(LunCmd::Show { controller, lun }) => get(
            &["controllers", controller, "luns", &lun.to_string()],
            Shape::Object,
        ),
        C::Lun(LunCmd::Add {
            controller,
            keys,
            tenant,
        }) => change(
            "POST",
            &["controllers", controller, "luns"],
            Some(keys_to_json(keys, tenant.as_deref())?),
        ),
        C::Lun(LunCmd::Remove { controller, lun }) => change(
            "DELETE",
            &["controllers", controller, "luns", &lun.to_string()],
            None,
        ),
        C::Media(MediaCmd::Insert {
            controller,
            lun,
            path,
        }) => change(
            "PUT",
            &["controllers", controller, "luns", &lun.to_string(), "media"],
            Some(json!({ "path": path })),
        ),
        C::Media(MediaCmd::Eject { controller, lun }) => change(
            "DELETE",
            &["controllers", controller, "luns", &lun.to_string(), "media"],
            None,
        ),
        C::Switches { name: None } => get(&["switches"], Shape::Table(SWITCH_COLUMNS)),
        C::Switches { name: Some(n) } => get(&["switches", n], Shape::Object),
        C::Port(PortCmd::Show { switch, port }) => {
            get(&["switches", switch, "ports", port], Shape::Object)
        }
        C::Port(PortCmd::Add {
            switch,
            keys,
            tenant,
        }) => change(
            "POST",
            &["switches", switch, "ports"],
            Some(keys_to_json(keys, tenant.as_deref())?),
        ),
        C::Port(PortCmd::Remove { switch, port }) => {
            change("DELETE", &["switches", switch, "ports", port], None)
        }
        C::Link {
            switch,
            port,
            state,
        } => change(
            "PUT",
            &["switches", switch, "ports", port, "link"],
            Some(json!({ "up": state == "up" })),
        ),
        C::Ic(IcCmd::Show { tenant }) => get(&["tenants", tenant, "ic"], Shape::Object),
        C::Ic(IcCmd::Heartbeat { tenant }) => {
            get(&["tenants", tenant, "ic", "heartbeat"], Shape::Object)
        }
        C::Ic(IcCmd::Shutdown { tenant, kind }) => Request {
            shape: Shape::Object,
            ..change(
                "POST",
                &["tenants", tenant, "ic", "shutdown"],
                Some(json!({ "kind": kind })),
            )
        },
        C::Ic(IcCmd::Kvp { tenant, pool }) => match pool {
            Some(p) => get(&["tenants", tenant, "ic", "kvp", p], Shape::Object),
            None => get(&["tenants", tenant, "ic", "kvp"], Shape::Object),
        },
        C::Ic(IcCmd::KvpSet {
            tenant,
            pool,
            key,
            value,
        }) => Request {
            shape: Shape::Object,
            ..change(
                "PUT",
                &["tenants", tenant, "ic", "kvp", pool, key],
                Some(json!({ "value": value })),
            )
        },
        C::Overrides { drop: None } => get(&["overrides"], Shape::Table(OVERRIDE_COLUMNS)),
        C::Overrides { drop: Some(id) } if id == "all" => change("DELETE", &["overrides"], None),
        C::Overrides { drop: Some(id) } => change("DELETE", &["overrides", id], None),
        C::Call { method, path, body } => Request {
            method: match method.to_ascii_uppercase().as_str() {
                "GET" => "GET",
                "POST" => "POST",
                "PUT" => "PUT",
                "DELETE" => "DELETE",
                m => bail!("method {m:?}: GET, POST, PUT or DELETE"),
            },
            path: path.clone(),
            body: body
                .as_deref()
                .map(serde_json::from_str)
                .transpose()
                .context("the body is not JSON")?,
            shape: Shape::Object,
        },
    })
}

pub fn run(args: CtlArgs) -> anyhow::Result<ExitCode> {
    let req = request(&args.command)?;
    let mut stream = UnixStream::connect(&args.api_socket).with_context(|| {
        format!(
            "cannot connect to the control API at {} (is `vspa serve --api-socket` running?)",
            args.api_socket.display()
        )
    })?;
    let resp = http::call(&mut stream, req.method, &req.path, req.body.as_ref())
        .context("the control API's answer")?;
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&resp.body)?)?;
    } else if (200..300).contains(&resp.status) {
        out!("{}", render(&req.shape, &resp.body))?;
    }
    if (200..300).contains(&resp.status) {
        return Ok(ExitCode::SUCCESS);
    }
    let msg = resp.body["error"].as_str().unwrap_or("(no message)");
    eprintln!("vspa ctl: error {}: {msg}", resp.status);
    Ok(ExitCode::FAILURE)
}

/// The human-readable form of an answer.
fn render(shape: &Shape, body: &Value) -> String {
    match shape {
        Shape::Table(cols) => table(cols, body.as_array().map_or(&[][..], Vec::as_slice)),
        Shape::Object => object(body),
        Shape::Report => report(body),
    }
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) => {
            if a.iter().all(|x| !x.is_object()) {
                a.iter().map(cell).collect::<Vec<_>>().join(",")
            } else {
                a.len().to_string()
            }
        }
        other => other.to_string(),
    }
}

fn table(cols: &[&str], rows: &[Value]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| cols.iter().map(|c| cell(&r[*c])).collect())
        .collect();
    let widths: Vec<usize> = cols
        .iter()
        .enumerate()
        .map(|(i, c)| {
            cells
                .iter()
                .map(|r| r[i].len())
                .chain([c.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |words: &mut dyn Iterator<Item = String>| {
        let mut s = words
            .zip(&widths)
            .map(|(w, n)| format!("{w:<n$}"))
            .collect::<Vec<_>>()
            .join("  ");
        s.truncate(s.trim_end().len());
        s + "\n"
    };
    let mut out = line(&mut cols.iter().map(|c| c.to_uppercase()));
    for r in cells {
        out += &line(&mut r.into_iter());
    }
    out
}

fn object(body: &Value) -> String {
    match body {
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| match v {
                Value::Object(_) => format!("{k}: {v}\n"),
                // Long lists of words (the endpoints): one a line.
                Value::Array(a) if a.len() > 4 && a.iter().all(Value::is_string) => {
                    let lines: String = a.iter().map(|w| format!("  {}\n", cell(w))).collect();
                    format!("{k}:\n{lines}")
                }
                _ => format!("{k}: {}\n", cell(v)),
            })
            .collect(),
        other => format!("{}\n", cell(other)),
    }
}

fn report(body: &Value) -> String {
    let mut out = String::new();
    let list = |k: &str| body[k].as_array().cloned().unwrap_or_default();
    for a in list("applied") {
        out += &format!("applied: {}\n", cell(&a));
    }
    for f in list("failed") {
        out += &format!("failed: {}: {}\n", cell(&f["change"]), cell(&f["error"]));
    }
    for r in list("needs_restart") {
        out += &format!("needs restart: {}\n", cell(&r));
    }
    for d in list("dropped") {
        out += &format!(
            "override dropped: {}: {}\n",
            cell(&d["override"]),
            cell(&d["reason"])
        );
    }
    if out.is_empty() {
        out = "no change\n".into();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_become_a_json_table() {
        let words = [
            "lun=1",
            "path=d.vhd",
            "read_only=true",
            "pcap.path=/tmp/x y",
        ]
        .map(String::from);
        let got = keys_to_json(&words, Some("t1")).unwrap();
        assert_eq!(
            got,
            json!({"lun": 1, "path": "d.vhd", "read_only": true, "pcap": {"path": "/tmp/x y"}, "tenant": "t1"})
        );
        assert!(keys_to_json(&["nokey".into()], None).is_err());
    }

    #[test]
    fn tables_align_and_reports_list_changes() {
        let rows = json!([{"name": "scsi0", "luns": [{"lun": 0}], "tenants": ["a", "b"]}]);
        assert_eq!(
            render(&Shape::Table(&["name", "luns", "tenants"]), &rows),
            "NAME   LUNS  TENANTS\nscsi0  1     a,b\n"
        );
        let r = json!({"applied": ["scsi0: LUN 1 added"], "failed": [], "needs_restart": [], "dropped": []});
        assert_eq!(render(&Shape::Report, &r), "applied: scsi0: LUN 1 added\n");
        let status = json!({"endpoints": ["GET /v1", "GET /v1/a", "GET /v1/b", "GET /v1/c", "GET /v1/d"], "nics": 0});
        assert_eq!(
            render(&Shape::Object, &status),
            "endpoints:\n  GET /v1\n  GET /v1/a\n  GET /v1/b\n  GET /v1/c\n  GET /v1/d\nnics: 0\n"
        );
    }
}
