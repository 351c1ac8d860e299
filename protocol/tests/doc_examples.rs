//! Every example in `docs/protocol.md` is checked against the codec, so the document a client
//! author writes from cannot drift from what the gateway speaks.
//!
//! The format (described at the top of the document's examples section, and parsed the same way
//! by the JavaScript library's golden-vector tests):
//! - a fenced block with info string `json` holds one complete JSON message per line;
//! - a fenced block with info string `hex` holds one binary frame: its first line is `# ` and the
//!   same frame as one line of JSON (its twin), every other line is hex digits in groups
//!   separated by spaces, optionally followed by `# comment`; blank lines are allowed.
//!
//! A JSON line must decode, and encoding what it decoded must give the same JSON value, except
//! for the decoder's documented normalisations (see [`normalise`]). A hex block must decode to
//! the same typed frame as its twin, and encoding that frame must give exactly its bytes.

use bytes::BytesMut;
use chinwag_protocol::{binary, json, Frame, Op};
use serde_json::Value;

const CLIENT_DOC: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md"));
/// The service port's ops are documented, with examples in the same format, in backend.md.
const BACKEND_DOC: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/backend.md"));

/// Both documents' examples.
fn all_examples() -> Vec<Example> {
    let mut all = examples(CLIENT_DOC);
    all.extend(examples(BACKEND_DOC));
    all
}

/// One example, with the document line it starts on (for messages).
#[derive(Debug)]
enum Example {
    Json {
        line: usize,
        text: String,
    },
    Hex {
        line: usize,
        twin: String,
        bytes: Vec<u8>,
    },
}

/// Every `json` and `hex` block of `doc`, as examples. Panics (naming the line) on a block that
/// does not follow the format.
fn examples(doc: &str) -> Vec<Example> {
    let mut out = Vec::new();
    let mut lines = doc.lines().enumerate().map(|(i, l)| (i + 1, l));
    while let Some((start, line)) = lines.next() {
        let Some(info) = line.trim_start().strip_prefix("```") else {
            continue;
        };
        let info = info.trim().to_owned();
        let body: Vec<(usize, &str)> = lines
            .by_ref()
            .take_while(|(_, l)| !l.trim_start().starts_with("```"))
            .collect();
        match info.as_str() {
            "json" => {
                for (line, text) in body {
                    if !text.trim().is_empty() {
                        out.push(Example::Json {
                            line,
                            text: text.trim().to_owned(),
                        });
                    }
                }
            }
            "hex" => out.push(parse_hex_block(start, &body)),
            _ => {}
        }
    }
    out
}

fn parse_hex_block(start: usize, body: &[(usize, &str)]) -> Example {
    let mut body = body.iter().filter(|(_, l)| !l.trim().is_empty());
    let twin = body
        .next()
        .and_then(|(_, l)| l.trim().strip_prefix("# "))
        .unwrap_or_else(|| panic!("line {start}: a hex block starts with `# ` and its JSON twin"))
        .trim()
        .to_owned();
    let mut bytes = Vec::new();
    for (line, text) in body {
        let hex = text.split('#').next().unwrap_or_default();
        for group in hex.split_whitespace() {
            assert!(
                group.len() % 2 == 0 && group.bytes().all(|b| b.is_ascii_hexdigit()),
                "line {line}: `{group}` is not a group of whole hex bytes"
            );
            for pair in group.as_bytes().chunks(2) {
                let pair = std::str::from_utf8(pair).expect("ASCII hex digits");
                bytes.push(u8::from_str_radix(pair, 16).expect("checked hex digits"));
            }
        }
    }
    Example::Hex {
        line: start,
        twin,
        bytes,
    }
}

/// What the encoder writes for a decoded message that the decoder accepted in another form:
/// `history` without `limit` means `limit` 50, and `before` 0 means no `before` (the newest
/// page). Fields the decoder does not know are ignored, so they do not come back either.
fn normalise(mut value: Value) -> Value {
    if let Some(object) = value.as_object_mut() {
        if object.get("op").and_then(Value::as_str) == Some("history") {
            if object.get("before").and_then(Value::as_u64) == Some(0) {
                object.remove("before");
            }
            object.entry("limit").or_insert(Value::from(50));
        }
    }
    value
}

/// Checks one JSON example; returns its decoded frame.
fn check_json(text: &str) -> Result<Frame<'_>, String> {
    let frame = json::decode(text).map_err(|e| format!("does not decode: {e}"))?;
    let mut out = BytesMut::new();
    json::encode(&frame, &mut out);
    let written: Value = serde_json::from_slice(&out).map_err(|e| e.to_string())?;
    let given: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    if written != normalise(given) {
        return Err(format!(
            "re-encodes differently:\n  doc:     {text}\n  encoder: {}",
            String::from_utf8_lossy(&out)
        ));
    }
    Ok(frame)
}

/// Checks one hex example against its twin; returns the op.
fn check_hex(twin: &str, bytes: &[u8]) -> Result<Op, String> {
    let from_json = check_json(twin).map_err(|e| format!("twin: {e}"))?;
    let from_hex = binary::decode(bytes).map_err(|e| format!("hex does not decode: {e}"))?;
    if from_hex != from_json {
        return Err(format!(
            "hex and twin differ:\n  hex:  {from_hex:?}\n  twin: {from_json:?}"
        ));
    }
    let mut encoded = BytesMut::new();
    binary::encode(&from_json, &mut encoded).map_err(|e| e.to_string())?;
    if encoded[..] != *bytes {
        return Err(format!(
            "the encoder writes other bytes:\n  doc:     {}\n  encoder: {}",
            hex(bytes),
            hex(&encoded)
        ));
    }
    Ok(from_json.message.op())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn every_json_example_decodes_and_re_encodes_to_itself() {
    let mut failures = Vec::new();
    let mut count = 0;
    for example in all_examples() {
        if let Example::Json { line, text } = example {
            count += 1;
            if let Err(e) = check_json(&text) {
                failures.push(format!("docs/protocol.md line {line}: {e}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(count > 0, "no json examples found");
}

#[test]
fn every_hex_example_is_its_twin_byte_for_byte() {
    let mut failures = Vec::new();
    for example in all_examples() {
        if let Example::Hex { line, twin, bytes } = example {
            if let Err(e) = check_hex(&twin, &bytes) {
                failures.push(format!("docs/protocol.md hex block at line {line}: {e}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_op_has_a_json_and_a_hex_example() {
    let mut json_ops = Vec::new();
    let mut hex_ops = Vec::new();
    for example in all_examples() {
        match example {
            Example::Json { text, .. } => {
                if let Ok(frame) = json::decode(&text) {
                    json_ops.push(frame.message.op());
                }
            }
            Example::Hex { twin, bytes, .. } => {
                if let Ok(op) = check_hex(&twin, &bytes) {
                    hex_ops.push(op);
                }
            }
        }
    }
    // The client contract's ops. The service port's (codes 0x10..=0x3f and their replies) are
    // documented in docs/backend.md; that document's examples are not checked here yet.
    let missing = |have: &[Op]| -> Vec<&str> {
        Op::ALL
            .into_iter()
            .filter(|op| !op.is_service())
            .filter(|op| !have.contains(op))
            .map(Op::name)
            .collect()
    };
    assert_eq!(
        missing(&json_ops),
        Vec::<&str>::new(),
        "ops without a json example"
    );
    assert_eq!(
        missing(&hex_ops),
        Vec::<&str>::new(),
        "ops without a hex example"
    );
}

#[test]
fn editing_any_byte_of_a_hex_example_fails_the_check() {
    let mut checked = 0;
    for example in all_examples() {
        let Example::Hex { twin, bytes, .. } = example else {
            continue;
        };
        for i in 0..bytes.len() {
            let mut edited = bytes.clone();
            edited[i] ^= 0x01;
            assert!(
                check_hex(&twin, &edited).is_err(),
                "flipping a bit of byte {i} of `{twin}` went unnoticed"
            );
            checked += 1;
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(
            check_hex(&twin, &longer).is_err(),
            "an extra byte went unnoticed"
        );
        assert!(
            check_hex(&twin, &bytes[..bytes.len() - 1]).is_err(),
            "a missing byte went unnoticed"
        );
    }
    assert!(checked > 0, "no hex examples found");
}

#[test]
fn the_format_parser_reads_twins_groups_and_comments() {
    let doc = "text\n```hex\n# {\"op\":\"ping\",\"req\":1}\n\n00000010 01 07   # header\n0001 0000000000000001\n```\n```json\n{\"op\":\"pong\"}\n\n{\"op\":\"ping\"}\n```\n```sh\nnot an example\n```\n";
    let found = examples(doc);
    assert_eq!(found.len(), 3, "{found:?}");
    let Example::Hex { twin, bytes, .. } = &found[0] else {
        panic!("expected a hex example first: {found:?}");
    };
    assert_eq!(twin, r#"{"op":"ping","req":1}"#);
    assert_eq!(hex(bytes), "00000010010700010000000000000001");
    assert_eq!(check_hex(twin, bytes), Ok(Op::Ping));
    assert!(matches!(&found[1], Example::Json { text, .. } if text == r#"{"op":"pong"}"#));
}
