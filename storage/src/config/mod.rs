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
//! format = "auto"           # auto (from the file name) | raw | vhd | vhdx | iso
//! read_only = false
//! cache = "direct"          # direct (O_DIRECT where possible) | cached | mapped
//! parent_dirs = ["base"]    # where differencing parents may be (default: the disk's own directory)
//!
//! [[controller.lun]]
//! lun = 1
//! dvd = true                # a DVD drive; path is optional (empty drive)
//! path = "install.iso"
//! ```
//!
//! Three steps, each its own function: [`validate`] turns the tables as
//! written ([`ControllerSpec`]) into [`ValidController`]s (defaults
//! applied, GUIDs parsed, paths resolved; no file is opened), [`plan`]
//! compares running and wanted controllers into typed changes, and
//! [`open_lun`] / [`open_media`] / [`controller_config`] give the appliance
//! what it needs to change running controllers.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};
use vhd::{CacheMode, DiskOptions, Format, ParentPolicy};
use vmbus::Guid;

use crate::controller::{ControllerConfig, DEFAULT_MAX_TRANSFER, Disk, Lun};

mod plan;
pub use plan::{StorageChange, StoragePlan, StorageRestart, plan};

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
    /// None: `auto`, found from the file.
    #[serde(default, deserialize_with = "format_or_auto")]
    pub format: Option<Format>,
    #[serde(default)]
    pub read_only: bool,
    #[serde(default)]
    pub dvd: bool,
    #[serde(default)]
    pub cache: CacheMode,
    /// Directories a differencing disk's parents may be in (empty: its own).
    #[serde(default)]
    pub parent_dirs: Vec<PathBuf>,
}

/// `"auto"` or a format name.
pub(crate) fn format_or_auto<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Format>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Choice {
        Format(Format),
        Word(String),
    }
    match Choice::deserialize(d)? {
        Choice::Format(f) => Ok(Some(f)),
        Choice::Word(w) if w == "auto" => Ok(None),
        Choice::Word(w) => Err(serde::de::Error::custom(format!(
            "unknown format {w:?} (auto, raw, vhd, vhdx, iso)"
        ))),
    }
}

/// A controller as validated: defaults applied, its instance GUID and its
/// LUNs' paths resolved, LUNs in number order. Two files that mean the
/// same controller give equal values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidController {
    pub name: String,
    pub settings: ControllerSettings,
    pub luns: Vec<ValidLun>,
}

/// What a running controller keeps until a restart (the guest sees the
/// offer, the channel count and the queue depth when it opens).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerSettings {
    pub instance: Guid,
    pub subchannels: u16,
    pub queue_depth: u32,
    pub cpus: Vec<usize>,
}

/// A LUN as validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidLun {
    pub lun: u8,
    pub kind: LunKind,
}

/// What sits at a LUN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LunKind {
    Disk(ImageSpec),
    /// A DVD drive with its media (None: empty).
    Dvd(Option<ImageSpec>),
}

/// An image to open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    /// Absolute, or relative to the working directory when the
    /// configuration had no directory.
    pub path: PathBuf,
    /// None: `auto`, from the file name (see `vhd::open_by_name`).
    pub format: Option<Format>,
    pub read_only: bool,
    pub cache: CacheMode,
    /// Where differencing parents may be: `allowed_dirs` from `parent_dirs`
    /// (resolved); `denied` is for the appliance to fill (other tenants'
    /// images).
    pub parents: ParentPolicy,
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
        source: Box<vhd::ImageError>,
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

/// Checks controllers for what serde cannot, without opening images.
/// Relative paths are resolved against `base` (the configuration file's
/// directory).
pub fn validate(
    specs: &[ControllerSpec],
    base: &Path,
) -> Result<Vec<ValidController>, ConfigError> {
    let mut names = HashSet::new();
    let mut instances = HashSet::new();
    let mut out = Vec::new();
    for s in specs {
        let c = s.validate(base)?;
        if !names.insert(c.name.clone()) {
            return Err(ConfigError::Controller(c.name, "name used twice".into()));
        }
        if !instances.insert(c.settings.instance) {
            return Err(ConfigError::Controller(
                c.name,
                "instance GUID used by another controller".into(),
            ));
        }
        out.push(c);
    }
    Ok(out)
}

impl ControllerSpec {
    fn validate(&self, base: &Path) -> Result<ValidController, ConfigError> {
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
        let mut luns: Vec<ValidLun> = self
            .luns
            .iter()
            .map(|l| l.validate(&self.name, base))
            .collect::<Result<_, _>>()?;
        luns.sort_by_key(|l| l.lun);
        if let Some(w) = luns.windows(2).find(|w| w[0].lun == w[1].lun) {
            return Err(ConfigError::Lun {
                controller: self.name.clone(),
                lun: w[0].lun,
                reason: "LUN number used twice".into(),
            });
        }
        Ok(ValidController {
            name: self.name.clone(),
            settings: ControllerSettings {
                instance,
                subchannels: self.subchannels,
                queue_depth: self.queue_depth,
                cpus: self.cpus.clone(),
            },
            luns,
        })
    }
}

impl LunSpec {
    fn validate(&self, controller: &str, base: &Path) -> Result<ValidLun, ConfigError> {
        let bad = |reason: &str| ConfigError::Lun {
            controller: controller.to_string(),
            lun: self.lun,
            reason: reason.to_string(),
        };
        let image = self.path.as_ref().map(|p| ImageSpec {
            // An NBD URI names a server's export, not a file.
            path: if vhd::nbd::is_uri(p) {
                p.clone()
            } else {
                base.join(p)
            },
            format: self.format,
            read_only: self.read_only || self.dvd,
            cache: self.cache,
            parents: ParentPolicy {
                allowed_dirs: self.parent_dirs.iter().map(|d| base.join(d)).collect(),
                denied: Vec::new(),
            },
        });
        let kind = if self.dvd {
            if matches!(self.format, Some(Format::Vhd | Format::Vhdx)) {
                return Err(bad("a DVD holds ISO (or raw 2048-byte) media"));
            }
            LunKind::Dvd(image)
        } else {
            LunKind::Disk(image.ok_or_else(|| bad("a disk needs a path"))?)
        };
        Ok(ValidLun {
            lun: self.lun,
            kind,
        })
    }
}

/// The settings of a running controller for `c` (without LUNs: the
/// appliance adds them, sharing read-only ones between tenants' views).
pub fn controller_config(c: &ValidController) -> ControllerConfig {
    let mut config = ControllerConfig::new(&c.name, c.settings.instance);
    config.cpus = c.settings.cpus.clone();
    config.max_subchannels = c.settings.subchannels;
    config.queue_depth = c.settings.queue_depth;
    config.max_transfer = DEFAULT_MAX_TRANSFER;
    config
}

/// Opens the image (if any) of LUN `l` of controller `controller`.
pub fn open_lun(controller: &str, l: &ValidLun) -> Result<Lun, ConfigError> {
    match &l.kind {
        LunKind::Disk(image) => {
            let disk = open_image(controller, l.lun, image)?;
            if disk.info().block_size == 2048 {
                return Err(ConfigError::Lun {
                    controller: controller.to_string(),
                    lun: l.lun,
                    reason: "an ISO image can only be served as a DVD (set dvd = true)".into(),
                });
            }
            Ok(Lun::disk(disk, DEFAULT_MAX_TRANSFER))
        }
        LunKind::Dvd(media) => {
            let media = media
                .as_ref()
                .map(|m| open_media(controller, l.lun, m))
                .transpose()?;
            Ok(Lun::dvd(media))
        }
    }
}

/// Opens DVD media: an image with 2048-byte blocks.
pub fn open_media(controller: &str, lun: u8, image: &ImageSpec) -> Result<Disk, ConfigError> {
    let disk = open_image(controller, lun, image)?;
    if disk.info().block_size != 2048 {
        return Err(ConfigError::Lun {
            controller: controller.to_string(),
            lun,
            reason: "a DVD needs ISO media (2048-byte blocks)".into(),
        });
    }
    Ok(disk)
}

fn open_image(controller: &str, lun: u8, image: &ImageSpec) -> Result<Disk, ConfigError> {
    let mut options = DiskOptions::default()
        .read_only(image.read_only)
        .cache(image.cache);
    options.parents = image.parents.clone();
    // A live checkpoint's chain when the image has one (vhd::vhd::live).
    let checkpointed = match image.read_only {
        true => Ok(None),
        false => vhd::vhd::live::open_checkpointed(&image.path, &options),
    };
    let opened = match (checkpointed, image.format) {
        (Ok(Some(chain)), _) => Ok(std::sync::Arc::new(chain) as Disk),
        (Err(e), _) => Err(e),
        (Ok(None), None) => vhd::open_by_name(&image.path, &options),
        (Ok(None), Some(f)) => vhd::open_as(&image.path, f, &options),
    };
    opened.map_err(|source| ConfigError::Image {
        controller: controller.to_string(),
        lun,
        path: image.path.clone(),
        source: Box::new(source),
    })
}

/// A LUN change refused by a running controller, as a configuration error.
pub fn lun_error(controller: &str, lun: u8, e: crate::controller::LunError) -> ConfigError {
    ConfigError::Lun {
        controller: controller.to_string(),
        lun,
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<ValidController>, String> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            controller: Vec<ControllerSpec>,
        }
        let f: File = toml::from_str(text).map_err(|e| e.to_string())?;
        validate(&f.controller, Path::new("/cfg")).map_err(|e| e.to_string())
    }

    #[test]
    fn validation_resolves_paths_and_refuses_bad_values() {
        let c = parse(
            "[[controller]]\nname = \"c\"\n[[controller.lun]]\nlun = 1\npath = \"b.vhd\"\nformat = \"vhd\"\n\
             [[controller.lun]]\nlun = 0\npath = \"/x/a.raw\"\n[[controller.lun]]\nlun = 2\ndvd = true\n",
        )
        .unwrap();
        let luns: Vec<_> = c[0].luns.iter().map(|l| (l.lun, l.kind.clone())).collect();
        let disk = |p: &str, format| {
            LunKind::Disk(ImageSpec {
                path: p.into(),
                format,
                read_only: false,
                cache: CacheMode::Direct,
                parents: ParentPolicy::default(),
            })
        };
        assert_eq!(
            luns,
            [
                (0, disk("/x/a.raw", None)),
                (1, disk("/cfg/b.vhd", Some(Format::Vhd))),
                (2, LunKind::Dvd(None))
            ]
        );
        assert_eq!(c[0].settings.instance, guid_from_name("c"));
        let cases = [
            ("[[controller]]\nname = \"\"\n", "name must not be empty"),
            (
                "[[controller]]\nname = \"a\"\n[[controller]]\nname = \"a\"\n",
                "name used twice",
            ),
            (
                "[[controller]]\nname = \"a\"\ninstance = \"x\"\n",
                "not a GUID",
            ),
            (
                "[[controller]]\nname = \"a\"\nqueue_depth = 0\n",
                "queue_depth",
            ),
            (
                "[[controller]]\nname = \"a\"\nsubchannels = 65\n",
                "subchannels",
            ),
            (
                "[[controller]]\nname = \"a\"\n[[controller.lun]]\nlun = 0\n",
                "needs a path",
            ),
            (
                "[[controller]]\nname = \"a\"\n[[controller.lun]]\nlun = 0\npath = \"x\"\n[[controller.lun]]\nlun = 0\npath = \"y\"\n",
                "used twice",
            ),
            (
                "[[controller]]\nname = \"a\"\n[[controller.lun]]\nlun = 0\ndvd = true\nformat = \"vhd\"\n",
                "ISO",
            ),
            (
                "[[controller]]\nname = \"a\"\n[[controller.lun]]\nlun = 0\npath = \"x\"\nformat = \"qcow2\"\n",
                "unknown format",
            ),
        ];
        for (text, want) in cases {
            let e = parse(text).unwrap_err();
            assert!(e.contains(want), "{text}\n-> {e}\n(want {want})");
        }
        let dup = format!(
            "[[controller]]\nname = \"a\"\n[[controller]]\nname = \"b\"\ninstance = \"{}\"\n",
            guid_from_name("a")
        );
        assert!(parse(&dup).unwrap_err().contains("instance GUID used"));
    }
}
