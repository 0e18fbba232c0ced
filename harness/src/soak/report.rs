//! `report.html`: one self-contained file per run (no network): the verdict, the failing
//! checks and the replay command at the top, then charts drawn with plotters as inline SVG
//! (a timeline of every process, shares/s, quotes by state, ehash and sats over time), then
//! the checks, faults and redemptions as tables.

use std::fmt::Write as _;

use plotters::prelude::*;

use super::history::History;
use super::schedule::Schedule;
use super::workload::RedemptionRecord;
use crate::stack_sweep::Check;

const WIDTH: u32 = 1100;

/// Escape text for HTML.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn secs(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

/// The end of the time axis, s.
fn span(h: &History) -> f64 {
    let last = h.samples.last().map(|s| s.t_ms).unwrap_or(0);
    secs(last.max(h.duration_ms)).max(1.0)
}

/// Each process's phases as a timeline: one row per process, a bar per sampled phase.
fn timeline(h: &History) -> anyhow::Result<String> {
    let names: Vec<String> = h
        .samples
        .last()
        .map(|s| s.phases.keys().cloned().collect())
        .unwrap_or_default();
    let rows = names.len().max(1) as i32;
    let mut svg = String::new();
    {
        let height = 60 + 22 * (rows as u32 + 1);
        let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("Processes (green up, red down, orange paused, grey starting, black failed) and faults", ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(150)
            .build_cartesian_2d(0f64..span(h), (0i32..rows + 1).into_segmented())?;
        let labels = names.clone();
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(rows as usize + 2)
            .y_label_formatter(&move |y| match *y {
                SegmentValue::CenterOf(0) => "nemesis".to_string(),
                SegmentValue::CenterOf(y) if y >= 1 && (y as usize) <= labels.len() => {
                    labels[y as usize - 1].clone()
                }
                _ => String::new(),
            })
            .x_desc("seconds")
            .draw()?;
        for (row, name) in names.iter().enumerate() {
            let y = row as i32 + 1;
            for w in h.samples.windows(2) {
                let color = match w[0].phases.get(name).map(String::as_str) {
                    Some("up") => RGBColor(60, 170, 80),
                    Some("down") => RGBColor(210, 50, 50),
                    Some("paused") => RGBColor(240, 160, 30),
                    Some("starting") => RGBColor(160, 160, 160),
                    Some("failed") => BLACK,
                    _ => WHITE,
                };
                chart.draw_series(std::iter::once(Rectangle::new(
                    [
                        (secs(w[0].t_ms), SegmentValue::Exact(y)),
                        (secs(w[1].t_ms), SegmentValue::Exact(y + 1)),
                    ],
                    color.filled(),
                )))?;
            }
        }
        for f in h.faults.iter().filter(|f| f.what == "apply") {
            let color = if f.result.is_ok() { BLUE } else { RED };
            chart.draw_series(std::iter::once(Rectangle::new(
                [
                    (secs(f.from_ms), SegmentValue::Exact(0)),
                    (secs(f.to_ms.max(f.from_ms + 300)), SegmentValue::Exact(1)),
                ],
                color.mix(0.6).filled(),
            )))?;
        }
        root.present()?;
    }
    Ok(svg)
}

/// A line chart of named series over time.
fn lines(
    title: &str,
    y_desc: &str,
    h: &History,
    series: Vec<(String, Vec<(f64, f64)>)>,
) -> anyhow::Result<String> {
    let y_max = series
        .iter()
        .flat_map(|(_, pts)| pts.iter().map(|p| p.1))
        .fold(1.0f64, f64::max)
        * 1.1;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, 300)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..span(h), 0f64..y_max)?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc(y_desc)
            .draw()?;
        for (i, (name, pts)) in series.into_iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
    }
    Ok(svg)
}

/// Accepted shares per second between samples (a pool restart resets its counter).
fn share_rate(h: &History) -> Vec<(f64, f64)> {
    let mut out = Vec::new();
    for w in h.samples.windows(2) {
        if let (Some(a), Some(b)) = (w[0].shares_accepted, w[1].shares_accepted) {
            let dt = secs(w[1].t_ms - w[0].t_ms).max(0.001);
            let d = if b >= a { b - a } else { b };
            out.push((secs(w[1].t_ms), d / dt));
        }
    }
    out
}

/// A per-wallet series of one field.
fn wallet_series(
    h: &History,
    label: &str,
    f: fn(&super::history::WalletSample) -> u64,
) -> Vec<(String, Vec<(f64, f64)>)> {
    let names: std::collections::BTreeSet<String> = h
        .samples
        .iter()
        .flat_map(|s| s.wallets.keys().cloned())
        .collect();
    names
        .into_iter()
        .map(|n| {
            let pts = h
                .samples
                .iter()
                .filter_map(|s| s.wallets.get(&n).map(|w| (secs(s.t_ms), f(w) as f64)))
                .collect();
            (format!("{n} {label}"), pts)
        })
        .collect()
}

/// Write the report's HTML.
pub fn render(
    schedule: &Schedule,
    history: &History,
    checks: &[Check],
    redemptions: &[RedemptionRecord],
    replay: &str,
) -> anyhow::Result<String> {
    let passed = checks.iter().all(|c| c.passed);
    let mut html = String::new();
    write!(
        html,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>soak {seed}</title><style>body{{font-family:sans-serif;margin:20px}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 6px;vertical-align:top;font-size:13px}}.pass{{color:#187a2f}}.fail{{color:#b00020;font-weight:bold}}pre{{white-space:pre-wrap;margin:0}}</style></head><body>",
        seed = schedule.seed
    )?;
    write!(
        html,
        "<h1>Soak seed {} ({:?}, {} s, {} faults, {} redemptions): <span class=\"{}\">{}</span></h1><p>Replay: <code>{}</code></p>",
        schedule.seed,
        schedule.profile,
        schedule.duration_ms / 1000,
        schedule.faults.len(),
        schedule.redemptions.len(),
        if passed { "pass" } else { "fail" },
        if passed { "every check passed" } else { "CHECKS FAILED" },
        esc(replay)
    )?;
    for c in checks.iter().filter(|c| !c.passed) {
        let lines: Vec<&str> = c.detail.lines().collect();
        let mut head: String = lines
            .iter()
            .take(5)
            .map(|l| l.chars().take(300).collect::<String>())
            .collect::<Vec<_>>()
            .join("\n");
        if lines.len() > 5 {
            head.push_str(&format!(
                "\n... {} more line(s) in the checks table",
                lines.len() - 5
            ));
        }
        write!(
            html,
            "<p class=\"fail\">{}</p><pre>{}</pre>",
            esc(&c.name),
            esc(&head)
        )?;
    }
    html.push_str("<h2 id=\"timeline\">Timeline</h2>");
    html.push_str(&timeline(history)?);
    html.push_str(&lines(
        "Accepted shares per second",
        "shares/s",
        history,
        vec![("pool".into(), share_rate(history))],
    )?);
    let mut quotes = wallet_series(history, "PENDING", |w| w.pending);
    quotes.extend(wallet_series(history, "FAILED", |w| w.failed));
    quotes.extend(wallet_series(history, "minted", |w| w.minted));
    html.push_str(&lines("Quotes by state (ehash)", "ehash", history, quotes)?);
    let mut ehash = wallet_series(history, "held", |w| w.held);
    ehash.extend(wallet_series(history, "melted", |w| w.melted));
    html.push_str(&lines("ehash held and melted", "ehash", history, ehash)?);
    let sats = |f: fn(&super::history::Sample) -> Option<u64>| {
        history
            .samples
            .iter()
            .filter_map(|s| f(s).map(|v| (secs(s.t_ms), v as f64)))
            .collect::<Vec<_>>()
    };
    html.push_str(&lines(
        "sats: redeemed over Lightning, and what the mint could still pay",
        "sat",
        history,
        vec![
            ("redeemed".into(), sats(|s| s.redeemed_sat)),
            ("available".into(), sats(|s| s.available_sat)),
        ],
    )?);
    html.push_str("<h2>Checks</h2><table><tr><th>check</th><th>verdict</th><th>detail</th></tr>");
    for c in checks {
        write!(
            html,
            "<tr><td>{}</td><td class=\"{}\">{}</td><td><pre>{}</pre></td></tr>",
            esc(&c.name),
            if c.passed { "pass" } else { "fail" },
            if c.passed { "pass" } else { "FAIL" },
            esc(&c.detail)
        )?;
    }
    html.push_str("</table><h2>Faults</h2><table><tr><th>#</th><th>what</th><th>fault</th><th>from s</th><th>to s</th><th>result</th></tr>");
    for f in &history.faults {
        write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.1}</td><td>{:.1}</td><td>{}</td></tr>",
            f.index,
            f.what,
            esc(&f.fault),
            secs(f.from_ms),
            secs(f.to_ms),
            esc(&match &f.result {
                Ok(s) => s.clone(),
                Err(e) => format!("FAILED: {e}"),
            })
        )?;
    }
    html.push_str("</table><h2>Redemptions</h2><table><tr><th>#</th><th>at s</th><th>done s</th><th>by</th><th>kind</th><th>paid</th><th>answers</th></tr>");
    for r in redemptions {
        write!(
            html,
            "<tr><td>{}</td><td>{:.1}</td><td>{:.1}</td><td>{}</td><td>{}</td><td>{}</td><td><pre>{}</pre></td></tr>",
            r.index,
            secs(r.at_ms),
            secs(r.done_ms),
            esc(&r.by),
            esc(&r.kind),
            r.paid,
            esc(&r.outcome.join("\n"))
        )?;
    }
    html.push_str("</table><h2>Notes</h2><ul>");
    for (t, n) in &history.notes {
        write!(html, "<li>{:.1} s: {}</li>", secs(*t), esc(n))?;
    }
    html.push_str("</ul></body></html>\n");
    Ok(html)
}
