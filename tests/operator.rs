//! What operators plug in, each checked by the real tool against the real
//! binary:
//!
//! - `openapi/taskgate.yaml`: schemathesis against a gateway in front of the
//!   emulator (every answer conforms, no 5xx, undocumented methods get 405,
//!   and the body schema agrees with the validator, in both directions, on
//!   everything sent — see `tests/contract/`); a boundary corpus of literal
//!   bodies; the example body is the vendor page's and passes; the reasons
//!   are DESIGN.md's and the code's.
//! - `deploy/prometheus/`: `promtool check rules`, `promtool test rules`,
//!   `promtool check config`; every alert has a runbook and a test that fires
//!   and clears it; a real Prometheus scrapes a real taskgate, evaluates
//!   every rule and every dashboard query, and `promtool check metrics` lints
//!   the exposition.
//! - `deploy/grafana/taskgate.json`: every metric name (and label) its
//!   queries and the rules use exists in a running taskgate's `/metrics`.
//!
//! The tools (`schemathesis`, `promtool`, `prometheus`) are installed by
//! `.ci/run`. Without them a test says so and passes, except under CI
//! (`CI` set), where a missing tool fails it.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde_json::Value;
use serde_yaml::Value as Yaml;
use support::*;

const OPENAPI: &str = "openapi/taskgate.yaml";
const ALERTS: &str = "deploy/prometheus/alerts.yaml";
const ALERT_TESTS: &str = "deploy/prometheus/alerts.test.yaml";
const PROMETHEUS_EXAMPLE: &str = "deploy/prometheus/prometheus.example.yaml";
const RUNBOOKS: &str = "deploy/prometheus/README.md";
const DASHBOARD: &str = "deploy/grafana/taskgate.json";
const TASK_ROUTE: &str = "/agent-api/user/{user_id}/task/{task_id}";
/// The caller key of the caller-control contract run, and its SHA-256.
const CALLER_KEY: &str = "contract-key";
const CALLER_KEY_SHA256: &str = "a68e57a052aa22758f75bd93aa57dbaea91ac1f01c932e25ac7c6e9d1dd5c46f";

/// Reasons taskgate has beyond DESIGN.md's table (README.md lists them).
const REASONS_BEYOND_DESIGN: [(&str, u16); 3] = [
    ("invalid_framing", 400),
    ("request_timeout", 408),
    ("internal_error", 500),
];

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

fn yaml(rel: &str) -> Yaml {
    serde_yaml::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel} is not YAML: {e}"))
}

/// The product contract and the vendor's page, as the tests were written
/// against them: copies under `tests/fixtures/shared/` (a checkout alone must
/// pass). Where the project's `shared/` sits beside the repository (the
/// developers' layout), the copy must still equal it, so a changed contract
/// is noticed here first.
fn shared(rel: &str) -> String {
    let fixture = repo("tests/fixtures/shared").join(rel);
    let text = std::fs::read_to_string(&fixture)
        .unwrap_or_else(|e| panic!("read {}: {e}", fixture.display()));
    if let Ok(source) = std::fs::read_to_string(repo("../shared").join(rel)) {
        assert!(
            source == text,
            "{} differs from ../shared/{rel}: copy the new version in and review what changed",
            fixture.display()
        );
    }
    text
}

/// A tool on PATH. Missing: a failure under CI, a loud skip elsewhere.
fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{name} is not installed; .ci/run installs it (apt-get install prometheus, pip install schemathesis)"
        );
        eprintln!("SKIPPED: {name} is not on PATH; .ci/run installs it");
    }
    found
}

/// Runs a command to completion within `limit`; returns (exit code, stdout + stderr).
async fn run(mut cmd: tokio::process::Command, limit: Duration) -> (Option<i32>, String) {
    let shown = format!("{:?}", cmd.as_std());
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {shown}: {e}"));
    let out = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{shown} did not finish within {limit:?}"))
        .unwrap_or_else(|e| panic!("{shown}: {e}"));
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code(), text)
}

fn get<'a>(v: &'a Yaml, path: &[&str]) -> &'a Yaml {
    path.iter().fold(v, |v, k| &v[*k])
}

/// Follows a local `$ref` ("#/components/...") once.
fn deref<'a>(doc: &'a Yaml, v: &'a Yaml) -> &'a Yaml {
    match v["$ref"].as_str() {
        Some(r) => {
            let path: Vec<&str> = r.trim_start_matches("#/").split('/').collect();
            get(doc, &path)
        }
        None => v,
    }
}

fn to_json(v: &Yaml) -> Value {
    serde_json::to_value(v).expect("YAML value converts to JSON")
}

/// The top-level keys of a JSON object text, in the order they are written.
fn key_order(json_text: &str) -> Vec<String> {
    let v: serde_json::Map<String, Value> = serde_json::from_str(json_text).expect("an object");
    let mut keys: Vec<(usize, String)> = v
        .keys()
        .map(|k| {
            let at = json_text
                .find(&format!("\"{k}\""))
                .expect("key is in the text");
            (at, k.clone())
        })
        .collect();
    keys.sort();
    keys.into_iter().map(|(_, k)| k).collect()
}

// ---------------------------------------------------------------------------
// The OpenAPI document.

#[tokio::test]
async fn openapi_example_is_the_vendor_pages_and_passes_the_gateway() {
    let doc = yaml(OPENAPI);
    let op = get(&doc, &["paths", TASK_ROUTE, "put"]);
    let example = get(
        op,
        &["requestBody", "content", "application/json", "example"],
    );
    assert!(example.is_mapping(), "the request body has an example");

    // The vendor's original page (its curl's -d '...'), the English copy, and
    // the harness's constant: one body, and the document's keys in its order.
    let zh = shared("vendor/task-update-api.zh.txt");
    let curl = zh.find("-d '").expect("the vendor page's curl has -d '") + 4;
    let zh_body = &zh[curl..curl + zh[curl..].find('\'').expect("closing quote")];
    let en = shared("vendor/VENDOR_API.md");
    let at = en
        .find("Example request body (from the vendor page):")
        .expect("VENDOR_API.md has the example");
    let start = at + en[at..].find("```json").expect("a json block") + "```json".len();
    let en_body = &en[start..start + en[start..].find("```").expect("block end")];
    let documented = to_json(example);
    for (source, text) in [
        ("the vendor page (task-update-api.zh.txt)", zh_body),
        ("VENDOR_API.md", en_body),
        ("support::EXAMPLE_BODY", EXAMPLE_BODY),
    ] {
        let value: Value = serde_json::from_str(text)
            .unwrap_or_else(|e| panic!("{source}'s example is not JSON: {e}"));
        assert_eq!(
            documented, value,
            "the document's example differs from {source}'s"
        );
        let documented_order: Vec<String> = example
            .as_mapping()
            .unwrap()
            .keys()
            .map(|k| k.as_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            documented_order,
            key_order(text),
            "key order differs from {source}'s"
        );
    }

    // The success example is the vendor page's answer, and the emulator's.
    let updated = deref(&doc, &op["responses"]["200"]);
    let answer = to_json(get(
        updated,
        &["content", "application/json", "examples", "vendor", "value"],
    ));
    let at = zh
        .find("返回示例")
        .expect("the vendor page's answer example");
    let open = at + zh[at..].find('{').unwrap();
    let close = open + zh[open..].find('}').unwrap() + 1;
    let vendor_answer: Value = serde_json::from_str(&zh[open..close]).unwrap();
    assert_eq!(answer, vendor_answer);
    assert_eq!(answer, serde_json::from_str::<Value>(SUCCESS_BODY).unwrap());

    // And through the gateway, as written in the document (key order kept).
    let v = vendor().await;
    let gw = Gateway::start(&v.url()).await;
    let body = serde_json::to_string(example).unwrap();
    let resp = put(&gw, example_path(), &body).await;
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
    assert_eq!(resp.text(), SUCCESS_BODY);
    for h in ["x-request-id", "ratelimit-limit", "ratelimit-remaining"] {
        assert!(resp.headers.contains_key(h), "200 without {h}");
    }
    let forwarded = v.updates();
    assert_eq!(forwarded.len(), 1);
    assert_eq!(
        forwarded[0].body,
        body.as_bytes(),
        "the bytes forwarded unchanged"
    );
}

/// `data.reason` enum per documented status.
fn documented_reasons(doc: &Yaml) -> BTreeMap<String, u16> {
    let responses = get(doc, &["paths", TASK_ROUTE, "put", "responses"]);
    let mut reasons = BTreeMap::new();
    for (code, resp) in responses.as_mapping().expect("responses") {
        let code = code.as_str().expect("status keys are strings");
        if code == "200" || code == "default" {
            continue;
        }
        let status: u16 = code.parse().expect("a status");
        let schema = get(deref(doc, resp), &["content", "application/json", "schema"]);
        let own = &schema["allOf"][1]["properties"];
        assert_eq!(
            own["code"]["const"].as_u64(),
            Some(u64::from(status)),
            "{code}: code const"
        );
        let listed = own["data"]["properties"]["reason"]["enum"]
            .as_sequence()
            .unwrap_or_else(|| panic!("{code} lists its reasons"));
        for r in listed {
            let r = r.as_str().unwrap().to_owned();
            assert!(
                reasons.insert(r.clone(), status).is_none(),
                "{r} is listed under two statuses"
            );
        }
    }
    reasons
}

#[test]
fn openapi_reasons_are_designs_and_the_codes() {
    let doc = yaml(OPENAPI);
    let documented = documented_reasons(&doc);

    // DESIGN.md's table: | reason | status | when |
    let design_text = shared("DESIGN.md");
    let table = &design_text[design_text
        .find("`data.reason` is one of:")
        .expect("DESIGN.md's reasons table")..];
    let mut design = BTreeMap::new();
    for line in table.lines().skip_while(|l| !l.starts_with('|')) {
        if !line.starts_with('|') {
            break;
        }
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if let (Some(reason), Some(Ok(status))) =
            (cells.get(1), cells.get(2).map(|s| s.parse::<u16>()))
        {
            design.insert(reason.to_string(), status);
        }
    }
    assert!(design.len() >= 18, "parsed DESIGN.md's table: {design:?}");
    for (reason, status) in &design {
        assert_eq!(
            documented.get(reason),
            Some(status),
            "DESIGN.md's {reason} ({status}) is not documented under {status}"
        );
    }

    // Every reason the code can answer (client_closed is never seen: the
    // caller is gone), read from src/error.rs's `reason()`.
    let error_rs = read("src/error.rs");
    let body = &error_rs[error_rs.find("pub fn reason(&self)").expect("fn reason")..];
    let body = &body[..body.find("\n    }\n").expect("end of fn reason")];
    let coded: BTreeSet<String> = body
        .split("=> \"")
        .skip(1)
        .map(|s| s[..s.find('"').unwrap()].to_owned())
        .filter(|r| r != "client_closed")
        .collect();
    assert!(coded.len() >= 18, "parsed src/error.rs: {coded:?}");
    for reason in &coded {
        assert!(
            documented.contains_key(reason),
            "src/error.rs answers {reason}, which openapi/taskgate.yaml does not list"
        );
    }
    let beyond: BTreeMap<String, u16> = REASONS_BEYOND_DESIGN
        .iter()
        .map(|(r, s)| (r.to_string(), *s))
        .collect();
    for (reason, status) in &documented {
        assert!(
            design.get(reason) == Some(status) || beyond.get(reason) == Some(status),
            "the document lists {reason} ({status}), which neither DESIGN.md nor the known extras have"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_contract() {
    let (Some(schemathesis), Some(python)) = (tool("schemathesis"), tool("python3")) else {
        return;
    };
    let started = Instant::now();
    let v = vendor().await;
    v.set_recording(false);
    // Limits far above what the run sends, so no 429 comes by chance (429 is
    // documented and would conform, but the run stays the same every time).
    let gw = Gateway::builder(&v.url())
        .toml("[rate_limit]\nper_second = 1000000\nburst = 1000000\n[audit]\nfsync = \"never\"\n")
        .start()
        .await;
    let work = tempfile::tempdir().unwrap();
    let doc = repo(OPENAPI);
    let seed = std::env::var("TASKGATE_CONTRACT_SEED").unwrap_or_else(|_| "1".into());
    let contract = repo("tests/contract");
    let schemathesis_run = |url: String, tag: &str, checks: &str, examples: &str| {
        let mut cmd = tokio::process::Command::new(&schemathesis);
        cmd.current_dir(work.path())
            .env("PYTHONPATH", &contract)
            .env("SCHEMATHESIS_HOOKS", "taskgate_checks")
            .env("TASKGATE_OPENAPI", &doc)
            .env("NO_COLOR", "1")
            .arg("run")
            .arg(&doc)
            .args(["--url", &url, "--include-tag", tag, "--checks", checks])
            .args(["--max-examples", examples, "--seed", &seed])
            .args(["--generation-database", "none", "--request-timeout", "10"])
            .arg("--no-color");
        cmd
    };

    // The data API: stock conformance checks, undocumented methods, and
    // tests/contract/taskgate_checks.py's schema-equals-validator check.
    let (code, out) = run(
        schemathesis_run(
            format!("http://{}", gw.addr),
            "task-update",
            "not_a_server_error,status_code_conformance,content_type_conformance,\
             response_headers_conformance,response_schema_conformance,\
             unsupported_method,allow_header_conformance,body_verdict_matches_schema,\
             dry_run_answer_matches_schema",
            "60",
        ),
        Duration::from_secs(90),
    )
    .await;
    println!("{out}");
    assert_eq!(code, Some(0), "schemathesis (task-update) failed:\n{out}");

    let (code, out) = run(
        schemathesis_run(
            format!("http://{}", gw.admin),
            "admin",
            "not_a_server_error,status_code_conformance,content_type_conformance,\
             response_headers_conformance,response_schema_conformance",
            "10",
        ),
        Duration::from_secs(60),
    )
    .await;
    println!("{out}");
    assert_eq!(code, Some(0), "schemathesis (admin) failed:\n{out}");

    // Each rule's edges as literal bytes: what the generators may not reach.
    let mut cmd = tokio::process::Command::new(&python);
    cmd.current_dir(work.path())
        .env("PYTHONPATH", &contract)
        .env("TASKGATE_OPENAPI", &doc)
        .arg(contract.join("boundaries.py"))
        .arg(format!("http://{}", gw.addr));
    let (code, out) = run(cmd, Duration::from_secs(60)).await;
    println!("{out}");
    assert_eq!(code, Some(0), "boundary corpus disagrees:\n{out}");

    // The gateway itself stayed healthy throughout.
    assert_eq!(gw.admin_get("/readyz").await.status, StatusCode::OK);
    gw.assert_token_never_logged();

    // Caller control: a gateway with one caller, who may act for the example
    // user only. Without a key every update is 401 (with WWW-Authenticate);
    // with it, other users are 403 and the example user's updates go through.
    let guarded = Gateway::builder(&v.url())
        .toml(&format!(
            "[rate_limit]\nper_second = 1000000\nburst = 1000000\n[audit]\nfsync = \"never\"\n\
             [[access.callers]]\nname = \"contract\"\nkey_sha256 = \"{CALLER_KEY_SHA256}\"\n\
             users = [\"{EXAMPLE_USER}\"]\n"
        ))
        .start()
        .await;
    let stock = "not_a_server_error,status_code_conformance,content_type_conformance,\
                 response_headers_conformance,response_schema_conformance";
    for key in [None, Some(CALLER_KEY)] {
        let mut cmd = schemathesis_run(
            format!("http://{}", guarded.addr),
            "task-update",
            stock,
            "15",
        );
        if let Some(key) = key {
            cmd.args(["--header", &format!("Authorization: Bearer {key}")]);
        }
        let (code, out) = run(cmd, Duration::from_secs(60)).await;
        println!("{out}");
        assert_eq!(
            code,
            Some(0),
            "schemathesis (caller control, key {key:?}) failed:\n{out}"
        );
    }
    let statuses: BTreeSet<u64> = guarded
        .access_log()
        .iter()
        .filter_map(|l| l["status"].as_u64())
        .collect();
    for want in [401, 403, 200] {
        assert!(
            statuses.contains(&want),
            "caller-control run saw no {want}: {statuses:?}"
        );
    }
    println!("contract test took {:?}", started.elapsed());
}

// ---------------------------------------------------------------------------
// Alert rules.

fn alerts(rules: &Yaml) -> Vec<&Yaml> {
    rules["groups"]
        .as_sequence()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_sequence().expect("rules").iter())
        .filter(|r| r["alert"].is_string())
        .collect()
}

fn minutes(d: &str) -> u64 {
    if let Some(m) = d.strip_suffix('m') {
        m.parse().expect("minutes")
    } else if let Some(h) = d.strip_suffix('h') {
        h.parse::<u64>().expect("hours") * 60
    } else {
        panic!("eval_time {d}: write it in m or h")
    }
}

/// GitHub's heading anchor for the simple headings used here.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == '-' || *c == '_' || *c == ' ')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

#[test]
fn every_alert_has_a_summary_a_runbook_and_a_test_that_fires_and_clears_it() {
    let rules = yaml(ALERTS);
    let alerts = alerts(&rules);
    assert!(alerts.len() >= 10, "alerts.yaml has its alerts");
    let runbooks = read(RUNBOOKS);
    let anchors: BTreeSet<String> = runbooks
        .lines()
        .filter_map(|l| l.strip_prefix("### "))
        .map(anchor)
        .collect();
    let names: BTreeSet<String> = alerts
        .iter()
        .map(|a| a["alert"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names.len(), alerts.len(), "alert names are unique");
    for a in &alerts {
        let name = a["alert"].as_str().unwrap();
        let summary = a["annotations"]["summary"].as_str().unwrap_or_default();
        assert!(!summary.is_empty(), "{name} has no summary");
        assert!(
            a["labels"]["severity"].is_string(),
            "{name} has no severity"
        );
        let runbook = a["annotations"]["runbook_url"].as_str().unwrap_or_default();
        let (file, frag) = runbook
            .split_once('#')
            .unwrap_or_else(|| panic!("{name}: runbook_url {runbook:?} has no anchor"));
        assert_eq!(file, RUNBOOKS, "{name}: runbook_url names another file");
        assert!(
            anchors.contains(frag),
            "{name}: {RUNBOOKS} has no heading for #{frag}"
        );
        assert_eq!(frag, anchor(name), "{name}: the anchor is not its own");
    }
    let runbook_names: BTreeSet<String> = anchors
        .iter()
        .filter(|a| a.starts_with("taskgate"))
        .cloned()
        .collect();
    let alert_anchors: BTreeSet<String> = names.iter().map(|n| anchor(n)).collect();
    assert_eq!(
        runbook_names, alert_anchors,
        "runbook headings and alerts differ"
    );

    // Each alert: a case where it fires and a later one where it is gone.
    let tests = yaml(ALERT_TESTS);
    let mut fired: BTreeMap<String, u64> = BTreeMap::new();
    let mut cleared: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for t in tests["tests"].as_sequence().expect("tests") {
        for case in t["alert_rule_test"].as_sequence().into_iter().flatten() {
            let name = case["alertname"].as_str().unwrap().to_owned();
            let at = minutes(case["eval_time"].as_str().unwrap());
            if case["exp_alerts"]
                .as_sequence()
                .is_some_and(|s| !s.is_empty())
            {
                let first = fired.entry(name).or_insert(at);
                *first = (*first).min(at);
            } else {
                cleared.entry(name).or_default().push(at);
            }
        }
    }
    for name in &names {
        let fires = fired
            .get(name)
            .unwrap_or_else(|| panic!("{ALERT_TESTS} never makes {name} fire"));
        assert!(
            cleared
                .get(name)
                .is_some_and(|c| c.iter().any(|t| t > fires)),
            "{ALERT_TESTS} never shows {name} cleared after it fired"
        );
    }
}

#[tokio::test]
async fn promtool_checks_and_tests_the_rules() {
    let Some(promtool) = tool("promtool") else {
        return;
    };
    let dir = repo("deploy/prometheus");
    for args in [
        vec!["check", "rules", "alerts.yaml"],
        vec!["test", "rules", "alerts.test.yaml"],
        vec!["check", "config", "prometheus.example.yaml"],
    ] {
        let mut cmd = tokio::process::Command::new(&promtool);
        cmd.current_dir(&dir).args(&args);
        let (code, out) = run(cmd, Duration::from_secs(60)).await;
        println!("promtool {}:\n{out}", args.join(" "));
        assert_eq!(code, Some(0), "promtool {} failed:\n{out}", args.join(" "));
        assert!(out.contains("SUCCESS"), "{out}");
    }
}

// ---------------------------------------------------------------------------
// Metric names: the exposition, the dashboard, the rules.

/// Series names the exposition can produce (from its `# TYPE` lines, so a
/// labelled family without a child yet counts too), and the label names seen
/// on each series name's samples.
struct Exposition {
    names: BTreeSet<String>,
    labels: BTreeMap<String, BTreeSet<String>>,
}

fn exposition(text: &str) -> Exposition {
    let mut names = BTreeSet::new();
    let mut labels: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            match kind {
                "counter" => {
                    names.insert(format!("{}_total", name.trim_end_matches("_total")));
                }
                "histogram" => {
                    for suffix in ["_bucket", "_sum", "_count"] {
                        names.insert(format!("{name}{suffix}"));
                    }
                }
                "summary" => {
                    for suffix in ["", "_sum", "_count"] {
                        names.insert(format!("{name}{suffix}"));
                    }
                }
                _ => {
                    names.insert(name.to_owned());
                }
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            let name = &line[..end];
            names.insert(name.to_owned());
            let set = labels.entry(name.to_owned()).or_default();
            if let Some(inner) = line[end..]
                .strip_prefix('{')
                .and_then(|s| s.split_once('}'))
            {
                for pair in inner.0.split(',').filter(|p| !p.is_empty()) {
                    set.insert(pair.split_once('=').expect("label=value").0.to_owned());
                }
            }
        }
    }
    Exposition { names, labels }
}

/// The PromQL expressions of the dashboard (panels, rows' panels, variables).
fn dashboard_exprs(dash: &Value) -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr" | "definition", Value::String(s)) => out.push(s.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(dash, &mut out);
    out
}

fn alert_exprs() -> Vec<String> {
    alerts(&yaml(ALERTS))
        .iter()
        .map(|a| a["expr"].as_str().expect("expr").to_owned())
        .collect()
}

/// `taskgate_*` selectors in an expression: (metric, label names matched).
fn selectors(expr: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("taskgate_") {
        let preceded = rest[..at]
            .chars()
            .last()
            .is_some_and(|c| c.is_alphanumeric() || c == '_');
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let mut matched = Vec::new();
        if let Some(inner) = tail[end..]
            .strip_prefix('{')
            .and_then(|s| s.split_once('}'))
        {
            for m in inner.0.split(',') {
                let label = m
                    .trim()
                    .split(['=', '!', '~'])
                    .next()
                    .unwrap_or_default()
                    .trim();
                if !label.is_empty() {
                    matched.push(label.to_owned());
                }
            }
        }
        if !preceded {
            out.push((name.to_owned(), matched));
        }
        rest = &tail[end..];
    }
    out
}

/// Label names in `by (...)`, `without (...)` and `on (...)` clauses.
fn grouping_labels(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    for kw in ["by", "without", "on", "ignoring"] {
        let mut rest = expr;
        while let Some(at) = rest.find(&format!("{kw} (")) {
            let preceded = rest[..at]
                .chars()
                .last()
                .is_some_and(|c| c.is_alphanumeric() || c == '_');
            let tail = &rest[at + kw.len() + 2..];
            let close = tail.find(')').expect("closing paren");
            if !preceded {
                out.extend(
                    tail[..close]
                        .split(',')
                        .map(|l| l.trim().to_owned())
                        .filter(|l| !l.is_empty()),
                );
            }
            rest = &tail[close..];
        }
    }
    out
}

/// A gateway with [shared] configured against a closed port (so the shared
/// families get children), after an accepted update, a refusal and a cached
/// lookup: its `/metrics` text.
async fn busy_gateway_metrics() -> (MockVendor, Gateway, String) {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let v = vendor().await;
    let gw = Gateway::builder(&v.url())
        .toml(&format!(
            "[shared]\nredis_url = \"redis://127.0.0.1:{port}/0\"\ntimeout_ms = 100\non_unavailable = \"local\"\n"
        ))
        .start()
        .await;
    // A miss (the list is read), then another line of the same list: a hit
    // (an accepted update drops only its own line), then a 422.
    let other_line = body_with(1, "37d73edf-4628-4cf1-8beb-758433fd0aab");
    for (body, status) in [
        (EXAMPLE_BODY, StatusCode::OK),
        (other_line.as_str(), StatusCode::OK),
        ("{\"maximumcall\": 0}", StatusCode::UNPROCESSABLE_ENTITY),
    ] {
        let resp = put(&gw, example_path(), body).await;
        assert_eq!(resp.status, status, "{}", resp.text());
    }
    let text = gw.admin_get("/metrics").await.text();
    (v, gw, text)
}

#[tokio::test]
async fn dashboard_and_rules_use_only_metrics_taskgate_exports() {
    let dash: Value = serde_json::from_str(&read(DASHBOARD)).expect("the dashboard is JSON");
    let (_v, _gw, text) = busy_gateway_metrics().await;
    let exp = exposition(&text);
    assert!(exp.names.contains("taskgate_requests_total"), "{text}");

    let dash_exprs = dashboard_exprs(&dash);
    assert!(dash_exprs.len() >= 15, "the dashboard has its queries");
    let mut used = BTreeSet::new();
    let mut problems = Vec::new();
    for (source, exprs) in [
        ("deploy/grafana/taskgate.json", dash_exprs),
        (ALERTS, alert_exprs()),
    ] {
        for expr in exprs {
            let sels = selectors(&expr);
            let mut expr_labels: BTreeSet<String> =
                ["job", "instance", "le"].map(str::to_owned).into();
            for (name, matched) in &sels {
                used.insert(name.clone());
                if !exp.names.contains(name) {
                    problems.push(format!("{source}: {name} is not in /metrics: {expr}"));
                    continue;
                }
                let seen = exp.labels.get(name);
                expr_labels.extend(seen.into_iter().flatten().cloned());
                for label in matched {
                    if ["job", "instance"].contains(&label.as_str()) {
                        continue;
                    }
                    match seen {
                        Some(seen) if !seen.contains(label) => problems.push(format!(
                            "{source}: {name} has no label {label} (it has {seen:?}): {expr}"
                        )),
                        Some(_) => {}
                        None => {
                            println!("note: {name} has no samples yet; label {label} unchecked")
                        }
                    }
                }
            }
            let unsampled = sels.iter().any(|(name, _)| !exp.labels.contains_key(name));
            for label in grouping_labels(&expr) {
                if !expr_labels.contains(&label) && unsampled {
                    println!(
                        "note: grouping label {label} unchecked (a series has no samples yet): {expr}"
                    );
                } else if !expr_labels.contains(&label) {
                    problems.push(format!(
                        "{source}: grouping label {label} is on none of its series: {expr}"
                    ));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{}\n/metrics:\n{text}",
        problems.join("\n")
    );

    // The dashboard covers what an operator looks at.
    for name in [
        "taskgate_requests_total",
        "taskgate_request_duration_seconds_bucket",
        "taskgate_upstream_duration_seconds_bucket",
        "taskgate_upstream_requests_total",
        "taskgate_rate_limited_total",
        "taskgate_residue_lookups_total",
        "taskgate_audit_fsync_seconds_bucket",
        "taskgate_audit_fsync_seconds_count",
        "taskgate_audit_records_total",
        "taskgate_shared_up",
        "taskgate_residue_lock_wait_seconds_bucket",
    ] {
        assert!(used.contains(name), "nothing uses {name}");
    }
    // Panels: unique ids, every query on the datasource variable.
    let panels = dash["panels"].as_array().expect("panels");
    let ids: BTreeSet<u64> = panels.iter().filter_map(|p| p["id"].as_u64()).collect();
    assert_eq!(ids.len(), panels.len(), "panel ids are unique");
    for p in panels.iter().filter(|p| p["type"] != "row") {
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        assert!(
            p["targets"].as_array().is_some_and(|t| !t.is_empty()),
            "{} has no query",
            p["title"]
        );
    }
}

// ---------------------------------------------------------------------------
// A real Prometheus.

/// Percent-encodes a query-string value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

struct Prometheus {
    base: String,
    /// Killed on drop.
    _child: tokio::process::Child,
    log: PathBuf,
}

impl Prometheus {
    async fn api(&self, path_and_query: &str) -> Value {
        let resp = send(
            Method::GET,
            &format!("{}{path_and_query}", self.base),
            &[],
            "",
        )
        .await;
        serde_json::from_slice(&resp.body).unwrap_or_else(|e| {
            panic!(
                "prometheus {path_and_query}: {e}: {}",
                String::from_utf8_lossy(&resp.body)
            )
        })
    }

    async fn query(&self, q: &str) -> Value {
        self.api(&format!("/api/v1/query?query={}", encode(q)))
            .await
    }

    /// The first sample's value of an instant query, once it has one (bounded).
    async fn value_of(&self, q: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = self.query(q).await;
            assert_eq!(r["status"], "success", "{q}: {r}");
            if let Some(v) = r["data"]["result"][0]["value"][1].as_str() {
                return v.to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "{q} has no sample after 30 s: {r}\nprometheus log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_prometheus_scrapes_taskgate_and_runs_the_rules_and_the_dashboard() {
    let (Some(prometheus), Some(promtool)) = (tool("prometheus"), tool("promtool")) else {
        return;
    };
    let started = Instant::now();
    let (_v, gw, text) = busy_gateway_metrics().await;

    // `promtool check metrics` on the exposition: clean but for what the
    // older text format cannot know about OpenMetrics counters (their HELP
    // names the family, `taskgate_requests`, not the sample).
    let mut cmd = tokio::process::Command::new(&promtool);
    cmd.args(["check", "metrics"]).stdin(Stdio::piped());
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("spawn promtool");
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(text.as_bytes()).await.unwrap();
    }
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("promtool check metrics finishes")
        .unwrap();
    let findings = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "promtool check metrics (exit {:?}):\n{findings}",
        out.status.code()
    );
    assert!(
        matches!(out.status.code(), Some(0) | Some(3)),
        "promtool could not parse /metrics:\n{findings}"
    );
    for line in findings.lines().filter(|l| !l.trim().is_empty()) {
        let counter_help = line.strip_suffix(" no help text").is_some_and(|name| {
            name.ends_with("_total")
                && text.contains(&format!("# HELP {} ", name.trim_end_matches("_total")))
                && text.contains(&format!(
                    "# TYPE {} counter",
                    name.trim_end_matches("_total")
                ))
        });
        assert!(
            counter_help,
            "promtool check metrics: {line}\n/metrics:\n{text}"
        );
    }

    // Prometheus on the shipped example config, pointed at this gateway.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dir = tempfile::tempdir().unwrap();
    let config = read(PROMETHEUS_EXAMPLE)
        .replace("127.0.0.1:9901", &gw.admin.to_string())
        .replace("scrape_interval: 15s", "scrape_interval: 500ms")
        .replace("evaluation_interval: 15s", "evaluation_interval: 500ms");
    assert!(config.contains(&gw.admin.to_string()), "target replaced");
    std::fs::write(dir.path().join("prometheus.yaml"), &config).unwrap();
    std::fs::copy(repo(ALERTS), dir.path().join("alerts.yaml")).unwrap();
    let log = dir.path().join("prometheus.log");
    let log_file = std::fs::File::create(&log).unwrap();
    let child = tokio::process::Command::new(&prometheus)
        .arg(format!(
            "--config.file={}",
            dir.path().join("prometheus.yaml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--storage.tsdb.retention.time=1h")
        .stdin(Stdio::null())
        .stdout(Stdio::from(log_file.try_clone().unwrap()))
        .stderr(Stdio::from(log_file))
        .kill_on_drop(true)
        .spawn()
        .expect("spawn prometheus");
    let prom = Prometheus {
        base: format!("http://127.0.0.1:{port}"),
        _child: child,
        log,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while try_send(Method::GET, &format!("{}/-/ready", prom.base), &[], "")
        .await
        .map(|r| r.status != StatusCode::OK)
        .unwrap_or(true)
    {
        assert!(
            Instant::now() < deadline,
            "prometheus not ready in 30 s:\n{}",
            prom.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // One successful scrape, no scrape error.
    assert_eq!(prom.value_of("up{job=\"taskgate\"} == 1").await, "1");
    let targets = prom.api("/api/v1/targets").await;
    let target = &targets["data"]["activeTargets"][0];
    assert_eq!(target["health"], "up", "{targets}");
    assert_eq!(target["lastError"], "", "{targets}");

    // The series, as Prometheus parsed them.
    for (q, want) in [
        (
            "taskgate_requests_total{job=\"taskgate\",status=\"200\",reason=\"\"}",
            "2",
        ),
        (
            "taskgate_requests_total{status=\"422\",reason=\"validation_failed\"}",
            "1",
        ),
        ("taskgate_upstream_requests_total{status=\"200\"}", "2"),
        ("taskgate_residue_lookups_total{result=\"miss\"}", "1"),
        ("taskgate_residue_lookups_total{result=\"hit\"}", "1"),
        ("taskgate_audit_records_total{event=\"attempt\"}", "2"),
        ("taskgate_request_duration_seconds_count", "3"),
        ("taskgate_request_duration_seconds_bucket{le=\"+Inf\"}", "3"),
        ("taskgate_inflight_requests", "0"),
        ("taskgate_shared_up", "0"),
        (
            "sum(taskgate_shared_requests_total{result=\"skipped\"}) > 0",
            "",
        ),
    ] {
        let got = prom.value_of(q).await;
        if !want.is_empty() {
            assert_eq!(got, want, "{q}");
        }
    }

    // Every dashboard query parses and evaluates in the real thing.
    let dash: Value = serde_json::from_str(&read(DASHBOARD)).unwrap();
    for expr in dashboard_exprs(&dash) {
        if expr.starts_with("label_values(") {
            continue; // a Grafana function, not PromQL
        }
        let q = expr
            .replace("$__rate_interval", "1m")
            .replace("$job", ".*")
            .replace("$instance", ".*");
        let r = prom.query(&q).await;
        assert_eq!(r["status"], "success", "dashboard query {q}: {r}");
    }

    // Every rule loaded and evaluated without error. The gateway's Redis is
    // down (a closed port), so TaskgateSharedStateDown must be on its way
    // (pending: its `for` is 2m) on real series; nothing else may be.
    let deadline = Instant::now() + Duration::from_secs(30);
    let rules = loop {
        let r = prom.api("/api/v1/rules").await;
        let rules: Vec<Value> = r["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        // Evaluated since the scrape: the rule that the down Redis trips is
        // on its way (an evaluation before the first scrape saw nothing).
        let evaluated = !rules.is_empty() && rules.iter().all(|r| r["health"] != "unknown");
        let caught_up = rules
            .iter()
            .any(|r| r["name"] == "TaskgateSharedStateDown" && r["state"] != "inactive");
        if evaluated && (caught_up || Instant::now() >= deadline) {
            break rules;
        }
        assert!(
            Instant::now() < deadline,
            "rules not evaluated in 30 s: {r}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        rules.len(),
        alerts(&yaml(ALERTS)).len(),
        "every rule loaded"
    );
    for r in &rules {
        assert_eq!(
            r["health"], "ok",
            "rule {} failed to evaluate: {r}",
            r["name"]
        );
        let want = if r["name"] == "TaskgateSharedStateDown" {
            "pending"
        } else {
            "inactive"
        };
        assert_eq!(r["state"], want, "{}: {r}", r["name"]);
    }
    drop(prom);
    println!("real Prometheus test took {:?}", started.elapsed());
}
