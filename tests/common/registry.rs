//! A Schema Registry for tests, compatible with the Confluent REST calls the
//! engine makes: `GET /schemas/ids/{id}`, `POST /subjects/{subject}/versions`
//! (register) and `POST /subjects/{subject}` (look up). Ids start at 101;
//! ids 1..=6 (every local id) hold unrelated schemas, as in a registry
//! shared with other teams. It can be taken down (every call answers 503) and brought back,
//! and can require basic auth.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

/// Schemas another team registered first, under ids 1..=6.
pub const FOREIGN_SCHEMAS: [&str; 6] = [
    r#"{"type":"record","name":"Other","namespace":"com.example","fields":[{"name":"other_id","type":"int"},{"name":"weight","type":"double"}]}"#,
    r#"{"type":"record","name":"Click","namespace":"com.example","fields":[{"name":"url","type":"string"}]}"#,
    r#"{"type":"record","name":"Order","namespace":"com.example","fields":[{"name":"order_id","type":"long"},{"name":"total","type":"double"}]}"#,
    r#"{"type":"record","name":"Ping","namespace":"com.example","fields":[]}"#,
    r#"{"type":"string"}"#,
    r#"{"type":"record","name":"Alert","namespace":"com.example","fields":[{"name":"level","type":"string"}]}"#,
];

#[derive(Default)]
struct Registry {
    /// id → schema text.
    schemas: BTreeMap<u32, String>,
    /// subject → ids, oldest version first.
    subjects: BTreeMap<String, Vec<u32>>,
    next_id: u32,
    down: bool,
    user_info: Option<String>,
    requests: Vec<String>,
}

/// A running registry.
#[derive(Clone)]
pub struct TestRegistry {
    pub url: String,
    state: Arc<Mutex<Registry>>,
}

fn normalized(text: &str) -> String {
    apache_avro::Schema::parse_str(text)
        .map(|s| s.canonical_form())
        .unwrap_or_else(|_| text.to_owned())
}

impl TestRegistry {
    /// Starts a registry on a free loopback port.
    pub async fn start() -> Self {
        let mut registry = Registry {
            next_id: 101,
            ..Registry::default()
        };
        for (i, schema) in FOREIGN_SCHEMAS.iter().enumerate() {
            let id = i as u32 + 1;
            registry.schemas.insert(id, (*schema).to_owned());
            registry
                .subjects
                .insert(format!("foreign-{id}-value"), vec![id]);
        }
        let state = Arc::new(Mutex::new(registry));
        let app = Router::new()
            .route("/schemas/ids/{id}", get(by_id))
            .route("/subjects/{subject}/versions", post(register))
            .route("/subjects/{subject}", post(lookup))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { url, state }
    }

    /// Registers `schema` under `subject` as a producer would; returns its id.
    pub fn add(&self, subject: &str, schema: &str) -> u32 {
        add(&mut self.state.lock().unwrap(), subject, schema)
    }

    /// Takes the registry down (true) or brings it back (false).
    pub fn set_down(&self, down: bool) {
        self.state.lock().unwrap().down = down;
    }

    /// Requires `user:password` basic auth from now on.
    pub fn require_auth(&self, user_info: &str) {
        self.state.lock().unwrap().user_info = Some(user_info.to_owned());
    }

    /// Subject → latest id.
    pub fn subjects(&self) -> BTreeMap<String, u32> {
        self.state
            .lock()
            .unwrap()
            .subjects
            .iter()
            .filter_map(|(s, ids)| ids.last().map(|id| (s.clone(), *id)))
            .collect()
    }

    /// The schema text under `id`.
    pub fn schema(&self, id: u32) -> Option<String> {
        self.state.lock().unwrap().schemas.get(&id).cloned()
    }

    /// Every request so far, as `METHOD path`.
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }
}

fn add(registry: &mut Registry, subject: &str, schema: &str) -> u32 {
    let wanted = normalized(schema);
    let existing = registry
        .schemas
        .iter()
        .find(|(_, s)| normalized(s) == wanted)
        .map(|(id, _)| *id);
    let id = existing.unwrap_or_else(|| {
        let id = registry.next_id;
        registry.next_id += 1;
        registry.schemas.insert(id, schema.to_owned());
        id
    });
    let versions = registry.subjects.entry(subject.to_owned()).or_default();
    if !versions.contains(&id) {
        versions.push(id);
    }
    id
}

type Shared = Arc<Mutex<Registry>>;

fn refused(registry: &mut Registry, headers: &HeaderMap, request: String) -> Option<Response> {
    registry.requests.push(request);
    if registry.down {
        return Some(
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"error_code": 50302, "message": "down for the test"})),
            )
                .into_response(),
        );
    }
    let expected = registry.user_info.as_ref()?;
    use base64::Engine;
    let wanted = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(expected)
    );
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    (given != Some(wanted.as_str())).then(|| {
        (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error_code": 401, "message": "Unauthorized"})),
        )
            .into_response()
    })
}

async fn by_id(State(state): State<Shared>, headers: HeaderMap, Path(id): Path<u32>) -> Response {
    let mut registry = state.lock().unwrap();
    if let Some(r) = refused(&mut registry, &headers, format!("GET /schemas/ids/{id}")) {
        return r;
    }
    match registry.schemas.get(&id) {
        Some(schema) => Json(json!({"schema": schema})).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"error_code": 40403, "message": "Schema not found"})),
        )
            .into_response(),
    }
}

#[derive(serde::Deserialize)]
struct SchemaBody {
    schema: String,
}

async fn register(
    State(state): State<Shared>,
    Path(subject): Path<String>,
    headers: HeaderMap,
    Json(body): Json<SchemaBody>,
) -> Response {
    let mut registry = state.lock().unwrap();
    if let Some(r) = refused(
        &mut registry,
        &headers,
        format!("POST /subjects/{subject}/versions"),
    ) {
        return r;
    }
    if apache_avro::Schema::parse_str(&body.schema).is_err() {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({"error_code": 42201, "message": "Invalid schema"})),
        )
            .into_response();
    }
    let id = add(&mut registry, &subject, &body.schema);
    Json(json!({"id": id})).into_response()
}

async fn lookup(
    State(state): State<Shared>,
    Path(subject): Path<String>,
    headers: HeaderMap,
    Json(body): Json<SchemaBody>,
) -> Response {
    let mut registry = state.lock().unwrap();
    if let Some(r) = refused(&mut registry, &headers, format!("POST /subjects/{subject}")) {
        return r;
    }
    let wanted = normalized(&body.schema);
    let found = registry.subjects.get(&subject).and_then(|ids| {
        ids.iter().enumerate().find(|(_, id)| {
            registry
                .schemas
                .get(id)
                .is_some_and(|s| normalized(s) == wanted)
        })
    });
    match found {
        Some((version, id)) => Json(json!({
            "subject": subject, "id": id, "version": version + 1, "schema": body.schema
        }))
        .into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"error_code": 40403, "message": "Schema not found"})),
        )
            .into_response(),
    }
}
