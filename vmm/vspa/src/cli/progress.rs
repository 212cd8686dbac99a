//! Progress bars for long commands, shown only on a terminal.

use std::io::IsTerminal;

/// A bar with `template` when stderr is a terminal, else `None`.
pub fn terminal_bar(template: &str) -> Option<indicatif::ProgressBar> {
    std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(template)
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    })
}
