//! `vspa-bench disk` (filled in by the vhd issue).

#[derive(Debug, clap::Args)]
pub struct DiskArgs {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(_args: DiskArgs) -> anyhow::Result<()> {
    anyhow::bail!("disk bench: not written yet")
}
