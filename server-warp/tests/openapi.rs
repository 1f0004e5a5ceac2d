// docs/openapi.json against the route table and a running broker: every
// served path is described and every described path served; one request
// (at least) to each described operation answers a documented status, with
// the documented content type, and a JSON answer has the documented
// required fields (of the right JSON types, within their enums).

use std::collections::BTreeSet;

use reqwest::{Method, RequestBuilder};
use serde_json::Value;

use crate::support::{Harness, fake_config, harness};

const OPERATION_METHODS: [&str; 8] = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];

fn spec() -> Value {
    serde_json::from_str(include_str!("../../docs/openapi.json")).expect("docs/openapi.json is JSON")
}

/// Follows `$ref`s within the document.
fn resolve<'a>(spec: &'a Value, value: &'a Value) -> &'a Value {
    match value.get("$ref").and_then(Value::as_str) {
        Some(reference) => {
            let pointer = reference.strip_prefix('#').unwrap_or_else(|| panic!("{reference}: a local reference"));
            resolve(spec, spec.pointer(pointer).unwrap_or_else(|| panic!("{reference} resolves")))
        }
        None => value,
    }
}

fn json_type_is(value: &Value, name: &str) -> bool {
    match name {
        "null" => value.is_null(),
        "boolean" => value.is_boolean(),
        "integer" => value.is_u64() || value.is_i64(),
        "number" => value.is_number(),
        "string" => value.is_string(),
        "array" => value.is_array(),
        "object" => value.is_object(),
        other => panic!("unknown JSON type {other}"),
    }
}

/// Whether `body` has what `schema` requires: `oneOf` (one alternative
/// fits), `type`, `const`, `enum`, `required`, and the same for the
/// properties present and array items.
fn conforms(spec: &Value, schema: &Value, body: &Value, at: &str) -> Result<(), String> {
    let schema = resolve(spec, schema);
    if let Some(alternatives) = schema.get("oneOf").and_then(Value::as_array) {
        let errors: Vec<String> = alternatives.iter().filter_map(|alt| conforms(spec, alt, body, at).err()).collect();
        return if errors.len() < alternatives.len() { Ok(()) } else { Err(errors.join("; ")) };
    }
    match schema.get("type") {
        Some(Value::String(name)) if !json_type_is(body, name) => return Err(format!("{at}: {body} is not {name}")),
        Some(Value::Array(names)) if !names.iter().any(|n| json_type_is(body, n.as_str().unwrap())) => {
            return Err(format!("{at}: {body} is none of {names:?}"));
        }
        _ => {}
    }
    if let Some(constant) = schema.get("const") {
        if constant != body {
            return Err(format!("{at}: {body} is not {constant}"));
        }
    }
    if let Some(values) = schema.get("enum").and_then(Value::as_array) {
        if !values.contains(body) {
            return Err(format!("{at}: {body} is not one of {values:?}"));
        }
    }
    if let Some(object) = body.as_object() {
        for name in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
            let name = name.as_str().unwrap();
            if !object.contains_key(name) {
                return Err(format!("{at}: required field {name} missing in {body}"));
            }
        }
        if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
            for (name, property) in properties {
                if let Some(value) = object.get(name) {
                    conforms(spec, property, value, &format!("{at}.{name}"))?;
                }
            }
        }
    }
    if let (Some(items), Some(array)) = (schema.get("items"), body.as_array()) {
        for (i, item) in array.iter().enumerate() {
            conforms(spec, items, item, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}

/// The media type without its parameters.
fn essence(media_type: &str) -> &str {
    media_type.split(';').next().unwrap_or_default().trim()
}

/// Sends requests and checks each answer against its operation's description.
struct Checker<'a> {
    spec: Value,
    h: &'a Harness,
    /// The operations requests went to, as (path, method).
    exercised: BTreeSet<(String, String)>,
}

/// An answer as the test looks at it further.
struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    json: Option<Value>,
}

impl Checker<'_> {
    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.h.http.request(method, format!("{}{path}", self.h.url))
    }

    /// Sends `request`, made for the operation `method` on the described
    /// path `template`, and checks its answer against the description.
    async fn check(&mut self, template: &str, method: Method, request: RequestBuilder) -> Answer {
        let name = method.as_str().to_ascii_lowercase();
        let what = format!("{} {template}", method.as_str());
        let operation =
            self.spec["paths"][template].get(&name).unwrap_or_else(|| panic!("{what} is not described")).clone();
        self.exercised.insert((template.to_owned(), name));
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let content_type = headers.get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
        let text = response.text().await.unwrap();
        let documented = operation["responses"].get(status.to_string()).unwrap_or_else(|| {
            let statuses: Vec<&String> = operation["responses"].as_object().unwrap().keys().collect();
            panic!("{what} answered {status}, documented are {statuses:?}: {text}")
        });
        let documented = resolve(&self.spec, documented).clone();
        let content = documented.get("content").and_then(Value::as_object);
        let schema = content.and_then(|c| c.iter().find(|(t, _)| essence(t) == essence(&content_type)));
        match (content, schema) {
            (None, _) => assert!(text.is_empty(), "{what} {status}: documented without a body, answered {text}"),
            (Some(content), None) => {
                panic!("{what} {status}: answered {content_type}, documented {:?}", content.keys().collect::<Vec<_>>())
            }
            (Some(_), Some(_)) => {}
        }
        for header in documented.get("headers").and_then(Value::as_object).into_iter().flat_map(|h| h.keys()) {
            // Retry-After comes only with a wait; the others always.
            if header != "Retry-After" {
                assert!(headers.contains_key(header.as_str()), "{what} {status}: no {header} header");
            }
        }
        let json = (essence(&content_type) == "application/json").then(|| {
            let body: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what} {status}: {e}: {text}"));
            let (_, media) = schema.unwrap();
            if let Err(why) = conforms(&self.spec, &media["schema"], &body, "body") {
                panic!("{what} {status}: {why}");
            }
            body
        });
        Answer { status, headers, json }
    }
}

#[test]
fn every_served_path_is_described_and_every_described_path_is_served() {
    let spec = spec();
    let described: BTreeSet<&str> = spec["paths"].as_object().unwrap().keys().map(String::as_str).collect();
    let served: BTreeSet<&str> = latchkey_server::http::served_paths().into_iter().map(|(path, _)| path).collect();
    let undescribed: Vec<&&str> = served.difference(&described).collect();
    let unserved: Vec<&&str> = described.difference(&served).collect();
    assert!(undescribed.is_empty(), "served, not described in docs/openapi.json: {undescribed:?}");
    assert!(unserved.is_empty(), "described in docs/openapi.json, not served: {unserved:?}");
    assert_eq!(spec["openapi"], "3.1.0");
}

#[test]
fn every_reference_resolves_and_every_operation_has_an_id() {
    fn walk(spec: &Value, value: &Value) {
        match value {
            Value::Object(object) => {
                if object.contains_key("$ref") {
                    resolve(spec, value);
                }
                object.values().for_each(|v| walk(spec, v));
            }
            Value::Array(array) => array.iter().for_each(|v| walk(spec, v)),
            _ => {}
        }
    }
    let spec = spec();
    walk(&spec, &spec);
    let mut ids = BTreeSet::new();
    for (path, item) in spec["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            assert!(OPERATION_METHODS.contains(&method.as_str()), "{path}: {method}");
            let id = operation["operationId"].as_str().unwrap_or_else(|| panic!("{method} {path}: no operationId"));
            assert!(ids.insert(id.to_owned()), "{id} twice");
            assert!(!operation["responses"].as_object().unwrap().is_empty(), "{method} {path}: no responses");
        }
    }
}

#[tokio::test]
async fn each_described_operation_answers_as_documented() {
    let h = harness(fake_config(), "").await;
    let authid = h.login().await;
    let mut c = Checker { spec: spec(), h: &h, exercised: BTreeSet::new() };
    let handoff = "openapi-handoff-token-0123456789";

    // Duplicati's helper protocol.
    let ok = c.check("/refresh", Method::GET, c.request(Method::GET, "/refresh").header("X-AuthID", &authid)).await;
    assert_eq!(ok.status, 200);
    let bad = c.check("/refresh", Method::GET, c.request(Method::GET, "/refresh").header("X-AuthID", "no-colon")).await;
    assert_eq!(bad.status, 401);
    assert_eq!(bad.json.unwrap()["code"], "authid_invalid");
    let popup = c.check("/refresh", Method::GET, c.request(Method::GET, "/refresh?type=fake")).await;
    assert_eq!(popup.status, 302);
    assert_eq!(popup.headers["location"], "/?type=fake");
    let posted =
        c.check("/refresh", Method::POST, c.request(Method::POST, "/refresh").form(&[("authid", &authid)])).await;
    assert_eq!(posted.status, 200);
    let gone = c.check("/fetch", Method::GET, c.request(Method::GET, &format!("/fetch?token={handoff}"))).await;
    assert_eq!(gone.status, 404);
    assert_eq!(gone.json.unwrap()["code"], "bad_request");
    let jsonp = c.request(Method::GET, &format!("/fetch?token={handoff}&callback=angular.callbacks._0"));
    assert_eq!(c.check("/fetch", Method::GET, jsonp).await.status, 200);
    let state = c.check("/token-state", Method::GET, c.request(Method::GET, &format!("/token-state?token={handoff}")));
    assert_eq!(state.await.json.unwrap(), serde_json::json!({ "success": false }));

    // The pages (no browser proof: the posts are refused).
    assert_eq!(c.check("/", Method::GET, c.request(Method::GET, "/")).await.status, 200);
    assert_eq!(c.check("/login", Method::GET, c.request(Method::GET, "/login?id=fake")).await.status, 200);
    let click = c.request(Method::POST, "/login").form(&[("id", "fake"), ("csrf", "x")]);
    assert_eq!(c.check("/login", Method::POST, click).await.status, 403);
    assert_eq!(c.check("/logged-in", Method::GET, c.request(Method::GET, "/logged-in")).await.status, 400);
    assert_eq!(c.check("/revoke", Method::GET, c.request(Method::GET, "/revoke")).await.status, 200);
    let revoked = c.request(Method::POST, "/revoked").form(&[("authid", "no-colon")]);
    assert_eq!(c.check("/revoked", Method::POST, revoked).await.status, 401);
    c.check("/cli-token", Method::GET, c.request(Method::GET, "/cli-token")).await;
    let pasted =
        c.request(Method::POST, "/cli-token-login").form(&[("id", "fake"), ("login_token", "t"), ("csrf", "x")]);
    assert_eq!(c.check("/cli-token-login", Method::POST, pasted).await.status, 403);
    assert_eq!(c.check("/device", Method::GET, c.request(Method::GET, "/device")).await.status, 200);
    let typed = c.request(Method::POST, "/device").form(&[("user_code", "ABCD-EFGH"), ("csrf", "x")]);
    assert_eq!(c.check("/device", Method::POST, typed).await.status, 403);
    assert_eq!(c.check("/privacy-policy", Method::GET, c.request(Method::GET, "/privacy-policy")).await.status, 200);

    // The /v1 API.
    let token = c.check("/v1/token", Method::POST, c.request(Method::POST, "/v1/token").bearer_auth(&authid)).await;
    assert_eq!(token.status, 200);
    let bad = c.check("/v1/token", Method::POST, c.request(Method::POST, "/v1/token").bearer_auth("no-colon")).await;
    assert_eq!((bad.status, bad.json.unwrap()["error"].as_str()), (401, Some("authid_invalid")));
    assert_eq!(c.check("/v1/token", Method::POST, c.request(Method::POST, "/v1/token")).await.status, 401);
    let list = c.check("/v1/handles", Method::GET, c.request(Method::GET, "/v1/handles").bearer_auth(&authid)).await;
    assert_eq!(list.status, 200);
    let minted = c.request(Method::POST, "/v1/handles").bearer_auth(&authid).json(&serde_json::json!({ "label": "b" }));
    let minted = c.check("/v1/handles", Method::POST, minted).await;
    assert_eq!(minted.status, 201);
    let second = minted.json.unwrap()["authid"].as_str().unwrap().to_owned();
    let rotated = c.request(Method::POST, "/v1/handles/rotate").bearer_auth(&second);
    let rotated = c.check("/v1/handles/rotate", Method::POST, rotated).await;
    assert_eq!(rotated.status, 200);
    let keyid = rotated.json.unwrap()["keyid"].as_str().unwrap().to_owned();
    let delete = c.request(Method::DELETE, &format!("/v1/handles/{keyid}")).bearer_auth(&authid);
    assert_eq!(c.check("/v1/handles/{keyid}", Method::DELETE, delete).await.status, 200);
    let start = c.request(Method::POST, "/v1/device/code").form(&[("service", "fake"), ("label", "openapi")]);
    let start = c.check("/v1/device/code", Method::POST, start).await;
    assert_eq!(start.status, 200);
    let device_code = start.json.unwrap()["device_code"].as_str().unwrap().to_owned();
    let poll = c.request(Method::POST, "/v1/device/token").form(&[("device_code", &device_code)]);
    let poll = c.check("/v1/device/token", Method::POST, poll).await;
    assert_eq!((poll.status, poll.json.unwrap()["error"].as_str()), (400, Some("authorization_pending")));
    assert_eq!(c.check("/v1/services", Method::GET, c.request(Method::GET, "/v1/services")).await.status, 200);

    // The RFC 6749 facade.
    let ok =
        c.request(Method::POST, "/oauth2/token").form(&[("grant_type", "refresh_token"), ("refresh_token", &authid)]);
    assert_eq!(c.check("/oauth2/token", Method::POST, ok).await.status, 200);
    let bad = c
        .request(Method::POST, "/oauth2/token")
        .form(&[("grant_type", "refresh_token"), ("refresh_token", "no-colon")]);
    let bad = c.check("/oauth2/token", Method::POST, bad).await;
    assert_eq!((bad.status, bad.json.unwrap()["error"].as_str()), (400, Some("invalid_grant")));
    let other = c
        .check(
            "/oauth2/token",
            Method::POST,
            c.request(Method::POST, "/oauth2/token").form(&[("grant_type", "password")]),
        )
        .await;
    assert_eq!(other.json.unwrap()["error"], "unsupported_grant_type");
    let missing = c
        .check(
            "/oauth2/token",
            Method::POST,
            c.request(Method::POST, "/oauth2/token").form(&[("refresh_token", &authid)]),
        )
        .await;
    assert_eq!((missing.status, missing.json.unwrap()["error"].as_str()), (400, Some("invalid_request")));

    // Operations and assets.
    for path in ["/healthz", "/readyz", "/metrics", "/static/style.css", "/static/authid.js", "/favicon.ico"] {
        assert_eq!(c.check(path, Method::GET, c.request(Method::GET, path)).await.status, 200, "{path}");
    }

    // Last: the whole login revoked; its AuthIDs answer 401 after.
    let revoke = c.request(Method::POST, "/v1/grant/revoke").bearer_auth(&authid);
    assert_eq!(c.check("/v1/grant/revoke", Method::POST, revoke).await.status, 200);
    let dead = c.check("/refresh", Method::GET, c.request(Method::GET, "/refresh").header("X-AuthID", &authid)).await;
    assert_eq!(dead.status, 401);
    let dead = c.check("/v1/handles", Method::GET, c.request(Method::GET, "/v1/handles").bearer_auth(&authid)).await;
    assert_eq!(dead.status, 401);

    let mut described = BTreeSet::new();
    for (path, item) in c.spec["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            described.insert((path.clone(), method.clone()));
        }
    }
    let untried: Vec<_> = described.difference(&c.exercised).collect();
    assert!(untried.is_empty(), "described operations this test sends no request to: {untried:?}");
}

/// Every operation that documents a 413 answers a 20 KiB body with it, in
/// its route's vocabulary (a Duplicati route's with X-Reason), and a header
/// that does not parse on Duplicati's token request with its documented 400.
#[tokio::test]
async fn refused_bodies_and_headers_answer_as_documented() {
    let h = harness(fake_config(), "").await;
    let mut c = Checker { spec: spec(), h: &h, exercised: BTreeSet::new() };
    let mut oversized = Vec::new();
    for (path, item) in c.spec["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            if operation["responses"].get("413").is_some() {
                oversized.push((path.clone(), Method::from_bytes(method.to_ascii_uppercase().as_bytes()).unwrap()));
            }
        }
    }
    assert!(oversized.len() >= 10, "{oversized:?}");
    for (path, method) in oversized {
        let request = c
            .request(method.clone(), &path)
            .header("content-type", "application/x-www-form-urlencoded")
            .body("x".repeat(20 * 1024));
        assert_eq!(c.check(&path, method.clone(), request).await.status, 413, "{method} {path}");
    }
    let odd = c.request(Method::GET, "/refresh").header("X-AuthID", &b"\xff"[..]);
    let odd = c.check("/refresh", Method::GET, odd).await;
    assert_eq!((odd.status, odd.json.unwrap()["code"].as_str()), (400, Some("bad_request")));
}
