//! `vspa-bench ring`.

#[derive(Debug, clap::Args)]
pub struct RingArgs {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(_args: RingArgs) -> anyhow::Result<()> {
    anyhow::bail!("ring bench: not written yet")
}
