//! Termination and reload signals, waited for synchronously: the main
//! thread blocks SIGINT, SIGTERM and SIGHUP before it starts any thread
//! (so no other thread takes them) and then waits for them with sigwait.

/// The signals the appliance waits for.
#[derive(Debug, Clone, Copy)]
pub struct Signals(libc::sigset_t);

impl Signals {
    /// Blocks SIGINT, SIGTERM and SIGHUP in this thread and the threads it
    /// starts later.
    pub fn block() -> Signals {
        // SAFETY: sigset manipulation on a local set, then pthread_sigmask
        // with valid pointers.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGHUP);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            Signals(set)
        }
    }

    /// Waits for one of the signals and returns its number.
    pub fn wait(&self) -> i32 {
        let mut sig = 0;
        // SAFETY: sigwait with a valid set and output pointer.
        unsafe { libc::sigwait(&self.0, &mut sig) };
        sig
    }
}
