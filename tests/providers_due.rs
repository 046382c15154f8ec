//! The Due client against a local HTTP server playing Due: request shapes,
//! transfer id (never the quote token) as provider_tx_id, status mapping with
//! exact decimals, and error mapping.

use std::time::Duration;

use rust_decimal_macros::dec;
use serde_json::{Value, json};
use treasury::domain::{ConversionDirection, Currency, Money};
use treasury::providers::due::{DueConfig, DueProvider, map_transfer};
use treasury::providers::http::HttpSettings;
use treasury::providers::{ConversionProvider, ConversionRequest, ProviderError, ProviderState};
use uuid::Uuid;
use wiremock::matchers::{body_json, header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const KEY: &str = "due-test-key";

fn config(base_url: &str) -> DueConfig {
    DueConfig {
        base_url: base_url.to_owned(),
        api_key: KEY.to_owned(),
        account_id: Some("acct_treasury".to_owned()),
        usd_rail: "ach".to_owned(),
        usdc_rail: "ethereum".to_owned(),
        usd_recipient_id: "rcp_usd_bank".to_owned(),
        usdc_recipient_id: "rcp_usdc_wallet".to_owned(),
        http: HttpSettings {
            timeout: Duration::from_millis(400),
            connect_timeout: Duration::from_millis(400),
        },
    }
}

fn provider(server: &MockServer) -> DueProvider {
    DueProvider::new("Due", config(&server.uri())).unwrap()
}

fn request(
    direction: ConversionDirection,
    currency: Currency,
    amount: rust_decimal::Decimal,
) -> ConversionRequest {
    ConversionRequest {
        idempotency_key: Uuid::from_u128(0x1234_5678_9abc_4def_8123_4567_89ab_cdef),
        direction,
        amount: Money::new(currency, amount).unwrap(),
    }
}

/// A raw JSON body (so numbers stay as literal text, as Due would send them).
fn raw(status: u16, body: &str) -> ResponseTemplate {
    ResponseTemplate::new(status).set_body_raw(body.as_bytes().to_vec(), "application/json")
}

/// A Due that quotes with [`QUOTE_BODY`] and answers transfer creation with
/// `transfer`.
async fn due_quoting_then_answering_transfers(transfer: ResponseTemplate) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/transfers/quote"))
        .respond_with(raw(200, QUOTE_BODY))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/v1/transfers"))
        .respond_with(transfer)
        .mount(&server)
        .await;
    server
}

const QUOTE_BODY: &str = r#"{
    "token": "qt_eyJhbGciOiJIUzI1NiJ9.quote",
    "source": {"rail": "ethereum", "currency": "USDC", "amount": "50000.000000", "fee": "10.000000", "totalFee": "15.000000"},
    "destination": {"rail": "ach", "currency": "USD", "amount": "49970.00"},
    "fxRate": 0.9997,
    "fxMarkup": 5,
    "expiresAt": "2026-01-01T00:02:00Z"
}"#;

const TRANSFER_CREATED: &str = r#"{
    "id": "tr_8f14e45fceea167a",
    "ownerId": "acct_treasury",
    "status": "awaiting_funds",
    "source": {"currency": "USDC", "rail": "ethereum", "amount": "50000.000000", "fee": "15.000000"},
    "destination": {"currency": "USD", "rail": "ach", "amount": "49970.00"},
    "fxRate": 0.9997,
    "createdAt": "2026-01-01T00:00:01Z"
}"#;

#[tokio::test]
async fn initiate_quotes_then_creates_a_transfer_and_keeps_the_transfer_id() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/transfers/quote"))
        .and(header("authorization", format!("Bearer {KEY}").as_str()))
        .and(header("due-account-id", "acct_treasury"))
        .and(body_json(json!({
            "source": {"rail": "ethereum", "currency": "USDC", "amount": "50000.000000"},
            "destination": {"rail": "ach", "currency": "USD", "amount": "0"}
        })))
        .respond_with(raw(200, QUOTE_BODY))
        .expect(1)
        .mount(&server)
        .await;
    let req = request(ConversionDirection::UsdcToUsd, Currency::Usdc, dec!(50000));
    Mock::given(method("POST"))
        .and(path("/v1/transfers"))
        .and(header("authorization", format!("Bearer {KEY}").as_str()))
        .and(header(
            "idempotency-key",
            req.idempotency_key.to_string().as_str(),
        ))
        .and(body_json(json!({
            "quote": "qt_eyJhbGciOiJIUzI1NiJ9.quote",
            "recipient": "rcp_usd_bank",
            "memo": format!("treasury {}", req.idempotency_key)
        })))
        .respond_with(raw(200, TRANSFER_CREATED))
        .expect(1)
        .mount(&server)
        .await;

    let conversion = provider(&server).initiate(&req).await.unwrap();

    assert_eq!(conversion.provider_tx_id, "tr_8f14e45fceea167a");
    assert_ne!(conversion.provider_tx_id, "qt_eyJhbGciOiJIUzI1NiJ9.quote");
    assert_eq!(conversion.state, ProviderState::Submitted);
    assert_eq!(conversion.raw["transfer"]["id"], "tr_8f14e45fceea167a");
    assert_eq!(
        conversion.raw["quote"]["token"],
        "qt_eyJhbGciOiJIUzI1NiJ9.quote"
    );

    // The quote call carries no idempotency key; the transfer call does.
    let received = server.received_requests().await.unwrap();
    let quote_call = received
        .iter()
        .find(|r| r.url.path() == "/v1/transfers/quote")
        .unwrap();
    assert!(quote_call.headers.get("idempotency-key").is_none());
}

#[tokio::test]
async fn usd_amounts_are_sent_as_strings_with_cents() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/transfers/quote"))
        .and(body_json(json!({
            "source": {"rail": "ach", "currency": "USD", "amount": "1000.10"},
            "destination": {"rail": "ethereum", "currency": "USDC", "amount": "0"}
        })))
        .respond_with(raw(
            200,
            r#"{"token": "qt_2", "fxRate": 0.9995, "source": {"currency": "USD", "fee": "1.00"}}"#,
        ))
        .expect(1)
        .mount(&server)
        .await;
    let quote = provider(&server)
        .quote(
            ConversionDirection::UsdToUsdc,
            Money::new(Currency::Usd, dec!(1000.1)).unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(quote.rate, dec!(0.9995));
    assert_eq!(quote.fee, Money::new(Currency::Usd, dec!(1.00)).unwrap());
}

#[tokio::test]
async fn status_of_a_processed_transfer_is_completed_with_exact_amounts() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/v1/transfers/tr_42"))
        .and(header("authorization", format!("Bearer {KEY}").as_str()))
        .respond_with(raw(
            200,
            r#"{
                "id": "tr_42",
                "status": "payment_processed",
                "source": {"currency": "USD", "rail": "ach", "amount": "50000.00", "fee": "10.00", "totalFee": "14.87"},
                "destination": {"currency": "USDC", "rail": "ethereum", "amount": "49985.123456"},
                "fxRate": 0.99999999999999999997
            }"#,
        ))
        .mount(&server)
        .await;

    let conversion = provider(&server).status("tr_42").await.unwrap();

    assert_eq!(conversion.provider_tx_id, "tr_42");
    let ProviderState::Completed {
        destination_amount,
        fee,
        rate,
    } = conversion.state
    else {
        panic!("expected completed, got {:?}", conversion.state);
    };
    assert_eq!(destination_amount.currency, Currency::Usdc);
    assert_eq!(destination_amount.value, dec!(49985.123456));
    assert_eq!(fee.currency, Currency::Usd);
    assert_eq!(fee.value, dec!(14.87));
    assert_eq!(
        rate,
        dec!(0.99999999999999999997),
        "a JSON number must not pass through f64"
    );
}

#[test]
fn due_statuses_map_to_provider_states() {
    let transfer = |status: &str| {
        json!({
            "id": "tr_1", "status": status,
            "source": {"currency": "USDC", "amount": "10.000000"},
            "destination": {"currency": "USD", "amount": "9.99"},
            "fxRate": "0.999"
        })
    };
    for s in ["awaiting_funds", "pending"] {
        assert_eq!(
            map_transfer(&transfer(s)).unwrap().state,
            ProviderState::Submitted,
            "{s}"
        );
    }
    for s in [
        "funds_received",
        "approved",
        "manual_review",
        "payment_submitted",
        "refund_submitted",
    ] {
        assert_eq!(
            map_transfer(&transfer(s)).unwrap().state,
            ProviderState::Processing,
            "{s}"
        );
    }
    for s in [
        "failed",
        "canceled",
        "cancelled",
        "rejected",
        "refund_processed",
    ] {
        assert!(
            matches!(
                map_transfer(&transfer(s)).unwrap().state,
                ProviderState::Failed { .. }
            ),
            "{s}"
        );
    }
    for s in ["payment_processed", "completed"] {
        assert!(
            matches!(
                map_transfer(&transfer(s)).unwrap().state,
                ProviderState::Completed { .. }
            ),
            "{s}"
        );
    }
    assert!(matches!(
        map_transfer(&transfer("teleported")),
        Err(ProviderError::Protocol(_))
    ));
}

#[test]
fn an_over_precise_usd_amount_is_refused_not_rounded() {
    let body = json!({
        "id": "tr_1", "status": "payment_processed",
        "source": {"currency": "USDC", "amount": "10.000000"},
        "destination": {"currency": "USD", "amount": "9.995"},
        "fxRate": "0.9995"
    });
    assert!(matches!(
        map_transfer(&body),
        Err(ProviderError::Protocol(_))
    ));
}

#[test]
fn a_transfer_without_an_id_is_a_protocol_error() {
    let body: Value = json!({"status": "awaiting_funds"});
    assert!(matches!(
        map_transfer(&body),
        Err(ProviderError::Protocol(_))
    ));
}

#[tokio::test]
async fn server_error_is_retryable() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(raw(500, r#"{"message": "internal"}"#))
        .mount(&server)
        .await;
    let err = provider(&server).status("tr_1").await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
}

#[tokio::test]
async fn rate_limit_is_retryable_with_retry_after() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(raw(429, r#"{"message": "slow down"}"#).insert_header("Retry-After", "3"))
        .mount(&server)
        .await;
    let req = request(ConversionDirection::UsdcToUsd, Currency::Usdc, dec!(100));
    let err = provider(&server).initiate(&req).await.unwrap_err();
    assert_eq!(
        err,
        ProviderError::Retryable {
            reason: "HTTP 429: slow down".to_owned(),
            retry_after_ms: Some(3000)
        }
    );
}

#[tokio::test]
async fn bad_request_is_final_with_dues_code() {
    let server = due_quoting_then_answering_transfers(raw(
        400,
        r#"{"code": "quote_expired", "message": "Quote has expired"}"#,
    ))
    .await;
    let req = request(ConversionDirection::UsdcToUsd, Currency::Usdc, dec!(50000));
    let err = provider(&server).initiate(&req).await.unwrap_err();
    assert_eq!(
        err,
        ProviderError::Final {
            code: "quote_expired".to_owned(),
            reason: "HTTP 400: Quote has expired".to_owned()
        }
    );
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn a_slow_answer_times_out_retryably() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(raw(200, TRANSFER_CREATED).set_delay(Duration::from_secs(2)))
        .mount(&server)
        .await;
    let err = provider(&server).status("tr_1").await.unwrap_err();
    assert!(
        matches!(err, ProviderError::OutcomeUnknown { ref reason } if reason.contains("timeout")),
        "a timeout after sending leaves the outcome unknown (and retryable): {err:?}"
    );
    assert!(err.is_retryable());
}

#[tokio::test]
async fn a_garbage_body_is_a_protocol_error() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_body_string("<html>gateway</html>"))
        .mount(&server)
        .await;
    let err = provider(&server).status("tr_1").await.unwrap_err();
    assert!(matches!(err, ProviderError::Protocol(_)), "{err:?}");
}

#[tokio::test]
async fn an_unreachable_server_is_retryable() {
    // A port that was just free: nothing listens there (a dropped MockServer
    // would go back to wiremock's pool and keep answering).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let provider = DueProvider::new("Due", config(&format!("http://127.0.0.1:{port}"))).unwrap();
    let err = provider.status("tr_1").await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
}

#[tokio::test]
async fn a_path_changing_id_is_refused_before_any_call() {
    let server = MockServer::start().await;
    let err = provider(&server).status("../accounts").await.unwrap_err();
    assert!(matches!(err, ProviderError::Final { .. }), "{err:?}");
    assert!(server.received_requests().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_request_in_the_wrong_currency_never_reaches_due() {
    let server = MockServer::start().await;
    let req = request(ConversionDirection::UsdcToUsd, Currency::Usd, dec!(100));
    let err = provider(&server).initiate(&req).await.unwrap_err();
    assert!(matches!(err, ProviderError::Final { ref code, .. } if code == "invalid_request"));
    assert!(server.received_requests().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_slow_quote_is_retryable_but_a_slow_transfer_leaves_the_outcome_unknown() {
    let req = request(ConversionDirection::UsdcToUsd, Currency::Usdc, dec!(50000));

    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/transfers/quote"))
        .respond_with(raw(200, QUOTE_BODY).set_delay(Duration::from_secs(2)))
        .mount(&server)
        .await;
    let err = provider(&server).initiate(&req).await.unwrap_err();
    assert!(
        err.is_retryable() && !err.may_have_acted(),
        "a quote moves no money: {err:?}"
    );

    let server = due_quoting_then_answering_transfers(
        raw(200, TRANSFER_CREATED).set_delay(Duration::from_secs(2)),
    )
    .await;
    let err = provider(&server).initiate(&req).await.unwrap_err();
    assert!(
        err.is_retryable() && err.may_have_acted(),
        "the transfer may exist: {err:?}"
    );
}

#[tokio::test]
async fn a_transfer_answered_with_500_or_without_an_id_leaves_the_outcome_unknown() {
    let req = request(ConversionDirection::UsdcToUsd, Currency::Usdc, dec!(50000));
    for (status, body) in [
        (500, r#"{"message": "internal"}"#),
        (200, r#"{"ok": true}"#),
    ] {
        let server = due_quoting_then_answering_transfers(raw(status, body)).await;
        let err = provider(&server).initiate(&req).await.unwrap_err();
        assert!(err.may_have_acted(), "HTTP {status} {body}: {err:?}");
    }
}

#[tokio::test]
async fn a_refused_connection_is_retryable_and_sent_nothing() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let provider = DueProvider::new("Due", config(&url)).unwrap();
    let req = request(ConversionDirection::UsdcToUsd, Currency::Usdc, dec!(50000));
    let err = provider.initiate(&req).await.unwrap_err();
    assert!(
        err.is_retryable() && !err.may_have_acted(),
        "nothing reached Due: {err:?}"
    );
}
