//! CPU affinity for worker threads (std has no call for it). A worker bound
//! to one CPU keeps its caches, and the scheduler cannot pull it onto the
//! CPU of whoever woke it, which on a small host is the peer it serves.
#![allow(unsafe_code)]

use std::io;
use std::sync::mpsc;
use std::thread::JoinHandle;

use vspa_threads::ThreadKind;

/// Highest CPU number a `cpu_set_t` holds, plus one.
pub const MAX_CPUS: usize = libc::CPU_SETSIZE as usize;

/// The CPUs the calling thread may run on, in ascending order.
pub fn allowed_cpus() -> io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain bits; all zeros is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the kernel writes at most `size_of::<cpu_set_t>()` bytes into `set`.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: CPU_ISSET only reads the set; every index is below CPU_SETSIZE.
    Ok((0..MAX_CPUS)
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect())
}

/// Binds the calling thread to CPU `cpu`.
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    if cpu >= MAX_CPUS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("CPU {cpu} is past the last CPU number ({})", MAX_CPUS - 1),
        ));
    }
    // SAFETY: as above, an all-zero cpu_set_t is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below CPU_SETSIZE, checked above.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: the kernel reads `size_of::<cpu_set_t>()` bytes from `set`.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("pinning to CPU {cpu}: {e}"),
        ));
    }
    Ok(())
}

/// The CPU of thread `n` of a group bound round-robin to `cpus` (None when
/// the list is empty: unbound).
pub fn nth(cpus: &[usize], n: usize) -> Option<usize> {
    cpus.get(n.checked_rem(cpus.len())?).copied()
}

/// Most CPUs a configured list may name.
pub const MAX_LIST: usize = 128;

/// Why a configured CPU list is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CpuListError {
    #[error("more than {MAX_LIST} cpus")]
    TooMany,
    #[error("cpu {0} is past the last CPU number ({last})", last = MAX_CPUS - 1)]
    PastLast(usize),
}

/// Checks a configured CPU list (whether this host has them is known only
/// when a thread binds).
pub fn check_list(cpus: &[usize]) -> Result<(), CpuListError> {
    if cpus.len() > MAX_LIST {
        return Err(CpuListError::TooMany);
    }
    match cpus.iter().find(|&&c| c >= MAX_CPUS) {
        Some(&c) => Err(CpuListError::PastLast(c)),
        None => Ok(()),
    }
}

/// Starts thread `name` of kind `kind` bound to `cpu` (None: the scheduler
/// places it) and runs `f` there. A thread that cannot take its CPU does not
/// run `f`: the error comes back here, as the configuration asked for that
/// placement. The thread's result is None only in that case. Once placed,
/// the thread enters its kind ([`vspa_threads::enter`]: its sandbox) before
/// `f` runs.
pub fn spawn_on<F, T>(
    name: String,
    cpu: Option<usize>,
    kind: ThreadKind,
    f: F,
) -> io::Result<JoinHandle<Option<T>>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let (started, pinned) = mpsc::channel();
    let thread = std::thread::Builder::new().name(name).spawn(move || {
        let pin = cpu.map_or(Ok(()), pin_current_thread);
        let ok = pin.is_ok();
        let _ = started.send(pin);
        ok.then(|| {
            vspa_threads::enter(kind);
            f()
        })
    })?;
    if let Ok(Err(e)) = pinned.recv() {
        let _ = thread.join();
        return Err(e);
    }
    Ok(thread)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_pins_to_an_allowed_cpu_and_not_to_others() {
        let allowed = allowed_cpus().unwrap();
        assert!(!allowed.is_empty());
        let last = *allowed.last().unwrap();
        let seen = std::thread::spawn(move || {
            pin_current_thread(last).unwrap();
            allowed_cpus().unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(seen, [last]);
        assert!(pin_current_thread(MAX_CPUS).is_err());
        let outside = (0..MAX_CPUS).find(|c| !allowed.contains(c)).unwrap();
        let e = std::thread::spawn(move || pin_current_thread(outside))
            .join()
            .unwrap()
            .unwrap_err();
        assert!(e.to_string().contains(&format!("CPU {outside}")), "{e}");
    }

    #[test]
    fn cpu_lists_are_checked() {
        assert_eq!(check_list(&[0, 1, 5]), Ok(()));
        assert_eq!(
            check_list(&[0, MAX_CPUS]),
            Err(CpuListError::PastLast(MAX_CPUS))
        );
        assert_eq!(check_list(&[0; MAX_LIST + 1]), Err(CpuListError::TooMany));
        assert_eq!(
            CpuListError::PastLast(MAX_CPUS).to_string(),
            format!(
                "cpu {MAX_CPUS} is past the last CPU number ({})",
                MAX_CPUS - 1
            )
        );
    }

    #[test]
    fn threads_take_cpus_round_robin() {
        assert_eq!(nth(&[], 3), None);
        assert_eq!(nth(&[4, 6], 0), Some(4));
        assert_eq!(nth(&[4, 6], 3), Some(6));
    }

    #[test]
    fn spawn_on_runs_pinned_or_not_at_all() {
        let last = *allowed_cpus().unwrap().last().unwrap();
        let t = spawn_on(
            "pinned".into(),
            Some(last),
            ThreadKind::DeviceWorker,
            || allowed_cpus().unwrap(),
        )
        .unwrap();
        assert_eq!(t.join().unwrap(), Some(vec![last]));
        let t = spawn_on("free".into(), None, ThreadKind::DeviceWorker, || 7).unwrap();
        assert_eq!(t.join().unwrap(), Some(7));
        let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let r = ran.clone();
        let e = spawn_on(
            "bad".into(),
            Some(MAX_CPUS),
            ThreadKind::DeviceWorker,
            move || r.store(true, std::sync::atomic::Ordering::SeqCst),
        );
        assert!(e.is_err());
        assert!(!ran.load(std::sync::atomic::Ordering::SeqCst));
    }
}
