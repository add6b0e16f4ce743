//! Every vendor rule through the real gateway: 422 naming the field, nothing
//! forwarded; the vendor's example passes.

mod support;

use serde_json::{Value, json};
use support::*;

fn example() -> Value {
    serde_json::from_str(EXAMPLE_BODY).unwrap()
}

/// The example with `edit` applied.
fn edited(edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> String {
    let mut v = example();
    edit(v.as_object_mut().unwrap());
    v.to_string()
}

#[tokio::test]
async fn each_rule_gives_422_naming_the_field_and_nothing_is_forwarded() {
    let vendor = vendor().await;
    let gw = Gateway::builder(&vendor.url())
        .toml("[rate_limit]\nper_second = 1000\nburst = 1000")
        .start()
        .await;
    type Edit = Box<dyn FnOnce(&mut serde_json::Map<String, Value>)>;
    let cases: Vec<(&str, Edit)> = vec![
        (
            "caller_line_id",
            Box::new(|m| {
                m.remove("caller_line_id");
            }),
        ),
        (
            "caller_line_id",
            Box::new(|m| {
                m.insert("caller_line_id".into(), json!("not-a-uuid"));
            }),
        ),
        (
            "destination_extension",
            Box::new(|m| {
                m.remove("destination_extension");
            }),
        ),
        (
            "destination_extension",
            Box::new(|m| {
                m.insert("destination_extension".into(), json!("3"));
            }),
        ),
        (
            "destination_extension",
            Box::new(|m| {
                m.insert("destination_extension".into(), json!(-1));
            }),
        ),
        (
            "dial_time_id",
            Box::new(|m| {
                m.insert("dial_time_id".into(), json!(1.0));
            }),
        ),
        (
            "maximumcall",
            Box::new(|m| {
                m.insert("maximumcall".into(), json!(0));
            }),
        ),
        (
            "maximumcall",
            Box::new(|m| {
                m.remove("maximumcall");
            }),
        ),
        (
            "name",
            Box::new(|m| {
                m.insert("name".into(), json!(""));
            }),
        ),
        (
            "name",
            Box::new(|m| {
                m.insert("name".into(), json!("x".repeat(256)));
            }),
        ),
        (
            "name",
            Box::new(|m| {
                m.remove("name");
            }),
        ),
        (
            "sub_user_id",
            Box::new(|m| {
                m.insert("sub_user_id".into(), json!(12));
            }),
        ),
        (
            "bridge_group_id",
            Box::new(|m| {
                m.insert("bridge_group_id".into(), Value::Null);
            }),
        ),
        (
            "remark",
            Box::new(|m| {
                m.insert("remark".into(), json!(5));
            }),
        ),
        (
            "call_pause_second",
            Box::new(|m| {
                m.insert("call_pause_second".into(), json!(-1));
            }),
        ),
        (
            "auto_recycle_rule_id",
            Box::new(|m| {
                m.insert("auto_recycle_rule_id".into(), json!(true));
            }),
        ),
        (
            "elasticity_type",
            Box::new(|m| {
                m.insert("elasticity_type".into(), json!("false"));
            }),
        ),
        (
            "end_action",
            Box::new(|m| {
                m.insert("elasticity_type".into(), json!(true));
            }),
        ),
        (
            "llm_intention_id",
            Box::new(|m| {
                m.insert("llm_intention_id".into(), json!(9223372036854775808u64));
            }),
        ),
        (
            "task_type",
            Box::new(|m| {
                m.insert("task_type".into(), json!(3));
            }),
        ),
        (
            "maximumCall",
            Box::new(|m| {
                m.insert("maximumCall".into(), json!(3));
            }),
        ),
    ];
    for (field, edit) in cases {
        let body = edited(edit);
        let resp = put(&gw, &example_path(), &body).await;
        assert_eq!(resp.status, 422, "{field}: {body}");
        let v = resp.json();
        assert_eq!(v["data"]["reason"], "validation_failed");
        let fields: Vec<&str> = v["data"]["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["field"].as_str().unwrap())
            .collect();
        assert_eq!(fields, [field], "{body} -> {v}");
    }
    assert!(
        vendor.requests().is_empty(),
        "nothing malformed reached the vendor"
    );
}

#[tokio::test]
async fn all_broken_fields_are_listed_at_once() {
    let vendor = vendor().await;
    let gw = Gateway::start(&vendor.url()).await;
    let resp = put(
        &gw,
        &example_path(),
        r#"{"maximumcall": 0, "name": "", "task_type": 7, "typo": 1}"#,
    )
    .await;
    assert_eq!(resp.status, 422);
    let fields: Vec<String> = resp.json()["data"]["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        fields,
        [
            "caller_line_id",
            "destination_extension",
            "dial_time_id",
            "maximumcall",
            "name",
            "task_type",
            "typo"
        ]
    );
    assert!(vendor.requests().is_empty());
}

#[tokio::test]
async fn valid_bodies_pass_byte_for_byte_and_unknown_fields_can_be_allowed() {
    let vendor = vendor().await;
    let gw = Gateway::builder(&vendor.url())
        .toml("[validation]\nallow_unknown_fields = true")
        .start()
        .await;
    // Pretty-printed, with every optional field and an unknown one.
    let body = format!(
        "{{\n  \"name\": \"全字段\",\n  \"destination_extension\": 3,\n  \"dial_time_id\": 1,\n  \"maximumcall\": 1,\n  \
         \"caller_line_id\": \"{EXAMPLE_LINE}\",\n  \"sub_user_id\": \"5b55bcca-d653-4a58-8f9a-437fb0601f8e\",\n  \
         \"bridge_group_id\": 1, \"remark\": \"r\", \"call_pause_second\": 0, \"auto_recycle_rule_id\": 1,\n  \
         \"elasticity_type\": false, \"end_action\": 1, \"llm_intention_id\": 1, \"task_type\": 4, \"vendor_beta\": [1]\n}}\n"
    );
    let resp = put(&gw, &example_path(), &body).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(vendor.updates()[0].body, body.as_bytes());
}
