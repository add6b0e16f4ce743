//! Validation stage: checks a parsed body against the vendor's task-update
//! contract and yields a typed [`TaskUpdate`], or every broken field at once (422).
//!
//! Error order is stable so clients and tests can rely on it: known fields in
//! the order of the vendor's table, then the cross-field rule, then unknown
//! fields sorted by name.
//!
//! Null: the vendor page types every field and only says of `bridge_group_id`
//! that a sent key must hold a value. We are strict for all of them: an
//! optional key sent as `null` gets the field's type error (and
//! `bridge_group_id` gets "must not be null"), because we cannot know how the
//! vendor reads a null it never documented.

use serde_json::{Map, Value};
use uuid::Uuid;

pub use crate::error::FieldError;
use crate::ids::parse_canonical_uuid;

/// A task update that satisfies every rule of the vendor contract. Later
/// stages (rate limit key, residue rule, audit) read this; nobody re-parses JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskUpdate {
    pub sub_user_id: Option<Uuid>,
    pub caller_line_id: Uuid,
    pub destination_extension: i64,
    pub dial_time_id: i64,
    pub maximumcall: i64,
    pub name: String,
    pub remark: Option<String>,
    pub bridge_group_id: Option<i64>,
    pub call_pause_second: Option<i64>,
    pub auto_recycle_rule_id: Option<i64>,
    pub elasticity_type: Option<bool>,
    pub end_action: Option<i64>,
    pub llm_intention_id: Option<i64>,
    pub task_type: Option<i64>,
}

/// The body fields the vendor documents, in the order of its table; this is
/// also the order in which their errors are reported.
const KNOWN_FIELDS: [&str; 14] = [
    "sub_user_id",
    "caller_line_id",
    "bridge_group_id",
    "destination_extension",
    "dial_time_id",
    "maximumcall",
    "name",
    "remark",
    "call_pause_second",
    "auto_recycle_rule_id",
    "elasticity_type",
    "end_action",
    "llm_intention_id",
    "task_type",
];

/// The vendor counts `name` in characters; we count Unicode scalar values so a
/// Chinese name is not charged three per character.
const NAME_MAX_CHARS: usize = 255;

const TASK_TYPES: [i64; 4] = [1, 2, 4, 5];

const IS_REQUIRED: &str = "is required";
const NOT_NULL: &str = "must not be null";
const UUID_STRING: &str = "must be a canonical UUID string";
const NAME_STRING: &str = "must be a non-empty string of at most 255 characters";
const STRING: &str = "must be a string";
const BOOLEAN: &str = "must be a boolean";
const OUT_OF_I64: &str = "must fit in a signed 64-bit integer";
const TASK_TYPE: &str = "must be one of 1, 2, 4, 5";
const END_ACTION_WITH_ELASTICITY: &str = "cannot be combined with elasticity_type true";
const UNKNOWN: &str = "unknown field";

/// Checks `body` against every rule and reports all broken ones.
///
/// With `allow_unknown_fields` undocumented keys are ignored here; the proxy
/// forwards the caller's bytes unchanged, so they still reach the vendor.
pub fn validate(
    body: &Map<String, Value>,
    allow_unknown_fields: bool,
) -> Result<TaskUpdate, Vec<FieldError>> {
    let mut c = Checker {
        body,
        errors: Vec::new(),
    };

    // Table order, so errors come out in it.
    let sub_user_id = c.uuid("sub_user_id", Presence::Optional);
    let caller_line_id = c.uuid("caller_line_id", Presence::Required);
    let bridge_group_id = if matches!(body.get("bridge_group_id"), Some(Value::Null)) {
        // The one null the vendor page rules on explicitly: a sent key must hold a value.
        c.fail("bridge_group_id", NOT_NULL);
        None
    } else {
        c.id("bridge_group_id", Presence::Optional, 0)
    };
    let destination_extension = c.id("destination_extension", Presence::Required, 0);
    let dial_time_id = c.id("dial_time_id", Presence::Required, 0);
    let maximumcall = c.id("maximumcall", Presence::Required, 1);
    let name = c.name();
    let remark = c.string("remark");
    let call_pause_second = c.id("call_pause_second", Presence::Optional, 0);
    let auto_recycle_rule_id = c.id("auto_recycle_rule_id", Presence::Optional, 0);
    let elasticity_type = c.boolean("elasticity_type");
    let end_action = c.id("end_action", Presence::Optional, 0);
    let llm_intention_id = c.id("llm_intention_id", Presence::Optional, 0);
    let task_type = c.task_type();

    // Judged on the raw keys so the rule is reported even when end_action's
    // own value is also broken: the vendor forbids sending both at all.
    if body.contains_key("end_action")
        && matches!(body.get("elasticity_type"), Some(Value::Bool(true)))
    {
        c.fail("end_action", END_ACTION_WITH_ELASTICITY);
    }

    if !allow_unknown_fields {
        // Sorted explicitly: serde_json's map order depends on its features.
        let mut unknown: Vec<&String> = body
            .keys()
            .filter(|key| !KNOWN_FIELDS.contains(&key.as_str()))
            .collect();
        unknown.sort();
        for key in unknown {
            let message = match suggestion(key) {
                Some(known) => format!("{UNKNOWN}; did you mean `{known}`?"),
                None => UNKNOWN.to_owned(),
            };
            c.fail(key, message);
        }
    }

    let errors = c.errors;
    match (
        caller_line_id,
        destination_extension,
        dial_time_id,
        maximumcall,
        name,
    ) {
        (
            Some(caller_line_id),
            Some(destination_extension),
            Some(dial_time_id),
            Some(maximumcall),
            Some(name),
        ) if errors.is_empty() => Ok(TaskUpdate {
            sub_user_id,
            caller_line_id,
            destination_extension,
            dial_time_id,
            maximumcall,
            name,
            remark,
            bridge_group_id,
            call_pause_second,
            auto_recycle_rule_id,
            elasticity_type,
            end_action,
            llm_intention_id,
            task_type,
        }),
        // A missing required value always recorded an error, so this is never empty.
        _ => Err(errors),
    }
}

/// The known field an unknown key was probably meant to be. Case, `_` and `-`
/// are ignored so `maximumCall` and `callerLineId` are caught: the vendor
/// would silently ignore such a typo.
fn suggestion(key: &str) -> Option<&'static str> {
    let folded = |s: &str| -> Vec<u8> {
        s.bytes()
            .filter(|b| !matches!(b, b'_' | b'-'))
            .map(|b| b.to_ascii_lowercase())
            .collect()
    };
    let key = folded(key);
    KNOWN_FIELDS
        .iter()
        .copied()
        .find(|known| folded(known) == key)
}

#[derive(Clone, Copy)]
enum Presence {
    Required,
    Optional,
}

/// Why a JSON value is not an i64.
enum IntError {
    /// Not a JSON integer at all: a string, a float such as `3.0` or `1e2`, …
    NotInteger,
    /// An integer above `i64::MAX` (serde_json keeps those as u64).
    OutOfRange,
}

/// Only JSON integer literals count; serde_json stores `3.0` and `1e2` as
/// floats, so `as_i64` is `None` for them.
fn json_i64(value: &Value) -> Result<i64, IntError> {
    match value {
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Ok(i),
            (None, Some(_)) => Err(IntError::OutOfRange),
            (None, None) => Err(IntError::NotInteger),
        },
        _ => Err(IntError::NotInteger),
    }
}

/// Walks the body once per field, collecting errors instead of stopping.
/// Each check returns `None` either when an optional key is absent or after
/// recording an error.
struct Checker<'a> {
    body: &'a Map<String, Value>,
    errors: Vec<FieldError>,
}

impl<'a> Checker<'a> {
    fn fail(&mut self, field: &str, message: impl Into<String>) {
        self.errors.push(FieldError {
            field: field.to_owned(),
            message: message.into(),
        });
    }

    fn lookup(&mut self, field: &str, presence: Presence) -> Option<&'a Value> {
        let value = self.body.get(field);
        if value.is_none() && matches!(presence, Presence::Required) {
            self.fail(field, IS_REQUIRED);
        }
        value
    }

    fn uuid(&mut self, field: &str, presence: Presence) -> Option<Uuid> {
        let value = self.lookup(field, presence)?;
        let id = value.as_str().and_then(parse_canonical_uuid);
        if id.is_none() {
            self.fail(field, UUID_STRING);
        }
        id
    }

    /// Every integer in the contract is an id or a count, so all have a floor.
    fn id(&mut self, field: &str, presence: Presence, min: i64) -> Option<i64> {
        let value = self.lookup(field, presence)?;
        match json_i64(value) {
            Ok(n) if n >= min => Some(n),
            Ok(_) | Err(IntError::NotInteger) => {
                self.fail(field, format!("must be an integer >= {min}"));
                None
            }
            Err(IntError::OutOfRange) => {
                self.fail(field, OUT_OF_I64);
                None
            }
        }
    }

    fn name(&mut self) -> Option<String> {
        let value = self.lookup("name", Presence::Required)?;
        match value {
            // `nth` stops early, so a huge string is not counted in full.
            Value::String(s) if !s.is_empty() && s.chars().nth(NAME_MAX_CHARS).is_none() => {
                Some(s.clone())
            }
            _ => {
                self.fail("name", NAME_STRING);
                None
            }
        }
    }

    fn string(&mut self, field: &str) -> Option<String> {
        match self.lookup(field, Presence::Optional)? {
            Value::String(s) => Some(s.clone()),
            _ => {
                self.fail(field, STRING);
                None
            }
        }
    }

    fn boolean(&mut self, field: &str) -> Option<bool> {
        match self.lookup(field, Presence::Optional)? {
            Value::Bool(b) => Some(*b),
            _ => {
                self.fail(field, BOOLEAN);
                None
            }
        }
    }

    fn task_type(&mut self) -> Option<i64> {
        let value = self.lookup("task_type", Presence::Optional)?;
        match json_i64(value) {
            Ok(n) if TASK_TYPES.contains(&n) => Some(n),
            _ => {
                self.fail("task_type", TASK_TYPE);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::body::parse_object;
    use serde_json::json;

    const LINE: &str = "f352fd9d-b86b-49eb-942c-3ae2f69fa3b0";
    const SUB: &str = "5b55bcca-d653-4a58-8f9a-437fb0601f8e";

    fn obj(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            other => panic!("not an object: {other}"),
        }
    }

    /// The smallest body that passes: only the required fields.
    fn minimal() -> Map<String, Value> {
        obj(json!({
            "caller_line_id": LINE,
            "destination_extension": 297,
            "dial_time_id": 5,
            "maximumcall": 1,
            "name": "测试任务",
        }))
    }

    fn with(key: &str, value: Value) -> Map<String, Value> {
        let mut body = minimal();
        body.insert(key.to_owned(), value);
        body
    }

    fn without(key: &str) -> Map<String, Value> {
        let mut body = minimal();
        body.remove(key);
        body
    }

    fn err(field: &str, message: &str) -> FieldError {
        FieldError {
            field: field.to_owned(),
            message: message.to_owned(),
        }
    }

    /// Asserts the body fails with exactly this one error.
    fn fails_with(body: &Map<String, Value>, field: &str, message: &str) {
        assert_eq!(
            validate(body, false),
            Err(vec![err(field, message)]),
            "{}",
            Value::Object(body.clone())
        );
    }

    fn passes(body: &Map<String, Value>) -> TaskUpdate {
        match validate(body, false) {
            Ok(update) => update,
            Err(errors) => panic!("{} failed: {errors:?}", Value::Object(body.clone())),
        }
    }

    /// Parses literal JSON text, so floats like `3.0` are exactly what a client sent.
    fn from_text(text: &str) -> Map<String, Value> {
        parse_object(text.as_bytes()).unwrap()
    }

    #[test]
    fn vendor_example_body_passes() {
        let body = from_text(
            r#"{"name": "API任务创建测试", "destination_extension": 3, "dial_time_id": 1,
                "maximumcall": 3, "caller_line_id": "f352fd9d-b86b-49eb-942c-3ae2f69fa3b0",
                "remark": "API-test", "end_action": 1}"#,
        );
        assert_eq!(
            passes(&body),
            TaskUpdate {
                sub_user_id: None,
                caller_line_id: Uuid::parse_str(LINE).unwrap(),
                destination_extension: 3,
                dial_time_id: 1,
                maximumcall: 3,
                name: "API任务创建测试".to_owned(),
                remark: Some("API-test".to_owned()),
                bridge_group_id: None,
                call_pause_second: None,
                auto_recycle_rule_id: None,
                elasticity_type: None,
                end_action: Some(1),
                llm_intention_id: None,
                task_type: None,
            }
        );
    }

    #[test]
    fn every_field_set_passes_and_is_typed() {
        let mut body = minimal();
        for (k, v) in [
            ("sub_user_id", json!(SUB)),
            ("bridge_group_id", json!(1)),
            ("remark", json!("第一个任务")),
            ("call_pause_second", json!(10)),
            ("auto_recycle_rule_id", json!(2)),
            ("elasticity_type", json!(false)),
            ("end_action", json!(3)),
            ("llm_intention_id", json!(4)),
            ("task_type", json!(5)),
        ] {
            body.insert(k.to_owned(), v);
        }
        let update = passes(&body);
        assert_eq!(update.sub_user_id, Some(Uuid::parse_str(SUB).unwrap()));
        assert_eq!(update.bridge_group_id, Some(1));
        assert_eq!(update.remark.as_deref(), Some("第一个任务"));
        assert_eq!(update.call_pause_second, Some(10));
        assert_eq!(update.auto_recycle_rule_id, Some(2));
        assert_eq!(update.elasticity_type, Some(false));
        assert_eq!(update.end_action, Some(3));
        assert_eq!(update.llm_intention_id, Some(4));
        assert_eq!(update.task_type, Some(5));
    }

    #[test]
    fn required_fields_are_required() {
        for field in [
            "caller_line_id",
            "destination_extension",
            "dial_time_id",
            "maximumcall",
            "name",
        ] {
            fails_with(&without(field), field, IS_REQUIRED);
        }
        passes(&minimal());
        // An empty body names all five, in table order.
        let fields: Vec<String> = validate(&Map::new(), false)
            .unwrap_err()
            .into_iter()
            .map(|e| e.field)
            .collect();
        assert_eq!(
            fields,
            [
                "caller_line_id",
                "destination_extension",
                "dial_time_id",
                "maximumcall",
                "name"
            ]
        );
    }

    #[test]
    fn caller_line_id_must_be_a_canonical_uuid_string() {
        for bad in [
            json!(format!("{{{LINE}}}")),
            json!(format!("urn:uuid:{LINE}")),
            json!(LINE.replace('-', "")),
            json!(format!(" {LINE}")),
            json!(""),
            json!(1),
            json!(null),
            json!([LINE]),
        ] {
            fails_with(&with("caller_line_id", bad), "caller_line_id", UUID_STRING);
        }
        let upper = passes(&with("caller_line_id", json!(LINE.to_ascii_uppercase())));
        assert_eq!(upper.caller_line_id, Uuid::parse_str(LINE).unwrap());
    }

    #[test]
    fn sub_user_id_is_an_optional_canonical_uuid_string() {
        fails_with(
            &with("sub_user_id", json!("not-a-uuid")),
            "sub_user_id",
            UUID_STRING,
        );
        fails_with(
            &with("sub_user_id", json!(null)),
            "sub_user_id",
            UUID_STRING,
        );
        assert_eq!(passes(&minimal()).sub_user_id, None);
        assert_eq!(
            passes(&with("sub_user_id", json!(SUB))).sub_user_id,
            Some(Uuid::parse_str(SUB).unwrap())
        );
    }

    #[test]
    fn bridge_group_id_may_be_absent_but_not_null() {
        fails_with(
            &with("bridge_group_id", json!(null)),
            "bridge_group_id",
            NOT_NULL,
        );
        fails_with(
            &with("bridge_group_id", json!("1")),
            "bridge_group_id",
            "must be an integer >= 0",
        );
        fails_with(
            &with("bridge_group_id", json!(-1)),
            "bridge_group_id",
            "must be an integer >= 0",
        );
        assert_eq!(passes(&minimal()).bridge_group_id, None);
        assert_eq!(
            passes(&with("bridge_group_id", json!(0))).bridge_group_id,
            Some(0)
        );
    }

    #[test]
    fn integers_are_json_integers_that_fit_i64() {
        let msg = "must be an integer >= 0";
        for text in [
            r#""3""#,
            "3.0",
            "1e2",
            "-0.0",
            "true",
            "null",
            "[3]",
            "{}",
            "1.5",
            "18446744073709551616",
            // serde_json reads `-0` as the float -0.0; rejecting it is the strict side.
            "-0",
            "-9223372036854775809",
        ] {
            let mut body = minimal();
            body.insert(
                "destination_extension".into(),
                from_text(&format!(r#"{{"v":{text}}}"#))["v"].clone(),
            );
            fails_with(&body, "destination_extension", msg);
        }
        fails_with(
            &with("destination_extension", json!(u64::MAX)),
            "destination_extension",
            OUT_OF_I64,
        );
        fails_with(
            &from_text(&format!(
                r#"{{"caller_line_id":"{LINE}","destination_extension":9223372036854775808,
                    "dial_time_id":5,"maximumcall":1,"name":"n"}}"#
            )),
            "destination_extension",
            OUT_OF_I64,
        );
        fails_with(
            &with("destination_extension", json!(-1)),
            "destination_extension",
            msg,
        );
        assert_eq!(
            passes(&with("destination_extension", json!(i64::MAX))).destination_extension,
            i64::MAX
        );
        assert_eq!(
            passes(&with("destination_extension", json!(0))).destination_extension,
            0
        );
    }

    #[test]
    fn dial_time_id_is_an_id() {
        fails_with(
            &with("dial_time_id", json!(-5)),
            "dial_time_id",
            "must be an integer >= 0",
        );
        fails_with(
            &with("dial_time_id", json!(5.0)),
            "dial_time_id",
            "must be an integer >= 0",
        );
        assert_eq!(passes(&with("dial_time_id", json!(0))).dial_time_id, 0);
    }

    #[test]
    fn maximumcall_is_at_least_one() {
        for bad in [json!(0), json!(-1), json!(1.0), json!("1"), json!(null)] {
            fails_with(
                &with("maximumcall", bad),
                "maximumcall",
                "must be an integer >= 1",
            );
        }
        assert_eq!(passes(&with("maximumcall", json!(1))).maximumcall, 1);
    }

    #[test]
    fn name_is_a_non_empty_string_of_at_most_255_characters() {
        let max_chinese = "任".repeat(255);
        assert!(max_chinese.len() > 255, "bytes would exceed the limit");
        assert_eq!(passes(&with("name", json!(max_chinese))).name, max_chinese);
        assert_eq!(passes(&with("name", json!("x"))).name, "x");
        for bad in [
            json!(""),
            json!("任".repeat(256)),
            json!("a".repeat(256)),
            json!(1),
            json!(null),
        ] {
            fails_with(&with("name", bad), "name", NAME_STRING);
        }
    }

    #[test]
    fn remark_is_an_optional_string() {
        fails_with(&with("remark", json!(1)), "remark", STRING);
        fails_with(&with("remark", json!(null)), "remark", STRING);
        assert_eq!(
            passes(&with("remark", json!(""))).remark.as_deref(),
            Some("")
        );
        assert_eq!(passes(&minimal()).remark, None);
    }

    #[test]
    fn call_pause_second_is_non_negative() {
        fails_with(
            &with("call_pause_second", json!(-1)),
            "call_pause_second",
            "must be an integer >= 0",
        );
        assert_eq!(
            passes(&with("call_pause_second", json!(0))).call_pause_second,
            Some(0)
        );
    }

    #[test]
    fn optional_ids_reject_null_and_negatives() {
        for field in ["auto_recycle_rule_id", "end_action", "llm_intention_id"] {
            for bad in [json!(null), json!(-1), json!(2.5), json!("1")] {
                fails_with(&with(field, bad), field, "must be an integer >= 0");
            }
            passes(&with(field, json!(1)));
        }
    }

    #[test]
    fn elasticity_type_is_a_boolean() {
        for bad in [json!("false"), json!(0), json!(null)] {
            fails_with(&with("elasticity_type", bad), "elasticity_type", BOOLEAN);
        }
        assert_eq!(
            passes(&with("elasticity_type", json!(true))).elasticity_type,
            Some(true)
        );
    }

    #[test]
    fn task_type_is_one_of_the_four_values() {
        for bad in [
            json!(0),
            json!(3),
            json!(6),
            json!(-1),
            json!("1"),
            json!(1.0),
            json!(null),
            json!(u64::MAX),
        ] {
            fails_with(&with("task_type", bad), "task_type", TASK_TYPE);
        }
        for good in TASK_TYPES {
            assert_eq!(
                passes(&with("task_type", json!(good))).task_type,
                Some(good)
            );
        }
    }

    #[test]
    fn end_action_cannot_be_combined_with_elasticity_true() {
        let mut body = with("elasticity_type", json!(true));
        body.insert("end_action".into(), json!(1));
        fails_with(&body, "end_action", END_ACTION_WITH_ELASTICITY);

        let mut ok = with("elasticity_type", json!(false));
        ok.insert("end_action".into(), json!(1));
        passes(&ok);
        passes(&with("elasticity_type", json!(true)));
        passes(&with("end_action", json!(1)));
    }

    #[test]
    fn unknown_fields_are_rejected_unless_allowed() {
        let body = with("colour", json!("blue"));
        fails_with(&body, "colour", UNKNOWN);
        assert_eq!(validate(&body, true), validate(&minimal(), false));

        let body = with("maximumCall", json!(900));
        fails_with(
            &body,
            "maximumCall",
            "unknown field; did you mean `maximumcall`?",
        );
        let body = with("callerLineId", json!(LINE));
        fails_with(
            &body,
            "callerLineId",
            "unknown field; did you mean `caller_line_id`?",
        );
        assert!(validate(&with("maximumCall", json!(900)), true).is_ok());
    }

    #[test]
    fn all_errors_are_listed_in_stable_order() {
        let body = from_text(
            r#"{"zeta": 1, "Name": "x", "task_type": 3, "name": "", "caller_line_id": "x",
                "elasticity_type": true, "end_action": -1, "maximumcall": 0,
                "bridge_group_id": null, "alpha": 2}"#,
        );
        let expected = vec![
            err("caller_line_id", UUID_STRING),
            err("bridge_group_id", NOT_NULL),
            err("destination_extension", IS_REQUIRED),
            err("dial_time_id", IS_REQUIRED),
            err("maximumcall", "must be an integer >= 1"),
            err("name", NAME_STRING),
            err("end_action", "must be an integer >= 0"),
            err("task_type", TASK_TYPE),
            err("end_action", END_ACTION_WITH_ELASTICITY),
            err("Name", "unknown field; did you mean `name`?"),
            err("alpha", UNKNOWN),
            err("zeta", UNKNOWN),
        ];
        assert_eq!(validate(&body, false), Err(expected.clone()));
        let without_unknown: Vec<FieldError> = expected.into_iter().take(9).collect();
        assert_eq!(validate(&body, true), Err(without_unknown));
    }

    #[test]
    fn field_error_serialises_as_the_envelope_expects() {
        assert_eq!(
            serde_json::to_value(err("maximumcall", "must be an integer >= 1")).unwrap(),
            json!({"field": "maximumcall", "message": "must be an integer >= 1"})
        );
    }
}

#[cfg(test)]
mod props {
    //! Property tests: no input panics, every rejection names at least one
    //! field, and every body drawn from the valid space is accepted as sent.

    use super::*;
    use crate::pipeline::body::parse_object;
    use proptest::prelude::*;

    /// Errors must come out in the documented order: known fields by table
    /// position, then the cross-field rule, then unknown keys by name.
    fn assert_stable_order(body: &Map<String, Value>, errors: &[FieldError]) {
        let rank = |e: &FieldError| -> (usize, Option<String>) {
            match KNOWN_FIELDS.iter().position(|k| *k == e.field) {
                Some(_) if e.message == END_ACTION_WITH_ELASTICITY => (KNOWN_FIELDS.len(), None),
                Some(i) => (i, None),
                None => (KNOWN_FIELDS.len() + 1, Some(e.field.clone())),
            }
        };
        for pair in errors.windows(2) {
            assert!(rank(&pair[0]) <= rank(&pair[1]), "out of order: {pair:?}");
        }
        for e in errors {
            assert!(
                body.contains_key(&e.field) || e.message == IS_REQUIRED,
                "error names a key that was not sent: {e:?}"
            );
        }
    }

    /// Runs both modes and checks the invariants every outcome must keep.
    fn check_any(body: &Map<String, Value>) {
        let strict = validate(body, false);
        let lenient = validate(body, true);
        for outcome in [&strict, &lenient] {
            if let Err(errors) = outcome {
                assert!(!errors.is_empty(), "422 without a field error");
                assert_stable_order(body, errors);
            }
        }
        // Strict accepting implies lenient accepts the same update.
        if let Ok(update) = &strict {
            assert_eq!(lenient.as_ref().ok(), Some(update));
        }
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (-4i64..8).prop_map(Value::from),
            any::<f64>().prop_map(Value::from), // NaN/inf become null
            Just(Value::from(3.0)),
            ".{0,12}".prop_map(Value::String),
            any::<u128>().prop_map(|n| Value::String(Uuid::from_u128(n).to_string())),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(".{0,6}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Keys that are mostly the vendor's own, plus near-misses and noise.
    fn arb_key() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => prop::sample::select(KNOWN_FIELDS.to_vec()).prop_map(str::to_owned),
            1 => prop::sample::select(KNOWN_FIELDS.to_vec()).prop_map(|k| k.to_ascii_uppercase()),
            1 => ".{0,10}",
        ]
    }

    fn arb_body() -> impl Strategy<Value = Map<String, Value>> {
        prop::collection::btree_map(arb_key(), arb_json(), 0..16)
            .prop_map(|m| m.into_iter().collect())
    }

    /// A point in the valid space, and the update it must validate to.
    fn arb_valid() -> impl Strategy<Value = (Map<String, Value>, TaskUpdate)> {
        let id = || 0..=i64::MAX;
        let uuid_text = || {
            (any::<u128>(), any::<bool>()).prop_map(|(n, upper)| {
                let id = Uuid::from_u128(n);
                let text = id.to_string();
                (
                    id,
                    if upper {
                        text.to_ascii_uppercase()
                    } else {
                        text
                    },
                )
            })
        };
        let name =
            prop::collection::vec(any::<char>(), 1..=NAME_MAX_CHARS).prop_map(String::from_iter);
        let required = (uuid_text(), id(), id(), 1..=i64::MAX, name);
        let optional_a = (
            proptest::option::of(uuid_text()),
            proptest::option::of(".*"),
            proptest::option::of(id()),
            proptest::option::of(id()),
            proptest::option::of(id()),
        );
        let optional_b = (
            proptest::option::of(any::<bool>()),
            proptest::option::of(id()),
            proptest::option::of(id()),
            proptest::option::of(prop::sample::select(TASK_TYPES.to_vec())),
        );
        (required, optional_a, optional_b).prop_map(
            |(
                ((line, line_text), destination_extension, dial_time_id, maximumcall, name),
                (sub, remark, bridge_group_id, call_pause_second, auto_recycle_rule_id),
                (elasticity_type, end_action, llm_intention_id, task_type),
            )| {
                // Respect the cross-field rule: no end_action with dynamic seats.
                let end_action = if elasticity_type == Some(true) {
                    None
                } else {
                    end_action
                };
                let mut body = Map::new();
                let mut put = |k: &str, v: Value| {
                    body.insert(k.to_owned(), v);
                };
                put("caller_line_id", Value::from(line_text));
                put("destination_extension", Value::from(destination_extension));
                put("dial_time_id", Value::from(dial_time_id));
                put("maximumcall", Value::from(maximumcall));
                put("name", Value::from(name.clone()));
                if let Some((_, text)) = &sub {
                    put("sub_user_id", Value::from(text.clone()));
                }
                if let Some(r) = &remark {
                    put("remark", Value::from(r.clone()));
                }
                for (k, v) in [
                    ("bridge_group_id", bridge_group_id),
                    ("call_pause_second", call_pause_second),
                    ("auto_recycle_rule_id", auto_recycle_rule_id),
                    ("end_action", end_action),
                    ("llm_intention_id", llm_intention_id),
                    ("task_type", task_type),
                ] {
                    if let Some(v) = v {
                        put(k, Value::from(v));
                    }
                }
                if let Some(b) = elasticity_type {
                    put("elasticity_type", Value::from(b));
                }
                let update = TaskUpdate {
                    sub_user_id: sub.map(|(id, _)| id),
                    caller_line_id: line,
                    destination_extension,
                    dial_time_id,
                    maximumcall,
                    name,
                    remark,
                    bridge_group_id,
                    call_pause_second,
                    auto_recycle_rule_id,
                    elasticity_type,
                    end_action,
                    llm_intention_id,
                    task_type,
                };
                (body, update)
            },
        )
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            // Err(()) -> 400; Ok(map) -> 422 or pass.
            if let Ok(map) = parse_object(&bytes) {
                check_any(&map);
            }
        }

        #[test]
        fn json_looking_text_never_panics(text in r#"\{[\[\]{}",:0-9a-z_ .eE+\-]{0,64}"#) {
            if let Ok(map) = parse_object(text.as_bytes()) {
                check_any(&map);
            }
        }

        #[test]
        fn arbitrary_objects_never_panic(body in arb_body()) {
            check_any(&body);
            // Through bytes the verdict is the same. (Maps need not be equal:
            // serde_json's default float parsing may differ in the last digit,
            // and a float is rejected wherever the contract asks for a value.)
            let bytes = serde_json::to_vec(&body).unwrap();
            let parsed = parse_object(&bytes);
            prop_assert!(parsed.is_ok());
            let parsed = parsed.unwrap();
            prop_assert_eq!(validate(&parsed, false), validate(&body, false));
            prop_assert_eq!(validate(&parsed, true), validate(&body, true));
        }

        #[test]
        fn arbitrary_values_for_known_fields_never_panic(
            base in arb_valid(),
            overrides in prop::collection::vec(
                (prop::sample::select(KNOWN_FIELDS.to_vec()), proptest::option::of(arb_json())),
                1..4,
            ),
        ) {
            let (mut body, _) = base;
            for (key, value) in overrides {
                match value {
                    Some(v) => body.insert(key.to_owned(), v),
                    None => body.remove(key),
                };
            }
            check_any(&body);
        }

        #[test]
        fn valid_bodies_pass_as_sent((body, expected) in arb_valid(), pretty in any::<bool>()) {
            prop_assert_eq!(validate(&body, false), Ok(expected.clone()));
            let mut bytes = if pretty {
                serde_json::to_vec_pretty(&body).unwrap()
            } else {
                serde_json::to_vec(&body).unwrap()
            };
            bytes.extend_from_slice(b" \n");
            let parsed = parse_object(&bytes);
            prop_assert_eq!(parsed.as_ref().ok(), Some(&body));
            prop_assert_eq!(validate(&parsed.unwrap(), false), Ok(expected));
        }
    }
}
