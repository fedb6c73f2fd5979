//! Bad `run` flags are refused before anything is loaded or attached
//! (issue 17, item 12): a zero (or unbounded) timer period used to panic the
//! agent after its programs were attached and its maps pinned. Each bad
//! value must end the agent at once with one clear error naming the flag,
//! no panic, and nothing pinned.
//!
//! The agent runs in a lab's node namespace, so even a regression that
//! attaches first only touches the lab's interfaces. Needs root and the
//! agent binary; fails loudly without them.

use std::ffi::OsString;
use std::time::{Duration, Instant};

use lab::Lab;

#[test]
fn bad_flag_values_fail_before_anything_is_loaded() {
    let lab = Lab::new().expect("lab setup (needs root)");
    lab.write_manifest("demo.yaml", &lab::yaml::demo(&[0]))
        .unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["--poll-interval-ms", "0"], "--poll-interval-ms"),
        (&["--resync-interval-s", "0"], "--resync-interval-s"),
        (
            &["--conntrack-gc-interval", "0s"],
            "--conntrack-gc-interval",
        ),
        // Too long for a timer: its deadline would overflow.
        (
            &["--resync-interval-s", "18446744073709551615"],
            "--resync-interval-s",
        ),
        (
            &["--conntrack-gc-interval", "9999999h"],
            "--conntrack-gc-interval",
        ),
        (
            &["--metrics-bind-address", "0.0.0.0:10256"],
            "--healthz-bind-address",
        ),
        (
            &["--healthz-bind-address", "node:10256"],
            "--healthz-bind-address",
        ),
    ];
    for (flags, named) in cases {
        let mut args: Vec<OsString> = vec!["--manifests".into(), lab.manifest_dir().into()];
        args.extend(flags.iter().map(OsString::from));
        let agent = lab.start_agent_args(&args).expect("spawn the agent");
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = agent.exit_status().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "{flags:?}: the agent is still running:\n{}",
                agent.log_tail(20)
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        // Let the output readers catch up with the exited process.
        std::thread::sleep(Duration::from_millis(100));
        let out = agent.logs();
        // clap's usage error: 2 (a panic would be 101).
        assert_eq!(status.code(), Some(2), "{flags:?}: {status}\n{out}");
        let errors: Vec<&str> = out.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "{flags:?}: one error line:\n{out}");
        assert!(
            errors[0].contains(named),
            "{flags:?}: names {named}:\n{out}"
        );
        assert!(!out.contains("panicked"), "{flags:?}:\n{out}");
        assert!(
            !lab.bpffs_dir().exists(),
            "{flags:?}: the agent pinned {} before failing:\n{out}",
            lab.bpffs_dir().display()
        );
    }
}
