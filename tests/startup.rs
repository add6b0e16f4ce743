//! Signals at any moment of start-up (DESIGN.md "Operating it"): the
//! handlers are the first thing `main` sets up, so a SIGHUP or SIGTERM sent
//! right after spawn is handled (a reload once started; a clean exit 0),
//! never the default action. A test binary of its own, so no other test's
//! gateways compete for the CPU while it times signals against process start.

mod support;

use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use support::process::{Proc, STARTUP_CONFIG, STEP, describe, silent_upstream, spawn_serve};

/// Signal delays after spawn, in ms, and trials per delay. The handlers are
/// the first thing `main` does, but `main` itself starts ~0.95 ms after exec
/// for any Rust binary on the 2-core CI machine (measured: a hello-world's
/// `main` at 0.92-1.05 ms after spawn returns; a C program's at ~0.63 ms):
/// a signal sent 1 ms after spawn (plus the ~0.3 ms `kill` takes to start)
/// races the runtime's own start, which no code of ours can act before, and
/// lost 1-5 of 10 trials. From 2 ms on it lost none in 1,000 on an idle
/// machine.
const SIGNAL_DELAYS_MS: std::ops::RangeInclusive<u64> = 2..=10;
const TRIALS_PER_DELAY: usize = 10;
/// On a loaded CI machine the child is now and then not scheduled for
/// several ms after spawn (once in 90 trials at 4 ms: it died of the signal,
/// its handlers not yet installed). Such a trial tested the loader, not us.
/// The handler mask, `SigCgt`, is read just before `kill` is started: a
/// trial that went wrong while the mask showed no handler yet is run again.
/// One that went wrong with the handler in place is a failure. A stall is
/// chance: on the 2-core machine under four busy loops, ten runs of this
/// binary needed at most 21 re-runs at one delay (2 ms), most none past
/// 4 ms. A gateway that installed its handlers after a delay fails every
/// trial at it that way, so more than this many re-runs at one delay fail
/// the test (the bound keeps such a run short, not the test lenient).
const MAX_RERUNS_PER_DELAY: usize = 5 * TRIALS_PER_DELAY;
/// The whole start-up test, in a debug build on a busy 2-core machine.
const STARTUP_BUDGET: Duration = Duration::from_secs(90);

const SIGHUP: u32 = 1;
const SIGTERM: u32 = 15;

/// The two tests time signals against process start: one at a time.
static STARTUP_TRIALS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// How one trial went.
enum Trial {
    Passed,
    /// It went wrong, but the process had no handler yet for the signal when
    /// `kill` was started: it had not reached `main`'s first statement.
    NotYetInMain,
    Failed(String),
}

/// Sleeps `k` ms after spawn and sends `sig`; true when `p` caught signal
/// number `signo` already as `kill` was started.
fn signal_at(p: &Proc, k: u64, sig: &str, signo: u32) -> bool {
    std::thread::sleep(Duration::from_millis(k));
    let caught = p.catches(signo);
    p.signal(sig);
    caught
}

/// A failed trial, unless the process was signalled before it could act.
fn failed(caught: bool, why: String) -> Trial {
    if caught {
        Trial::Failed(why)
    } else {
        Trial::NotYetInMain
    }
}

/// Runs `trial(k)` for every delay `TRIALS_PER_DELAY` times, within the
/// budget (re-running a trial signalled before `main`, at most
/// `MAX_RERUNS_PER_DELAY` times a delay), and fails listing the trials that went wrong.
fn every_delay(trial: impl Fn(u64) -> Trial) {
    let _one_at_a_time = STARTUP_TRIALS.lock().unwrap_or_else(|p| p.into_inner());
    let started = Instant::now();
    let mut failures = Vec::new();
    let mut reruns = Vec::new();
    let mut runs = 0;
    for k in SIGNAL_DELAYS_MS {
        for rep in 0..TRIALS_PER_DELAY {
            loop {
                assert!(
                    started.elapsed() < STARTUP_BUDGET,
                    "over the {STARTUP_BUDGET:?} budget after {runs} trials; failures so far: {failures:?}"
                );
                runs += 1;
                match trial(k) {
                    Trial::Passed => break,
                    Trial::Failed(e) => {
                        failures.push((k, format!("k={k}ms rep {rep}: {e}")));
                        break;
                    }
                    Trial::NotYetInMain => {
                        reruns.push(k);
                        let at_k = reruns.iter().filter(|&&d| d == k).count();
                        assert!(
                            at_k <= MAX_RERUNS_PER_DELAY,
                            "{at_k} trials at {k} ms went wrong with no handler installed yet \
                             at the signal's moment: installed too late"
                        );
                    }
                }
            }
        }
    }
    if !reruns.is_empty() {
        eprintln!("re-run as signalled before main, at delays in ms: {reruns:?}");
    }
    let per_delay: Vec<String> = SIGNAL_DELAYS_MS
        .map(|k| {
            let n = failures.iter().filter(|(d, _)| *d == k).count();
            format!("{k}ms: {n}/{TRIALS_PER_DELAY}")
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {runs} trials failed (per delay: {}; re-run as signalled before main: {reruns:?}); \
         first ones:\n{}",
        failures.len(),
        per_delay.join(", "),
        failures
            .iter()
            .take(5)
            .map(|(_, f)| f.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn sigterm_at_any_moment_of_startup_exits_0() {
    let (_vendor, upstream) = silent_upstream();
    every_delay(|k| {
        let mut p = spawn_serve(STARTUP_CONFIG, &upstream);
        let caught = signal_at(&p, k, "TERM", SIGTERM);
        let status = p.wait_exit(STEP);
        if status.signal().is_none() && status.code() == Some(0) {
            Trial::Passed
        } else {
            let err = p.stderr_text();
            failed(caught, format!("{}; stderr: {err}", describe(status)))
        }
    });
}

#[test]
fn sighup_during_startup_does_not_kill_and_sigterm_then_exits_0() {
    let (_vendor, upstream) = silent_upstream();
    every_delay(|k| {
        let mut p = spawn_serve(STARTUP_CONFIG, &upstream);
        let caught = signal_at(&p, k, "HUP", SIGHUP);
        if !p.wait_ready(STEP) {
            let status = p.wait_exit(STEP);
            let err = p.stderr_text();
            return failed(
                caught,
                format!(
                    "SIGHUP ended it before ready: {}; stderr: {err}",
                    describe(status)
                ),
            );
        }
        p.signal("TERM");
        let status = p.wait_exit(STEP);
        if status.signal().is_none() && status.code() == Some(0) {
            Trial::Passed
        } else {
            let err = p.stderr_text();
            Trial::Failed(format!(
                "ready, then SIGTERM: {}; stderr: {err}",
                describe(status)
            ))
        }
    });
}
