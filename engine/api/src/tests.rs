use serde_json::{json, Value};

use crate::json::{from_json, to_json};
use crate::querier::v1::{
    FlameGraph, Level, ProfileFormat, SelectMergeStacktracesRequest, SelectMergeStacktracesResponse,
};
use crate::types::v1::{Point, TimeSeriesAggregationType};

#[test]
fn fields_read_in_either_name_with_64_bit_integers_as_strings_or_numbers() {
    let r: SelectMergeStacktracesRequest = from_json(
        br#"{"profile_typeID":"cpu","start":"1700000000000","maxNodes":16,
             "format":"PROFILE_FORMAT_TREE","labelSelector":null,"unknownField":[1]}"#,
    )
    .unwrap();
    assert_eq!(r.profile_type_id, "cpu");
    assert_eq!(r.start, 1_700_000_000_000);
    assert_eq!(r.max_nodes, Some(16));
    assert_eq!(r.format, ProfileFormat::Tree as i32);
    assert_eq!(r.label_selector, "");
    let r: SelectMergeStacktracesRequest =
        from_json(br#"{"profileTypeID":"cpu","max_nodes":"7","format":2}"#).unwrap();
    assert_eq!(
        (r.profile_type_id.as_str(), r.max_nodes, r.format),
        ("cpu", Some(7), 2)
    );
}

#[test]
fn bad_fields_are_errors_that_name_the_field() {
    let err = from_json::<SelectMergeStacktracesRequest>(br#"{"start":"soon"}"#).unwrap_err();
    assert!(err.starts_with("start"), "{err}");
    let err = from_json::<SelectMergeStacktracesRequest>(br#"{"format":"PNG"}"#).unwrap_err();
    assert!(err.contains("PROFILE_FORMAT_TREE"), "{err}");
    assert!(from_json::<SelectMergeStacktracesRequest>(b"[1]").is_err());
    assert!(from_json::<SelectMergeStacktracesRequest>(b"{nope").is_err());
}

#[test]
fn a_request_nested_too_deep_is_refused() {
    let deep = "[".repeat(100) + &"]".repeat(100);
    let body = format!(r#"{{"unknown":{deep}}}"#);
    let err = from_json::<SelectMergeStacktracesRequest>(body.as_bytes()).unwrap_err();
    assert!(err.contains("deeper"), "{err}");
}

#[test]
fn written_integers_are_strings_floats_numbers_and_bytes_base64() {
    let response = SelectMergeStacktracesResponse {
        flamegraph: Some(FlameGraph {
            names: vec!["total".into()],
            levels: vec![Level {
                values: vec![1, -2],
            }],
            total: i64::MAX,
            max_self: 0,
        }),
        tree: vec![0xff],
    };
    let got: Value = serde_json::from_slice(&to_json(&response).unwrap()).unwrap();
    assert_eq!(got["flamegraph"]["total"], json!(i64::MAX.to_string()));
    assert_eq!(got["flamegraph"]["maxSelf"], json!("0"));
    assert_eq!(got["flamegraph"]["levels"][0]["values"], json!(["1", "-2"]));
    assert_eq!(got["tree"], json!("/w=="));
    let point: Value = serde_json::from_slice(
        &to_json(&Point {
            value: 2.5,
            timestamp: 1_700_000_000_000,
            ..Point::default()
        })
        .unwrap(),
    )
    .unwrap();
    assert_eq!(point["value"], json!(2.5));
    assert_eq!(point["timestamp"], json!("1700000000000"));
    assert_eq!(
        TimeSeriesAggregationType::Average.as_str_name(),
        "TIME_SERIES_AGGREGATION_TYPE_AVERAGE"
    );
}
