//! Per-user rate limits through the real gateway.

mod support;

use support::*;

#[tokio::test]
async fn third_quick_request_is_429_while_another_user_passes() {
    let vendor = vendor().await;
    let other = random_uuid();
    let gw = Gateway::builder(&vendor.url())
        .toml(&format!(
            "[rate_limit]\nper_second = 1\nburst = 2\n[rate_limit.overrides]\n\"{other}\" = {{ per_second = 1, burst = 5 }}"
        ))
        .start()
        .await;
    let user = random_uuid();
    let body = body_with(1, EXAMPLE_LINE);

    let first = put(&gw, &task_path(&user, &random_uuid()), &body).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.headers["ratelimit-limit"], "2");
    assert_eq!(first.headers["ratelimit-remaining"], "1");
    let second = put(&gw, &task_path(&user, &random_uuid()), &body).await;
    assert_eq!(second.status, 200);
    assert_eq!(second.headers["ratelimit-remaining"], "0");
    let third = put(&gw, &task_path(&user, &random_uuid()), &body).await;
    assert_eq!(third.status, 429);
    assert_eq!(third.reason(), "rate_limited");
    let retry: u64 = third.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1);
    assert_eq!(
        vendor.updates().len(),
        2,
        "the refused request never reached the vendor"
    );

    // Another user has a bucket of its own; an override raises one user's limit.
    for i in 0..5 {
        let resp = put(&gw, &task_path(&other, &random_uuid()), &body).await;
        assert_eq!(resp.status, 200, "override request {i}");
    }
    let resp = put(&gw, &task_path(&other, &random_uuid()), &body).await;
    assert_eq!(resp.status, 429);
    assert!(
        put(&gw, &task_path(&random_uuid(), &random_uuid()), &body)
            .await
            .status
            == 200
    );

    let metrics = gw.admin_get("/metrics").await;
    assert!(
        metrics.text().contains("taskgate_rate_limited_total 2"),
        "{}",
        metrics.text()
    );
}
