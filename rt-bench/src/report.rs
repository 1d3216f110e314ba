//! The results: figures with their distributions, the targets they are held to, the table
//! on stdout, `latest.json`, and the SVG plots.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;
use serde::Serialize;

use crate::stats::Summary;

/// The memory target, 15 MB, in the MiB the figures are in (15 000 000 / 2^20).
const RSS_TARGET_MIB: f64 = 15_000_000.0 / 1_048_576.0;

/// One figure for one subject.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// Stable key: `mic_wire`, `wire_ring`, `loop_stall`, …
    pub id: &'static str,
    /// The device it ran on (`file`, `pulse`), when it matters.
    pub device: Option<&'static str>,
    /// A condition: `N=10`, `list_tasks`, `under 10-agent flood`.
    pub variant: Option<String>,
    pub subject: &'static str,
    /// `release`, `release+probe` (walkie), or `python` (the peer).
    pub build: &'static str,
    pub unit: &'static str,
    pub summary: Summary,
}

impl Figure {
    /// Table order: by figure, device, then condition (N numerically).
    fn key(
        &self,
    ) -> (
        usize,
        &'static str,
        Option<&'static str>,
        u64,
        Option<String>,
    ) {
        let n = self
            .variant
            .as_deref()
            .and_then(|v| v.strip_prefix("N="))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        (
            order(self.id),
            self.id,
            self.device,
            n,
            self.variant.clone(),
        )
    }
}

/// How each figure is titled, in which order it is listed, and its target.
struct Spec {
    id: &'static str,
    title: &'static str,
    /// (statistic, limit, text) for walkie, if docs/BENCHMARKS.md sets one.
    target: Option<(Stat, f64, &'static str)>,
    /// Lower is better for the peer ratio (latency, CPU, memory).
    ratio: bool,
}

#[derive(Debug, Clone, Copy)]
enum Stat {
    P50,
    P99,
    P999,
    Max,
}

impl Stat {
    fn of(self, s: &Summary) -> f64 {
        match self {
            Stat::P50 => s.p50,
            Stat::P99 => s.p99,
            Stat::P999 => s.p999,
            Stat::Max => s.max,
        }
    }
}

const SPECS: &[Spec] = &[
    Spec {
        id: "mic_wire",
        title: "mic→wire (ALSA period 10 ms)",
        target: Some((Stat::P99, 12.0, "p99 ≤ period + 2 ms")),
        ratio: true,
    },
    Spec {
        id: "wire_ring",
        title: "wire→ring",
        target: Some((Stat::P99, 2.0, "p99 ≤ 2 ms")),
        ratio: true,
    },
    Spec {
        id: "wire_device",
        title: "wire→device (first delta)",
        target: None,
        ratio: true,
    },
    Spec {
        id: "barge_in",
        title: "barge-in: button→flush",
        target: Some((Stat::P99, 5.0, "p99 ≤ 5 ms")),
        ratio: true,
    },
    Spec {
        id: "barge_cancel",
        title: "barge-in: button→response.cancel",
        target: None,
        ratio: true,
    },
    Spec {
        id: "tool_ack",
        title: "tool ack: arguments.done→output",
        target: Some((Stat::P99, 5.0, "p99 ≤ 5 ms (spawn)")),
        ratio: true,
    },
    Spec {
        id: "loop_stall",
        title: "loop iteration (busy)",
        target: Some((Stat::P999, 1.0, "p99.9 ≤ 1 ms at N=10")),
        ratio: true,
    },
    Spec {
        id: "loop_cpu",
        title: "loop iteration (on CPU)",
        target: None,
        ratio: true,
    },
    Spec {
        id: "ctl_rtt",
        title: "control round trip",
        target: None,
        ratio: true,
    },
    Spec {
        id: "mic_wire_load",
        title: "mic→wire under load",
        target: None,
        ratio: true,
    },
    Spec {
        id: "idle_cpu",
        title: "idle CPU (% of a core, per second)",
        target: Some((Stat::P50, 0.2, "≤ 0.2 %")),
        ratio: true,
    },
    Spec {
        id: "idle_wakeups",
        title: "idle wake-ups/s (all threads)",
        target: Some((Stat::P50, 25.0, "≤ 25/s")),
        ratio: true,
    },
    Spec {
        id: "rss_rest",
        title: "RSS at rest (MiB)",
        target: Some((Stat::Max, RSS_TARGET_MIB, "≤ 15 MB")),
        ratio: true,
    },
    Spec {
        id: "rss_soak",
        title: "RSS over the soak (MiB)",
        target: Some((Stat::Max, RSS_TARGET_MIB, "≤ 15 MB, flat")),
        ratio: true,
    },
    Spec {
        id: "rss_slope",
        title: "RSS growth over the soak's 2nd half (KiB/min)",
        target: None,
        ratio: false,
    },
    Spec {
        id: "ready",
        title: "start→control socket answering",
        target: Some((Stat::P99, 50.0, "≤ 50 ms")),
        ratio: true,
    },
    Spec {
        id: "shutdown",
        title: "shutdown with 10 agents",
        target: None,
        ratio: true,
    },
];

fn spec(id: &str) -> Option<&'static Spec> {
    SPECS.iter().find(|s| s.id == id)
}

fn order(id: &str) -> usize {
    SPECS.iter().position(|s| s.id == id).unwrap_or(usize::MAX)
}

/// Whether walkie's figure meets its target (None: no target for this row).
fn verdict(f: &Figure) -> Option<(bool, &'static str)> {
    let (stat, limit, text) = spec(f.id)?.target?;
    // Some targets apply to one condition only.
    match (f.id, f.variant.as_deref()) {
        ("loop_stall", Some(v)) if v != "N=10" => return None,
        ("tool_ack", Some(v)) if v.starts_with("list_tasks") => return None,
        _ => {}
    }
    Some((stat.of(&f.summary) <= limit, text))
}

/// A row of the table: one figure, walkie and the peer side by side.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub id: &'static str,
    pub title: &'static str,
    pub device: Option<&'static str>,
    pub variant: Option<String>,
    pub unit: &'static str,
    pub walkie: Option<Figure>,
    pub peer: Option<Figure>,
    /// peer p99 ÷ walkie p99 (p50 for the idle figures, max for memory).
    pub ratio: Option<f64>,
    pub target: Option<&'static str>,
    pub met: Option<bool>,
}

pub fn rows(figures: &[Figure]) -> Vec<Row> {
    let mut grouped: BTreeMap<_, (Option<Figure>, Option<Figure>)> = BTreeMap::new();
    for f in figures {
        let e = grouped.entry(f.key()).or_default();
        if f.subject == "walkie" {
            e.0 = Some(f.clone());
        } else {
            e.1 = Some(f.clone());
        }
    }
    grouped
        .into_iter()
        .map(|((_, id, device, _, variant), (walkie, peer))| {
            let spec = spec(id);
            let stat = spec.and_then(|s| s.target).map_or(Stat::P99, |t| t.0);
            let ratio = match (&walkie, &peer, spec.is_some_and(|s| s.ratio)) {
                (Some(w), Some(p), true) if stat.of(&w.summary) > 0.0 => {
                    Some(stat.of(&p.summary) / stat.of(&w.summary))
                }
                _ => None,
            };
            let v = walkie.as_ref().and_then(verdict);
            Row {
                id,
                title: spec.map_or(id, |s| s.title),
                device,
                variant,
                unit: walkie.as_ref().or(peer.as_ref()).map_or("", |f| f.unit),
                walkie,
                peer,
                ratio,
                target: v.map(|v| v.1),
                met: v.map(|v| v.0),
            }
        })
        .collect()
}

fn num(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn cells(f: &Option<Figure>) -> String {
    match f {
        Some(f) => format!(
            "{:>8} {:>8} {:>8} {:>8}",
            num(f.summary.p50),
            num(f.summary.p99),
            num(f.summary.p999),
            num(f.summary.max)
        ),
        None => format!("{:>35}", "—"),
    }
}

/// The table printed on stdout (and kept in the JSON as text).
pub fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<64} {:>35}   {:>35} {:>7}  target",
        "figure [unit] (device, condition)",
        "walkie  p50      p99    p99.9      max",
        "peer  p50      p99    p99.9      max",
        "peer/w"
    );
    for r in rows {
        let mut name = format!("{} [{}]", r.title, r.unit);
        let cond: Vec<String> = r
            .device
            .map(str::to_owned)
            .into_iter()
            .chain(r.variant.clone())
            .collect();
        if !cond.is_empty() {
            name.push_str(&format!(" ({})", cond.join(", ")));
        }
        let ratio = r.ratio.map_or("".into(), |x| format!("{x:.1}×"));
        let target = match (r.target, r.met) {
            (Some(t), Some(true)) => format!("met ({t})"),
            (Some(t), Some(false)) => format!("NOT MET ({t})"),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "{name:<64} {}   {} {ratio:>7}  {target}",
            cells(&r.walkie),
            cells(&r.peer)
        );
    }
    out
}

/// A plot's file name (without `.svg`) from its figure: lower-case letters, digits and
/// single hyphens only (`tool-ack-start-task-spawn`, `loop-stall-n10`), so it needs no
/// quoting in a shell or a URL.
fn plot_name(id: &str, device: Option<&str>, variant: Option<&str>) -> String {
    let mut name = String::new();
    for part in [Some(id), device, variant].into_iter().flatten() {
        for c in part.chars() {
            if c.is_ascii_alphanumeric() {
                name.push(c.to_ascii_lowercase());
            } else if c == '=' {
                // N=10 reads n10.
            } else if !name.is_empty() && !name.ends_with('-') {
                name.push('-');
            }
        }
        if !name.ends_with('-') {
            name.push('-');
        }
    }
    name.trim_end_matches('-').to_string()
}

/// Percentile curves of walkie and the peer for each latency figure, one SVG each, and
/// the cost-versus-agents curve.
pub fn plots(figures: &[Figure], dir: &Path) -> Result<Vec<String>, String> {
    let mut written = Vec::new();
    let rows = rows(figures);
    for r in &rows {
        if r.unit != "ms" {
            continue;
        }
        let name = plot_name(r.id, r.device, r.variant.as_deref());
        let file = dir.join(format!("{name}.svg"));
        let mut title = r.title.to_string();
        if let Some(d) = r.device {
            title.push_str(&format!(" — {d}"));
        }
        if let Some(v) = &r.variant {
            title.push_str(&format!(" — {v}"));
        }
        percentile_plot(&file, &title, &[&r.walkie, &r.peer]).map_err(|e| e.to_string())?;
        written.push(format!("{name}.svg"));
    }
    let file = dir.join("agents.svg");
    agents_plot(&file, figures).map_err(|e| e.to_string())?;
    written.push("agents.svg".into());
    Ok(written)
}

/// x = "nines" (0 = p0, 1 = p90, 2 = p99, 3 = p99.9), y = ms (log).
fn percentile_plot(
    file: &Path,
    title: &str,
    series: &[&Option<Figure>],
) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(file, (760, 440)).into_drawing_area();
    root.fill(&WHITE)?;
    let nines = |p: f64| -(1.0 - (p / 100.0).min(0.99999)).log10();
    let mut ymax = 0.001f64;
    let mut ymin = f64::MAX;
    for f in series.iter().filter_map(|f| f.as_ref()) {
        for &(_, v) in &f.summary.curve {
            ymax = ymax.max(v);
            if v > 0.0 {
                ymin = ymin.min(v);
            }
        }
    }
    let ymin = (ymin.min(ymax) / 2.0).max(0.0005);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..5f64, (ymin..ymax * 2.0).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("ms (log scale)")
        .x_labels(6)
        .x_label_formatter(&|x| match x.round() as i64 {
            0 => "p0".into(),
            1 => "p90".into(),
            2 => "p99".into(),
            3 => "p99.9".into(),
            4 => "p99.99".into(),
            _ => "max".into(),
        })
        .draw()?;
    for (f, color) in series
        .iter()
        .zip([RGBColor(0, 90, 200), RGBColor(220, 80, 0)])
    {
        let Some(f) = f else { continue };
        let pts: Vec<(f64, f64)> = f
            .summary
            .curve
            .iter()
            .map(|&(p, v)| (if p >= 100.0 { 5.0 } else { nines(p) }, v.max(ymin)))
            .collect();
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))?
            .label(format!(
                "{} ({}, n={})",
                f.subject, f.build, f.summary.count
            ))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Loop stall p99.9 and control round trip p99 against the number of flooding agents.
fn agents_plot(file: &Path, figures: &[Figure]) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(file, (760, 440)).into_drawing_area();
    root.fill(&WHITE)?;
    let n_of = |f: &Figure| {
        f.variant
            .as_deref()
            .and_then(|v| v.strip_prefix("N="))
            .and_then(|n| n.parse::<f64>().ok())
    };
    type Line = (String, RGBColor, Vec<(f64, f64)>);
    let lines: Vec<Line> = [
        ("walkie", "loop_stall", "loop p99.9", RGBColor(0, 90, 200)),
        (
            "walkie",
            "ctl_rtt",
            "control RTT p99",
            RGBColor(90, 160, 255),
        ),
        ("peer", "loop_stall", "loop p99.9", RGBColor(220, 80, 0)),
        ("peer", "ctl_rtt", "control RTT p99", RGBColor(255, 160, 90)),
    ]
    .into_iter()
    .map(|(subject, id, what, color)| {
        let mut pts: Vec<(f64, f64)> = figures
            .iter()
            .filter(|f| f.subject == subject && f.id == id)
            .filter_map(|f| {
                let v = if id == "loop_stall" {
                    f.summary.p999
                } else {
                    f.summary.p99
                };
                Some((n_of(f)?, v.max(0.001)))
            })
            .collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        (format!("{subject}: {what}"), color, pts)
    })
    .collect();
    let ymax = lines
        .iter()
        .flat_map(|l| l.2.iter().map(|p| p.1))
        .fold(0.01f64, f64::max);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "cost of work: agents each flooding 5 MB/s, audio flowing",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..21f64, (0.001f64..ymax * 2.0).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("agents (N)")
        .y_desc("ms (log scale)")
        .draw()?;
    for (label, color, pts) in lines {
        if pts.is_empty() {
            continue;
        }
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plot_names_are_plain() {
        assert_eq!(
            plot_name("tool_ack", None, Some("start_task (spawn)")),
            "tool-ack-start-task-spawn"
        );
        assert_eq!(
            plot_name("tool_ack", None, Some("start_task under 10-agent flood")),
            "tool-ack-start-task-under-10-agent-flood"
        );
        assert_eq!(
            plot_name("mic_wire_load", Some("file"), Some("N=10")),
            "mic-wire-load-file-n10"
        );
        assert_eq!(plot_name("ready", None, None), "ready");
    }
}
