//! Kubernetes' own Service e2e cases (test/e2e/network) whose outcome
//! depends on the service proxy, each named as upstream prints it and run
//! against the real agents on the two-node lab ([`env::Env`]). A row passes
//! only on traffic outcomes; a row the project cannot run says why.
//!
//! Every row gets a fresh cluster, so one failure never leaks into the
//! next. Upstream's waits are shortened where the lab makes them
//! pointless (the agents program a change in milliseconds and report it,
//! so rows wait for that instead of polling for minutes) and affinity
//! timeouts are a few seconds instead of 125 s; each shortening is noted
//! at the row.

mod cases;
pub mod check;
pub mod env;
pub(crate) mod invalid;

use std::fmt::Write;
use std::time::Instant;

use anyhow::Result;

use crate::cgroup::TestCgroup;
use crate::cluster::Cluster;
pub use env::{Client, Env, Options, Proto};

/// What a row does.
pub enum Kind {
    Run(fn(&Env<'_>) -> Result<()>),
    /// The project cannot run this case yet: why.
    Unsupported(&'static str),
}

/// One upstream case.
pub struct Case {
    /// The name as upstream prints it, Describe prefix included.
    pub name: &'static str,
    pub kind: Kind,
    /// Set while the row waits for a fix that is not merged yet: the row
    /// still runs in full and shows its result, but a failure does not
    /// fail the suite. Remove the mark when the fix lands.
    pub pending: Option<&'static str>,
}

impl Case {
    pub const fn run(name: &'static str, f: fn(&Env<'_>) -> Result<()>) -> Case {
        Case {
            name,
            kind: Kind::Run(f),
            pending: None,
        }
    }

    pub const fn unsupported(name: &'static str, why: &'static str) -> Case {
        Case {
            name,
            kind: Kind::Unsupported(why),
            pending: None,
        }
    }

    pub const fn pending(mut self, fix: &'static str) -> Case {
        self.pending = Some(fix);
        self
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Fail(String),
    Unsupported(String),
}

#[derive(Debug, Clone)]
pub struct RowResult {
    pub name: String,
    pub outcome: Outcome,
    pub seconds: f64,
    pub pending: Option<String>,
    /// The agents' last lines when the row failed (printed, not tabled).
    pub detail: String,
}

impl RowResult {
    /// A supported row that failed and is not waiting for a fix.
    pub fn fails_suite(&self) -> bool {
        matches!(self.outcome, Outcome::Fail(_)) && self.pending.is_none()
    }

    /// The table's result cell.
    pub fn result_text(&self) -> String {
        let pending = self
            .pending
            .as_deref()
            .map(|p| format!(" (pending: {p})"))
            .unwrap_or_default();
        match &self.outcome {
            Outcome::Pass => format!("pass{pending}"),
            Outcome::Fail(why) => format!("FAIL: {}{pending}", one_line(why)),
            Outcome::Unsupported(why) => format!("unsupported: {why}"),
        }
    }
}

fn one_line(text: &str) -> String {
    let t: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    // Keeps the table readable; the full text is printed as the row runs.
    if t.chars().count() > 300 {
        format!("{}…", t.chars().take(300).collect::<String>())
    } else {
        t
    }
}

/// Every row, in upstream file order.
pub fn all_cases() -> Vec<Case> {
    cases::all()
}

/// Runs one case in a fresh cluster.
pub fn run_case(case: &Case, opts: &Options) -> RowResult {
    let started = Instant::now();
    let mut detail = String::new();
    let outcome = match &case.kind {
        Kind::Unsupported(why) => Outcome::Unsupported(why.to_string()),
        Kind::Run(f) => match in_fresh_cluster(*f, opts, &mut detail) {
            Ok(()) => Outcome::Pass,
            Err(e) => Outcome::Fail(format!("{e:#}")),
        },
    };
    RowResult {
        name: case.name.to_string(),
        outcome,
        seconds: started.elapsed().as_secs_f64(),
        pending: case.pending.map(str::to_string),
        detail,
    }
}

fn in_fresh_cluster(
    f: fn(&Env<'_>) -> Result<()>,
    opts: &Options,
    detail: &mut String,
) -> Result<()> {
    let cluster = Cluster::with_config(Env::cluster_config())?;
    let cgroups = [TestCgroup::new()?, TestCgroup::new()?];
    let env = Env::start(&cluster, &cgroups, opts.clone())?;
    let result = f(&env);
    if result.is_err() {
        *detail = env.agent_tails();
    }
    result
}

/// The results as a Markdown table: `upstream name | result | seconds`.
pub fn markdown(results: &[RowResult]) -> String {
    let mut s = String::from("| upstream name | result | seconds |\n|---|---|---|\n");
    for r in results {
        let _ = writeln!(
            s,
            "| {} | {} | {:.1} |",
            r.name.replace('|', "\\|"),
            r.result_text().replace('|', "\\|"),
            r.seconds
        );
    }
    s
}

/// `N passed, N failed, N skipped`-style counts: passed, failed (suite),
/// failed (pending a fix), unsupported.
pub fn counts(results: &[RowResult]) -> (usize, usize, usize, usize) {
    let mut c = (0, 0, 0, 0);
    for r in results {
        match (&r.outcome, r.pending.is_some()) {
            (Outcome::Pass, _) => c.0 += 1,
            (Outcome::Fail(_), false) => c.1 += 1,
            (Outcome::Fail(_), true) => c.2 += 1,
            (Outcome::Unsupported(_), _) => c.3 += 1,
        }
    }
    c
}
