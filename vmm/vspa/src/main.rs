//! `vspa`: the appliance binary. Subcommand files (`cli/`) parse
//! arguments and print; the appliance itself is the `vspa` library.
//!
//! Subcommands: `serve` (hosted mode: VSPs behind a Unix socket), `run`
//! (a guest in vspa's KVM VMM), `ctl` (the control API's client), `demo` (the
//! appliance on an embedded default, driven by a built-in client) and `image`
//! (create, inspect, convert, check and merge disk images).

use clap::{Parser, Subcommand};

mod cli;
use cli::{ctl, demo, image, run, serve};

#[derive(Debug, Parser)]
#[command(
    name = "vspa",
    version,
    about = "Virtual switch and storage VSP appliance"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve VSPs to hosted-mode clients over a Unix socket.
    Serve(serve::ServeArgs),
    /// Run the appliance on an embedded default and drive it with a client.
    Demo(demo::DemoArgs),
    /// Boot a guest in vspa's KVM VMM (VMBus and virtio-mmio devices).
    Run(run::RunArgs),
    /// Create, inspect, convert, compare, check and merge disk images.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Drive a running appliance through its control API.
    Ctl(ctl::CtlArgs),
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VSPA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Image(cmd) => image::run(cmd),
        Command::Run(args) => run::run(args),
        Command::Ctl(args) => ctl::run(args),
    };
    match result {
        Ok(code) => code,
        // The reader of our output went away (`| head`): not an error.
        Err(err) if is_broken_pipe(&err) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("vspa: error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
