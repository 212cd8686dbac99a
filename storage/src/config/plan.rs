//! What a configuration change means for running controllers: a pure,
//! typed plan from the validated controllers that run to the validated
//! controllers wanted. Controllers come and go (offered and rescinded over
//! VMBus), LUNs are hot-added and removed, a disk whose image settings
//! changed is replaced, and a DVD drive's media is inserted or ejected; a
//! running controller's own settings wait for a restart.

use super::{ImageSpec, LunKind, ValidController, ValidLun};

/// One change, applied in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageChange {
    AddController(ValidController),
    RemoveController(String),
    AddLun {
        controller: String,
        lun: ValidLun,
    },
    RemoveLun {
        controller: String,
        lun: u8,
    },
    /// A disk (or a drive that became a disk, or the reverse) whose
    /// settings changed: removed, then added again.
    ReplaceLun {
        controller: String,
        lun: ValidLun,
    },
    /// New media in a DVD drive (None: ejected).
    ChangeMedia {
        controller: String,
        lun: u8,
        media: Option<ImageSpec>,
    },
}

/// A change that waits for a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageRestart {
    /// instance, subchannels, queue_depth or cpus of a running controller.
    ControllerSettings(String),
}

/// The plan that brings the running controllers to the wanted ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoragePlan {
    pub changes: Vec<StorageChange>,
    pub restart: Vec<StorageRestart>,
}

impl StoragePlan {
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.restart.is_empty()
    }
}

impl StorageChange {
    /// The controller the change is about.
    pub fn controller(&self) -> &str {
        match self {
            StorageChange::AddController(c) => &c.name,
            StorageChange::RemoveController(name)
            | StorageChange::AddLun {
                controller: name, ..
            }
            | StorageChange::RemoveLun {
                controller: name, ..
            }
            | StorageChange::ReplaceLun {
                controller: name, ..
            }
            | StorageChange::ChangeMedia {
                controller: name, ..
            } => name,
        }
    }
}

impl std::fmt::Display for StorageChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StorageChange::AddController(c) => write!(f, "controller {} added", c.name),
            StorageChange::RemoveController(c) => write!(f, "controller {c} removed"),
            StorageChange::AddLun { controller, lun } => {
                write!(f, "{controller}: LUN {} added", lun.lun)
            }
            StorageChange::RemoveLun { controller, lun } => {
                write!(f, "{controller}: LUN {lun} removed")
            }
            StorageChange::ReplaceLun { controller, lun } => {
                write!(f, "{controller}: LUN {} replaced", lun.lun)
            }
            StorageChange::ChangeMedia {
                controller,
                lun,
                media: Some(m),
            } => write!(
                f,
                "{controller}: LUN {lun} media changed to {}",
                m.path.display()
            ),
            StorageChange::ChangeMedia {
                controller,
                lun,
                media: None,
            } => write!(f, "{controller}: LUN {lun} media ejected"),
        }
    }
}

impl std::fmt::Display for StorageRestart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StorageRestart::ControllerSettings(c) => write!(
                f,
                "settings of controller {c} (instance, subchannels, queue_depth, cpus) changed"
            ),
        }
    }
}

/// Plans the changes from `running` to `wanted`: removals first, so a name
/// or an image may move in one reload.
pub fn plan(running: &[ValidController], wanted: &[ValidController]) -> StoragePlan {
    let mut out = StoragePlan::default();
    for old in running {
        if !wanted.iter().any(|w| w.name == old.name) {
            out.changes
                .push(StorageChange::RemoveController(old.name.clone()));
        }
    }
    for new in wanted {
        match running.iter().find(|r| r.name == new.name) {
            None => out.changes.push(StorageChange::AddController(new.clone())),
            Some(old) => {
                if old.settings != new.settings {
                    out.restart
                        .push(StorageRestart::ControllerSettings(new.name.clone()));
                }
                plan_luns(old, new, &mut out.changes);
            }
        }
    }
    out
}

fn plan_luns(old: &ValidController, new: &ValidController, out: &mut Vec<StorageChange>) {
    let controller = || new.name.clone();
    let find = |c: &ValidController, n: u8| c.luns.iter().find(|l| l.lun == n).cloned();
    for l in &old.luns {
        if find(new, l.lun).is_none() {
            out.push(StorageChange::RemoveLun {
                controller: controller(),
                lun: l.lun,
            });
        }
    }
    for l in &new.luns {
        let change = match find(old, l.lun) {
            None => StorageChange::AddLun {
                controller: controller(),
                lun: l.clone(),
            },
            Some(o) if o == *l => continue,
            Some(ValidLun {
                kind: LunKind::Dvd(_),
                ..
            }) if matches!(l.kind, LunKind::Dvd(_)) => {
                let LunKind::Dvd(media) = &l.kind else {
                    unreachable!("matched above")
                };
                StorageChange::ChangeMedia {
                    controller: controller(),
                    lun: l.lun,
                    media: media.clone(),
                }
            }
            Some(_) => StorageChange::ReplaceLun {
                controller: controller(),
                lun: l.clone(),
            },
        };
        out.push(change);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ControllerSpec, validate};
    use std::path::Path;

    fn controllers(text: &str) -> Vec<ValidController> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            #[serde(default)]
            controller: Vec<ControllerSpec>,
        }
        let f: File = toml::from_str(text).unwrap();
        validate(&f.controller, Path::new("/etc/vspa")).unwrap()
    }

    const C: &str = "[[controller]]\nname = \"c\"\n";
    const DISK0: &str = "[[controller.lun]]\nlun = 0\npath = \"a.vhd\"\n";
    const DVD1: &str = "[[controller.lun]]\nlun = 1\ndvd = true\npath = \"x.iso\"\n";

    fn names(p: &StoragePlan) -> Vec<String> {
        p.changes.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn equal_files_plan_nothing_even_when_written_differently() {
        let base = controllers(&format!("{C}{DISK0}{DVD1}"));
        assert!(plan(&base, &base).is_empty());
        let spelled = format!(
            "[[controller]]\nname = \"c\"\nsubchannels = 4\nqueue_depth = 256\ncpus = []\ninstance = \"{}\"\n\
             [[controller.lun]]\ndvd = true\nlun = 1\npath = \"/etc/vspa/x.iso\"\nread_only = true\n\
             [[controller.lun]]\nlun = 0\npath = \"./a.vhd\"\nformat = \"auto\"\ncache = \"direct\"\nread_only = false\n",
            crate::config::guid_from_name("c")
        );
        let p = plan(&base, &controllers(&spelled));
        assert_eq!(p, StoragePlan::default(), "{:?}", names(&p));
    }

    #[test]
    fn luns_come_go_and_change() {
        let base = controllers(&format!("{C}{DISK0}{DVD1}"));
        let p = plan(&base, &controllers(&format!("{C}{DVD1}")));
        assert_eq!(names(&p), ["c: LUN 0 removed"]);
        let disk2 = "[[controller.lun]]\nlun = 2\npath = \"b.raw\"\n";
        let p = plan(&base, &controllers(&format!("{C}{DISK0}{DVD1}{disk2}")));
        assert_eq!(names(&p), ["c: LUN 2 added"]);
        let ro = "[[controller.lun]]\nlun = 0\npath = \"a.vhd\"\nread_only = true\n";
        let p = plan(&base, &controllers(&format!("{C}{ro}{DVD1}")));
        assert_eq!(names(&p), ["c: LUN 0 replaced"]);
        let other_iso = "[[controller.lun]]\nlun = 1\ndvd = true\npath = \"y.iso\"\n";
        let p = plan(&base, &controllers(&format!("{C}{DISK0}{other_iso}")));
        assert_eq!(names(&p), ["c: LUN 1 media changed to /etc/vspa/y.iso"]);
        let empty = "[[controller.lun]]\nlun = 1\ndvd = true\n";
        let p = plan(&base, &controllers(&format!("{C}{DISK0}{empty}")));
        assert_eq!(names(&p), ["c: LUN 1 media ejected"]);
        // A drive that becomes a disk is replaced.
        let disk1 = "[[controller.lun]]\nlun = 1\npath = \"z.raw\"\n";
        let p = plan(&base, &controllers(&format!("{C}{DISK0}{disk1}")));
        assert_eq!(names(&p), ["c: LUN 1 replaced"]);
    }

    #[test]
    fn controllers_come_and_go_and_settings_need_a_restart() {
        let base = controllers(&format!("{C}{DISK0}"));
        let d = "[[controller]]\nname = \"d\"\n";
        let p = plan(&base, &controllers(&format!("{C}{DISK0}{d}")));
        assert_eq!(names(&p), ["controller d added"]);
        let p = plan(&base, &controllers(d));
        assert_eq!(names(&p), ["controller c removed", "controller d added"]);
        let p = plan(
            &base,
            &controllers(&format!("{C}queue_depth = 64\n{DISK0}")),
        );
        assert!(p.changes.is_empty());
        assert_eq!(p.restart, [StorageRestart::ControllerSettings("c".into())]);
        // LUN changes still apply while settings wait.
        let p = plan(&base, &controllers(&format!("{C}subchannels = 1\n")));
        assert_eq!(names(&p), ["c: LUN 0 removed"]);
        assert_eq!(p.restart.len(), 1);
    }
}
