//! The filesystem layer: a Landlock ruleset that handles every filesystem
//! right this kernel knows (plus TCP bind/connect and the abstract-socket
//! and signal scopes, where known) and grants only the [`Paths`]. Applied
//! on the main thread before it starts any thread, so every thread of the
//! process inherits it (Landlock binds the caller and its future threads).

use landlock::{
    ABI, Access, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible, NetPort, PathBeneath,
    PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope,
};

use super::paths::{Grant, Paths};

/// The newest ABI this code asks for (6: scopes); older kernels get what
/// they support (best effort), newer ones change nothing we use.
const WANTED: ABI = ABI::V6;

/// What the layer achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Status {
    /// Enforced, fully or partly (an older ABI), with this many rules.
    Enforced {
        full: bool,
        rules: usize,
    },
    NotEnforced(String),
}

/// Restricts the calling thread (and the threads it starts) to `paths`.
pub(crate) fn restrict(paths: &Paths) -> Status {
    match try_restrict(paths) {
        Ok(s) => s,
        Err(e) => Status::NotEnforced(e.to_string()),
    }
}

fn try_restrict(paths: &Paths) -> Result<Status, landlock::RulesetError> {
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(WANTED))?
        .handle_access(AccessNet::BindTcp | AccessNet::ConnectTcp)?
        .scope(Scope::AbstractUnixSocket | Scope::Signal)?
        .create()?;
    let mut rules = 0;
    for grant in paths.grants() {
        let Ok(fd) = PathFd::new(&grant.path) else {
            // A path that does not exist yet is opened by nobody.
            continue;
        };
        let access = rights(grant) & mask_for(&grant.path);
        ruleset = ruleset.add_rule(PathBeneath::new(fd, access))?;
        rules += 1;
    }
    for &(port, bind) in paths.tcp_ports() {
        let access = if bind {
            AccessNet::BindTcp
        } else {
            AccessNet::ConnectTcp
        };
        ruleset = ruleset.add_rule(NetPort::new(port, access))?;
        rules += 1;
    }
    let status = ruleset.restrict_self()?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => Status::Enforced { full: true, rules },
        RulesetStatus::PartiallyEnforced => Status::Enforced { full: false, rules },
        RulesetStatus::NotEnforced => {
            Status::NotEnforced("Landlock is not supported by this kernel".into())
        }
    })
}

/// Rights valid on `path`: files take no directory rights.
fn mask_for(path: &std::path::Path) -> BitFlags<AccessFs> {
    if path.is_dir() {
        AccessFs::from_all(WANTED)
    } else {
        AccessFs::from_file(WANTED)
    }
}

fn rights(grant: &Grant) -> BitFlags<AccessFs> {
    use super::paths::Access as A;
    let read = AccessFs::ReadFile | AccessFs::ReadDir;
    let write = AccessFs::WriteFile | AccessFs::Truncate;
    match grant.access {
        A::Read => read,
        A::ReadWrite => read | write | AccessFs::MakeReg | AccessFs::RemoveFile,
        A::Device => AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::IoctlDev,
        A::Sockets => AccessFs::MakeSock | AccessFs::RemoveFile,
    }
}

/// The Landlock ABI of the running kernel (0: none), for the report.
pub(crate) fn kernel_abi() -> i32 {
    // SAFETY: LANDLOCK_CREATE_RULESET_VERSION takes no attribute pointer.
    unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            1u32,
        ) as i32
    }
    .max(0)
}
