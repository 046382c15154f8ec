//! The ZeroHash client against a local HTTP server playing ZeroHash: request
//! signing (checked by an HMAC computed here, independently of the client),
//! RFQ → execute with the trade id as provider_tx_id, trade status mapping
//! with exact decimals, balances, and error mapping.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use rust_decimal::RoundingStrategy;
use rust_decimal_macros::dec;
use serde_json::json;
use sha2::Sha256;
use treasury::domain::{ConversionDirection, Currency, Money};
use treasury::providers::http::HttpSettings;
use treasury::providers::zerohash::{ZeroHashConfig, ZeroHashProvider, map_trade, sign};
use treasury::providers::{ConversionProvider, ConversionRequest, ProviderError, ProviderState};
use uuid::Uuid;
use wiremock::matchers::{body_json, header, method, path};
use wiremock::{Match, Mock, MockServer, Request, ResponseTemplate};

/// 32 bytes, base64.
const SECRET: &str = "c2VjcmV0LWtleS1mb3ItdGhlLXRyZWFzdXJ5LXRlc3Q=";
const API_KEY: &str = "zh-public-key";
const PASSPHRASE: &str = "zh-passphrase";
const NOW: i64 = 1_700_000_000;
const ME: &str = "TRSY01";

/// The signature ZeroHash expects, computed here with `hmac` directly.
fn expected_signature(timestamp: &str, method: &str, path: &str, body: &str) -> String {
    let key = BASE64.decode(SECRET).unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{timestamp}{method}{path}{body}").as_bytes());
    BASE64.encode(mac.finalize().into_bytes())
}

/// Matches only requests correctly signed with `SECRET` (GETs sign `{}`).
struct SignedCorrectly;

impl Match for SignedCorrectly {
    fn matches(&self, request: &Request) -> bool {
        let header = |name: &str| request.headers.get(name).and_then(|v| v.to_str().ok());
        let (Some(ts), Some(signed)) = (header("x-scx-timestamp"), header("x-scx-signed")) else {
            return false;
        };
        let body = if request.body.is_empty() {
            "{}".to_owned()
        } else {
            String::from_utf8(request.body.clone()).unwrap()
        };
        let mut route = request.url.path().to_owned();
        if let Some(q) = request.url.query() {
            route = format!("{route}?{q}");
        }
        signed == expected_signature(ts, request.method.as_str(), &route, &body)
            && header("x-scx-api-key") == Some(API_KEY)
            && header("x-scx-passphrase") == Some(PASSPHRASE)
            && ts == NOW.to_string()
    }
}

fn config(base_url: &str) -> ZeroHashConfig {
    ZeroHashConfig {
        base_url: base_url.to_owned(),
        api_key: API_KEY.to_owned(),
        api_secret: SECRET.to_owned(),
        passphrase: PASSPHRASE.to_owned(),
        participant_code: ME.to_owned(),
        account_label: None,
        usdc_asset: "USDC".to_owned(),
        http: HttpSettings {
            timeout: Duration::from_millis(400),
            connect_timeout: Duration::from_millis(400),
        },
    }
}

fn provider(server: &MockServer) -> ZeroHashProvider {
    ZeroHashProvider::new("ZeroHash", config(&server.uri()))
        .unwrap()
        .with_clock(|| NOW)
}

fn raw(status: u16, body: &str) -> ResponseTemplate {
    ResponseTemplate::new(status).set_body_raw(body.as_bytes().to_vec(), "application/json")
}

fn key() -> Uuid {
    Uuid::from_u128(0x0f0e_0d0c_0b0a_4908_8706_0504_0302_0100)
}

#[test]
fn signature_matches_an_independently_computed_hmac() {
    let body = r#"{"quote_id":"q-1"}"#;
    let got = sign(SECRET, "1700000000", "POST", "/liquidity/execute", body).unwrap();
    assert_eq!(
        got,
        expected_signature("1700000000", "POST", "/liquidity/execute", body)
    );
    // Any change to what is signed changes the signature.
    assert_ne!(
        got,
        sign(SECRET, "1700000001", "POST", "/liquidity/execute", body).unwrap()
    );
    assert_ne!(
        got,
        sign(SECRET, "1700000000", "GET", "/liquidity/execute", body).unwrap()
    );
    assert!(matches!(
        sign("not base64!", "1", "GET", "/", "{}"),
        Err(ProviderError::Configuration(_))
    ));
}

#[tokio::test]
async fn initiate_signs_requests_and_keeps_the_trade_id_not_the_quote_id() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/liquidity/rfq"))
        .and(SignedCorrectly)
        .and(header("content-type", "application/json"))
        .and(body_json(json!({
            "participant_code": ME,
            "side": "sell",
            "underlying": "USDC",
            "quoted_currency": "USD",
            "quantity": "50000.000000"
        })))
        .respond_with(raw(
            200,
            r#"{"message": {
                "request_id": "42684912-6107-4547-9999-977b2f847bfd",
                "participant_code": "TRSY01",
                "quoted_currency": "USD",
                "side": "sell",
                "quantity": "50000",
                "price": 0.9997,
                "quote_id": "2888c933-4766-4a35-aba7-a3d3c3c8e3cc",
                "expire_ts": 1755539666435,
                "underlying": "USDC",
                "total_notional": "49985.00"
            }}"#,
        ))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/liquidity/execute"))
        .and(SignedCorrectly)
        .and(header("x-request-id", key().to_string().as_str()))
        .and(body_json(
            json!({"quote_id": "2888c933-4766-4a35-aba7-a3d3c3c8e3cc"}),
        ))
        .respond_with(raw(
            200,
            r#"{"message": {
                "request_id": "39b54e0f-6af1-4d79-a7b5-a9cf036794f9",
                "quote": {"quote_id": "2888c933-4766-4a35-aba7-a3d3c3c8e3cc", "price": "0.9997"},
                "trade_id": "ba97133e-ab15-4c86-86c1-86671b8420bc",
                "status": "Completed"
            }}"#,
        ))
        .expect(1)
        .mount(&server)
        .await;

    let request = ConversionRequest {
        idempotency_key: key(),
        direction: ConversionDirection::UsdcToUsd,
        amount: Money::new(Currency::Usdc, dec!(50000)).unwrap(),
    };
    let conversion = provider(&server).initiate(&request).await.unwrap();

    assert_eq!(
        conversion.provider_tx_id,
        "ba97133e-ab15-4c86-86c1-86671b8420bc"
    );
    assert_eq!(conversion.state, ProviderState::Submitted);
    // The RFQ carries a request id derived from the key (not the key itself).
    let received = server.received_requests().await.unwrap();
    let rfq_id = received[0]
        .headers
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap();
    assert_ne!(rfq_id, key().to_string());
}

#[tokio::test]
async fn buying_usdc_quotes_a_usd_total() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/liquidity/rfq"))
        .and(SignedCorrectly)
        .and(body_json(json!({
            "participant_code": ME,
            "side": "buy",
            "underlying": "USDC",
            "quoted_currency": "USD",
            "total": "1000.10"
        })))
        .respond_with(raw(
            200,
            r#"{"message": {"quote_id": "q-9", "price": "1.0025"}}"#,
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
    assert_eq!(
        quote.rate,
        (dec!(1) / dec!(1.0025)).round_dp_with_strategy(10, RoundingStrategy::MidpointNearestEven)
    );
    assert_eq!(quote.fee, Money::zero(Currency::Usd));
}

fn trade(trade_state: &str, settlement: Option<&str>) -> String {
    let settlement = settlement.map_or("null".to_owned(), |s| format!("\"{s}\""));
    format!(
        r#"{{"message": {{
            "trade_id": "t-1",
            "trade_state": "{trade_state}",
            "settlement_state": {settlement},
            "symbol": "USDC/USD",
            "trade_price": "0.9997024691",
            "trade_quantity": "50000.00",
            "parties": [
                {{"participant_code": "{ME}", "side": "buy", "asset": "USDC", "amount": 49985.123456, "settling": true}},
                {{"participant_code": "00SCXM", "side": "sell", "asset": "USD", "amount": "50000.00", "settling": true}}
            ]
        }}}}"#
    )
}

#[tokio::test]
async fn a_settled_trade_is_completed_with_exact_amounts() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/trades/t-1"))
        .and(SignedCorrectly)
        .respond_with(raw(200, &trade("terminated", Some("settled"))))
        .expect(1)
        .mount(&server)
        .await;

    let conversion = provider(&server).status("t-1").await.unwrap();

    assert_eq!(conversion.provider_tx_id, "t-1");
    let ProviderState::Completed {
        destination_amount,
        fee,
        rate,
    } = conversion.state
    else {
        panic!("expected completed, got {:?}", conversion.state);
    };
    assert_eq!(
        destination_amount,
        Money::new(Currency::Usdc, dec!(49985.123456)).unwrap()
    );
    assert_eq!(fee, Money::zero(Currency::Usd));
    assert_eq!(
        rate,
        (dec!(49985.123456) / dec!(50000))
            .round_dp_with_strategy(10, RoundingStrategy::MidpointNearestEven)
    );
}

#[test]
fn trade_states_map_to_provider_states() {
    let parse = |s: &str| treasury::providers::json::parse_lossless(s.as_bytes()).unwrap();
    for state in ["accepted", "active"] {
        let c = map_trade(&parse(&trade(state, None)), ME).unwrap();
        assert_eq!(c.state, ProviderState::Processing, "{state}");
    }
    let c = map_trade(&parse(&trade("terminated", Some("defaulted"))), ME).unwrap();
    assert!(matches!(c.state, ProviderState::Failed { .. }));
    assert!(matches!(
        map_trade(&parse(&trade("terminated", None)), ME),
        Err(ProviderError::Protocol(_))
    ));
    assert!(matches!(
        map_trade(&parse(&trade("vanished", None)), ME),
        Err(ProviderError::Protocol(_))
    ));
    // Our side is found by participant code; a stranger's code finds nothing.
    assert!(matches!(
        map_trade(&parse(&trade("terminated", Some("settled"))), "OTHER1"),
        Err(ProviderError::Protocol(_))
    ));
}

#[tokio::test]
async fn balance_sums_available_accounts_in_the_currency() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/accounts"))
        .and(SignedCorrectly)
        .respond_with(raw(
            200,
            r#"{"message": [
                {"asset": "USDC.ETH", "account_type": "available", "balance": "1000.000001"},
                {"asset": "USDC", "account_type": "available", "balance": 0.5},
                {"asset": "USDC", "account_type": "collateral", "balance": "99"},
                {"asset": "USD", "account_type": "available", "balance": "12.34"}
            ]}"#,
        ))
        .mount(&server)
        .await;
    let p = provider(&server);
    assert_eq!(
        p.balance(Currency::Usdc).await.unwrap().value,
        dec!(1000.500001)
    );
    assert_eq!(p.balance(Currency::Usd).await.unwrap().value, dec!(12.34));
}

#[tokio::test]
async fn server_error_is_retryable() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(raw(503, r#"{"errors": ["maintenance"]}"#))
        .mount(&server)
        .await;
    let err = provider(&server).status("t-1").await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
}

#[tokio::test]
async fn rate_limit_is_retryable_with_retry_after() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            raw(429, r#"{"errors": ["Too many requests"]}"#).insert_header("Retry-After", "2"),
        )
        .mount(&server)
        .await;
    let request = ConversionRequest {
        idempotency_key: key(),
        direction: ConversionDirection::UsdToUsdc,
        amount: Money::new(Currency::Usd, dec!(100)).unwrap(),
    };
    let err = provider(&server).initiate(&request).await.unwrap_err();
    assert_eq!(
        err,
        ProviderError::Retryable {
            reason: "HTTP 429: Too many requests".to_owned(),
            retry_after_ms: Some(2000)
        }
    );
}

#[tokio::test]
async fn bad_request_is_final_with_the_code() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/liquidity/rfq"))
        .respond_with(raw(
            400,
            r#"{"errors": [{"code": "insufficient_balance", "message": "Insufficient balance"}]}"#,
        ))
        .mount(&server)
        .await;
    let request = ConversionRequest {
        idempotency_key: key(),
        direction: ConversionDirection::UsdcToUsd,
        amount: Money::new(Currency::Usdc, dec!(100)).unwrap(),
    };
    let err = provider(&server).initiate(&request).await.unwrap_err();
    assert_eq!(
        err,
        ProviderError::Final {
            code: "insufficient_balance".to_owned(),
            reason: "HTTP 400: Insufficient balance".to_owned()
        }
    );
}

#[tokio::test]
async fn a_slow_answer_times_out_retryably() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(raw(200, &trade("accepted", None)).set_delay(Duration::from_secs(2)))
        .mount(&server)
        .await;
    let err = provider(&server).status("t-1").await.unwrap_err();
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
        .respond_with(ResponseTemplate::new(200).set_body_string("not json at all"))
        .mount(&server)
        .await;
    let err = provider(&server).status("t-1").await.unwrap_err();
    assert!(matches!(err, ProviderError::Protocol(_)), "{err:?}");
}

#[tokio::test]
async fn an_execute_answer_without_a_trade_id_leaves_the_outcome_unknown() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/liquidity/rfq"))
        .respond_with(raw(
            200,
            r#"{"message": {"quote_id": "q-1", "price": "1"}}"#,
        ))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/liquidity/execute"))
        .respond_with(raw(
            200,
            r#"{"message": {"quote": {"quote_id": "q-1"}, "status": "Completed"}}"#,
        ))
        .mount(&server)
        .await;
    let request = ConversionRequest {
        idempotency_key: key(),
        direction: ConversionDirection::UsdcToUsd,
        amount: Money::new(Currency::Usdc, dec!(100)).unwrap(),
    };
    let err = provider(&server).initiate(&request).await.unwrap_err();
    assert!(
        matches!(err, ProviderError::OutcomeUnknown { .. }),
        "the trade may have executed: {err:?}"
    );
}
