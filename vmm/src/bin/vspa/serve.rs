//! `vspa serve`: hosted mode. VSPs are offered to client processes that
//! connect to a Unix socket and act as guests.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use vmbus::echo::EchoDevice;
use vmbus::hosted::HostedServer;
use vmbus::server::Registry;

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Unix socket to listen on.
    #[arg(long, default_value = "/run/vspa.sock")]
    pub socket: PathBuf,
    /// Also offer the echo test device.
    #[arg(long)]
    pub echo: bool,
    /// Reset an echo channel whose client leaves replies unread this long.
    #[arg(long, default_value_t = 10_000, value_name = "MS")]
    pub echo_stall_ms: u64,
}

pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let signals = block_termination_signals();
    let registry = Registry::new();
    if args.echo {
        let mut echo = EchoDevice::new(
            "5e4d3c2b-1a09-4f8e-9d7c-6b5a49382716"
                .parse()
                .expect("guid"),
        );
        echo.stall_timeout = Duration::from_millis(args.echo_stall_ms);
        registry.add(Arc::new(echo));
    }
    let server = HostedServer::start(&args.socket, registry)
        .with_context(|| format!("cannot listen on {}", args.socket.display()))?;
    println!("vspa: listening on {}", args.socket.display());
    let signal = wait_for_signal(&signals);
    eprintln!("vspa: signal {signal}, shutting down");
    server.stop();
    Ok(ExitCode::SUCCESS)
}

/// Blocks SIGINT and SIGTERM in this thread (and the threads it starts
/// later), so the main thread can wait for them synchronously.
#[allow(unsafe_code)]
pub(crate) fn block_termination_signals() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local set, then pthread_sigmask with
    // valid pointers.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

#[allow(unsafe_code)]
pub(crate) fn wait_for_signal(set: &libc::sigset_t) -> i32 {
    let mut sig = 0;
    // SAFETY: sigwait with a valid set and output pointer.
    unsafe { libc::sigwait(set, &mut sig) };
    sig
}
