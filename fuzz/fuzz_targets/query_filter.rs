//! The query language (`core/src/query.rs`): filters and queries parsed from JSON text, and the
//! total order of JSON values they compare with.
//!
//! Properties: a query that parses serialises to a form that parses back equal within the same
//! limits (the api-server forwards the serialised form to store nodes, which parse it again),
//! and so does a filter within the limits as a tree (`Filter::check_extent`); `$not` is the complement on any document; `compare_values` is a total order
//! (reflexive, antisymmetric, transitive on the values found in the input).
#![no_main]

use std::cmp::Ordering;

use causeway_core::query::{compare_values, Filter, Query, QueryLimits};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};

fn docs(extra: &Value) -> Vec<Value> {
    vec![
        json!({}),
        json!({"a": 1, "b": {"c": [1, 2.5, "x"]}, "s": "open", "n": null, "t": true}),
        json!({"a": -9223372036854775808i64, "b": [{"c": 18446744073709551615u64}]}),
        extra.clone(),
    ]
}

fn values(v: &Value, out: &mut Vec<Value>) {
    if out.len() >= 24 {
        return;
    }
    out.push(v.clone());
    match v {
        Value::Array(a) => a.iter().for_each(|x| values(x, out)),
        Value::Object(m) => m.values().for_each(|x| values(x, out)),
        _ => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let limits = QueryLimits::default();
    let input: Option<Value> = serde_json::from_str(text).ok();

    if let Ok(f) = Filter::parse_str(text, &limits) {
        // The form parses back equal (its tree may be past the limits the text met: see
        // `Filter::parse`), and within them when the tree is.
        let form = f.to_json();
        let roomy = QueryLimits {
            max_depth: 64,
            max_nodes: 4096,
            ..limits
        };
        assert_eq!(
            Filter::parse(&form, &roomy),
            Ok(f.clone()),
            "the serialised filter {form} does not parse back equal"
        );
        if f.check_extent(&limits).is_ok() {
            assert_eq!(Filter::parse(&form, &limits), Ok(f.clone()));
            let text = serde_json::to_string(&f).expect("a filter serialises");
            assert_eq!(Filter::parse_str(&text, &limits), Ok(f.clone()));
        }
        let not = Filter::Not(Box::new(f.clone()));
        for doc in docs(input.as_ref().unwrap_or(&Value::Null)) {
            assert_eq!(not.matches(&doc), !f.matches(&doc));
        }
    }

    if let Ok(q) = Query::parse_str(text, &limits) {
        let form = serde_json::to_value(&q).expect("a query serialises");
        assert_eq!(
            Query::parse(&form, &limits),
            Ok(q.clone()),
            "the serialised query {form} does not parse back equal"
        );
        if let Some(order) = &q.order {
            for a in docs(&form) {
                assert_eq!(order.compare(&a, &a), Ordering::Equal);
            }
        }
    }

    if let Some(v) = &input {
        let mut vs = Vec::new();
        values(v, &mut vs);
        for a in &vs {
            assert_eq!(
                compare_values(a, a),
                Ordering::Equal,
                "{a} is not equal to itself"
            );
            for b in &vs {
                let ab = compare_values(a, b);
                assert_eq!(ab, compare_values(b, a).reverse(), "{a} vs {b}");
                for c in &vs {
                    let bc = compare_values(b, c);
                    if ab != Ordering::Greater && bc != Ordering::Greater {
                        assert_ne!(
                            compare_values(a, c),
                            Ordering::Greater,
                            "not transitive: {a} <= {b} <= {c}"
                        );
                    }
                }
            }
        }
    }
});
