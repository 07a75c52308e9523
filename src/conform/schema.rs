//! What an answer's body must be. At `full`: the schema that the OpenAPI
//! document built into this binary gives for the operation, status and
//! media type, checked as JSON Schema 2020-12 by the `jsonschema` crate,
//! with `additionalProperties: false` lifted so that extra fields pass. At
//! `seed`: only what the seed text names, so that any implementation can
//! pass: `provider_id`, `linked_user_id` and `linked_username` are strings
//! wherever they appear. Either way a fault names the JSON path it is at.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use jsonschema::error::ValidationErrorKind;
use serde_json::{json, Value};

use super::exchange::Answer;
use super::Level;
use crate::domain::Operation;

/// The fields the seed text names, each a string.
pub(crate) const SEED_FIELDS: [&str; 3] = ["provider_id", "linked_user_id", "linked_username"];

/// At most this many schema faults are named in one message.
const FAULTS_NAMED: usize = 3;

/// Judges answer bodies at one level.
pub(crate) struct Judge {
    level: Level,
    /// The OpenAPI document built into this binary.
    document: Value,
    /// `components.schemas`, with `additionalProperties: false` lifted.
    schemas: Value,
    /// Validators by the JSON text of the schema they check, each built on
    /// first use.
    validators: Mutex<HashMap<String, Arc<jsonschema::Validator>>>,
}

impl Judge {
    /// A judge at `level` reading the document built into this binary.
    pub(crate) fn new(level: Level) -> Result<Judge, String> {
        let document: Value = serde_json::from_str(&crate::http::openapi::document_json())
            .map_err(|e| format!("the built-in OpenAPI document does not parse: {e}"))?;
        let mut schemas = document
            .pointer("/components/schemas")
            .cloned()
            .ok_or("the built-in OpenAPI document has no components.schemas")?;
        lift_closed_objects(&mut schemas);
        Ok(Judge {
            level,
            document,
            schemas,
            validators: Mutex::new(HashMap::new()),
        })
    }

    /// The level this judge works at.
    pub(crate) fn level(&self) -> Level {
        self.level
    }

    /// Judges an answer's body as `operation`'s answer with its status and
    /// returns it as JSON (`null` when the answer documents, or at `seed`
    /// has, no body).
    pub(crate) fn body(&self, operation: Operation, answer: &Answer) -> Result<Value, String> {
        match self.level {
            Level::Seed => {
                if answer.body.is_empty() {
                    return Ok(Value::Null);
                }
                let body = answer.json()?;
                let mut faults = seed_faults(&body);
                if faults.is_empty() {
                    return Ok(body);
                }
                let more = faults.len().saturating_sub(FAULTS_NAMED);
                faults.truncate(FAULTS_NAMED);
                let mut text = faults.join("; ");
                if more > 0 {
                    text.push_str(&format!(" (and {more} more)"));
                }
                Err(text)
            }
            Level::Full => self.full(operation, answer),
        }
    }

    fn full(&self, operation: Operation, answer: &Answer) -> Result<Value, String> {
        let spec = operation.spec();
        let pointer = format!(
            "/paths/{}/{}/responses",
            spec.route.replace('~', "~0").replace('/', "~1"),
            spec.method.to_ascii_lowercase()
        );
        let status = answer.status.to_string();
        let mut response = self
            .document
            .pointer(&pointer)
            .and_then(|responses| responses.get(&status))
            .ok_or_else(|| format!("the document gives {} no {status} answer", operation.id()))?;
        if let Some(reference) = response.get("$ref").and_then(Value::as_str) {
            response = reference
                .strip_prefix('#')
                .and_then(|pointer| self.document.pointer(pointer))
                .ok_or_else(|| format!("the document's {reference} is missing"))?;
        }
        let Some(content) = response.get("content").and_then(Value::as_object) else {
            return Ok(Value::Null);
        };
        let documented = content.keys().cloned().collect::<Vec<_>>().join(" or ");
        let media = answer
            .media_type()
            .ok_or_else(|| format!("no Content-Type (the document says {documented})"))?;
        let schema = content
            .get(&media)
            .and_then(|c| c.get("schema"))
            .ok_or_else(|| format!("Content-Type {media} (the document says {documented})"))?;
        let body = answer.json()?;
        self.validate(schema, &body)?;
        Ok(body)
    }

    /// Validates `value` against `schema` (which may `$ref` the document's
    /// component schemas).
    fn validate(&self, schema: &Value, value: &Value) -> Result<(), String> {
        let key = schema.to_string();
        let validator = {
            let mut validators = self.validators.lock().unwrap_or_else(|e| e.into_inner());
            match validators.get(&key) {
                Some(validator) => validator.clone(),
                None => {
                    let root = json!({
                        "$schema": "https://json-schema.org/draft/2020-12/schema",
                        "components": {"schemas": self.schemas},
                        "allOf": [schema],
                    });
                    let validator = jsonschema::draft202012::options()
                        .should_validate_formats(true)
                        .build(&root)
                        .map_err(|e| format!("the document's schema {key} does not build: {e}"))?;
                    let validator = Arc::new(validator);
                    validators.insert(key, validator.clone());
                    validator
                }
            }
        };
        // (A hostile body may hold a fault per item: a few say enough.)
        let mut faults: Vec<String> = validator
            .iter_errors(value)
            .take(100)
            .map(|e| fault(&e))
            .collect();
        faults.dedup();
        if faults.is_empty() {
            return Ok(());
        }
        let name = schema
            .get("$ref")
            .and_then(Value::as_str)
            .and_then(|r| r.rsplit('/').next())
            .unwrap_or("its schema");
        let more = faults.len().saturating_sub(FAULTS_NAMED);
        faults.truncate(FAULTS_NAMED);
        let mut text = format!("the body does not fit {name}: {}", faults.join("; "));
        if more > 0 {
            text.push_str(&format!(" (and {more} more)"));
        }
        Err(text)
    }
}

/// One schema fault, named by its JSON path.
fn fault(error: &jsonschema::ValidationError) -> String {
    let path = json_path(error.instance_path().as_str());
    match error.kind() {
        ValidationErrorKind::Required { property } => match property.as_str() {
            Some(name) => format!("{}: missing", child_path(&path, name)),
            None => format!("{path}: a required member is missing"),
        },
        ValidationErrorKind::Type { .. } => format!(
            "{path}: {} (it is {})",
            error.masked(),
            type_name(error.instance())
        ),
        _ => format!("{path}: {}", error.masked()),
    }
}

/// Where the seed's fields are not strings.
pub(crate) fn seed_faults(body: &Value) -> Vec<String> {
    let mut faults = Vec::new();
    walk_seed_fields(body, "$".to_string(), &mut faults);
    faults
}

fn walk_seed_fields(value: &Value, path: String, faults: &mut Vec<String>) {
    match value {
        Value::Object(members) => {
            for (key, member) in members {
                let here = child_path(&path, key);
                if SEED_FIELDS.contains(&key.as_str()) && !member.is_string() {
                    faults.push(format!(
                        "{here}: not a string (it is {}), where the seed names a string",
                        type_name(member)
                    ));
                } else {
                    walk_seed_fields(member, here, faults);
                }
            }
        }
        Value::Array(items) => {
            for (index, item) in items.iter().enumerate() {
                walk_seed_fields(item, format!("{path}[{index}]"), faults);
            }
        }
        _ => {}
    }
}

/// Every object in `value` (itself included) that has a member `key`, in
/// document order.
pub(crate) fn objects_with<'v>(value: &'v Value, key: &str) -> Vec<&'v Value> {
    let mut found = Vec::new();
    collect_objects_with(value, key, &mut found);
    found
}

fn collect_objects_with<'v>(value: &'v Value, key: &str, found: &mut Vec<&'v Value>) {
    match value {
        Value::Object(members) => {
            if members.contains_key(key) {
                found.push(value);
            }
            for member in members.values() {
                collect_objects_with(member, key, found);
            }
        }
        Value::Array(items) => {
            for item in items {
                collect_objects_with(item, key, found);
            }
        }
        _ => {}
    }
}

/// Whether `value` holds the string `text` (in any letter case) anywhere.
pub(crate) fn holds_string(value: &Value, text: &str) -> bool {
    match value {
        Value::String(s) => s.eq_ignore_ascii_case(text),
        Value::Object(members) => members.values().any(|v| holds_string(v, text)),
        Value::Array(items) => items.iter().any(|v| holds_string(v, text)),
        _ => false,
    }
}

/// A JSON value's type, as a message names it.
pub(crate) fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A JSON pointer (`/a/0/b`) as a JSON path (`$.a[0].b`).
pub(crate) fn json_path(pointer: &str) -> String {
    let mut path = "$".to_string();
    for segment in pointer.split('/').skip(1) {
        let segment = segment.replace("~1", "/").replace("~0", "~");
        if !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit()) {
            path.push_str(&format!("[{segment}]"));
        } else {
            path = child_path(&path, &segment);
        }
    }
    path
}

/// `path` followed by the member `name`.
fn child_path(path: &str, name: &str) -> String {
    let plain = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if plain {
        format!("{path}.{name}")
    } else {
        format!("{path}[{}]", Value::String(name.to_string()))
    }
}

/// Lifts `additionalProperties: false` (and `unevaluatedProperties:
/// false`) everywhere: an answer with more fields than the document names
/// still keeps the contract.
fn lift_closed_objects(value: &mut Value) {
    match value {
        Value::Object(members) => {
            for keyword in ["additionalProperties", "unevaluatedProperties"] {
                if members.get(keyword) == Some(&Value::Bool(false)) {
                    members.remove(keyword);
                }
            }
            members.values_mut().for_each(lift_closed_objects);
        }
        Value::Array(items) => items.iter_mut().for_each(lift_closed_objects),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderMap, HeaderValue};

    fn answer(status: u16, content_type: &str, body: Value) -> Answer {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_str(content_type).unwrap());
        Answer {
            request: "POST /x".to_string(),
            status,
            headers,
            body: body.to_string().into_bytes(),
        }
    }

    fn identity() -> Value {
        json!({
            "provider_id": "okta",
            "linked_user_id": "00u1",
            "linked_username": "ada@example.com",
            "created_at": "2026-01-01T00:00:00Z",
            "updated_at": "2026-01-01T00:00:00Z",
        })
    }

    #[test]
    fn json_pointers_read_as_json_paths() {
        assert_eq!(json_path(""), "$");
        assert_eq!(
            json_path("/linked_identities/0/created_at"),
            "$.linked_identities[0].created_at"
        );
        assert_eq!(json_path("/a~1b/c d"), "$[\"a/b\"][\"c d\"]");
    }

    #[test]
    fn at_full_a_missing_field_is_named_by_its_path() {
        let judge = Judge::new(Level::Full).unwrap();
        let mut body = json!({"linked_identities": [identity()]});
        body["linked_identities"][0]
            .as_object_mut()
            .unwrap()
            .remove("created_at");
        let fault = judge
            .body(
                Operation::ListLinkedIdentities,
                &answer(200, "application/json", body),
            )
            .unwrap_err();
        assert!(
            fault.contains("$.linked_identities[0].created_at: missing"),
            "{fault}"
        );
        assert!(fault.contains("LinkedIdentityList"), "{fault}");
    }

    #[test]
    fn at_full_a_mistyped_field_is_named_and_extra_fields_pass() {
        let judge = Judge::new(Level::Full).unwrap();
        let mut body = identity();
        body["extra"] = json!({"anything": true});
        assert!(judge
            .body(
                Operation::LinkIdentity,
                &answer(201, "application/json", body.clone())
            )
            .is_ok());
        body["linked_user_id"] = json!(42);
        let fault = judge
            .body(
                Operation::LinkIdentity,
                &answer(201, "application/json", body),
            )
            .unwrap_err();
        assert!(fault.contains("$.linked_user_id:"), "{fault}");
        assert!(fault.contains("a number"), "{fault}");
    }

    #[test]
    fn at_full_the_status_and_media_type_must_be_documented() {
        let judge = Judge::new(Level::Full).unwrap();
        let undocumented = judge
            .body(
                Operation::LinkIdentity,
                &answer(418, "application/json", json!({})),
            )
            .unwrap_err();
        assert!(undocumented.contains("no 418 answer"), "{undocumented}");
        let problem = json!({"type": "about:blank", "title": "Bad Request", "status": 400,
            "detail": "no", "code": "USER_ALREADY_LINKED", "request_id": "r"});
        assert!(judge
            .body(
                Operation::LinkIdentity,
                &answer(400, "application/problem+json", problem.clone())
            )
            .is_ok());
        let wrong_type = judge
            .body(
                Operation::LinkIdentity,
                &answer(400, "application/json", problem),
            )
            .unwrap_err();
        assert!(
            wrong_type.contains("application/problem+json"),
            "{wrong_type}"
        );
    }

    #[test]
    fn at_full_a_code_the_answer_cannot_carry_is_a_fault() {
        let judge = Judge::new(Level::Full).unwrap();
        let problem = json!({"type": "about:blank", "title": "Bad Request", "status": 400,
            "detail": "no", "code": "SOMETHING_ELSE", "request_id": "r"});
        let fault = judge
            .body(
                Operation::LinkIdentity,
                &answer(400, "application/problem+json", problem),
            )
            .unwrap_err();
        assert!(fault.contains("$.code:"), "{fault}");
    }

    #[test]
    fn at_seed_only_the_named_fields_are_judged_wherever_they_are() {
        let judge = Judge::new(Level::Seed).unwrap();
        let other_shape = json!({"error": {"code": "USER_ALREADY_LINKED"}});
        assert!(judge
            .body(
                Operation::LinkIdentity,
                &answer(400, "application/json", other_shape)
            )
            .is_ok());
        let mistyped = json!({"items": [{"provider_id": "okta", "linked_user_id": 7}]});
        let fault = judge
            .body(
                Operation::ListLinkedIdentities,
                &answer(200, "text/plain", mistyped),
            )
            .unwrap_err();
        assert_eq!(
            fault,
            "$.items[0].linked_user_id: not a string (it is a number), where the seed names a string"
        );
    }

    #[test]
    fn objects_and_strings_are_found_at_any_depth() {
        let body =
            json!({"data": {"links": [{"provider_id": "a", "x": ["Delete"]}]}, "ops": ["CREATE"]});
        assert_eq!(objects_with(&body, "provider_id").len(), 1);
        assert!(holds_string(&body, "create"));
        assert!(holds_string(&body, "DELETE"));
        assert!(!holds_string(&body, "a-b"));
    }
}
