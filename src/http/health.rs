//! `/livez` and `/readyz` (and `/healthz`, the older name of `/readyz`).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AppState;

/// The process is alive: it answers. (A task that stops makes the process
/// exit, so there is no live process with a dead task to report here.)
pub async fn livez() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

/// Ready: every role's task running, every consumer subscribed (assigned
/// partitions or waiting for an assignment), and the database reachable.
pub async fn readyz(State(state): State<AppState>) -> Response {
    let readiness = state.health.readiness();
    let database = match &state.pg {
        Some(pg) => match sqlx::query("SELECT 1").execute(pg.pool()).await {
            Ok(_) => "ok".to_owned(),
            Err(e) => format!("unreachable: {e}"),
        },
        None => "not used".to_owned(),
    };
    let ready = readiness.ready && (database == "ok" || state.pg.is_none());
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if ready { "ok" } else { "not_ready" },
        "database": database,
        "tasks": readiness.tasks,
        "consumers": readiness.consumers,
    });
    (status, Json(body)).into_response()
}
