//! `vspa image`: the qemu-img of vhd. Argument parsing and printing only;
//! the logic lives in `vhd::tool`.

use anyhow::Context;
use clap::Subcommand;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use vhd::Format;
use vhd::tool::{self, ConvertTarget, CreateSpec, Subformat};

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Create an image.
    Create {
        /// Format: vhd, vhdx or raw.
        #[arg(short = 'f', long = "format", default_value = "vhd")]
        format: String,
        /// VHD subformat: fixed, dynamic or differencing.
        #[arg(long, default_value = "dynamic")]
        subformat: String,
        /// Parent of a differencing disk.
        #[arg(long)]
        parent: Option<PathBuf>,
        /// Block size of dynamic and differencing disks, in bytes.
        #[arg(long, default_value_t = vhd::format::DEFAULT_BLOCK_SIZE)]
        block_size: u32,
        #[command(flatten)]
        vhdx: VhdxArgs,
        file: PathBuf,
        /// Virtual size (bytes, or with a K/M/G/T suffix); not for differencing.
        size: Option<String>,
    },
    /// Show format, type, sizes, creator, parent chain and checksum state.
    Info {
        #[arg(long)]
        json: bool,
        /// Take no image locks (as qemu-img's -U): read an image another
        /// process (a running vspa) holds for writing, as of its last flush.
        #[arg(short = 'U', long)]
        force_share: bool,
        file: PathBuf,
    },
    /// Copy an image into a new one (sparse-aware).
    Convert {
        /// Output format: raw or vhd.
        #[arg(short = 'O', long = "output-format")]
        output_format: String,
        /// Output VHD subformat: fixed or dynamic.
        #[arg(long, default_value = "dynamic")]
        subformat: String,
        #[arg(long, default_value_t = vhd::format::DEFAULT_BLOCK_SIZE)]
        block_size: u32,
        #[command(flatten)]
        vhdx: VhdxArgs,
        source: PathBuf,
        destination: PathBuf,
    },
    /// Compare the contents of two images (exit 0 identical, 1 different).
    Compare { a: PathBuf, b: PathBuf },
    /// Check an image (exit 0 clean, 2 with a list of problems).
    Check {
        #[arg(long)]
        json: bool,
        /// Open read-write first: replay a pending VHDX log, reclaim leaked space.
        #[arg(long, conflicts_with = "force_share")]
        repair: bool,
        /// Take no image locks (as qemu-img's -U): read an image another
        /// process (a running vspa) holds for writing, as of its last flush.
        #[arg(short = 'U', long)]
        force_share: bool,
        file: PathBuf,
    },
    /// Commit a differencing disk into its parent, then remove it.
    Merge {
        /// Keep the (now redundant) differencing disk.
        #[arg(long)]
        keep: bool,
        child: PathBuf,
    },
}

/// VHDX-only choices of create and convert.
#[derive(Debug, clap::Args)]
pub struct VhdxArgs {
    /// VHDX logical sector size (512 or 4096).
    #[arg(long, default_value_t = 512)]
    logical_sector_size: u32,
    /// VHDX physical sector size (512 or 4096).
    #[arg(long, default_value_t = 4096)]
    physical_sector_size: u32,
}

impl VhdxArgs {
    fn options(&self, block_size: u32) -> vhd::tool::VhdxOptions {
        vhd::tool::VhdxOptions {
            block_size,
            logical_sector: self.logical_sector_size,
            physical_sector: self.physical_sector_size,
            ..Default::default()
        }
    }
}

pub fn run(cmd: ImageCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ImageCommand::Create {
            format,
            subformat,
            parent,
            block_size,
            vhdx,
            file,
            size,
        } => {
            let size = size.map(|s| tool::parse_size(&s)).transpose()?;
            let subformat: Subformat = if parent.is_some() && subformat == "dynamic" {
                Subformat::Differencing
            } else {
                subformat.parse()?
            };
            let spec = CreateSpec {
                format: format.parse()?,
                subformat,
                size,
                parent,
                block_size,
            };
            tool::create_with(&file, &spec, &vhdx.options(block_size))
                .with_context(|| format!("creating {}", file.display()))?;
            Ok(ExitCode::SUCCESS)
        }
        ImageCommand::Info {
            json,
            force_share,
            file,
        } => {
            let info = tool::info_with(&file, force_share)
                .with_context(|| format!("reading {}", file.display()))?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&info)?)?;
            } else {
                out!("{info}")?;
            }
            Ok(ExitCode::SUCCESS)
        }
        ImageCommand::Convert {
            output_format,
            subformat,
            block_size,
            vhdx,
            source,
            destination,
        } => {
            let target = ConvertTarget {
                format: output_format.parse::<Format>()?,
                subformat: subformat.parse()?,
                block_size,
            };
            let bar = std::io::stderr().is_terminal().then(|| {
                let bar = indicatif::ProgressBar::new(0);
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{bar:40} {bytes}/{total_bytes} ({eta})",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                bar
            });
            let mut progress = |done: u64, total: u64| {
                if let Some(bar) = &bar {
                    bar.set_length(total);
                    bar.set_position(done);
                }
            };
            let vhdx = vhdx.options(block_size);
            tool::convert_with(&source, &destination, target, &vhdx, &mut progress).with_context(
                || {
                    format!(
                        "converting {} to {}",
                        source.display(),
                        destination.display()
                    )
                },
            )?;
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            Ok(ExitCode::SUCCESS)
        }
        ImageCommand::Compare { a, b } => {
            let result = tool::compare(&a, &b)?;
            if result.size_a != result.size_b {
                eprintln!(
                    "warning: image size mismatch ({} vs {} bytes)",
                    result.size_a, result.size_b
                );
            }
            if result.identical {
                outln!("Images are identical.")?;
                Ok(ExitCode::SUCCESS)
            } else {
                let at = result.first_difference.unwrap_or(0);
                outln!("Content mismatch at offset {at}!")?;
                Ok(ExitCode::from(1))
            }
        }
        ImageCommand::Check {
            json,
            repair,
            force_share,
            file,
        } => {
            if repair {
                tool::repair(&file).with_context(|| format!("repairing {}", file.display()))?;
            }
            let report = tool::check_with(&file, force_share);
            if json {
                outln!("{}", serde_json::to_string_pretty(&report)?)?;
            } else {
                for note in &report.notes {
                    outln!("note: {note}")?;
                }
                for problem in &report.problems {
                    outln!("problem: {problem}")?;
                }
                if report.is_clean() {
                    outln!("No errors were found on the image.")?;
                } else {
                    outln!("{} problem(s) found.", report.problems.len())?;
                }
            }
            Ok(if report.is_clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
        ImageCommand::Merge { keep, child } => {
            let result = tool::merge(&child, keep, &mut |_, _| {})
                .with_context(|| format!("merging {}", child.display()))?;
            outln!(
                "Merged {} sectors into {}{}.",
                result.sectors_merged,
                result.parent.display(),
                if result.child_removed {
                    "; removed the child"
                } else {
                    ""
                }
            )?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
