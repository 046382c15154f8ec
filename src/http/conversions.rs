//! `POST /v1/conversions`: a manual conversion, behind the bearer token.
//! 201 with the command when it is queued, 200 with the same command when the
//! idempotency key was used before for the same conversion, 4xx with the
//! reason otherwise ([`crate::manual`] decides).

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::{ApiError, AppState, authorize, internal, json_body};
use crate::manual::{self, ManualError, ManualRequest, Refusal};

/// Where manual commands go: the codec and the commands topic.
#[derive(Clone)]
pub struct ManualConversions {
    pub codec: crate::codec::Codec,
    pub commands_topic: String,
}

/// `POST /v1/conversions`.
pub async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<ManualRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    let request = json_body(body)?;
    let Some(to) = &state.conversions else {
        return Err(ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "conversions_disabled",
            message: "manual conversions are not configured in this process".into(),
        });
    };
    let destination = manual::Destination {
        codec: &to.codec,
        commands_topic: &to.commands_topic,
        requested_by: "http",
    };
    match manual::submit(
        state.store.as_ref(),
        &destination,
        &request,
        chrono::Utc::now(),
    )
    .await
    {
        Ok(submitted) => {
            let status = if submitted.created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok((status, Json(json!({"command": submitted.command}))).into_response())
        }
        Err(ManualError::Refused(refusal)) => Err(refused(&refusal)),
        Err(ManualError::Store(e)) => Err(internal(e)),
    }
}

fn refused(refusal: &Refusal) -> ApiError {
    let status = match refusal {
        Refusal::KeyReused { .. } => StatusCode::CONFLICT,
        _ => StatusCode::UNPROCESSABLE_ENTITY,
    };
    ApiError {
        status,
        code: refusal.code(),
        message: refusal.to_string(),
    }
}
