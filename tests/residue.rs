//! The concurrency rule: `maximumcall` within the chosen line's live residue.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::*;

const LINE_TWO: &str = "37d73edf-4628-4cf1-8beb-758433fd0aab";

fn line(value: &str, residue: i64) -> Line {
    Line {
        name: "line".into(),
        value: value.into(),
        residue,
        call_line: residue,
    }
}

#[tokio::test]
async fn within_passes_above_conflicts_unknown_is_422() {
    let vendor = vendor().await;
    let gw = Gateway::start(&vendor.url()).await;

    // The sample gives the example line residue 5 and line two residue 1.
    let resp = put(&gw, &example_path(), &body_with(2, LINE_TWO)).await;
    assert_eq!(resp.status, 409);
    assert_eq!(resp.reason(), "residue_exceeded");
    let msg = resp.json()["message"].as_str().unwrap().to_owned();
    assert!(
        msg.contains("maximumcall 2") && msg.contains("residue 1"),
        "{msg}"
    );

    let resp = put(&gw, &example_path(), &body_with(1, &random_uuid())).await;
    assert_eq!(resp.status, 422);
    assert_eq!(resp.reason(), "unknown_caller_line");
    assert!(
        vendor.updates().is_empty(),
        "refused updates never reach the vendor"
    );

    let resp = put(&gw, &example_path(), &body_with(5, EXAMPLE_LINE)).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(vendor.updates().len(), 1);
}

#[tokio::test]
async fn the_lookup_carries_the_token_and_sub_user_and_is_cached() {
    let vendor = vendor().await;
    let gw = Gateway::builder(&vendor.url())
        .toml("[residue]\nafter_update = \"decrement\"")
        .start()
        .await;
    let sub = random_uuid();
    let mut body: Value = serde_json::from_str(&body_with(9, EXAMPLE_LINE)).unwrap();
    body["sub_user_id"] = sub.clone().into();

    // Two refusals within the TTL: one lookup.
    for _ in 0..2 {
        let resp = put(&gw, &example_path(), &body.to_string()).await;
        assert_eq!(resp.status, 409, "{}", resp.text());
    }
    let inits = vendor.inits();
    assert_eq!(inits.len(), 1, "the second check used the cache");
    assert_eq!(
        inits[0].target,
        format!("/agent-api/user/{EXAMPLE_USER}/task/create?sub_user_id={sub}")
    );
    assert_eq!(inits[0].headers["authorization"], format!("Bearer {TOKEN}"));

    // Accepted updates lower the cached residue (5 -> 4 -> 3) instead of
    // costing a lookup each: two updates within the TTL, one lookup.
    body["maximumcall"] = 1.into();
    for _ in 0..2 {
        let resp = put(&gw, &example_path(), &body.to_string()).await;
        assert_eq!(resp.status, 200);
    }
    assert_eq!(vendor.inits().len(), 1);
    body["maximumcall"] = 4.into();
    let resp = put(&gw, &example_path(), &body.to_string()).await;
    assert_eq!(resp.status, 409, "checked against the lowered residue 3");
    assert!(
        resp.json()["message"]
            .as_str()
            .unwrap()
            .contains("residue 3")
    );
    assert_eq!(vendor.inits().len(), 1);
    // A vendor failure leaves the state unknown: the list is read again.
    body["maximumcall"] = 1.into();
    vendor.set_update_fault(Fault::Status(500));
    assert_eq!(
        put(&gw, &example_path(), &body.to_string()).await.status,
        500
    );
    vendor.set_update_fault(Fault::None);
    assert_eq!(
        put(&gw, &example_path(), &body.to_string()).await.status,
        200
    );
    assert_eq!(vendor.inits().len(), 2);
    gw.assert_token_never_logged();
}

#[tokio::test]
async fn by_default_an_accepted_update_drops_the_cached_list() {
    let vendor = vendor().await;
    let gw = Gateway::start(&vendor.url()).await;
    for n in 1..=2 {
        assert_eq!(
            put(&gw, &example_path(), &body_with(1, EXAMPLE_LINE))
                .await
                .status,
            200
        );
        assert_eq!(vendor.inits().len(), n, "one lookup per accepted update");
    }
}

#[tokio::test]
async fn lookup_failure_is_503_or_forwarded_when_allowed() {
    let vendor = vendor().await;
    vendor.set_init_fault(Fault::Status(500));
    let gw = Gateway::start(&vendor.url()).await;
    let resp = put(&gw, &example_path(), EXAMPLE_BODY).await;
    assert_eq!(resp.status, 503);
    assert_eq!(resp.reason(), "residue_unavailable");
    assert!(vendor.updates().is_empty());

    // Unparseable answers count as unavailable too.
    vendor.set_init_fault(Fault::Canned(
        200,
        r#"{"data":{"caller_line_list":[{"value":"x","residue":"lots"}]}}"#.into(),
    ));
    let resp = put(&gw, &example_path(), EXAMPLE_BODY).await;
    assert_eq!(resp.reason(), "residue_unavailable");
    drop(gw);

    let mut gw = Gateway::builder(&vendor.url())
        .toml("[residue]\non_unavailable = \"allow\"")
        .start()
        .await;
    let resp = put(&gw, &example_path(), EXAMPLE_BODY).await;
    assert_eq!(resp.status, 200);
    assert_eq!(vendor.updates().len(), 1);
    gw.stop().await;
    let records = gw.audit_records(&gw.audit_path());
    let attempt = records.iter().find(|r| r["event"] == "attempt").unwrap();
    assert!(
        attempt["note"].as_str().unwrap().contains("unavailable"),
        "{attempt}"
    );
    assert!(attempt["residue"].is_null());
}

#[tokio::test]
async fn residue_as_numeric_string_and_meta_location_are_understood() {
    let vendor = vendor().await;
    vendor.set_init_fault(Fault::Canned(
        200,
        format!(
            r#"{{"meta":{{"caller_line_list":[{{"value":"{EXAMPLE_LINE}","residue":"2"}}]}}}}"#
        ),
    ));
    let gw = Gateway::start(&vendor.url()).await;
    assert_eq!(
        put(&gw, &example_path(), &body_with(3, EXAMPLE_LINE))
            .await
            .status,
        409
    );
    assert_eq!(
        put(&gw, &example_path(), &body_with(2, EXAMPLE_LINE))
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn disabled_rule_forwards_without_lookup() {
    let vendor = vendor().await;
    let mut gw = Gateway::builder(&vendor.url())
        .toml("[residue]\nenabled = false")
        .start()
        .await;
    let resp = put(&gw, &example_path(), &body_with(99, &random_uuid())).await;
    assert_eq!(resp.status, 200);
    assert!(vendor.inits().is_empty());
    gw.stop().await;
    let records = gw.audit_records(&gw.audit_path());
    let attempt = records.iter().find(|r| r["event"] == "attempt").unwrap();
    assert!(
        attempt["note"].as_str().unwrap().contains("disabled"),
        "{attempt}"
    );
}

#[tokio::test]
async fn concurrent_updates_are_never_both_admitted_against_one_residue() {
    let vendor = vendor_with(MockOptions {
        token: Some(TOKEN.into()),
        consume: true,
        lines: [("*".to_owned(), vec![line(EXAMPLE_LINE, 3)])].into(),
    })
    .await;
    let gw = Gateway::start(&vendor.url()).await;
    for round in 0..20 {
        // A fresh account per round: its line starts with residue 3.
        let user = random_uuid();
        let body = body_with(3, EXAMPLE_LINE);
        let a = put(&gw, task_path(&user, &random_uuid()), &body);
        let b = put(&gw, task_path(&user, &random_uuid()), &body);
        let (a, b) = tokio::join!(a, b);
        let mut statuses = [a.status.as_u16(), b.status.as_u16()];
        statuses.sort();
        assert_eq!(
            statuses,
            [200, 409],
            "round {round}: {} / {}",
            a.text(),
            b.text()
        );
        assert_eq!(vendor.lines(&user).unwrap()[0].residue, 0);
    }
    assert_eq!(
        vendor.updates().len(),
        20,
        "only the admitted ones reached the vendor"
    );
}

#[tokio::test]
async fn concurrent_cold_misses_make_one_lookup() {
    let lines: Vec<Line> = (0..50).map(|_| line(&random_uuid(), 1)).collect();
    let vendor = vendor_with(MockOptions {
        token: Some(TOKEN.into()),
        consume: false,
        lines: [(EXAMPLE_USER.to_owned(), lines.clone())].into(),
    })
    .await;
    // A slow lookup widens the window in which all 50 miss together.
    vendor.set_delay(Duration::from_millis(300));
    let gw = Gateway::builder(&vendor.url())
        .toml("[rate_limit]\nper_second = 1000\nburst = 1000")
        .start()
        .await;
    // maximumcall 2 > residue 1: all refused, so nothing invalidates the cache.
    let calls = lines.iter().map(|l| {
        put(
            &gw,
            task_path(EXAMPLE_USER, &random_uuid()),
            body_with(2, &l.value),
        )
    });
    let answers = futures::future::join_all(calls).await;
    assert!(answers.iter().all(|r| r.status == 409));
    assert_eq!(
        vendor.inits().len(),
        1,
        "one lookup for 50 concurrent misses"
    );
}
