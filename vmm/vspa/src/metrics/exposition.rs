//! The Prometheus text exposition format, version 0.0.4: metric families
//! with `# HELP` and `# TYPE` lines, each family's samples together, label
//! values and help text escaped as the format asks.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The Content-Type of a scrape answer.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A metric family's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

#[derive(Debug)]
struct Family {
    help: String,
    kind: Kind,
    /// Rendered sample lines.
    samples: String,
}

/// Metric families being collected; samples may be added in any order and
/// come out grouped per family, families sorted by name.
#[derive(Debug, Default)]
pub struct Exposition {
    families: BTreeMap<String, Family>,
}

/// Label pairs of a sample.
pub type Labels<'a> = &'a [(&'a str, &'a str)];

impl Exposition {
    /// Adds a sample of family `name` (created with `help` and `kind` on
    /// first use). For histograms `suffix` is `_bucket`, `_sum` or
    /// `_count`; else empty.
    pub fn sample(
        &mut self,
        name: &str,
        help: &str,
        kind: Kind,
        suffix: &str,
        labels: Labels<'_>,
        value: f64,
    ) {
        let family = self
            .families
            .entry(name.to_string())
            .or_insert_with(|| Family {
                help: help.to_string(),
                kind,
                samples: String::new(),
            });
        let out = &mut family.samples;
        out.push_str(name);
        out.push_str(suffix);
        if !labels.is_empty() {
            out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                let _ = write!(out, "{k}=\"");
                escape_into(out, v, true);
                out.push('"');
            }
            out.push('}');
        }
        let _ = writeln!(out, " {}", format_value(value));
    }

    /// A counter sample.
    pub fn counter(&mut self, name: &str, help: &str, labels: Labels<'_>, value: u64) {
        self.sample(name, help, Kind::Counter, "", labels, value as f64);
    }

    /// A gauge sample.
    pub fn gauge(&mut self, name: &str, help: &str, labels: Labels<'_>, value: u64) {
        self.sample(name, help, Kind::Gauge, "", labels, value as f64);
    }

    /// A histogram: `buckets` are (upper bound, count in that bucket alone)
    /// with the overflow last (bound infinity); written cumulatively.
    pub fn histogram(
        &mut self,
        name: &str,
        help: &str,
        labels: Labels<'_>,
        buckets: &[(f64, u64)],
        sum: f64,
    ) {
        let mut total = 0;
        for &(bound, n) in buckets {
            total += n;
            let le = format_value(bound);
            let mut with_le: Vec<(&str, &str)> = labels.to_vec();
            with_le.push(("le", &le));
            self.sample(
                name,
                help,
                Kind::Histogram,
                "_bucket",
                &with_le,
                total as f64,
            );
        }
        self.sample(name, help, Kind::Histogram, "_sum", labels, sum);
        self.sample(name, help, Kind::Histogram, "_count", labels, total as f64);
    }

    /// The text of every family.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (name, f) in &self.families {
            let _ = write!(out, "# HELP {name} ");
            escape_into(&mut out, &f.help, false);
            let _ = writeln!(out, "\n# TYPE {name} {}", f.kind.name());
            out.push_str(&f.samples);
        }
        out
    }
}

/// Escapes `\` and newlines (and `"` in label values), as the format asks.
fn escape_into(out: &mut String, s: &str, quote: bool) {
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quote => out.push_str("\\\""),
            c => out.push(c),
        }
    }
}

/// A sample value or bucket bound as Prometheus writes them.
fn format_value(v: f64) -> String {
    if v == f64::INFINITY {
        "+Inf".into()
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_grouped_typed_and_escaped() {
        let mut e = Exposition::default();
        e.counter("b_total", "B \\ help\nline", &[("x", "a\"b\\c\nd")], 3);
        e.gauge("a", "A", &[], 7);
        e.counter("b_total", "ignored", &[("x", "2")], 4);
        e.histogram(
            "c_seconds",
            "C",
            &[("op", "read")],
            &[(0.5, 1), (1.0, 0), (f64::INFINITY, 2)],
            3.25,
        );
        let want = "\
# HELP a A
# TYPE a gauge
a 7
# HELP b_total B \\\\ help\\nline
# TYPE b_total counter
b_total{x=\"a\\\"b\\\\c\\nd\"} 3
b_total{x=\"2\"} 4
# HELP c_seconds C
# TYPE c_seconds histogram
c_seconds_bucket{op=\"read\",le=\"0.5\"} 1
c_seconds_bucket{op=\"read\",le=\"1\"} 1
c_seconds_bucket{op=\"read\",le=\"+Inf\"} 3
c_seconds_sum{op=\"read\"} 3.25
c_seconds_count{op=\"read\"} 3
";
        assert_eq!(e.render(), want);
    }
}
