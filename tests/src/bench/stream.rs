//! Throughput of one TCP stream, client -> target, with iperf3: a server in
//! backend 0 (the one endpoint of the target's `iperf` port, see
//! [`super::rules`]) and a bounded client run in the client namespace whose
//! `-J` report is parsed. A stream counts only if iperf3 ran to the end
//! without error and the server counted at least [`MIN_RECEIVED_SHARE`] of
//! the bytes the client wrote.

use std::net::SocketAddrV4;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use super::peers::Peer;
use super::rules;
use crate::Netns;

/// The share of the sent bytes the server must have counted. Not 1: when
/// the client's time is up, iperf3 ends the test and the server stops
/// counting, so what is still in flight or in the socket buffers (up to
/// ~0.5 % of a 1 s stream at 20 Gbit/s here) is sent but never counted. A
/// peer that loses packets shows as retransmits and a lower rate; one that
/// stops delivering makes iperf3 fail or the count fall far short.
pub const MIN_RECEIVED_SHARE: f64 = 0.99;

/// `iperf3 -s` in a backend namespace, killed on drop.
pub struct IperfServer {
    child: Child,
}

impl IperfServer {
    /// Starts `iperf3 -s -p IPERF_PORT` in `ns` and waits until it accepts
    /// connections (at most 5 s).
    pub fn start(ns: &Netns) -> Result<IperfServer> {
        let port = rules::IPERF_PORT.to_string();
        let child = Command::new("ip")
            .args(["netns", "exec", ns.name(), "iperf3", "-s", "-p", &port])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start iperf3 -s (installed by `cargo xtask setup`)")?;
        let mut server = IperfServer { child };
        let deadline = Instant::now() + Duration::from_secs(5);
        let filter = format!("sport = :{port}");
        loop {
            if let Some(status) = server.child.try_wait()? {
                bail!("iperf3 -s exited at once ({status})");
            }
            // Asked of the socket table, not by connecting: iperf3 would
            // take a bare connection for a (failed) test.
            let listening = ns.exec("ss", &["-Hltn", &filter])?;
            if !listening.trim().is_empty() {
                return Ok(server);
            }
            if Instant::now() >= deadline {
                bail!("iperf3 -s in {} not listening after 5 s", ns.name());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for IperfServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One peer's stream at one N in one round.
#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    pub peer: Peer,
    pub services: usize,
    pub round: usize,
    pub seconds: u64,
    /// Receiver side bits per second.
    pub bits_per_second: f64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub retransmits: Option<u64>,
    /// iperf3 ran to the end and the server counted at least
    /// [`MIN_RECEIVED_SHARE`] of the bytes sent.
    pub complete: bool,
    pub error: Option<String>,
    /// `bits_per_second / direct's` in the same round (filled in afterwards).
    pub ratio_to_direct: Option<f64>,
}

/// The fields of `iperf3 -J` that matter here.
#[derive(Debug, PartialEq)]
pub struct IperfResult {
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub bits_per_second: f64,
    pub retransmits: Option<u64>,
    pub error: Option<String>,
}

/// Parses an `iperf3 -J` client report.
pub fn parse_iperf(json: &str) -> Result<IperfResult> {
    let v: serde_json::Value = serde_json::from_str(json).context("iperf3 -J output")?;
    let error = v.get("error").and_then(|e| e.as_str()).map(str::to_string);
    let end = &v["end"];
    let num = |side: &str, field: &str| end[side][field].as_f64();
    Ok(IperfResult {
        bytes_sent: num("sum_sent", "bytes").unwrap_or(0.0) as u64,
        bytes_received: num("sum_received", "bytes").unwrap_or(0.0) as u64,
        bits_per_second: num("sum_received", "bits_per_second").unwrap_or(0.0),
        retransmits: end["sum_sent"]["retransmits"].as_u64(),
        error,
    })
}

/// Runs `iperf3 -c target -t seconds -J` in `client` (killed by `timeout`
/// if it hangs).
pub fn measure(
    client: &Netns,
    peer: Peer,
    services: usize,
    round: usize,
    target: SocketAddrV4,
    seconds: u64,
) -> Throughput {
    let limit = (seconds + 15).to_string();
    let (ip, port, secs) = (
        target.ip().to_string(),
        target.port().to_string(),
        seconds.to_string(),
    );
    let out = Command::new("timeout")
        .args([
            &limit,
            "ip",
            "netns",
            "exec",
            client.name(),
            "iperf3",
            "-c",
            &ip,
            "-p",
            &port,
            "-t",
            &secs,
            "--connect-timeout",
            "2000",
            "-J",
        ])
        .stdin(Stdio::null())
        .output();
    let mut t = Throughput {
        peer,
        services,
        round,
        seconds,
        bits_per_second: 0.0,
        bytes_sent: 0,
        bytes_received: 0,
        retransmits: None,
        complete: false,
        error: None,
        ratio_to_direct: None,
    };
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            t.error = Some(format!("cannot run iperf3: {e}"));
            return t;
        }
    };
    match parse_iperf(&String::from_utf8_lossy(&out.stdout)) {
        Ok(r) => {
            t.bits_per_second = r.bits_per_second;
            t.bytes_sent = r.bytes_sent;
            t.bytes_received = r.bytes_received;
            t.retransmits = r.retransmits;
            t.error = r.error.or_else(|| {
                (!out.status.success()).then(|| format!("iperf3 exited with {}", out.status))
            });
            t.complete = t.error.is_none()
                && r.bytes_sent > 0
                && r.bytes_received as f64 >= MIN_RECEIVED_SHARE * r.bytes_sent as f64;
            if t.error.is_none() && !t.complete {
                t.error = Some(format!(
                    "server counted {} of {} bytes sent",
                    r.bytes_received, r.bytes_sent
                ));
            }
        }
        Err(e) => {
            t.error = Some(format!(
                "{e:#} ({}; stderr {:?})",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_client_report() {
        let json = r#"{"start":{},"intervals":[],"end":{
            "sum_sent":{"start":0,"end":3.0,"seconds":3.0,"bytes":3000000000,"bits_per_second":8.0e9,"retransmits":2,"sender":true},
            "sum_received":{"start":0,"end":3.0,"seconds":3.0,"bytes":3000000000,"bits_per_second":7.9e9,"sender":true}}}"#;
        let r = parse_iperf(json).unwrap();
        assert_eq!(
            r,
            IperfResult {
                bytes_sent: 3_000_000_000,
                bytes_received: 3_000_000_000,
                bits_per_second: 7.9e9,
                retransmits: Some(2),
                error: None,
            }
        );
    }

    #[test]
    fn parses_an_error_report() {
        let json = r#"{"start":{},"intervals":[],"end":{},"error":"unable to connect to server: Connection refused"}"#;
        let r = parse_iperf(json).unwrap();
        assert_eq!(r.bytes_sent, 0);
        assert_eq!(
            r.error.as_deref(),
            Some("unable to connect to server: Connection refused")
        );
        assert!(parse_iperf("not json").is_err());
    }
}
