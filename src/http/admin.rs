//! Emergency manual overrides for operators, behind the bearer token: pause
//! and resume auto-rebalance, change a provider's status, cancel a job that
//! has not reached a provider (or that waits for a person). Every change is
//! one statement or transaction and leaves an audit trail; job status changes
//! go through the job state machine in the store.

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use super::{ApiError, AppState, authorize, internal, json_body};
use crate::domain::JobStatus;
use crate::providers::ProviderStatus;
use crate::store::jobs::JobStore;
use crate::store::operator::{OperatorAction, OperatorOutcome};

fn job_id(text: &str) -> Result<Uuid, ApiError> {
    text.parse().map_err(|_| ApiError {
        status: StatusCode::BAD_REQUEST,
        code: "bad_job_id",
        message: format!("{text:?} is not a uuid"),
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
/// executed there, so it is refused until it reaches `needs_review`. The job
/// state machine decides, in the store ([`crate::store::operator`]).
pub async fn cancel_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    let id = job_id(&id)?;
    let (job, from) = apply(&state, id, &OperatorAction::Cancel, "not_cancellable").await?;
    tracing::warn!(job = %id, from = %from, "job cancelled by an operator");
    Ok(Json(json!({"job": id, "status": job.status.as_str()})).into_response())
}

/// Applies an operator's action through the store, answering 404 for an
/// unknown job and 409 (`refused_code`) when the state machine refuses.
async fn apply(
    state: &AppState,
    id: Uuid,
    action: &OperatorAction,
    refused_code: &'static str,
) -> Result<(Box<crate::domain::ConversionJob>, JobStatus), ApiError> {
    match pg(state)?
        .operator_change(id, action)
        .await
        .map_err(internal)?
    {
        OperatorOutcome::Done { job, from } => Ok((job, from)),
        OperatorOutcome::NotFound => Err(unknown_job(id)),
        OperatorOutcome::Refused { reason, .. } => Err(ApiError {
            status: StatusCode::CONFLICT,
            code: refused_code,
            message: format!("job {id} is {reason}"),
        }),
    }
}

fn unknown_job(id: Uuid) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        code: "unknown_job",
        message: format!("no job {id}"),
    }
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
    use crate::domain::Money;

    authorize(&state, &headers)?;
    let id = job_id(&id)?;
    let resolution = json_body(body)?;
    let bad = |message: String| ApiError {
        status: StatusCode::BAD_REQUEST,
        code: "bad_resolution",
        message,
    };
    let job = pg(&state)?
        .job(id)
        .await
        .map_err(internal)?
        .ok_or_else(|| unknown_job(id))?;
    let direction = job.direction;
    let action = match resolution {
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
            if charged.value < rust_decimal::Decimal::ZERO || charged.value >= job.amount.value {
                return Err(bad(format!(
                    "fee {fee} must be at least 0 and below the amount {}",
                    job.amount.value
                )));
            }
            if rate <= rust_decimal::Decimal::ZERO {
                return Err(bad(format!("rate {rate} must be positive")));
            }
            OperatorAction::Completed {
                destination_amount: received,
                fee: charged,
                rate,
                provider_tx_id,
            }
        }
        Resolution::Failed { reason } => OperatorAction::Failed { reason },
    };
    let (job, _) = apply(&state, id, &action, "not_in_review").await?;
    let note = crate::store::operator::note(&action);
    tracing::warn!(job = %id, to = job.status.as_str(), %note, "job resolved by an operator");
    Ok(Json(json!({"job": id, "status": job.status.as_str()})).into_response())
}
