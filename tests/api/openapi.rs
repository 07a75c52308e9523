//! The OpenAPI document: committed as served, and as exact as contract
//! testers, mock servers and client generators need it.

use std::collections::BTreeSet;

use linkid::domain::Operation;
use serde_json::{json, Value};

use crate::helpers::{spawn_app, test_config};

const COMMITTED: &str = include_str!("../../openapi/openapi.json");

fn document() -> Value {
    serde_json::from_str(COMMITTED).unwrap()
}

/// `value`, or what its `$ref` points at (`#/components/...` only).
fn resolve<'a>(doc: &'a Value, value: &'a Value) -> &'a Value {
    match value["$ref"].as_str() {
        Some(pointer) => {
            let target = doc
                .pointer(pointer.trim_start_matches('#'))
                .unwrap_or_else(|| panic!("{pointer} resolves"));
            resolve(doc, target)
        }
        None => value,
    }
}

/// Every operation: (its table row, its object in the document).
fn operations(doc: &Value) -> Vec<(linkid::domain::OperationSpec, &Value)> {
    Operation::ALL
        .into_iter()
        .map(|op| {
            let spec = op.spec();
            let operation = &doc["paths"][spec.route][spec.method.to_lowercase()];
            assert!(operation.is_object(), "{} is documented", spec.id);
            (spec, operation)
        })
        .collect()
}

/// Every response object in the document, resolved: (where, response).
fn responses(doc: &Value) -> Vec<(String, &Value)> {
    let mut all = Vec::new();
    for (spec, operation) in operations(doc) {
        for (status, response) in operation["responses"].as_object().unwrap() {
            all.push((format!("{} {status}", spec.id), resolve(doc, response)));
        }
    }
    all
}

/// The codes an error response's schema allows.
fn narrowed_codes(doc: &Value, response: &Value) -> BTreeSet<String> {
    let schema = resolve(
        doc,
        &response["content"]["application/problem+json"]["schema"],
    );
    let parts = schema["allOf"]
        .as_array()
        .expect("Problem narrowed by allOf");
    assert_eq!(parts[0]["$ref"], "#/components/schemas/Problem");
    parts[1]["properties"]["code"]["enum"]
        .as_array()
        .expect("a code enum")
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn the_served_document_is_byte_identical_to_the_committed_one() {
    let app = spawn_app().await;

    let response = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let served = response.text().await.unwrap();
    assert!(
        served == COMMITTED,
        "openapi/openapi.json is stale: regenerate it with `cargo run -- openapi > openapi/openapi.json`"
    );
}

#[test]
fn the_document_is_openapi_3_1_with_every_operation_status_and_error_code() {
    let doc = document();
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    let everywhere = [
        ("401", "UNAUTHENTICATED"),
        ("401", "INVALID_TOKEN"),
        ("403", "FORBIDDEN"),
        ("403", "CORS_FORBIDDEN"),
        ("429", "RATE_LIMITED"),
        ("500", "INTERNAL"),
    ];
    let expected: [(&str, Vec<(&str, &str)>); 7] = [
        ("listIdentityProviders", vec![("200", "")]),
        (
            "listLinkedIdentities",
            vec![
                ("200", ""),
                ("400", "VALIDATION_FAILED"),
                ("503", "STORE_UNAVAILABLE"),
            ],
        ),
        (
            "linkIdentity",
            vec![
                ("201", ""),
                ("200", ""),
                ("400", "VALIDATION_FAILED"),
                ("400", "MALFORMED_JSON"),
                ("400", "INVALID_IDENTITY_PROVIDER"),
                ("400", "USER_ALREADY_LINKED"),
                ("408", "REQUEST_TIMEOUT"),
                ("409", "IDENTITY_ALREADY_LINKED"),
                ("413", "PAYLOAD_TOO_LARGE"),
                ("415", "UNSUPPORTED_MEDIA_TYPE"),
                ("503", "STORE_UNAVAILABLE"),
                ("507", "STORAGE_FULL"),
            ],
        ),
        (
            "getLinkedIdentity",
            vec![
                ("200", ""),
                ("400", "VALIDATION_FAILED"),
                ("404", "LINKED_IDENTITY_NOT_FOUND"),
                ("503", "STORE_UNAVAILABLE"),
            ],
        ),
        (
            "deleteLinkedIdentity",
            vec![
                ("200", ""),
                ("400", "VALIDATION_FAILED"),
                ("404", "LINKED_IDENTITY_NOT_FOUND"),
                ("503", "STORE_UNAVAILABLE"),
                ("507", "STORAGE_FULL"),
            ],
        ),
        (
            "searchLinkedIdentities",
            vec![
                ("200", ""),
                ("400", "VALIDATION_FAILED"),
                ("503", "STORE_UNAVAILABLE"),
            ],
        ),
        (
            "listEvents",
            vec![
                ("200", ""),
                ("400", "VALIDATION_FAILED"),
                ("410", "EVENTS_EXPIRED"),
                ("503", "TOO_MANY_STREAMS"),
                ("503", "STORE_UNAVAILABLE"),
            ],
        ),
    ];
    let ops = operations(&doc);
    for (id, own) in expected {
        let (_, operation) = ops.iter().find(|(spec, _)| spec.id == id).unwrap();
        assert_eq!(
            operation["security"][0]["bearer"],
            json!([]),
            "{id} needs the bearer"
        );
        let wanted: Vec<_> = own.into_iter().chain(everywhere).collect();
        let statuses: BTreeSet<&str> = wanted.iter().map(|(status, _)| *status).collect();
        let documented: BTreeSet<&str> = operation["responses"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(documented, statuses, "{id}: exactly these statuses");
        for (status, code) in wanted {
            if code.is_empty() {
                continue;
            }
            let response = resolve(&doc, &operation["responses"][status]);
            let example = &response["content"]["application/problem+json"]["examples"][code];
            assert_eq!(example["value"]["code"], code, "{id} {status}: {code}");
            assert_eq!(
                example["value"]["status"].as_u64().unwrap().to_string(),
                status,
                "{id} {status}: {code}"
            );
            assert!(
                narrowed_codes(&doc, response).contains(code),
                "{id} {status}: the schema allows {code}"
            );
        }
    }
}

#[test]
fn problem_code_is_an_enum_that_each_error_response_narrows_to_its_examples() {
    let doc = document();
    let problem = &doc["components"]["schemas"]["Problem"];
    assert_eq!(
        problem["properties"]["code"]["$ref"],
        "#/components/schemas/ProblemCode"
    );
    let all: BTreeSet<String> = doc["components"]["schemas"]["ProblemCode"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect();
    assert!(all.contains("VALIDATION_FAILED") && all.contains("NOT_FOUND"));
    for (place, response) in responses(&doc) {
        let Some(examples) =
            response["content"]["application/problem+json"]["examples"].as_object()
        else {
            continue;
        };
        let codes = narrowed_codes(&doc, response);
        assert!(codes.is_subset(&all), "{place}");
        let shown: BTreeSet<String> = examples
            .values()
            .map(|e| e["value"]["code"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(shown, codes, "{place}: one example per code, no other");
        for (name, example) in examples {
            assert_eq!(example["value"]["code"], name.as_str(), "{place}");
        }
    }
}

#[test]
fn fields_that_are_only_ever_omitted_are_not_nullable() {
    let doc = document();
    let schemas = &doc["components"]["schemas"];
    for (schema, field) in [
        ("LinkedIdentity", "actions"),
        ("LinkedIdentityList", "actions"),
        ("Problem", "errors"),
        ("Problem", "errors_omitted"),
    ] {
        let property = &schemas[schema]["properties"][field];
        assert!(property.is_object(), "{schema}.{field}");
        assert!(
            property["type"].is_string(),
            "{schema}.{field} has one type, not [.., null]: {property}"
        );
        let required = schemas[schema]["required"].as_array().unwrap();
        assert!(!required.contains(&json!(field)), "{schema}.{field}");
    }
}

#[test]
fn the_server_is_the_one_serving_the_document() {
    let doc = document();

    assert_eq!(doc["servers"].as_array().unwrap().len(), 1);
    assert_eq!(doc["servers"][0]["url"], "/");
}

#[test]
fn embed_is_documented_as_comma_separated_with_at_least_one_value() {
    let doc = document();
    for (spec, operation) in operations(&doc) {
        let Some(embed) = operation["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == "embed")
        else {
            continue;
        };
        assert_eq!(embed["style"], "form", "{}", spec.id);
        assert_eq!(embed["explode"], false, "{}", spec.id);
        assert_eq!(embed["schema"]["minItems"], 1, "{}", spec.id);
        assert!(
            embed["description"]
                .as_str()
                .unwrap()
                .contains("embed=ACTIONS&embed=ACTIONS"),
            "{}: repetition is described",
            spec.id
        );
    }
}

#[test]
fn shared_error_answers_are_components_referenced_by_every_operation() {
    let doc = document();
    for (spec, operation) in operations(&doc) {
        for (status, name) in [
            ("401", "Unauthorized"),
            ("403", "Forbidden"),
            ("429", "RateLimited"),
            ("500", "Internal"),
        ] {
            assert_eq!(
                operation["responses"][status]["$ref"],
                format!("#/components/responses/{name}"),
                "{} {status}",
                spec.id
            );
        }
    }
    let link = &doc["paths"]["/api/admin/users/v4/users/{user_id}/linked-identities"]["post"];
    assert_eq!(
        link["responses"]["408"]["$ref"],
        "#/components/responses/RequestTimeout"
    );
    assert_eq!(
        link["responses"]["503"]["$ref"],
        "#/components/responses/StoreUnavailable"
    );
}

#[test]
fn the_new_operation_makes_a_201_location_resolve() {
    let doc = document();
    let item = &doc["paths"]["/api/admin/users/v4/users/{user_id}/linked-identities/{provider_id}"];

    assert_eq!(item["get"]["operationId"], "getLinkedIdentity");
    let location = &item["get"]["responses"]["200"]["content"]["application/json"]["schema"];
    assert_eq!(location["$ref"], "#/components/schemas/LinkedIdentity");
    let created = &doc["paths"]["/api/admin/users/v4/users/{user_id}/linked-identities"]["post"]
        ["responses"]["201"];
    let header = resolve(&doc, &created["headers"]["Location"]);
    assert_eq!(header["required"], true);
    assert_eq!(
        header["example"],
        "/api/admin/users/v4/users/u-42/linked-identities/okta"
    );
}

#[test]
fn every_response_has_a_required_request_id_and_headers_have_examples() {
    let doc = document();
    for (place, response) in responses(&doc) {
        let request_id = resolve(&doc, &response["headers"]["x-request-id"]);
        assert_eq!(request_id["required"], true, "{place}");
        assert!(request_id["example"].is_string(), "{place}");
        for (name, header) in response["headers"].as_object().unwrap() {
            let header = resolve(&doc, header);
            assert!(
                header["example"].is_string()
                    || header["example"].is_number()
                    || header["examples"].is_object(),
                "{place}: {name} has an example"
            );
        }
        if place.ends_with(" 401") {
            let challenge = resolve(&doc, &response["headers"]["WWW-Authenticate"]);
            assert_eq!(challenge["required"], true, "{place}");
            assert_eq!(challenge["examples"]["UNAUTHENTICATED"]["value"], "Bearer");
            assert_eq!(
                challenge["examples"]["INVALID_TOKEN"]["value"],
                r#"Bearer error="invalid_token""#
            );
        }
    }
}

#[test]
fn examples_mock_the_real_shapes_plain_first_and_the_default_providers() {
    let doc = document();
    let list = &doc["paths"]["/api/admin/users/v4/users/{user_id}/linked-identities"]["get"]
        ["responses"]["200"]["content"]["application/json"]["examples"];
    // A mock server answers with the first example: the one without embed.
    let (_, first) = list.as_object().unwrap().iter().next().unwrap();
    assert!(first["value"].get("actions").is_none(), "{first}");
    assert!(first["value"]["linked_identities"][0]
        .get("actions")
        .is_none());

    let dir = tempfile::tempdir().unwrap();
    let linkable: Vec<String> = test_config(&dir)
        .identity_providers
        .into_iter()
        .filter(|p| p.linkable)
        .map(|p| p.id)
        .collect();
    let providers = &doc["paths"]["/api/admin/users/v4/users/identity-providers"]["get"]
        ["responses"]["200"]["content"]["application/json"]["example"]["identity_providers"];
    let shown: Vec<String> = providers
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["provider_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(shown, linkable);

    for (place, response) in responses(&doc) {
        for content in response["content"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(_, c)| c)
        {
            assert!(
                content["example"].is_object()
                    || content["example"].is_string()
                    || content["examples"].is_object(),
                "{place} has an example"
            );
        }
    }
}

#[test]
fn path_parameters_have_examples() {
    let doc = document();
    for (spec, operation) in operations(&doc) {
        for parameter in operation["parameters"].as_array().into_iter().flatten() {
            if parameter["in"] != "path" {
                continue;
            }
            let expected = match parameter["name"].as_str().unwrap() {
                "user_id" => "u-42",
                "provider_id" => "okta",
                other => panic!("{}: unexpected path parameter {other}", spec.id),
            };
            assert_eq!(parameter["example"], expected, "{}", spec.id);
        }
    }
}

#[test]
fn every_identifier_pattern_is_the_rule_the_server_applies() {
    let doc = document();
    let mut seen = 0;
    for (spec, operation) in operations(&doc) {
        for parameter in operation["parameters"].as_array().into_iter().flatten() {
            let parameter = resolve(&doc, parameter);
            if ["user_id", "provider_id", "linked_user_id"]
                .contains(&parameter["name"].as_str().unwrap())
            {
                assert_eq!(
                    parameter["schema"]["pattern"],
                    linkid::domain::TEXT_PATTERN,
                    "{} {}",
                    spec.id,
                    parameter["name"]
                );
                seen += 1;
            }
        }
    }
    let body = &doc["components"]["schemas"]["LinkRequest"]["properties"];
    for field in ["provider_id", "linked_user_id", "linked_username"] {
        assert_eq!(
            body[field]["pattern"],
            linkid::domain::TEXT_PATTERN,
            "{field}"
        );
    }
    assert!(
        seen >= 7,
        "the user, provider and remote id parameters: {seen}"
    );
}

#[test]
fn links_lead_from_a_new_link_to_every_operation_on_it_its_retry_and_on_to_the_feed() {
    let doc = document();
    let mut links = BTreeSet::new();
    for (spec, operation) in operations(&doc) {
        for (status, response) in operation["responses"].as_object().unwrap() {
            for (name, link) in response["links"].as_object().into_iter().flatten() {
                links.insert(format!(
                    "{} {status} {name} -> {}",
                    spec.id,
                    link["operationId"].as_str().unwrap()
                ));
            }
        }
    }
    let mut expected = BTreeSet::new();
    for status in ["200", "201"] {
        for (name, target) in [
            ("GetLinkedIdentity", "getLinkedIdentity"),
            ("ListLinkedIdentities", "listLinkedIdentities"),
            ("DeleteLinkedIdentity", "deleteLinkedIdentity"),
            ("LookUpLinkedIdentity", "searchLinkedIdentities"),
            ("ListEvents", "listEvents"),
        ] {
            expected.insert(format!("linkIdentity {status} {name} -> {target}"));
        }
    }
    expected.extend([
        "linkIdentity 201 RetryLinkIdentity -> linkIdentity".to_string(),
        "getLinkedIdentity 200 DeleteLinkedIdentity -> deleteLinkedIdentity".to_string(),
        "deleteLinkedIdentity 200 GetLinkedIdentity -> getLinkedIdentity".to_string(),
        "deleteLinkedIdentity 200 LookUpLinkedIdentity -> searchLinkedIdentities".to_string(),
        "listEvents 200 NextEvents -> listEvents".to_string(),
    ]);
    assert_eq!(links, expected);
    // No link leaves the search: schemathesis would start every stateful
    // scenario there, and never at a new link (src/http/openapi.rs, LINKS).
    assert!(
        !links
            .iter()
            .any(|link| link.starts_with("searchLinkedIdentities ")),
        "{links:?}"
    );

    let lookup = &doc["paths"]["/api/admin/users/v4/users/{user_id}/linked-identities"]["post"]
        ["responses"]["201"]["links"]["LookUpLinkedIdentity"]["parameters"];
    assert_eq!(
        *lookup,
        json!({"provider_id": "$response.body#/provider_id", "linked_user_id": "$response.body#/linked_user_id"})
    );
    let retry = &doc["paths"]["/api/admin/users/v4/users/{user_id}/linked-identities"]["post"]
        ["responses"]["201"]["links"]["RetryLinkIdentity"];
    assert_eq!(retry["requestBody"], "$request.body");
    let next = &doc["paths"]["/api/admin/users/v4/linked-identities/events"]["get"]["responses"]
        ["200"]["links"]["NextEvents"]["parameters"];
    assert_eq!(
        *next,
        json!({"after": "$response.body#/next_after", "wait": "0"}),
        "a link never long-polls"
    );
    let feed = &doc["paths"]["/api/admin/users/v4/users/{user_id}/linked-identities"]["post"]
        ["responses"]["201"]["links"]["ListEvents"]["parameters"];
    assert_eq!(*feed, json!({"wait": "0"}), "a link never long-polls");
    let unlinked = &doc["paths"]
        ["/api/admin/users/v4/users/{user_id}/linked-identities/{provider_id}"]["delete"]
        ["responses"]["200"]["links"];
    assert_eq!(
        unlinked["LookUpLinkedIdentity"]["parameters"],
        json!({"provider_id": "$response.body#/provider_id", "linked_user_id": "$response.body#/linked_user_id"})
    );
    assert_eq!(
        unlinked["GetLinkedIdentity"]["parameters"],
        json!({"user_id": "$request.path.user_id", "provider_id": "$response.body#/provider_id"})
    );
}

#[test]
fn the_change_feed_documents_its_event_stream() {
    let doc = document();
    let ok = &doc["paths"]["/api/admin/users/v4/linked-identities/events"]["get"]["responses"]
        ["200"]["content"];

    assert_eq!(
        ok["application/json"]["schema"]["$ref"],
        "#/components/schemas/EventPage"
    );
    let stream = ok["text/event-stream"]["example"].as_str().unwrap();
    let data = stream
        .lines()
        .find_map(|line| line.strip_prefix("data: "))
        .unwrap();
    let event: Value = serde_json::from_str(data).unwrap();
    assert_eq!(event["type"], "LINKED");
    assert!(stream.starts_with("id: "));
}

#[tokio::test]
async fn the_docs_page_is_served_from_the_binary() {
    let app = spawn_app().await;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();

    let redirect = client.get(app.url("/docs")).send().await.unwrap();
    let page = client.get(app.url("/docs/")).send().await.unwrap();
    let config = client
        .get(app.url("/docs/swagger-initializer.js"))
        .send()
        .await
        .unwrap();

    assert_eq!(redirect.status(), 302);
    assert_eq!(redirect.headers()["location"], "/docs/");
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(html.contains("swagger-ui"), "{html}");
    assert!(
        !html.contains("https://"),
        "the page must load nothing from the internet"
    );
    let js = config.text().await.unwrap();
    assert!(js.contains("/openapi.json"), "{js}");
}
