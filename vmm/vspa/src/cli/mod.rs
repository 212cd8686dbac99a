//! The subcommands: each parses its arguments, drives the appliance library
//! and prints.

/// `println!` that returns the write's error instead of panicking, so that
/// a reader that stops early (`vspa image check | head`) ends the command
/// quietly (see `main`'s handling of a broken pipe).
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)
    }};
}
/// `print!` as [`outln!`] is `println!`.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        write!(std::io::stdout().lock(), $($arg)*)
    }};
}

pub mod api;
pub mod console;
pub mod ctl;
pub mod demo;
pub mod image;
pub mod progress;
pub mod run;
pub mod sandbox;
pub mod serve;
