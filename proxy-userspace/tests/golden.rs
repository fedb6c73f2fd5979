//! Golden files: each directory under `tests/golden/` is one case, a
//! manifest directory (`input.yaml`: Services, EndpointSlices, Nodes) with
//! an optional `args` file, and `expected.txt`, the maps the agent writes
//! for it as `kube-ebpf-proxy dump` shows them. The input goes through the
//! agent's own pipeline (manifest source → tracker → encoder), no kernel
//! needed, and the rendering is the one `dump` uses.
//!
//! `KEP_BLESS=1 cargo test -p proxy-userspace --test golden` rewrites the
//! expected files; read the diff against kube-proxy's behaviour before
//! committing it: a file blessed from a bug enshrines the bug.
//!
//! `args` holds one agent flag per line (`#` starts a comment):
//! `--node-name NAME` (default `node-a`), `--lb-algorithm`,
//! `--cluster-lb-algorithm`, `--maglev-table-size`, and
//! `--node-address ADDR` (repeatable), which stands in for the addresses
//! the agent reads from its node interfaces (what NodePorts answer on).

use std::fmt::Write as _;
use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use proxy_userspace::encode::{Encoder, LbAlgorithm, LbAlgorithms};
use proxy_userspace::inspect::{self, Pinned};
use proxy_userspace::maglev;
use proxy_userspace::model::{NodeInfo, Tracker};
use proxy_userspace::source::manifests::{Decode, DocCache, reload};

/// A case's settings: what the agent takes from its flags and node.
struct Args {
    node_name: String,
    node_addresses: Vec<IpAddr>,
    algorithms: LbAlgorithms,
}

fn algorithm(name: &str, size: u32) -> LbAlgorithm {
    match name {
        "maglev" => LbAlgorithm::Maglev { table_size: size },
        "random" => LbAlgorithm::Random,
        other => panic!("unknown algorithm {other:?}"),
    }
}

fn parse_args(text: &str) -> Args {
    let mut node_name = "node-a".to_string();
    let mut node_addresses = Vec::new();
    let (mut external, mut internal) = ("maglev".to_string(), "random".to_string());
    let mut size = maglev::DEFAULT_SIZE;
    for line in text.lines() {
        let line = line.split('#').next().unwrap().trim();
        if line.is_empty() {
            continue;
        }
        let (flag, value) = line
            .split_once(char::is_whitespace)
            .unwrap_or_else(|| panic!("args: {line:?} is not `--flag value`"));
        let value = value.trim();
        match flag {
            "--node-name" => node_name = value.to_string(),
            "--node-address" => node_addresses.push(value.parse().expect("--node-address")),
            "--lb-algorithm" => external = value.to_string(),
            "--cluster-lb-algorithm" => internal = value.to_string(),
            "--maglev-table-size" => {
                size = maglev::check_size(value.parse().expect("--maglev-table-size"))
                    .expect("--maglev-table-size")
            }
            other => panic!("args: unknown flag {other}"),
        }
    }
    Args {
        node_name,
        node_addresses,
        algorithms: LbAlgorithms {
            external: algorithm(&external, size),
            internal: algorithm(&internal, size),
        },
    }
}

/// Runs one case's manifests through the agent's pipeline and renders the
/// result.
fn render(case: &Path) -> String {
    let args = match fs::read_to_string(case.join("args")) {
        Ok(text) => parse_args(&text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => parse_args(""),
        Err(e) => panic!("{}: {e}", case.join("args").display()),
    };
    let mut tracker = Tracker::new(NodeInfo {
        name: args.node_name.clone(),
        ..NodeInfo::default()
    });
    tracker.set_node_addresses(args.node_addresses.clone());
    let loaded = reload(case, &mut DocCache::default(), Decode::Facts);
    assert!(
        loaded.unavailable.is_none(),
        "{}: {:?}",
        case.display(),
        loaded.unavailable
    );
    for delta in loaded.deltas {
        delta.apply_to(&mut tracker);
    }
    let touched = tracker.settle();
    let mut encoder = Encoder::with_algorithms(args.algorithms);
    encoder.update(touched.iter().map(|f| (*f, tracker.frontend(f))));
    let contents = encoder.desired();
    let pinned = Pinned::of_contents(contents);

    let mut out = String::new();
    let addresses: Vec<String> = args.node_addresses.iter().map(|a| a.to_string()).collect();
    let _ = writeln!(
        out,
        "# node {} (addresses: {})",
        args.node_name,
        addresses.join(", ")
    );
    out.push_str("\n## services\n");
    out.push_str(&inspect::table(&inspect::services_rows(
        &inspect::services(&pinned),
        false,
    )));
    out.push_str("\n## backends\n");
    out.push_str(&inspect::table(&inspect::backends_rows(
        &inspect::backends(&pinned),
        false,
    )));
    out.push_str("\n## cluster IPs (other ports and protocols rejected)\n");
    for addr in inspect::cluster_ips(&pinned) {
        let _ = writeln!(out, "{addr}");
    }
    out.push_str("\n## maglev tables (svc: size, slots per backend id)\n");
    for (svc_id, spec) in &contents.tables {
        let table = spec.build();
        let shares: Vec<String> = spec
            .backends()
            .iter()
            .map(|b| {
                format!(
                    "{}:{}",
                    b.id,
                    table.iter().filter(|id| **id == b.id).count()
                )
            })
            .collect();
        let _ = writeln!(out, "{svc_id}: {} {}", spec.size(), shares.join(" "));
    }
    out.push_str("\n## health checks (healthCheckNodePort: service, local endpoints)\n");
    for (port, check) in tracker.health_checks() {
        let _ = writeln!(
            out,
            "{port}: {}/{} {}",
            check.namespace, check.name, check.local_endpoints
        );
    }
    out.push_str("\n## warnings\n");
    for warning in &loaded.warnings {
        let file = warning
            .file
            .file_name()
            .unwrap_or_default()
            .to_string_lossy();
        match &warning.object {
            Some(object) => {
                let _ = writeln!(out, "{file}: {object}: {}", warning.reason);
            }
            None => {
                let _ = writeln!(out, "{file}: {}", warning.reason);
            }
        }
    }
    for warning in tracker.warnings() {
        let _ = writeln!(out, "{warning}");
    }
    out
}

/// A line diff (longest common subsequence): `-` expected, `+` actual.
fn diff(expected: &str, actual: &str) -> String {
    let a: Vec<&str> = expected.lines().collect();
    let b: Vec<&str> = actual.lines().collect();
    // lcs[i][j]: common lines of a[i..] and b[j..].
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut out = String::new();
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            let _ = writeln!(out, "  {}", a[i]);
            i += 1;
            j += 1;
        } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            let _ = writeln!(out, "- {}", a[i]);
            i += 1;
        } else {
            let _ = writeln!(out, "+ {}", b[j]);
            j += 1;
        }
    }
    out
}

fn cases() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut cases: Vec<PathBuf> = fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.is_dir())
        .collect();
    cases.sort();
    cases
}

#[test]
fn every_case_renders_its_expected_maps() {
    let bless = std::env::var_os("KEP_BLESS").is_some_and(|v| v == "1");
    let cases = cases();
    assert!(!cases.is_empty(), "no golden cases found");
    let mut failed = Vec::new();
    for case in &cases {
        let actual = render(case);
        let path = case.join("expected.txt");
        if bless {
            fs::write(&path, &actual).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            continue;
        }
        let expected = fs::read_to_string(&path).unwrap_or_default();
        if expected != actual {
            eprintln!(
                "--- {} (- expected, + actual)\n{}",
                path.display(),
                diff(&expected, &actual)
            );
            failed.push(case.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    assert!(
        failed.is_empty(),
        "golden cases differ: {failed:?} (diffs above; KEP_BLESS=1 rewrites them once checked)"
    );
}

#[test]
fn the_diff_shows_what_changed() {
    assert_eq!(diff("a\nb\nc\n", "a\nx\nc\n"), "  a\n- b\n+ x\n  c\n");
    assert_eq!(diff("", "a\n"), "+ a\n");
    assert_eq!(diff("a\n", ""), "- a\n");
}
