//! The HTTP surface against real PostgreSQL: health, buffers, the operator
//! endpoints behind the bearer token, and JSON error bodies for bad requests.

use std::sync::Arc;

use serde_json::Value;
use sqlx::PgPool;
use treasury::http::{AppState, router};
use treasury::store::postgres::PgStore;

async fn serve(pool: &PgPool, token: Option<&str>) -> String {
    let store = PgStore::from_pool(pool.clone());
    let app = router(AppState {
        store: Arc::new(store.clone()),
        pg: Some(store),
        metrics: None,
        admin_token: token.map(str::to_owned),
        wake_executor: None,
        env: Arc::new(|var: &str| (var == "DUE_WEBHOOK_SECRET").then(|| "whsec".to_owned())),
        conversions: None,
        health: Default::default(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

async fn json(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    (status, response.json().await.expect("a JSON body"))
}

#[sqlx::test]
async fn health_and_buffers_answer_json(pool: PgPool) {
    let base = serve(&pool, Some("s3cret")).await;
    // The probes are open although a token is configured, and answer JSON.
    for probe in ["livez", "readyz", "healthz"] {
        let (status, body) = json(reqwest::get(format!("{base}/{probe}")).await.unwrap()).await;
        assert_eq!(
            (status, body["status"].as_str()),
            (200, Some("ok")),
            "{probe}"
        );
    }
    let (status, body) = json(
        reqwest::Client::new()
            .post(format!("{base}/readyz"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        status, 405,
        "a probe is GET only, and says so in JSON: {body}"
    );
    let (status, body) = json(reqwest::get(format!("{base}/v1/buffers")).await.unwrap()).await;
    assert_eq!(status, 200);
    let accounts: Vec<&str> = body
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["account"].as_str().unwrap())
        .collect();
    assert_eq!(
        accounts,
        [
            "system_buffer_usdc",
            "system_buffer_fiat",
            "broker_operational"
        ]
    );
    assert_eq!(body[0]["status"], "HEALTHY");
    let (status, body) = json(reqwest::get(format!("{base}/no/such/thing")).await.unwrap()).await;
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")));
}

#[sqlx::test]
async fn operator_endpoints_need_the_token_and_answer_4xx_json_on_bad_input(pool: PgPool) {
    let base = serve(&pool, Some("s3cret")).await;
    let http = reqwest::Client::new();
    let trigger = format!("{base}/v1/settlement/trigger");
    let (status, body) = json(http.post(&trigger).send().await.unwrap()).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("unauthorized"))
    );
    let (status, _) = json(
        http.post(&trigger)
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 401);
    let (status, body) = json(
        http.post(&trigger)
            .bearer_auth("s3cret")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 202);
    let pending: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM settlement_triggers WHERE id = $1 AND handled_at IS NULL",
    )
    .bind(body["trigger_id"].as_i64().unwrap())
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(pending, 1, "the trigger waits for the aggregator");

    let (status, _) = json(
        http.post(format!("{base}/v1/auto-rebalance/pause"))
            .bearer_auth("s3cret")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    let paused: bool = sqlx::query_scalar("SELECT auto_rebalance_paused FROM settlement_state")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(paused);

    let status_url = format!("{base}/v1/providers/Due/status");
    let (status, body) = json(
        http.post(&status_url)
            .bearer_auth("s3cret")
            .json(&serde_json::json!({"status": "sleepy"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, body["error"].as_str()), (400, Some("bad_status")));
    let (status, body) = json(
        http.post(&status_url)
            .bearer_auth("s3cret")
            .header("content-type", "application/json")
            .body("{not json")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, body["error"].as_str()), (400, Some("bad_request")));
    let (status, _) = json(
        http.post(format!("{base}/v1/providers/Nobody/status"))
            .bearer_auth("s3cret")
            .json(&serde_json::json!({"status": "inactive"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = json(
        http.post(&status_url)
            .bearer_auth("s3cret")
            .json(&serde_json::json!({"status": "inactive"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    let due: String =
        sqlx::query_scalar("SELECT status FROM conversion_providers WHERE name = 'Due'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(due, "inactive");

    let (status, body) = json(
        http.post(format!("{base}/v1/jobs/not-a-uuid/cancel"))
            .bearer_auth("s3cret")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, body["error"].as_str()), (400, Some("bad_job_id")));
    let (status, _) = json(
        http.post(format!("{base}/v1/jobs/{}/cancel", uuid::Uuid::new_v4()))
            .bearer_auth("s3cret")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 404);
}

#[sqlx::test]
async fn only_jobs_not_at_a_provider_can_be_cancelled(pool: PgPool) {
    let base = serve(&pool, Some("t")).await;
    let http = reqwest::Client::new();
    for (id, status, provider) in [
        (1u128, "pending", None),
        (2, "provider_submitted", Some("Due")),
        (3, "pending", Some("Due")),
    ] {
        sqlx::query(
            "INSERT INTO conversion_jobs (id, idempotency_key, direction, trigger_reason, status, amount,
                source_account, source_currency, source_amount, destination_account, destination_currency,
                provider_name)
             VALUES ($1, $1::text, 'usdc_to_usd', 'manual', $2, 500, 'system_buffer_usdc', 'USDC', 500,
                     'broker_operational', 'USD', $3)",
        )
        .bind(uuid::Uuid::from_u128(id))
        .bind(status)
        .bind(provider)
        .execute(&pool)
        .await
        .unwrap();
    }
    let cancel = |id: u128| {
        http.post(format!(
            "{base}/v1/jobs/{}/cancel",
            uuid::Uuid::from_u128(id)
        ))
        .bearer_auth("t")
        .send()
    };
    let (status, _) = json(cancel(1).await.unwrap()).await;
    assert_eq!(status, 200);
    let (status, body) = json(cancel(2).await.unwrap()).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("not_cancellable")),
        "money may be at the provider"
    );
    let (status, body) = json(cancel(3).await.unwrap()).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("not_cancellable")),
        "a pending job held at a provider may have been executed there: {body}"
    );
    let history: Vec<(Option<String>, String)> = sqlx::query_as(
        "SELECT from_status, to_status FROM conversion_job_history WHERE job_id = $1",
    )
    .bind(uuid::Uuid::from_u128(1))
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(history, vec![(Some("pending".into()), "cancelled".into())]);
}

#[sqlx::test]
async fn operator_endpoints_are_off_without_a_token(pool: PgPool) {
    let base = serve(&pool, None).await;
    let (status, body) = json(
        reqwest::Client::new()
            .post(format!("{base}/v1/settlement/trigger"))
            .bearer_auth("x")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("admin_disabled"))
    );
}

#[sqlx::test]
async fn provider_callbacks_are_verified_before_anything_happens(pool: PgPool) {
    use hmac::Mac;
    let base = serve(&pool, None).await;
    sqlx::query(
        "INSERT INTO conversion_jobs (id, idempotency_key, direction, trigger_reason, status, amount,
            source_account, source_currency, source_amount, destination_account, destination_currency,
            provider_name, provider_tx_id)
         VALUES ($1, $1::text, 'usdc_to_usd', 'manual', 'provider_submitted', 500, 'system_buffer_usdc',
                 'USDC', 500, 'broker_operational', 'USD', 'Due', 'tr_123')",
    )
    .bind(uuid::Uuid::from_u128(9))
    .execute(&pool)
    .await
    .unwrap();
    let body = br#"{"id":"tr_123","status":"payment_processed"}"#;
    let sign = |secret: &[u8]| {
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
        mac.update(body);
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    };
    let http = reqwest::Client::new();
    let url = format!("{base}/v1/webhooks/Due");
    let send = |sig: String| {
        http.post(&url)
            .header("x-signature", sig)
            .body(body.to_vec())
            .send()
    };
    let (status, body_json) = json(send(sign(b"wrong")).await.unwrap()).await;
    assert_eq!(
        (status, body_json["error"].as_str()),
        (401, Some("bad_signature"))
    );
    let (status, body_json) = json(send(sign(b"whsec")).await.unwrap()).await;
    assert_eq!(status, 202);
    assert_eq!(body_json["job"], uuid::Uuid::from_u128(9).to_string());
    let still: String = sqlx::query_scalar("SELECT status FROM conversion_jobs WHERE id = $1")
        .bind(uuid::Uuid::from_u128(9))
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        still, "provider_submitted",
        "a callback never moves a job by itself"
    );
    let (status, _) = json(
        http.post(format!("{base}/v1/webhooks/ZeroHash"))
            .header("x-signature", "sha256=00")
            .body("{}")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 403, "no secret configured for ZeroHash here");
}

#[sqlx::test]
async fn a_person_resolves_a_job_in_review_and_the_engine_posts_it(pool: PgPool) {
    use rust_decimal_macros::dec;
    use treasury::executor::{JobWorker, WorkerSettings};
    use treasury::providers::registry::ProviderRegistry;

    let base = serve(&pool, Some("t")).await;
    let id = uuid::Uuid::from_u128(42);
    sqlx::query(
        "INSERT INTO conversion_jobs (id, idempotency_key, direction, trigger_reason, status, amount,
            source_account, source_currency, source_amount, destination_account, destination_currency,
            provider_id, provider_name, provider_tx_id, submitted_at)
         VALUES ($1, $1::text, 'usdc_to_usd', 'emergency', 'needs_review', 1000, 'system_buffer_usdc', 'USDC',
                 1000, 'broker_operational', 'USD', (SELECT id FROM conversion_providers WHERE name = 'Due'),
                 'Due', 'tr_9', now() - INTERVAL '2 hours')",
    )
    .bind(id)
    .execute(&pool)
    .await
    .unwrap();
    let http = reqwest::Client::new();
    let url = format!("{base}/v1/jobs/{id}/resolve");
    let resolve = |body: serde_json::Value| http.post(&url).bearer_auth("t").json(&body).send();
    let (status, body) = json(resolve(serde_json::json!({"outcome": "completed", "destination_amount": "998.001", "fee": "1", "rate": "0.999"})).await.unwrap()).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("bad_resolution")),
        "USD to the cent"
    );
    let (status, body) = json(
        resolve(serde_json::json!({"outcome": "maybe"}))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, body["error"].as_str()), (400, Some("bad_request")));
    let (status, _) = json(resolve(serde_json::json!({"outcome": "completed", "destination_amount": "998.00", "fee": "1", "rate": "0.999"})).await.unwrap()).await;
    assert_eq!(status, 200);
    let (status, body) = json(
        resolve(serde_json::json!({"outcome": "failed", "reason": "again"}))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("not_in_review")),
        "resolved once"
    );

    let store = PgStore::from_pool(pool.clone());
    let worker = JobWorker::new(
        Arc::new(store.clone()),
        ProviderRegistry::standard(|_| None, None),
        treasury::codec::Codec::default(),
        WorkerSettings {
            owner: "test".into(),
            postings_topic: "ledger.postings".into(),
            max_retries: 0,
            retry_initial: std::time::Duration::from_millis(1),
            monitor_interval: std::time::Duration::from_secs(1),
            stale_after: chrono::Duration::minutes(30),
            conversion_timeout: chrono::Duration::minutes(30),
            lease: std::time::Duration::from_secs(60),
            call_timeout: std::time::Duration::from_secs(30),
            health_window: chrono::Duration::hours(1),
        },
        treasury::clock::SystemClock::shared(),
    );
    worker.run_cycle().await.unwrap();
    let (status, postings): (String, i64) = sqlx::query_as(
        "SELECT status, (SELECT count(*) FROM ledger_postings WHERE job_id = $1) FROM conversion_jobs WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((status.as_str(), postings), ("completed", 1));
    let balances: Vec<(String, rust_decimal::Decimal)> =
        sqlx::query_as("SELECT account_type, balance FROM buffer_balances ORDER BY account_type")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        balances,
        vec![
            ("broker_operational".into(), dec!(200998.00)),
            ("system_buffer_fiat".into(), dec!(100000)),
            ("system_buffer_usdc".into(), dec!(49000)),
        ]
    );
}

#[sqlx::test]
async fn a_resolution_records_the_transaction_a_person_found_at_the_provider(pool: PgPool) {
    let base = serve(&pool, Some("t")).await;
    // Held at Due after unanswered calls: Due's id for it was never seen.
    let id = uuid::Uuid::from_u128(43);
    sqlx::query(
        "INSERT INTO conversion_jobs (id, idempotency_key, direction, trigger_reason, status, amount,
            source_account, source_currency, source_amount, destination_account, destination_currency,
            provider_id, provider_name)
         VALUES ($1, $1::text, 'usdc_to_usd', 'emergency', 'needs_review', 1000, 'system_buffer_usdc', 'USDC',
                 1000, 'broker_operational', 'USD', (SELECT id FROM conversion_providers WHERE name = 'Due'), 'Due')",
    )
    .bind(id)
    .execute(&pool)
    .await
    .unwrap();
    let response = reqwest::Client::new()
        .post(format!("{base}/v1/jobs/{id}/resolve"))
        .bearer_auth("t")
        .json(
            &serde_json::json!({"outcome": "completed", "destination_amount": "998.00",
            "fee": "1", "rate": "0.999", "provider_tx_id": "tr_found_by_hand"}),
        )
        .send()
        .await
        .unwrap();
    let (status, body) = json(response).await;
    assert_eq!(status, 200, "{body}");
    let (job_status, tx): (String, Option<String>) =
        sqlx::query_as("SELECT status, provider_tx_id FROM conversion_jobs WHERE id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        (job_status.as_str(), tx.as_deref()),
        ("provider_completed", Some("tr_found_by_hand"))
    );
}

/// Errors axum answers before any handler (a wrong method, a body over the
/// limit) are JSON too, and the `Bearer` scheme is case-insensitive.
#[sqlx::test]
async fn wrong_methods_and_oversized_bodies_answer_json(pool: PgPool) {
    let base = serve(&pool, Some("s3cret")).await;
    let http = reqwest::Client::new();

    let response = http
        .get(format!("{base}/v1/settlement/trigger"))
        .send()
        .await
        .unwrap();
    let allow = response.headers().get("allow").cloned();
    let (status, body) = json(response).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (405, Some("method_not_allowed"))
    );
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert_eq!(allow.as_ref().and_then(|v| v.to_str().ok()), Some("POST"));
    let (status, body) = json(
        http.delete(format!("{base}/v1/buffers"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (405, Some("method_not_allowed"))
    );

    let huge = vec![b'x'; 3 * 1024 * 1024];
    let (status, body) = json(
        http.post(format!("{base}/v1/webhooks/Due"))
            .header("x-signature", "sha256=00")
            .body(huge.clone())
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (413, Some("payload_too_large"))
    );
    let (status, body) = json(
        http.post(format!("{base}/v1/providers/Due/status"))
            .bearer_auth("s3cret")
            .header("content-type", "application/json")
            .body(huge.clone())
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (413, Some("payload_too_large"))
    );
    // The manual conversion endpoint answers a body it cannot take the same way.
    let (status, body) = json(
        http.post(format!("{base}/v1/conversions"))
            .bearer_auth("s3cret")
            .header("content-type", "application/json")
            .body(huge)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (413, Some("payload_too_large"))
    );
    let (status, body) = json(
        http.post(format!("{base}/v1/conversions"))
            .bearer_auth("s3cret")
            .body(r#"{"direction": "usdc_to_usd"}"#)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (415, Some("unsupported_media_type"))
    );

    for scheme in ["bearer", "BEARER", "Bearer"] {
        let (status, _) = json(
            http.post(format!("{base}/v1/settlement/trigger"))
                .header("authorization", format!("{scheme} s3cret"))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 202, "scheme {scheme}");
    }
    let (status, _) = json(
        http.post(format!("{base}/v1/settlement/trigger"))
            .header("authorization", "bearer S3CRET")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 401, "the token itself is case-sensitive");
}
