//! A dependency-free SVG: connection rate (left) and p50 latency (right)
//! against the number of services, one line per peer.

use std::fmt::Write as _;

use super::peers::Peer;
use super::report::Summary;

const W: f64 = 960.0;
const H: f64 = 420.0;
const PANEL_W: f64 = 400.0;
const PANEL_H: f64 = 280.0;
const TOP: f64 = 60.0;

fn colour(p: Peer) -> &'static str {
    match p {
        Peer::Direct => "#555555",
        Peer::Ours => "#1f77b4",
        Peer::Iptables => "#d62728",
        Peer::Nftables => "#2ca02c",
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A "nice" upper bound for an axis.
fn nice_max(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let mag = 10f64.powf(v.log10().floor());
    for step in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if step * mag >= v {
            return step * mag;
        }
    }
    10.0 * mag
}

fn panel(
    out: &mut String,
    left: f64,
    title: &str,
    unit: &str,
    ns: &[usize],
    summaries: &[Summary],
    value: fn(&Summary) -> Option<f64>,
) {
    let max = nice_max(summaries.iter().filter_map(value).fold(0.0, f64::max));
    let x = |i: usize| {
        if ns.len() <= 1 {
            left + PANEL_W / 2.0
        } else {
            left + 30.0 + (PANEL_W - 60.0) * i as f64 / (ns.len() - 1) as f64
        }
    };
    let y = |v: f64| TOP + PANEL_H - PANEL_H * v / max;
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" font-size="15" text-anchor="middle">{}</text>"#,
        left + PANEL_W / 2.0,
        TOP - 20.0,
        esc(title)
    );
    let _ = writeln!(
        out,
        "<rect x=\"{left:.1}\" y=\"{TOP:.1}\" width=\"{PANEL_W:.1}\" height=\"{PANEL_H:.1}\" fill=\"none\" stroke=\"#999\"/>"
    );
    for k in 0..=4 {
        let v = max * k as f64 / 4.0;
        let yy = y(v);
        let _ = writeln!(
            out,
            "<line x1=\"{left:.1}\" x2=\"{:.1}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\" stroke=\"#eee\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"end\">{v:.0}{unit}</text>",
            left + PANEL_W,
            left - 4.0,
            yy + 4.0
        );
    }
    for (i, n) in ns.iter().enumerate() {
        let _ = writeln!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"middle\">{n}</text>",
            x(i),
            TOP + PANEL_H + 16.0
        );
    }
    let _ = writeln!(
        out,
        "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"12\" text-anchor=\"middle\">services (N)</text>",
        left + PANEL_W / 2.0,
        TOP + PANEL_H + 34.0
    );
    for peer in Peer::ALL {
        let points: Vec<(f64, f64)> = ns
            .iter()
            .enumerate()
            .filter_map(|(i, n)| {
                summaries
                    .iter()
                    .find(|s| s.peer == peer && s.services == *n)
                    .and_then(value)
                    .map(|v| (x(i), y(v)))
            })
            .collect();
        let path: Vec<String> = points
            .iter()
            .map(|(a, b)| format!("{a:.1},{b:.1}"))
            .collect();
        let c = colour(peer);
        let _ = writeln!(
            out,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{c}\" stroke-width=\"2\"/>",
            path.join(" ")
        );
        for (a, b) in points {
            let _ = writeln!(
                out,
                "<circle cx=\"{a:.1}\" cy=\"{b:.1}\" r=\"3.5\" fill=\"{c}\"/>"
            );
        }
    }
}

/// The chart for `summaries`.
pub fn svg(summaries: &[Summary]) -> String {
    let mut ns: Vec<usize> = summaries.iter().map(|s| s.services).collect();
    ns.sort_unstable();
    ns.dedup();
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" \
         viewBox=\"0 0 {W} {H}\" font-family=\"sans-serif\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    panel(
        &mut out,
        70.0,
        "TCP connections per second",
        "",
        &ns,
        summaries,
        |s| s.rate,
    );
    panel(
        &mut out,
        540.0,
        "p50 connection latency (µs)",
        "",
        &ns,
        summaries,
        |s| s.p50_us,
    );
    for (i, peer) in Peer::ALL.iter().enumerate() {
        let lx = 120.0 + 190.0 * i as f64;
        let ly = H - 14.0;
        let _ = writeln!(
            out,
            "<line x1=\"{lx:.1}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"{}\" stroke-width=\"3\"/>\
             <text x=\"{:.1}\" y=\"{ly:.1}\" font-size=\"12\">{peer}</text>",
            lx + 24.0,
            ly - 4.0,
            ly - 4.0,
            colour(*peer),
            lx + 30.0
        );
    }
    out.push_str("</svg>\n");
    out
}
