//! Result files: JSON (everything), a text summary, the comparison table, and an HTML report
//! with hand-written SVG charts over time.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use serde::Serialize;

use crate::scenario::{RunResult, Sample};

pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(path, serde_json::to_string_pretty(value)?)?;
    Ok(())
}

/// One line per run, for the terminal.
pub fn summary(r: &RunResult) -> String {
    format!(
        "{:?} {}: {} subs{}, delivered {:.0} pps ({:.1} Mbps), loss {:.3}%, latency p50 {:.2} / p99 {:.2} ms, jitter p99 {:.2} ms, \
         freezes {}, ttfp p50 {:.0} ms; SFU {:.1} µs/pkt ({:.0} pkt/s/core, {:.0}% of a core, {:.0} MB); tester {:.0}% of a core ({:.1} µs/pkt)",
        r.target,
        r.scenario.name,
        r.subscribers,
        // A run where some never joined measures a smaller room than it says: say so up front.
        if r.failed_participants > 0 { format!(" ({} participants FAILED to join or connect)", r.failed_participants) } else { String::new() },
        r.delivered_pps,
        r.delivered_kbps / 1000.0,
        r.loss_pct,
        r.latency_ms.p50,
        r.latency_ms.p99,
        r.jitter_ms.p99,
        r.freezes,
        r.time_to_first_packet_ms.p50,
        r.sfu_us_per_forwarded_packet,
        r.forwarded_pps_per_core,
        r.sfu_cores * 100.0,
        r.sfu_rss_mb_max,
        r.tester_cores * 100.0,
        r.tester_us_per_packet,
    )
}

/// The side-by-side table of one scenario against both targets (markdown).
pub fn compare_table(w: &RunResult, j: &RunResult) -> String {
    let mut s = String::new();
    let ratio = |a: f64, b: f64| if b > 0.0 { format!("{:.2}×", a / b) } else { "—".into() };
    let _ = writeln!(s, "Scenario `{}`: {} ({} s measured, load average {})", w.scenario.name, w.description, w.scenario.duration_s, w.load_average);
    let _ = writeln!(s);
    let _ = writeln!(s, "| metric | Warbler | Janus | Warbler / Janus |");
    let _ = writeln!(s, "|---|---|---|---|");
    let mut row = |name: &str, a: f64, b: f64, fmt: &dyn Fn(f64) -> String| {
        let _ = writeln!(s, "| {name} | {} | {} | {} |", fmt(a), fmt(b), ratio(a, b));
    };
    row("SFU CPU µs per forwarded packet", w.sfu_us_per_forwarded_packet, j.sfu_us_per_forwarded_packet, &|v| format!("{v:.2}"));
    row("forwarded packets/s per core", w.forwarded_pps_per_core, j.forwarded_pps_per_core, &|v| format!("{v:.0}"));
    row("delivered packets/s", w.delivered_pps, j.delivered_pps, &|v| format!("{v:.0}"));
    row("SFU CPU (share of a core)", w.sfu_cores, j.sfu_cores, &|v| format!("{:.1}%", v * 100.0));
    row("latency p50 (ms)", w.latency_ms.p50, j.latency_ms.p50, &|v| format!("{v:.2}"));
    row("latency p99 (ms)", w.latency_ms.p99, j.latency_ms.p99, &|v| format!("{v:.2}"));
    row("jitter p99 (ms)", w.jitter_ms.p99, j.jitter_ms.p99, &|v| format!("{v:.2}"));
    row("loss (%)", w.loss_pct, j.loss_pct, &|v| format!("{v:.3}"));
    row("freezes", w.freezes as f64, j.freezes as f64, &|v| format!("{v:.0}"));
    row("time to first packet p50 (ms)", w.time_to_first_packet_ms.p50, j.time_to_first_packet_ms.p50, &|v| format!("{v:.0}"));
    row("participants that failed to join or connect", w.failed_participants as f64, j.failed_participants as f64, &|v| format!("{v:.0}"));
    row("SFU memory max (MB)", w.sfu_rss_mb_max, j.sfu_rss_mb_max, &|v| format!("{v:.0}"));
    row("tester CPU (share of a core)", w.tester_cores, j.tester_cores, &|v| format!("{:.1}%", v * 100.0));
    s
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// A line chart of one or more series over time, as an SVG element.
pub fn svg_chart(title: &str, unit: &str, series: &[(&str, &str, Vec<(f64, f64)>)]) -> String {
    let (w, h, l, r, t, b) = (640.0, 220.0, 60.0, 10.0, 28.0, 30.0);
    let xmax = series.iter().flat_map(|s| s.2.iter().map(|p| p.0)).fold(1.0f64, f64::max);
    let ymax_raw = series.iter().flat_map(|s| s.2.iter().map(|p| p.1)).filter(|v| v.is_finite()).fold(0.0f64, f64::max);
    let ymax = nice_ceiling(ymax_raw.max(1e-9));
    let x = |v: f64| l + (w - l - r) * v / xmax;
    let y = |v: f64| t + (h - t - b) * (1.0 - v / ymax);
    let mut s = String::new();
    let _ = write!(s, r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">"#);
    let _ = write!(s, r#"<rect x="0" y="0" width="{w}" height="{h}" fill="white"/><text x="{l}" y="16" font-size="13" font-weight="bold">{}</text>"#, esc(title));
    for k in 0..=4 {
        let v = ymax * f64::from(k) / 4.0;
        let yy = y(v);
        let _ = write!(s, r##"<line x1="{l}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##, w - r, l - 4.0, yy + 4.0, fmt_num(v));
    }
    let _ = write!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">time (s) — {}</text>"#, (l + w - r) / 2.0, h - 6.0, esc(unit));
    let _ = write!(s, r#"<text x="{l}" y="{:.1}">0</text><text x="{:.1}" y="{:.1}" text-anchor="end">{:.0}</text>"#, h - b + 12.0, w - r, h - b + 12.0, xmax);
    for (i, (name, color, pts)) in series.iter().enumerate() {
        let path: Vec<String> = pts.iter().filter(|p| p.1.is_finite()).map(|p| format!("{:.1},{:.1}", x(p.0), y(p.1))).collect();
        let _ = write!(s, r#"<polyline fill="none" stroke="{color}" stroke-width="1.6" points="{}"/>"#, path.join(" "));
        let lx = l + 10.0 + 150.0 * i as f64;
        let _ = write!(s, r#"<rect x="{lx:.0}" y="{:.0}" width="10" height="3" fill="{color}"/><text x="{:.0}" y="{:.0}">{}</text>"#, t - 2.0, lx + 14.0, t + 2.0, esc(name));
    }
    s.push_str("</svg>");
    s
}

fn nice_ceiling(v: f64) -> f64 {
    let p = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if m * p >= v {
            return m * p;
        }
    }
    10.0 * p
}

fn fmt_num(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn pts(s: &[Sample], f: impl Fn(&Sample) -> f64) -> Vec<(f64, f64)> {
    s.iter().map(|x| (x.t, f(x))).collect()
}

const COLORS: [&str; 2] = ["#1f77b4", "#d62728"];

/// An HTML page for one or more runs of the same scenario (one per target): the summary
/// table, and charts of throughput, latency, loss and CPU over time.
pub fn html(title: &str, runs: &[&RunResult], extra_markdown: &str) -> String {
    let mut s = String::new();
    let _ = write!(s, "<!doctype html><html><head><meta charset=\"utf-8\"><title>{}</title><style>body{{font-family:sans-serif;max-width:1340px;margin:20px auto}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}th:first-child,td:first-child{{text-align:left}}.charts{{display:flex;flex-wrap:wrap;gap:10px}}pre{{background:#f6f6f6;padding:8px}}</style></head><body><h1>{}</h1>", esc(title), esc(title));
    if let Some(r) = runs.first() {
        let _ = write!(s, "<p>{} — {} s measured after {} s warm-up; load average at the end: {}</p>", esc(&r.description), r.scenario.duration_s, r.scenario.warmup_s, esc(&r.load_average));
    }
    s.push_str("<table><tr><th>target</th><th>subscribers</th><th>delivered pkt/s</th><th>Mbps</th><th>loss %</th><th>latency p50 / p95 / p99 ms</th><th>jitter p99 ms</th><th>freezes</th><th>TTFP p50 ms</th><th>SFU µs/pkt</th><th>pkt/s per core</th><th>SFU core %</th><th>SFU MB</th><th>tester core %</th></tr>");
    for r in runs {
        let _ = write!(
            s,
            "<tr><td>{:?}</td><td>{}</td><td>{:.0}</td><td>{:.1}</td><td>{:.3}</td><td>{:.2} / {:.2} / {:.2}</td><td>{:.2}</td><td>{}</td><td>{:.0}</td><td>{:.2}</td><td>{:.0}</td><td>{:.0}</td><td>{:.0}</td><td>{:.0}</td></tr>",
            r.target,
            r.subscribers,
            r.delivered_pps,
            r.delivered_kbps / 1000.0,
            r.loss_pct,
            r.latency_ms.p50,
            r.latency_ms.p95,
            r.latency_ms.p99,
            r.jitter_ms.p99,
            r.freezes,
            r.time_to_first_packet_ms.p50,
            r.sfu_us_per_forwarded_packet,
            r.forwarded_pps_per_core,
            r.sfu_cores * 100.0,
            r.sfu_rss_mb_max,
            r.tester_cores * 100.0
        );
    }
    s.push_str("</table>");
    if !extra_markdown.is_empty() {
        let _ = write!(s, "<pre>{}</pre>", esc(extra_markdown));
    }
    s.push_str("<div class=\"charts\">");
    let names: Vec<String> = runs.iter().map(|r| format!("{:?}", r.target)).collect();
    let chart = |title: &str, unit: &str, f: &dyn Fn(&Sample) -> f64| {
        let series: Vec<(&str, &str, Vec<(f64, f64)>)> =
            runs.iter().enumerate().map(|(i, r)| (names[i].as_str(), COLORS[i % 2], pts(&r.timeseries, f))).collect();
        svg_chart(title, unit, &series)
    };
    s.push_str(&chart("Delivered packets per second", "packets/s", &|x| x.rx_pps));
    s.push_str(&chart("End-to-end latency p99 (per second)", "ms", &|x| x.latency_p99_ms));
    s.push_str(&chart("End-to-end latency p50 (per second)", "ms", &|x| x.latency_p50_ms));
    s.push_str(&chart("Loss (per second)", "%", &|x| x.loss_pct));
    s.push_str(&chart("SFU CPU", "% of one core", &|x| x.sfu_cpu_pct));
    s.push_str(&chart("Tester CPU", "% of one core", &|x| x.tester_cpu_pct));
    s.push_str(&chart("SFU resident memory", "MB", &|x| x.sfu_rss_mb));
    s.push_str(&chart("Connected subscriber connections", "count", &|x| x.subscribers_connected as f64));
    s.push_str("</div></body></html>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_is_well_formed_svg() {
        let svg = svg_chart("x<y", "ms", &[("a", "#000", vec![(0.0, 1.0), (1.0, 3.0), (2.0, f64::NAN)])]);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert!(svg.contains("x&lt;y"));
        assert!(svg.contains("<polyline"));
        assert_eq!(nice_ceiling(7.3), 10.0);
        assert_eq!(nice_ceiling(0.23), 0.25);
        assert_eq!(nice_ceiling(120.0), 200.0);
    }
}
