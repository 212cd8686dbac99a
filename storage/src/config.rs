//! The `[[controller]]` tables of vspa's configuration file:
//!
//! ```toml
//! [[controller]]
//! name = "scsi0"            # also seeds the instance GUID unless given
//! subchannels = 4           # sub-channels a guest may request
//! queue_depth = 256         # requests in flight per channel
//! cpus = [1]                # bind channel workers (default: unbound)
//!
//! [[controller.lun]]
//! lun = 0
//! path = "disk.vhd"
//! format = "auto"           # auto | raw | vhd | iso
//! read_only = false
//! cache = "direct"          # direct (O_DIRECT where possible) | cached
//!
//! [[controller.lun]]
//! lun = 1
//! dvd = true                # a DVD drive; path is optional (empty drive)
//! path = "install.iso"
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use vhd::{CacheMode, DiskOptions, Format};
use vmbus::Guid;

use crate::controller::{Controller, ControllerConfig, DEFAULT_MAX_TRANSFER, Disk, Lun};

/// A controller as written in the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerSpec {
    pub name: String,
    pub instance: Option<String>,
    #[serde(default = "default_subchannels")]
    pub subchannels: u16,
    #[serde(default = "default_queue_depth")]
    pub queue_depth: u32,
    /// CPUs for the channel workers: sub-channel N's on `cpus[N % len]`.
    #[serde(default)]
    pub cpus: Vec<usize>,
    #[serde(default, rename = "lun")]
    pub luns: Vec<LunSpec>,
}

fn default_subchannels() -> u16 {
    4
}

fn default_queue_depth() -> u32 {
    256
}

/// A LUN as written in the file.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LunSpec {
    pub lun: u8,
    pub path: Option<PathBuf>,
    #[serde(default)]
    pub format: FormatSpec,
    #[serde(default)]
    pub read_only: bool,
    #[serde(default)]
    pub dvd: bool,
    #[serde(default)]
    pub cache: CacheSpec,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FormatSpec {
    #[default]
    Auto,
    Raw,
    Vhd,
    Iso,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CacheSpec {
    #[default]
    Direct,
    Cached,
}

/// A configuration the appliance cannot run.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("controller {0:?}: {1}")]
    Controller(String, String),
    #[error("controller {controller:?} LUN {lun}: {reason}")]
    Lun {
        controller: String,
        lun: u8,
        reason: String,
    },
    #[error("controller {controller:?} LUN {lun} ({path}): {source}")]
    Image {
        controller: String,
        lun: u8,
        path: PathBuf,
        source: vhd::ImageError,
    },
}

/// A GUID derived from a name, so an unnamed instance stays stable across
/// restarts (FNV-1a over the name, spread over 16 bytes).
pub fn guid_from_name(name: &str) -> Guid {
    let mut bytes = [0u8; 16];
    for (half, seed) in [0xcbf2_9ce4_8422_2325u64, 0x8422_2325_cbf2_9ce4]
        .into_iter()
        .enumerate()
    {
        let mut h = seed;
        for b in name.bytes().chain(*b"vspa-scsi") {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        bytes[half * 8..half * 8 + 8].copy_from_slice(&h.to_le_bytes());
    }
    bytes[7] = (bytes[7] & 0x0f) | 0x50; // version 5 style (name based)
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    Guid(bytes)
}

impl ControllerSpec {
    /// Opens every image and builds the controller. Relative paths are
    /// resolved against `base` (the configuration file's directory).
    pub fn build(&self, base: &Path) -> Result<Controller, ConfigError> {
        let err = |m: String| ConfigError::Controller(self.name.clone(), m);
        if self.name.is_empty() {
            return Err(err("name must not be empty".into()));
        }
        let instance = match &self.instance {
            Some(s) => s
                .parse()
                .map_err(|_| err(format!("instance {s:?} is not a GUID")))?,
            None => guid_from_name(&self.name),
        };
        if !(1..=4096).contains(&self.queue_depth) {
            return Err(err(format!(
                "queue_depth {} is not in 1..=4096",
                self.queue_depth
            )));
        }
        if self.subchannels > 64 {
            return Err(err(format!(
                "subchannels {} is more than 64",
                self.subchannels
            )));
        }
        vmbus::cpu::check_list(&self.cpus).map_err(|e| err(e.to_string()))?;
        let mut config = ControllerConfig::new(&self.name, instance);
        config.cpus = self.cpus.clone();
        config.max_subchannels = self.subchannels;
        config.queue_depth = self.queue_depth;
        config.max_transfer = DEFAULT_MAX_TRANSFER;
        let controller = Controller::new(config);
        for l in &self.luns {
            let lun = l.open(&self.name, base)?;
            controller
                .add_lun(l.lun, lun)
                .map_err(|e| ConfigError::Lun {
                    controller: self.name.clone(),
                    lun: l.lun,
                    reason: e.to_string(),
                })?;
        }
        Ok(controller)
    }
}

impl LunSpec {
    fn open(&self, controller: &str, base: &Path) -> Result<Lun, ConfigError> {
        let bad = |reason: &str| ConfigError::Lun {
            controller: controller.to_string(),
            lun: self.lun,
            reason: reason.to_string(),
        };
        if self.dvd
            && !matches!(
                self.format,
                FormatSpec::Auto | FormatSpec::Iso | FormatSpec::Raw
            )
        {
            return Err(bad("a DVD holds ISO (or raw 2048-byte) media"));
        }
        let Some(path) = &self.path else {
            if self.dvd {
                return Ok(Lun::dvd(None));
            }
            return Err(bad("a disk needs a path"));
        };
        let path = if path.is_absolute() {
            path.clone()
        } else {
            base.join(path)
        };
        let disk = self.open_image(&path, controller)?;
        let is_dvd_media = disk.info().block_size == 2048;
        if self.dvd != is_dvd_media {
            return Err(bad(if self.dvd {
                "a DVD needs ISO media (2048-byte blocks)"
            } else {
                "an ISO image can only be served as a DVD (set dvd = true)"
            }));
        }
        Ok(if self.dvd {
            Lun::dvd(Some(disk))
        } else {
            Lun::disk(disk, DEFAULT_MAX_TRANSFER)
        })
    }

    fn open_image(&self, path: &Path, controller: &str) -> Result<Disk, ConfigError> {
        let cache = match self.cache {
            CacheSpec::Direct => CacheMode::Direct,
            CacheSpec::Cached => CacheMode::Cached,
        };
        let options = DiskOptions::default()
            .read_only(self.read_only || self.dvd)
            .cache(cache);
        let format = match self.format {
            FormatSpec::Auto => None,
            FormatSpec::Raw => Some(Format::Raw),
            FormatSpec::Vhd => Some(Format::Vhd),
            FormatSpec::Iso => Some(Format::Iso),
        };
        let opened = match format {
            None => vhd::open(path, &options),
            Some(f) => vhd::open_as(path, f, &options),
        };
        opened.map_err(|source| ConfigError::Image {
            controller: controller.to_string(),
            lun: self.lun,
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Builds every controller of a configuration.
pub fn build_all(
    specs: &[ControllerSpec],
    base: &Path,
) -> Result<Vec<Arc<Controller>>, ConfigError> {
    let mut names = std::collections::HashSet::new();
    let mut out = Vec::new();
    for s in specs {
        if !names.insert(s.name.as_str()) {
            return Err(ConfigError::Controller(
                s.name.clone(),
                "name used twice".into(),
            ));
        }
        out.push(Arc::new(s.build(base)?));
    }
    Ok(out)
}

impl ControllerSpec {
    /// What a running controller keeps until a restart (the guest sees
    /// the offer, channel count and queue depth when it opens).
    fn settings(&self) -> (&Option<String>, u16, u32, &[usize]) {
        (
            &self.instance,
            self.subchannels,
            self.queue_depth,
            &self.cpus,
        )
    }

    /// As running after [`ControllerSpec::apply_to`] of `new`: this
    /// controller's settings with `new`'s LUNs.
    pub fn with_luns_of(&self, new: &ControllerSpec) -> ControllerSpec {
        ControllerSpec {
            luns: new.luns.clone(),
            ..self.clone()
        }
    }

    /// Brings a running controller from `old` to this specification: LUNs
    /// that appeared are hot-added, vanished ones hot-removed, disks whose
    /// image settings changed are swapped, and DVD drives get their new
    /// media inserted (or ejected). Controller settings are not changed
    /// (that needs a restart), only reported. Returns what changed, for
    /// the log.
    pub fn apply_to(
        &self,
        old: &ControllerSpec,
        controller: &Controller,
        base: &Path,
    ) -> Result<Vec<String>, ConfigError> {
        let mut changes = Vec::new();
        if self.settings() != old.settings() {
            changes.push(format!(
                "{}: controller settings (instance, subchannels, queue_depth, cpus) \
                 take effect after a restart",
                self.name
            ));
        }
        let find = |specs: &[LunSpec], lun: u8| specs.iter().find(|l| l.lun == lun).cloned();
        let lun_err = |lun: u8, e: crate::controller::LunError| ConfigError::Lun {
            controller: self.name.clone(),
            lun,
            reason: e.to_string(),
        };
        for l in &old.luns {
            if find(&self.luns, l.lun).is_none() {
                controller
                    .remove_lun(l.lun)
                    .map_err(|e| lun_err(l.lun, e))?;
                changes.push(format!("{}: LUN {} removed", self.name, l.lun));
            }
        }
        for l in &self.luns {
            match find(&old.luns, l.lun) {
                None => {
                    controller
                        .add_lun(l.lun, l.open(&self.name, base)?)
                        .map_err(|e| lun_err(l.lun, e))?;
                    changes.push(format!("{}: LUN {} added", self.name, l.lun));
                }
                Some(o) if o == *l => {}
                Some(o) if o.dvd && l.dvd => {
                    controller
                        .eject_media(l.lun, true)
                        .map_err(|e| lun_err(l.lun, e))?;
                    if let Some(path) = &l.path {
                        let path = if path.is_absolute() {
                            path.clone()
                        } else {
                            base.join(path)
                        };
                        controller
                            .insert_media(l.lun, l.open_image(&path, &self.name)?)
                            .map_err(|e| lun_err(l.lun, e))?;
                        changes.push(format!("{}: LUN {} media changed", self.name, l.lun));
                    } else {
                        changes.push(format!("{}: LUN {} media ejected", self.name, l.lun));
                    }
                }
                Some(_) => {
                    // Remove first: the old image's lock goes once workers
                    // drop it, and the new open waits for that.
                    controller
                        .remove_lun(l.lun)
                        .map_err(|e| lun_err(l.lun, e))?;
                    let lun = l.open(&self.name, base)?;
                    controller
                        .add_lun(l.lun, lun)
                        .map_err(|e| lun_err(l.lun, e))?;
                    changes.push(format!("{}: LUN {} replaced", self.name, l.lun));
                }
            }
        }
        Ok(changes)
    }
}
