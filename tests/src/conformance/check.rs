//! Upstream's success criteria, on the lab's clients (test/e2e/network and
//! test/e2e/framework/service): "every endpoint answers", "this one pod
//! answers", "the request fails", "REFUSED", ClientIP affinity's 15
//! same-pod answers in a row. Each returns an error saying what was seen.

use std::collections::BTreeSet;
use std::io;
use std::net::{SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};

use super::env::{Client, Env, Proto, tally};
use crate::cluster::Whoami;

/// Upstream's AffinityConfirmCount.
pub const AFFINITY_CONFIRM: usize = 15;
/// How long affinity may take to show (upstream AffinityTimeout: 2 min).
const AFFINITY_WITHIN: Duration = Duration::from_secs(30);

fn short(errors: &[String]) -> String {
    let shown: Vec<&str> = errors.iter().take(3).map(String::as_str).collect();
    format!("{} error(s), e.g. {shown:?}", errors.len())
}

/// Requests that may fail before a check gives up (upstream tolerates the
/// odd flake; more than this is the proxy, not the network).
const TOLERATED_ERRORS: usize = 5;

/// verifyServeHostnameServiceUp (and the lab's stricter reading of
/// CheckServiceReachability): requests until every one of `expected` has
/// answered (at most 20 per endpoint); an answer from anyone else fails at
/// once.
pub fn all_answer(
    env: &Env<'_>,
    from: Client,
    proto: Proto,
    target: impl Into<SocketAddr>,
    expected: &[String],
) -> Result<()> {
    let target: SocketAddr = target.into();
    let want: BTreeSet<&str> = expected.iter().map(String::as_str).collect();
    let mut got = Vec::new();
    let mut errors = Vec::new();
    let budget = 20 * expected.len().max(1);
    let batch = 8;
    while got.len() + errors.len() < budget && errors.len() <= TOLERATED_ERRORS {
        for r in env.requests(from, proto, target, batch, 0) {
            match r {
                Ok(w) => {
                    if !want.contains(w.backend.as_str()) {
                        bail!(
                            "{from:?} -> {} {target}: answered by {} (expected only {want:?})",
                            proto.name(),
                            w.backend
                        );
                    }
                    got.push(w.backend);
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        let seen: BTreeSet<&str> = got.iter().map(String::as_str).collect();
        if seen == want {
            return Ok(());
        }
    }
    bail!(
        "{from:?} -> {} {target}: wanted answers from {want:?}, got {:?}; {}",
        proto.name(),
        tally(&got),
        short(&errors)
    )
}

/// CheckServiceReachability as upstream: the Service answers, from one of
/// `expected` (with ClientIP affinity, one pod answers everything).
pub fn reachable(
    env: &Env<'_>,
    from: Client,
    proto: Proto,
    target: SocketAddrV4,
    expected: &[String],
) -> Result<()> {
    let w = env.whoami(from, proto, target).map_err(|e| {
        anyhow::anyhow!(
            "{from:?} -> {} {target}: {e} (expected an answer)",
            proto.name()
        )
    })?;
    ensure!(
        expected.contains(&w.backend),
        "{from:?} -> {} {target}: answered by {} (expected one of {expected:?})",
        proto.name(),
        w.backend
    );
    Ok(())
}

/// execHostnameTest: one request, answered by `expected`.
pub fn answers(
    env: &Env<'_>,
    from: Client,
    proto: Proto,
    target: SocketAddrV4,
    expected: &str,
) -> Result<Whoami> {
    match env.whoami(from, proto, target) {
        Ok(w) if w.backend == expected => Ok(w),
        Ok(w) => bail!(
            "{from:?} -> {} {target}: answered by {} (expected {expected})",
            proto.name(),
            w.backend
        ),
        Err(e) => bail!(
            "{from:?} -> {} {target}: {e} (expected {expected})",
            proto.name()
        ),
    }
}

/// "expected error when trying to connect": the request must fail; returns
/// how.
pub fn fails(
    env: &Env<'_>,
    from: Client,
    proto: Proto,
    target: SocketAddrV4,
) -> Result<io::ErrorKind> {
    match env.whoami(from, proto, target) {
        Ok(w) => bail!(
            "{from:?} -> {} {target}: answered by {} (expected no answer)",
            proto.name(),
            w.backend
        ),
        Err(e) => Ok(e.kind()),
    }
}

/// "should be rejected": `agnhost connect --timeout=3s` reports REFUSED
/// (upstream polls for up to KubeProxyEndpointLagTimeout, 30 s).
pub fn refused(env: &Env<'_>, from: Client, target: SocketAddrV4) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let kind = fails(env, from, Proto::Tcp, target)?;
        if kind == io::ErrorKind::ConnectionRefused {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{from:?} -> {target}: {kind:?}, not REFUSED, for 30 s");
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The source the endpoint saw is the client's own address.
pub fn source_preserved(w: &Whoami) -> Result<()> {
    ensure!(
        w.client_ip_preserved(),
        "the endpoint saw {} but the client is {}",
        w.seen_from.ip(),
        w.local.ip()
    );
    Ok(())
}

/// checkAffinity: requests in rounds of 16 until the last 15 answers came
/// from one pod (`should_hold`) or did not (`!should_hold`).
pub fn affinity(
    env: &Env<'_>,
    from: Client,
    proto: Proto,
    target: SocketAddrV4,
    should_hold: bool,
) -> Result<()> {
    let deadline = Instant::now() + AFFINITY_WITHIN;
    let mut trace: Vec<String> = Vec::new();
    let mut errors = Vec::new();
    loop {
        for r in env.requests(from, proto, target, AFFINITY_CONFIRM + 1, 0) {
            match r {
                Ok(w) => trace.push(w.backend),
                Err(e) => errors.push(e.to_string()),
            }
        }
        if trace.len() >= AFFINITY_CONFIRM {
            let last = &trace[trace.len() - AFFINITY_CONFIRM..];
            let holds = last.iter().all(|h| *h == last[AFFINITY_CONFIRM - 1]);
            if holds == should_hold {
                return Ok(());
            }
        }
        // Upstream waits 30 s between rounds; a short pause keeps the
        // client's ports out of TIME_WAIT exhaustion.
        std::thread::sleep(Duration::from_millis(200));
        if Instant::now() >= deadline {
            bail!(
                "{from:?} -> {} {target}: affinity should {}hold; last answers {:?}; {}",
                proto.name(),
                if should_hold { "" } else { "not " },
                &trace[trace.len().saturating_sub(AFFINITY_CONFIRM)..],
                short(&errors)
            );
        }
    }
}
