//! The command line: start-up failures name their cause, `check` redacts.

mod support;

use support::*;

#[test]
fn missing_token_fails_the_start_clearly() {
    let (code, _, err) = run_cli(&["serve"], &[]);
    assert_eq!(code, Some(78));
    assert!(err.contains("TASKGATE_UPSTREAM_TOKEN"), "{err}");
}

#[test]
fn empty_token_file_fails_the_start() {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), "  \n").unwrap();
    let path = f.path().to_str().unwrap();
    let (code, _, err) = run_cli(&["serve"], &[("TASKGATE_UPSTREAM_TOKEN_FILE", path)]);
    assert_eq!(code, Some(78));
    assert!(err.contains("empty"), "{err}");
}

#[test]
fn unknown_config_key_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "[upstream]\ntimeout_msec = 5\n").unwrap();
    let (code, _, err) = run_cli(
        &["check", "--config", cfg.to_str().unwrap()],
        &[("TASKGATE_UPSTREAM_TOKEN", TOKEN)],
    );
    assert_eq!(code, Some(78));
    assert!(err.contains("timeout_msec"), "{err}");
}

#[test]
fn check_prints_the_effective_config_without_the_token() {
    let (code, out, err) = run_cli(
        &[
            "check",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/taskgate.toml"),
        ],
        &[("TASKGATE_UPSTREAM_TOKEN", TOKEN)],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("listen = \"127.0.0.1:8080\""), "{out}");
    assert!(out.contains("redacted"));
    assert!(!out.contains(TOKEN) && !err.contains(TOKEN));
}
