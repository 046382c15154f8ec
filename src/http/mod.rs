//! The HTTP surface: health, Prometheus metrics, buffer status, and the
//! operator endpoints (behind a bearer token). Errors are JSON with a 4xx/5xx.

mod admin;
pub mod conversions;
mod health;
pub mod webhooks;

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::store::Store;

/// Reads a secret by variable name.
pub type SecretLookup = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    /// The PostgreSQL store, for the operator endpoints (absent in the demo).
    pub pg: Option<crate::store::postgres::PgStore>,
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// Operator endpoints are refused when no token is configured.
    pub admin_token: Option<String>,
    /// Wakes this process's executor (provider callbacks).
    pub wake_executor: Option<Arc<tokio::sync::Notify>>,
    /// Reads a secret by variable name (the process environment in production).
    pub env: SecretLookup,
    /// Where `POST /v1/conversions` sends manual commands (absent: refused).
    pub conversions: Option<conversions::ManualConversions>,
    /// The roles' tasks and consumers, for `/readyz`.
    pub health: crate::health::Health,
}

/// An error answered as `{"error": ..., "message": ...}`.
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({"error": self.code, "message": self.message})),
        )
            .into_response()
    }
}

/// The router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/livez", get(health::livez))
        .route("/readyz", get(health::readyz))
        .route("/healthz", get(health::readyz))
        .route("/metrics", get(metrics))
        .route("/v1/buffers", get(buffers))
        .route("/v1/settlement/trigger", post(trigger))
        .route("/v1/conversions", post(conversions::create))
        .route("/v1/auto-rebalance/{action}", post(admin::set_paused))
        .route(
            "/v1/providers/{name}/status",
            post(admin::set_provider_status),
        )
        .route("/v1/jobs/{id}/cancel", post(admin::cancel_job))
        .route("/v1/jobs/{id}/resolve", post(admin::resolve_job))
        .route("/v1/webhooks/{provider}", post(webhooks::receive))
        .fallback(|| async {
            ApiError {
                status: StatusCode::NOT_FOUND,
                code: "not_found",
                message: "no such endpoint".into(),
            }
        })
        .layer(axum::middleware::map_response(json_errors))
        .with_state(state)
}

/// A handler's JSON body, or the JSON error for its rejection: 413 for a
/// body over the limit, 415 without a JSON content type, 400 otherwise.
fn json_body<T>(
    body: Result<axum::Json<T>, axum::extract::rejection::JsonRejection>,
) -> Result<T, ApiError> {
    body.map(|axum::Json(b)| b).map_err(|e| ApiError {
        status: match e.status() {
            s @ (StatusCode::PAYLOAD_TOO_LARGE | StatusCode::UNSUPPORTED_MEDIA_TYPE) => s,
            _ => StatusCode::BAD_REQUEST,
        },
        code: match e.status() {
            StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
            _ => "bad_request",
        },
        message: e.body_text(),
    })
}

/// Gives every error answer a JSON body. axum answers some requests itself
/// before any handler runs — 405 for a wrong method, 413 for a body over the
/// limit, 415, a 400 for a path it cannot parse — with plain text or nothing;
/// those become `{"error": ..., "message": ...}` with the same status (and
/// the same `Allow` header on a 405).
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let code = match status {
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        s if s.is_client_error() => "bad_request",
        _ => "internal",
    };
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_lowercase()
    } else {
        text
    };
    let mut answer = ApiError {
        status,
        code,
        message,
    }
    .into_response();
    if let Some(allow) = parts.headers.get(header::ALLOW) {
        answer.headers_mut().insert(header::ALLOW, allow.clone());
    }
    answer
}

/// The token of an `Authorization: Bearer <token>` header; the scheme is
/// case-insensitive (RFC 7235), the token is not.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

async fn metrics(State(state): State<AppState>) -> Response {
    match &state.metrics {
        Some(handle) => handle.render().into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics recorder not installed",
        )
            .into_response(),
    }
}

async fn buffers(State(state): State<AppState>) -> Result<Response, ApiError> {
    let report = state.store.buffer_report().await.map_err(internal)?;
    Ok(Json(report).into_response())
}

async fn trigger(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    let id = state
        .store
        .request_trigger("http")
        .await
        .map_err(internal)?;
    Ok((StatusCode::ACCEPTED, Json(json!({"trigger_id": id}))).into_response())
}

pub(crate) fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = &state.admin_token else {
        return Err(ApiError {
            status: StatusCode::FORBIDDEN,
            code: "admin_disabled",
            message: "operator endpoints are disabled: set TREASURY_ADMIN_TOKEN".into(),
        });
    };
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token);
    if given.is_some_and(|g| constant_time_eq(g.as_bytes(), expected.as_bytes())) {
        Ok(())
    } else {
        Err(ApiError {
            status: StatusCode::UNAUTHORIZED,
            code: "unauthorized",
            message: "missing or wrong bearer token".into(),
        })
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(crate) fn internal(e: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "request failed");
    ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        code: "internal",
        message: e.to_string(),
    }
}
