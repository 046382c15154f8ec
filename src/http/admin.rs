//! Emergency manual overrides for operators, behind the bearer token: pause
//! and resume auto-rebalance, change a provider's status, cancel a job that
//! has not reached a provider (or that waits for a person). Every change is
//! one statement or transaction and leaves an audit trail.

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use super::{ApiError, AppState, authorize, internal};
use crate::providers::ProviderStatus;

fn job_id(text: &str) -> Result<Uuid, ApiError> {
    text.parse().map_err(|_| ApiError {
        status: StatusCode::BAD_REQUEST,
        code: "bad_job_id",
        message: format!("{text:?} is not a uuid"),
    })
}

fn json_body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(b)| b).map_err(|e| ApiError {
        // 413 for a body over the limit, 415 without a JSON content type.
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

fn pg(state: &AppState) -> Result<&crate::store::postgres::PgStore, ApiError> {
    state.pg.as_ref().ok_or_else(|| ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        code: "no_database",
        message: "operator endpoints need the PostgreSQL store".into(),
    })
}

/// `POST /v1/auto-rebalance/pause` and `/resume`.
pub async fn set_paused(
    State(state): State<AppState>,
    Path(action): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    let paused = match action.as_str() {
        "pause" => true,
        "resume" => false,
        other => {
            return Err(ApiError {
                status: StatusCode::NOT_FOUND,
                code: "not_found",
                message: format!("unknown action {other:?}: use pause or resume"),
            });
        }
    };
    sqlx::query(
        "UPDATE settlement_state SET auto_rebalance_paused = $1, updated_at = now() WHERE id = 1",
    )
    .bind(paused)
    .execute(pg(&state)?.pool())
    .await
    .map_err(internal)?;
    tracing::warn!(paused, "auto-rebalance changed by an operator");
    Ok(Json(json!({"auto_rebalance_paused": paused})).into_response())
}

/// Body of `POST /v1/providers/{name}/status`.
#[derive(Debug, Deserialize)]
pub struct ProviderStatusBody {
    pub status: String,
}

/// `POST /v1/providers/{name}/status` with `{"status": "inactive"}`.
pub async fn set_provider_status(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<Json<ProviderStatusBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    let body = json_body(body)?;
    let status: ProviderStatus = body.status.parse().map_err(|_| ApiError {
        status: StatusCode::BAD_REQUEST,
        code: "bad_status",
        message: format!("{:?} is not active, inactive or degraded", body.status),
    })?;
    let updated = sqlx::query(
        "UPDATE conversion_providers SET status = $2, updated_at = now() WHERE name = $1",
    )
    .bind(&name)
    .bind(status.as_str())
    .execute(pg(&state)?.pool())
    .await
    .map_err(internal)?
    .rows_affected();
    if updated == 0 {
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            code: "unknown_provider",
            message: format!("no provider named {name:?}"),
        });
    }
    tracing::warn!(provider = %name, status = status.as_str(), "provider status changed by an operator");
    Ok(Json(json!({"provider": name, "status": status.as_str()})).into_response())
}

/// `POST /v1/jobs/{id}/cancel`: only a `pending` job with no provider chosen
/// (nothing sent yet) or one in `needs_review` (a person checked the provider)
/// may be cancelled. A pending job held at a provider may already have been
/// executed there, so it is refused until it reaches `needs_review`.
pub async fn cancel_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    let id = job_id(&id)?;
    let pool = pg(&state)?.pool();
    let mut tx = pool.begin().await.map_err(internal)?;
    let found: Option<(String, Option<String>)> = sqlx::query_as(
        "SELECT status, provider_name FROM conversion_jobs WHERE id = $1 FOR UPDATE",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await
    .map_err(internal)?;
    let Some((from, provider)) = found else {
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            code: "unknown_job",
            message: format!("no job {id}"),
        });
    };
    if from == "pending"
        && let Some(provider) = provider
    {
        return Err(ApiError {
            status: StatusCode::CONFLICT,
            code: "not_cancellable",
            message: format!(
                "job {id} is pending at {provider}, which may already hold the conversion; \
                 it can be cancelled once it is in needs_review"
            ),
        });
    }
    if from != "pending" && from != "needs_review" {
        return Err(ApiError {
            status: StatusCode::CONFLICT,
            code: "not_cancellable",
            message: format!(
                "job {id} is {from}; only pending or needs_review jobs can be cancelled"
            ),
        });
    }
    sqlx::query("UPDATE conversion_jobs SET status = 'cancelled', cancelled_at = now(), updated_at = now() WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(internal)?;
    sqlx::query(
        "INSERT INTO conversion_job_history (job_id, from_status, to_status, note) VALUES ($1, $2, 'cancelled', 'cancelled by an operator')",
    )
    .bind(id)
    .bind(&from)
    .execute(&mut *tx)
    .await
    .map_err(internal)?;
    tx.commit().await.map_err(internal)?;
    tracing::warn!(job = %id, from = %from, "job cancelled by an operator");
    Ok((
        StatusCode::OK,
        Json(json!({"job": id, "status": "cancelled"})),
    )
        .into_response())
}

/// Body of `POST /v1/jobs/{id}/resolve`: what a person found at the provider.
#[derive(Debug, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Resolution {
    /// The conversion happened: the engine posts it on its next cycle.
    Completed {
        /// Received, in the destination currency.
        destination_amount: rust_decimal::Decimal,
        /// Charged, in the source currency.
        fee: rust_decimal::Decimal,
        /// Destination units per source unit.
        rate: rust_decimal::Decimal,
        /// The provider's id for the conversion, when the job has none yet
        /// (it was held at a provider that never answered the initiate call).
        #[serde(default)]
        provider_tx_id: Option<String>,
    },
    /// It did not happen: no money moved.
    Failed { reason: String },
}

/// `POST /v1/jobs/{id}/resolve`: settles a job in `needs_review`.
pub async fn resolve_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Json<Resolution>, JsonRejection>,
) -> Result<Response, ApiError> {
    use crate::domain::{ConversionDirection, Money};

    authorize(&state, &headers)?;
    let id = job_id(&id)?;
    let resolution = json_body(body)?;
    let bad = |message: String| ApiError {
        status: StatusCode::BAD_REQUEST,
        code: "bad_resolution",
        message,
    };
    let pool = pg(&state)?.pool();
    let mut tx = pool.begin().await.map_err(internal)?;
    let row: Option<(String, String, rust_decimal::Decimal)> = sqlx::query_as(
        "SELECT status, direction, amount FROM conversion_jobs WHERE id = $1 FOR UPDATE",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await
    .map_err(internal)?;
    let Some((status, direction, amount)) = row else {
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            code: "unknown_job",
            message: format!("no job {id}"),
        });
    };
    if status != "needs_review" {
        return Err(ApiError {
            status: StatusCode::CONFLICT,
            code: "not_in_review",
            message: format!("job {id} is {status}; only needs_review jobs are resolved by hand"),
        });
    }
    let direction: ConversionDirection = direction.parse().map_err(internal)?;
    let (to, note) = match resolution {
        Resolution::Completed {
            destination_amount,
            fee,
            rate,
            provider_tx_id,
        } => {
            let received = Money::positive(direction.destination_currency(), destination_amount)
                .map_err(|e| bad(format!("destination_amount: {e}")))?;
            let charged = Money::new(direction.source_currency(), fee)
                .map_err(|e| bad(format!("fee: {e}")))?;
            if charged.value < rust_decimal::Decimal::ZERO || charged.value >= amount {
                return Err(bad(format!(
                    "fee {fee} must be at least 0 and below the amount {amount}"
                )));
            }
            if rate <= rust_decimal::Decimal::ZERO {
                return Err(bad(format!("rate {rate} must be positive")));
            }
            sqlx::query(
                "UPDATE conversion_jobs SET status = 'provider_completed', provider_completed_at = now(),
                        destination_amount = $2, fees_amount = $3, fees_currency = $4, exchange_rate = $5,
                        provider_tx_id = coalesce($6, provider_tx_id),
                        updated_at = now() WHERE id = $1",
            )
            .bind(id)
            .bind(received.value)
            .bind(charged.value)
            .bind(charged.currency.code())
            .bind(rate.round_dp(crate::codec::records::RATE_SCALE))
            .bind(provider_tx_id.filter(|t| !t.trim().is_empty()))
            .execute(&mut *tx)
            .await
            .map_err(internal)?;
            (
                "provider_completed",
                format!("resolved by an operator: {received} received, fee {charged}, rate {rate}"),
            )
        }
        Resolution::Failed { reason } => {
            sqlx::query(
                "UPDATE conversion_jobs SET status = 'failed', failed_at = now(), error_message = $2,
                        updated_at = now() WHERE id = $1",
            )
            .bind(id)
            .bind(&reason)
            .execute(&mut *tx)
            .await
            .map_err(internal)?;
            ("failed", format!("resolved by an operator: {reason}"))
        }
    };
    sqlx::query(
        "INSERT INTO conversion_job_history (job_id, from_status, to_status, note) VALUES ($1, 'needs_review', $2, $3)",
    )
    .bind(id)
    .bind(to)
    .bind(&note)
    .execute(&mut *tx)
    .await
    .map_err(internal)?;
    tx.commit().await.map_err(internal)?;
    tracing::warn!(job = %id, to, %note, "job resolved by an operator");
    Ok(Json(json!({"job": id, "status": to})).into_response())
}
