//! Provider callbacks. A webhook is only a nudge: its signature is verified
//! (HMAC-SHA256 of the raw body with the secret named by the provider row's
//! `webhook_secret_ref`, sent as `X-Signature: sha256=<hex>`), the job it
//! names is looked up, and the executor is woken to poll that provider now.
//! The job's state still only changes on what the provider's API answers, so
//! a forged or replayed callback can at worst cause an extra poll.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use super::{ApiError, AppState, internal};

/// Fields that carry the provider's transaction id in the callbacks we know.
const TX_ID_FIELDS: [&str; 4] = ["transfer_id", "trade_id", "id", "transaction_id"];

/// Whether `signature` (`sha256=<hex>`) is the HMAC-SHA256 of `body` under `secret`.
pub fn signature_matches(secret: &[u8], body: &[u8], signature: &str) -> bool {
    let Some(hex_sig) = signature.strip_prefix("sha256=") else {
        return false;
    };
    let Ok(expected) = hex::decode(hex_sig) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any size");
    mac.update(body);
    mac.verify_slice(&expected).is_ok()
}

fn refused(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError {
        status,
        code,
        message: message.into(),
    }
}

/// `POST /v1/webhooks/{provider}`.
pub async fn receive(
    State(state): State<AppState>,
    Path(provider): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let pg = state.pg.as_ref().ok_or_else(|| {
        refused(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_database",
            "webhooks need the PostgreSQL store",
        )
    })?;
    let secret_ref: Option<Option<String>> =
        sqlx::query_scalar("SELECT webhook_secret_ref FROM conversion_providers WHERE name = $1")
            .bind(&provider)
            .fetch_optional(pg.pool())
            .await
            .map_err(internal)?;
    let secret_var = secret_ref
        .ok_or_else(|| {
            refused(
                StatusCode::NOT_FOUND,
                "unknown_provider",
                format!("no provider named {provider:?}"),
            )
        })?
        .ok_or_else(|| {
            refused(
                StatusCode::FORBIDDEN,
                "webhooks_disabled",
                format!("{provider} has no webhook_secret_ref"),
            )
        })?;
    let secret = (state.env)(&secret_var).ok_or_else(|| {
        refused(
            StatusCode::FORBIDDEN,
            "webhooks_disabled",
            format!("{secret_var} is not set"),
        )
    })?;
    let signature = headers
        .get("x-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !signature_matches(secret.as_bytes(), &body, signature) {
        tracing::warn!(%provider, "webhook with a bad signature refused");
        return Err(refused(
            StatusCode::UNAUTHORIZED,
            "bad_signature",
            "X-Signature does not match the body",
        ));
    }
    let payload: Value = serde_json::from_slice(&body)
        .map_err(|e| refused(StatusCode::BAD_REQUEST, "bad_json", e.to_string()))?;
    let tx_id = TX_ID_FIELDS
        .iter()
        .find_map(|f| payload.get(*f).and_then(Value::as_str))
        .ok_or_else(|| {
            refused(
                StatusCode::BAD_REQUEST,
                "no_transaction_id",
                format!("none of {TX_ID_FIELDS:?} in the body"),
            )
        })?;
    let job: Option<uuid::Uuid> = sqlx::query_scalar(
        "SELECT id FROM conversion_jobs WHERE provider_name = $1 AND provider_tx_id = $2",
    )
    .bind(&provider)
    .bind(tx_id)
    .fetch_optional(pg.pool())
    .await
    .map_err(internal)?;
    let Some(job) = job else {
        return Err(refused(
            StatusCode::NOT_FOUND,
            "unknown_transaction",
            format!("no job for {provider} transaction {tx_id}"),
        ));
    };
    metrics::counter!("treasury_webhooks_total", "provider" => provider.clone()).increment(1);
    tracing::info!(%provider, %job, "provider callback; polling now");
    if let Some(wake) = &state.wake_executor {
        wake.notify_one();
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"job": job, "polling": true})),
    )
        .into_response())
}
