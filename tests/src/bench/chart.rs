//! A dependency-free SVG, one line per peer against the number of
//! services: connection rate and p50 connection latency (top), TCP
//! request/response rate on one connection and one TCP stream's throughput
//! (bottom).

use std::fmt::Write as _;

use super::peers::{Kind, Peer};
use super::report::{KindSummary, StreamSummary, Summary};

const W: f64 = 960.0;
const H: f64 = 800.0;
const ROW: f64 = 380.0;
const PANEL_W: f64 = 400.0;
const PANEL_H: f64 = 280.0;
const TOP: f64 = 60.0;

fn colour(p: Peer) -> &'static str {
    match p {
        Peer::Direct => "#555555",
        Peer::Ours => "#1f77b4",
        Peer::OursStack => "#17becf",
        Peer::OursTc => "#9467bd",
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
    (left, top): (f64, f64),
    title: &str,
    unit: &str,
    ns: &[usize],
    value: &dyn Fn(Peer, usize) -> Option<f64>,
) {
    let max = nice_max(
        Peer::ALL
            .iter()
            .flat_map(|&p| ns.iter().filter_map(move |&n| value(p, n)))
            .fold(0.0, f64::max),
    );
    let x = |i: usize| {
        if ns.len() <= 1 {
            left + PANEL_W / 2.0
        } else {
            left + 30.0 + (PANEL_W - 60.0) * i as f64 / (ns.len() - 1) as f64
        }
    };
    let y = |v: f64| top + PANEL_H - PANEL_H * v / max;
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" font-size="15" text-anchor="middle">{}</text>"#,
        left + PANEL_W / 2.0,
        top - 20.0,
        esc(title)
    );
    let _ = writeln!(
        out,
        "<rect x=\"{left:.1}\" y=\"{top:.1}\" width=\"{PANEL_W:.1}\" height=\"{PANEL_H:.1}\" fill=\"none\" stroke=\"#999\"/>"
    );
    for k in 0..=4 {
        let v = max * k as f64 / 4.0;
        let yy = y(v);
        let _ = writeln!(
            out,
            "<line x1=\"{left:.1}\" x2=\"{:.1}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\" stroke=\"#eee\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"end\">{}{unit}</text>",
            left + PANEL_W,
            left - 4.0,
            yy + 4.0,
            if v.fract().abs() < 1e-9 {
                format!("{v:.0}")
            } else {
                format!("{v:.1}")
            }
        );
    }
    for (i, n) in ns.iter().enumerate() {
        let _ = writeln!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"middle\">{n}</text>",
            x(i),
            top + PANEL_H + 16.0
        );
    }
    let _ = writeln!(
        out,
        "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"12\" text-anchor=\"middle\">services (N)</text>",
        left + PANEL_W / 2.0,
        top + PANEL_H + 34.0
    );
    for peer in Peer::ALL {
        let points: Vec<(f64, f64)> = ns
            .iter()
            .enumerate()
            .filter_map(|(i, n)| value(peer, *n).map(|v| (x(i), y(v))))
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

/// The chart for the connection, request/response and stream summaries.
pub fn svg(summaries: &[Summary], kinds: &[KindSummary], streams: &[StreamSummary]) -> String {
    let mut ns: Vec<usize> = summaries.iter().map(|s| s.services).collect();
    ns.sort_unstable();
    ns.dedup();
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" \
         viewBox=\"0 0 {W} {H}\" font-family=\"sans-serif\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    let conn = |f: fn(&Summary) -> Option<f64>| {
        move |p: Peer, n: usize| {
            summaries
                .iter()
                .find(|s| s.peer == p && s.services == n)
                .and_then(f)
        }
    };
    panel(
        &mut out,
        (70.0, TOP),
        "TCP connections per second",
        "",
        &ns,
        &conn(|s| s.rate),
    );
    panel(
        &mut out,
        (540.0, TOP),
        "p50 connection latency (µs)",
        "",
        &ns,
        &conn(|s| s.p50_us),
    );
    panel(
        &mut out,
        (70.0, TOP + ROW),
        "TCP requests/s on one connection",
        "",
        &ns,
        &|p, n| {
            kinds
                .iter()
                .find(|s| s.kind == Kind::TcpSession && s.peer == p && s.services == n)
                .and_then(|s| s.rate)
        },
    );
    panel(
        &mut out,
        (540.0, TOP + ROW),
        "one TCP stream (Gbit/s, iperf3)",
        "",
        &ns,
        &|p, n| {
            streams
                .iter()
                .find(|s| s.peer == p && s.services == n)
                .and_then(|s| s.gbit_per_s)
        },
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
