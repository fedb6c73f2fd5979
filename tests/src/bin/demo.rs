//! `lab-demo`: brings up a lab with 3 backends, runs the agent on
//! `manifests/examples/*.yaml`, sends 3,000 TCP connections and 3,000 UDP
//! requests to the `demo` ClusterIP, probes the `empty` service (no
//! endpoints: refused), prints what it saw and tears everything down.
//! Exits non-zero if any request failed. Needs root; the agent binary comes
//! from `KEP_AGENT_BIN` (default `target/debug/kube-ebpf-proxy`).

use std::net::SocketAddrV4;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use lab::addr::{DEMO_VIP, DNS_PORT, EMPTY_VIP, HTTP_PORT};
use lab::loadgen::{self, ErrorKind, Probe};
use lab::{Lab, LabConfig};

const REQUESTS: usize = 3_000;
const PER_REQUEST: Duration = Duration::from_secs(2);
const DEADLINE: Duration = Duration::from_secs(120);

fn main() -> ExitCode {
    match demo() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("demo: some requests failed");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn examples_dir() -> PathBuf {
    std::env::var_os("KEP_EXAMPLES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| lab::workspace_root().join("manifests/examples"))
}

fn describe(p: &Probe) -> String {
    match &p.result {
        Ok(name) => format!("answered by {name} in {:.2?}", p.elapsed),
        Err(e) => format!("{e} ({}) after {:.2?}", ErrorKind::of(e), p.elapsed),
    }
}

fn demo() -> Result<bool> {
    let lab = Lab::with_config(LabConfig {
        backends: 3,
        ..LabConfig::default()
    })?;
    println!(
        "lab {}: node {}, client {} (10.244.1.2), backends 10.244.10-12.2",
        lab.id(),
        lab.node().name(),
        lab.client().name()
    );

    let src = examples_dir();
    let mut copied = 0;
    for entry in std::fs::read_dir(&src).with_context(|| format!("read {}", src.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let text = std::fs::read_to_string(&path)?;
            lab.write_manifest(&name, &text)?;
            println!("manifest {}", path.display());
            copied += 1;
        }
    }
    anyhow::ensure!(copied > 0, "no *.yaml in {}", src.display());

    let agent = lab.start_agent(&lab.manifest_dir())?;
    agent.wait_for_log("datapath programmed", Duration::from_secs(30))?;
    println!(
        "agent {} ready (log: {})\n",
        agent.pid(),
        agent.log_path().display()
    );

    let http = SocketAddrV4::new(DEMO_VIP, HTTP_PORT);
    let dns = SocketAddrV4::new(DEMO_VIP, DNS_PORT);
    let (t, u) = lab.client().run(move || {
        (
            loadgen::tcp_requests(http, REQUESTS, PER_REQUEST, DEADLINE),
            loadgen::udp_requests(dns, REQUESTS, PER_REQUEST, DEADLINE),
        )
    });
    println!("{t}\n{u}");

    let empty_tcp = SocketAddrV4::new(EMPTY_VIP, HTTP_PORT);
    let empty_udp = SocketAddrV4::new(EMPTY_VIP, DNS_PORT);
    let (et, eu) = lab.client().run(move || {
        (
            loadgen::tcp_probe(empty_tcp, Duration::from_secs(3)),
            loadgen::udp_connected_request(empty_udp, Duration::from_secs(3)),
        )
    });
    println!("service without endpoints:");
    println!("  TCP {empty_tcp}: {}", describe(&et));
    println!("  UDP {empty_udp}: {}", describe(&eu));

    let refused =
        et.error_kind() == Some(ErrorKind::Refused) && eu.error_kind() == Some(ErrorKind::Refused);
    let ok = t.error_count() == 0 && u.error_count() == 0 && refused;
    if !ok {
        println!("\nagent output (tail):\n{}", agent.log_tail(30));
    }
    drop(agent);
    drop(lab);
    println!("\nlab torn down");
    Ok(ok)
}
