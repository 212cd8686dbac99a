//! The user and group vspa drops to after setup: resolved (names or
//! numbers) before the filesystem is closed off, dropped with setgroups,
//! setresgid and setresuid. glibc runs those calls in every thread (its
//! set*id broadcast), so the whole process changes identity; moving away
//! from uid 0 clears every capability.

use std::ffi::CString;

use super::SandboxError;

/// Resolves `--user` and `--group` to (uid, gid): a user without a group
/// takes the user's primary group; a group alone keeps the current uid.
pub(crate) fn resolve(
    user: Option<&str>,
    group: Option<&str>,
) -> Result<Option<(u32, u32)>, SandboxError> {
    if user.is_none() && group.is_none() {
        return Ok(None);
    }
    let (uid, primary) = match user {
        Some(u) => lookup_user(u)?,
        // SAFETY: getuid and getgid cannot fail.
        None => unsafe { (libc::getuid(), libc::getgid()) },
    };
    let gid = match group {
        Some(g) => lookup_group(g)?,
        None => primary,
    };
    Ok(Some((uid, gid)))
}

fn lookup_user(spec: &str) -> Result<(u32, u32), SandboxError> {
    let unknown = || SandboxError::User(format!("no user {spec:?}"));
    let name = CString::new(spec).map_err(|_| unknown())?;
    let mut pwd: libc::passwd = unsafe_zeroed_passwd();
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; getpwnam_r fills `pwd`
    // with strings inside `buf`.
    let rc = unsafe {
        libc::getpwnam_r(
            name.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut out,
        )
    };
    if rc == 0 && !out.is_null() {
        return Ok((pwd.pw_uid, pwd.pw_gid));
    }
    // A number that names no user is still a uid (its group: the same number).
    spec.parse::<u32>()
        .map(|id| (id, id))
        .map_err(|_| unknown())
}

fn lookup_group(spec: &str) -> Result<u32, SandboxError> {
    let unknown = || SandboxError::User(format!("no group {spec:?}"));
    let name = CString::new(spec).map_err(|_| unknown())?;
    // SAFETY: an all-zero struct group is a valid value to be filled.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut out: *mut libc::group = std::ptr::null_mut();
    // SAFETY: as for getpwnam_r.
    let rc = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            &mut grp,
            buf.as_mut_ptr(),
            buf.len(),
            &mut out,
        )
    };
    if rc == 0 && !out.is_null() {
        return Ok(grp.gr_gid);
    }
    spec.parse::<u32>().map_err(|_| unknown())
}

fn unsafe_zeroed_passwd() -> libc::passwd {
    // SAFETY: an all-zero struct passwd is a valid value to be filled.
    unsafe { std::mem::zeroed() }
}

/// Drops every thread to `uid`/`gid` with no supplementary groups, and
/// checks that it took.
pub(crate) fn drop_to(uid: u32, gid: u32) -> Result<(), SandboxError> {
    let fail =
        |what: &str| SandboxError::User(format!("{what}: {}", std::io::Error::last_os_error()));
    // SAFETY: plain system calls through glibc (which applies them to
    // every thread); no pointers but the null group list.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(fail("setgroups"));
        }
        if libc::setresgid(gid, gid, gid) != 0 {
            return Err(fail("setresgid"));
        }
        if libc::setresuid(uid, uid, uid) != 0 {
            return Err(fail("setresuid"));
        }
    }
    let (mut r, mut e, mut s) = (0, 0, 0);
    // SAFETY: three valid out-pointers.
    unsafe { libc::getresuid(&mut r, &mut e, &mut s) };
    if (r, e, s) != (uid, uid, uid) {
        return Err(SandboxError::User(format!(
            "uid is {r}/{e}/{s} after the drop"
        )));
    }
    Ok(())
}
