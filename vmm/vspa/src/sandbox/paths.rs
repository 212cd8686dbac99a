//! What the appliance may open once the sandbox is in force: the
//! directories of its images (reloads, differencing parents, checkpoints),
//! its configuration, its socket directories and its devices. The same
//! set feeds Landlock and [`allows`](super::allows), which a reload checks
//! before it opens anything.

use std::path::{Component, Path, PathBuf};

use crate::config::ValidConfig;

/// How a path may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Access {
    /// Read files (in a directory: every file beneath).
    Read,
    /// Read, write, create and remove regular files beneath.
    ReadWrite,
    /// A device node: read, write and ioctl.
    Device,
    /// Create and remove Unix sockets in a directory.
    Sockets,
}

/// One granted path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Grant {
    pub path: PathBuf,
    pub access: Access,
}

/// The paths the appliance may open, and the TCP ports it may use.
#[derive(Debug, Clone, Default)]
pub struct Paths {
    grants: Vec<Grant>,
    /// (port, bind): TCP ports to listen on (bind) or connect to.
    tcp: Vec<(u16, bool)>,
    /// NBD servers named by host name (the sandbox refuses them).
    host_names: Vec<String>,
}

impl Paths {
    pub fn new() -> Self {
        Paths::default()
    }

    /// The configuration file (read at each reload); its directory holds
    /// images (relative paths resolve there).
    pub fn config_file(&mut self, path: &Path) -> &mut Self {
        self.grant(path, Access::Read);
        if let Some(dir) = absolute(path).parent() {
            self.grant(dir, Access::ReadWrite);
        }
        self
    }

    /// Everything `config` names: the directories of its images, capture
    /// files and NBD exports (block devices: the device itself), the
    /// directories differencing parents may come from (read only), the
    /// directories of the tenants' and NBD servers' Unix sockets, and the
    /// TCP ports of its NBD servers (bind) and NBD-backed LUNs (connect).
    pub fn config(&mut self, config: &ValidConfig) -> &mut Self {
        for (path, writable) in config_paths(config) {
            self.image(&path, writable);
        }
        for dir in parent_dirs(config) {
            self.grant(&dir, Access::Read);
        }
        for socket in config.tenants.iter().filter_map(|t| t.socket.as_ref()) {
            self.socket(socket);
        }
        for server in &config.nbd {
            if let Some(path) = &server.unix {
                self.socket(&config.base.join(path));
            }
            if let Some(addr) = server.tcp {
                self.tcp(addr.port(), true);
            }
        }
        for uri in nbd_luns(config) {
            if let vhd::nbd::Endpoint::Tcp { port, .. } = uri.endpoint {
                self.tcp(port, false);
            }
        }
        self.host_names.extend(nbd_host_names(config));
        self
    }

    pub(crate) fn host_names(&self) -> &[String] {
        &self.host_names
    }

    /// An image: its directory, or the device node of a block device.
    pub fn image(&mut self, path: &Path, writable: bool) -> &mut Self {
        let path = absolute(path);
        if is_device(&path) {
            return self.grant(&path, Access::Device);
        }
        let access = if writable {
            Access::ReadWrite
        } else {
            Access::Read
        };
        match path.parent() {
            Some(dir) => self.grant(dir, access),
            None => self,
        }
    }

    /// A directory of images the configuration may name later.
    pub fn image_dir(&mut self, dir: &Path) -> &mut Self {
        self.grant(dir, Access::ReadWrite)
    }

    /// A listening socket: its directory.
    pub fn socket(&mut self, path: &Path) -> &mut Self {
        match absolute(path).parent() {
            Some(dir) => self.grant(dir, Access::Sockets),
            None => self,
        }
    }

    /// A TCP port to listen on (an export) or, with `bind` false, to
    /// connect to; every other TCP bind and connect is denied (Landlock
    /// ABI 4 and later).
    pub fn tcp(&mut self, port: u16, bind: bool) -> &mut Self {
        if !self.tcp.contains(&(port, bind)) {
            self.tcp.push((port, bind));
        }
        self
    }

    pub(crate) fn tcp_ports(&self) -> &[(u16, bool)] {
        &self.tcp
    }

    /// A device node (`/dev/kvm`, `/dev/net/tun`).
    pub fn device(&mut self, path: &Path) -> &mut Self {
        self.grant(path, Access::Device)
    }

    /// Settings files read and written as devices are set up (the network
    /// sysctls of a VXLAN port's `gso_tap`).
    pub fn settings(&mut self, path: &Path) -> &mut Self {
        self.grant(path, Access::ReadWrite)
    }

    /// A file only read (a kernel, an initrd).
    pub fn read(&mut self, path: &Path) -> &mut Self {
        self.grant(path, Access::Read)
    }

    /// A file written (a serial log): its directory, where it may be
    /// created.
    pub fn output(&mut self, path: &Path) -> &mut Self {
        match absolute(path).parent() {
            Some(dir) => self.grant(dir, Access::ReadWrite),
            None => self,
        }
    }

    fn grant(&mut self, path: &Path, access: Access) -> &mut Self {
        let path = resolved(path);
        let grant = Grant { path, access };
        if !self.grants.contains(&grant) {
            self.grants.push(grant);
        }
        self
    }

    pub(crate) fn grants(&self) -> &[Grant] {
        &self.grants
    }

    /// Whether opening `path` (writable or not) stays inside the grants.
    pub(crate) fn covers(&self, path: &Path, writable: bool) -> bool {
        let path = resolved(path);
        self.grants.iter().any(|g| {
            let ok_access = match g.access {
                Access::Read => !writable,
                Access::ReadWrite | Access::Device => true,
                Access::Sockets => false,
            };
            ok_access && path.starts_with(&g.path)
        })
    }

    /// How many grants (for the report).
    pub fn len(&self) -> usize {
        self.grants.len()
    }

    pub fn is_empty(&self) -> bool {
        self.grants.is_empty()
    }
}

/// Every image `config`'s LUNs name, NBD URIs included.
fn images(config: &ValidConfig) -> impl Iterator<Item = &storage::config::ImageSpec> {
    use storage::config::LunKind;
    config
        .controllers
        .iter()
        .flat_map(|c| &c.luns)
        .filter_map(|lun| match &lun.kind {
            LunKind::Disk(image) | LunKind::Dvd(Some(image)) => Some(image),
            LunKind::Dvd(None) => None,
        })
}

/// The servers of `config`'s NBD-backed LUNs.
fn nbd_luns(config: &ValidConfig) -> impl Iterator<Item = vhd::nbd::NbdUri> + '_ {
    images(config)
        .filter(|image| vhd::nbd::is_uri(&image.path))
        .filter_map(|image| image.path.to_str()?.parse().ok())
}

/// NBD servers of `config`'s LUNs named by host name rather than address:
/// resolving a name reads /etc files and makes sockets (DNS) no sandboxed
/// thread may, at start as on a reconnect.
pub(crate) fn nbd_host_names(config: &ValidConfig) -> Vec<String> {
    nbd_luns(config)
        .filter_map(|uri| match uri.endpoint {
            vhd::nbd::Endpoint::Tcp { host, .. } if host.parse::<std::net::IpAddr>().is_err() => {
                Some(host)
            }
            _ => None,
        })
        .collect()
}

/// The directories `config` allows differencing parents in (beyond each
/// child's own directory, which its image grant covers).
pub(crate) fn parent_dirs(config: &ValidConfig) -> Vec<PathBuf> {
    images(config)
        .flat_map(|image| image.parents.allowed_dirs.iter().cloned())
        .collect()
}

/// Every file `config` names, with whether it is opened for writing.
pub(crate) fn config_paths(config: &ValidConfig) -> Vec<(PathBuf, bool)> {
    use switch::config::PortKind;
    let mut out: Vec<(PathBuf, bool)> = images(config)
        .filter(|image| !vhd::nbd::is_uri(&image.path))
        .map(|image| (image.path.clone(), !image.read_only))
        .collect();
    for server in &config.nbd {
        for export in &server.exports {
            if let Some(path) = &export.path {
                out.push((config.base.join(path), !export.read_only));
            }
        }
    }
    for s in &config.switches {
        for p in &s.ports {
            if let PortKind::Pcap(pcap) = &p.kind {
                out.push((pcap.path.clone(), true));
            }
        }
    }
    out
}

fn is_device(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path)
        .is_ok_and(|m| m.file_type().is_block_device() || m.file_type().is_char_device())
}

/// `path` made absolute without touching the filesystem.
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// `path` absolute, its existing part with symlinks resolved and the rest
/// with `.` and `..` folded, so a prefix test means what Landlock means.
fn resolved(path: &Path) -> PathBuf {
    let path = absolute(path);
    if let Ok(real) = path.canonicalize() {
        return real;
    }
    // The longest existing ancestor, resolved, plus the folded rest.
    let mut rest = Vec::new();
    let mut base = path.as_path();
    while let Some(parent) = base.parent() {
        rest.push(base.file_name().map(PathBuf::from).unwrap_or_default());
        if let Ok(real) = parent.canonicalize() {
            let mut out = real;
            for part in rest.iter().rev() {
                out.push(part);
            }
            return fold(&out);
        }
        base = parent;
    }
    fold(&path)
}

/// Folds `.` and `..` lexically.
fn fold(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_grants_its_directory_and_nothing_above() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("images");
        std::fs::create_dir(&images).unwrap();
        std::fs::write(images.join("a.raw"), b"").unwrap();
        let mut p = Paths::new();
        p.image(&images.join("a.raw"), true);
        assert!(p.covers(&images.join("b.vhd"), true));
        assert!(p.covers(&images.join("sub/../c.vhd"), true));
        assert!(!p.covers(&images.join("../escape.vhd"), false));
        assert!(!p.covers(dir.path(), false));
        assert!(!p.covers(Path::new("/etc/shadow"), false));
    }

    #[test]
    fn nbd_servers_named_by_host_name_are_found_and_addresses_get_their_port() {
        let lun = |n: u8, uri: &str| format!("[[controller.lun]]\nlun = {n}\npath = \"{uri}\"\n");
        let text = format!(
            "[[controller]]\nname = \"c\"\n{}{}{}{}",
            lun(0, "nbd://nbd-server:10809/a"),
            lun(1, "nbd://127.0.0.1:10810/b"),
            lun(2, "nbd://[::1]:10811/c"),
            lun(3, "nbd+unix:///d?socket=/run/d.sock"),
        );
        let config = ValidConfig::from_toml(&text, Path::new("/srv")).unwrap();
        assert_eq!(nbd_host_names(&config), ["nbd-server"]);
        let mut p = Paths::new();
        p.config(&config);
        assert_eq!(p.host_names(), ["nbd-server"]);
        for port in [10809, 10810, 10811] {
            assert!(p.tcp_ports().contains(&(port, false)), "{port}");
        }
        assert!(!p.covers(Path::new("/srv/nbd:"), false), "a URI is no file");
    }

    #[test]
    fn read_only_grants_refuse_writable_opens_and_sockets_refuse_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("m.iso"), b"").unwrap();
        let mut p = Paths::new();
        p.image(&dir.path().join("m.iso"), false);
        assert!(p.covers(&dir.path().join("other.iso"), false));
        assert!(!p.covers(&dir.path().join("other.iso"), true));
        let sock = tempfile::tempdir().unwrap();
        let mut p = Paths::new();
        p.socket(&sock.path().join("vspa.sock"));
        assert!(!p.covers(&sock.path().join("disk.raw"), false));
    }
}
