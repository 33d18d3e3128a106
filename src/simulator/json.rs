//! The JSON documents IMDS serves, written by hand (the crate has no JSON library outside
//! tests) in IMDS's own layout: one key per line, two-space indent, `" : "` between key and
//! value, no trailing newline.

use std::fmt::Write as _;

/// A JSON value that appears in IMDS documents: strings, and `null` for absent fields.
pub(super) enum Value<'a> {
    /// A string, escaped on output.
    Str(&'a str),
    /// `null`, as in the identity document's `kernelId`.
    Null,
}

/// Renders `fields`, in the given order, as one pretty-printed JSON object. Order matters:
/// the credential document's key order is what real clients and captures show.
pub(super) fn pretty_object(fields: &[(&str, Value<'_>)]) -> String {
    let mut out = String::from("{\n");
    for (index, (key, value)) in fields.iter().enumerate() {
        out.push_str("  ");
        push_string(&mut out, key);
        out.push_str(" : ");
        match value {
            Value::Str(text) => push_string(&mut out, text),
            Value::Null => out.push_str("null"),
        }
        if index + 1 < fields.len() {
            out.push(',');
        }
        out.push('\n');
    }
    out.push('}');
    out
}

/// Appends `text` as a JSON string literal, escaping what RFC 8259 requires.
fn push_string(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                // Writing to a String cannot fail.
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_imds() {
        let text = pretty_object(&[("Code", Value::Str("Success")), ("kernelId", Value::Null)]);
        assert_eq!(
            text,
            "{\n  \"Code\" : \"Success\",\n  \"kernelId\" : null\n}"
        );
    }

    #[test]
    fn strings_are_escaped_and_parse_back() {
        let nasty = "quote\" back\\ nl\n tab\t bell\u{7} é";
        let text = pretty_object(&[("k", Value::Str(nasty))]);
        let parsed: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
        assert_eq!(parsed["k"], nasty);
    }
}
