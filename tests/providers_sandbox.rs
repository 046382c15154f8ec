//! The sandbox provider: deterministic by seed, idempotent by key, exact
//! amounts, and failure injection.

use std::time::{Duration, Instant};

use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use treasury::domain::{ConversionDirection, Currency, Money};
use treasury::providers::{
    ConversionProvider, ConversionRequest, ProviderError, ProviderState, SandboxBehaviour,
    SandboxProvider,
};
use uuid::Uuid;

fn usdc_request(n: u128, amount: Decimal) -> ConversionRequest {
    ConversionRequest {
        idempotency_key: Uuid::from_u128(n),
        direction: ConversionDirection::UsdcToUsd,
        amount: Money::new(Currency::Usdc, amount).unwrap(),
    }
}

fn flaky() -> SandboxBehaviour {
    SandboxBehaviour {
        fee_bps: dec!(10),
        fee_fixed: dec!(1),
        spread_bps: dec!(5),
        retryable_error_probability: 0.3,
        lost_response_probability: 0.2,
        refusal_probability: 0.1,
        failure_probability: 0.2,
        status_error_probability: 0.25,
        polls_to_complete: 3,
        ..SandboxBehaviour::default()
    }
}

/// Drives 40 conversions the same way every time and records everything seen.
async fn script(provider: &SandboxProvider) -> Vec<String> {
    let mut log = Vec::new();
    for n in 1..=40u128 {
        let req = usdc_request(n, Decimal::from(100 + n as i64 * 7));
        let mut tx = None;
        for _ in 0..6 {
            let outcome = provider.initiate(&req).await;
            log.push(format!("{n} initiate {outcome:?}"));
            match outcome {
                Ok(c) => {
                    tx = Some(c.provider_tx_id);
                    break;
                }
                Err(e) if e.is_retryable() => continue,
                Err(_) => break,
            }
        }
        if let Some(tx) = tx {
            for _ in 0..8 {
                let outcome = provider.status(&tx).await;
                log.push(format!("{n} status {outcome:?}"));
                if matches!(
                    outcome,
                    Ok(ref c) if matches!(c.state, ProviderState::Completed { .. } | ProviderState::Failed { .. })
                ) {
                    break;
                }
            }
        }
    }
    log
}

#[tokio::test]
async fn same_seed_same_calls_same_results() {
    let a = script(&SandboxProvider::new(7, flaky())).await;
    let b = script(&SandboxProvider::new(7, flaky())).await;
    assert_eq!(a, b);
    let c = script(&SandboxProvider::new(8, flaky())).await;
    assert_ne!(a, c, "another seed should draw differently");
    // The flaky behaviour really injects each kind of outcome.
    let all = a.join("\n");
    for needle in [
        "simulated 503",
        "lost response",
        "refused",
        "Failed",
        "Completed",
        "status error",
    ] {
        assert!(all.contains(needle), "no {needle:?} in the script");
    }
}

#[tokio::test]
async fn results_do_not_depend_on_the_order_conversions_are_driven_in() {
    let forward = SandboxProvider::new(3, flaky());
    let backward = SandboxProvider::new(3, flaky());
    let mut seen_forward = Vec::new();
    for n in 1..=10u128 {
        seen_forward.push((
            n,
            format!("{:?}", forward.initiate(&usdc_request(n, dec!(500))).await),
        ));
    }
    let mut seen_backward = Vec::new();
    for n in (1..=10u128).rev() {
        seen_backward.push((
            n,
            format!("{:?}", backward.initiate(&usdc_request(n, dec!(500))).await),
        ));
    }
    seen_backward.sort();
    assert_eq!(seen_forward, seen_backward);
}

#[tokio::test]
async fn initiating_twice_with_one_key_is_one_conversion() {
    let provider = SandboxProvider::new(1, SandboxBehaviour::default());
    let req = usdc_request(42, dec!(1000));
    let first = provider.initiate(&req).await.unwrap();
    let second = provider.initiate(&req).await.unwrap();
    assert_eq!(first.provider_tx_id, second.provider_tx_id);
    assert_eq!(provider.initiated_count(), 1);
    assert_eq!(provider.conversion_count(), 1);
    assert_eq!(provider.initiate_calls(), 2);

    // The same key for a different conversion is refused, never a second one.
    let other = ConversionRequest {
        amount: Money::new(Currency::Usdc, dec!(999)).unwrap(),
        ..req.clone()
    };
    let err = provider.initiate(&other).await.unwrap_err();
    assert!(matches!(err, ProviderError::Final { ref code, .. } if code == "idempotency_conflict"));
    assert_eq!(provider.initiated_count(), 1);
}

#[tokio::test]
async fn concurrent_initiations_with_one_key_are_one_conversion() {
    let provider = SandboxProvider::new(
        5,
        SandboxBehaviour {
            latency_min_ms: 1,
            latency_max_ms: 5,
            ..SandboxBehaviour::default()
        },
    );
    let req = usdc_request(9, dec!(250));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (p, r) = (provider.clone(), req.clone());
        tasks.push(tokio::spawn(async move {
            p.initiate(&r).await.unwrap().provider_tx_id
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1);
    assert_eq!(provider.initiated_count(), 1);
    assert_eq!(provider.initiate_calls(), 16);
}

#[tokio::test]
async fn completion_amounts_are_exact_and_rounded_as_documented() {
    let provider = SandboxProvider::new(
        1,
        SandboxBehaviour {
            fee_bps: dec!(10),
            fee_fixed: dec!(1),
            spread_bps: dec!(5),
            polls_to_complete: 3,
            ..SandboxBehaviour::default()
        },
    );
    let req = usdc_request(1, dec!(1000));
    let c = provider.initiate(&req).await.unwrap();
    assert_eq!(c.state, ProviderState::Submitted);
    assert_eq!(
        provider.status(&c.provider_tx_id).await.unwrap().state,
        ProviderState::Processing
    );
    assert_eq!(
        provider.status(&c.provider_tx_id).await.unwrap().state,
        ProviderState::Processing
    );
    let done = provider.status(&c.provider_tx_id).await.unwrap();
    // fee = 1000 × 10 bps + 1 = 2 USDC; (1000 − 2) × 0.9995 = 997.501 → 997.50 USD (toward zero).
    assert_eq!(
        done.state,
        ProviderState::Completed {
            destination_amount: Money::new(Currency::Usd, dec!(997.50)).unwrap(),
            fee: Money::new(Currency::Usdc, dec!(2)).unwrap(),
            rate: dec!(0.9995),
        }
    );
    // Polling a finished conversion keeps answering the same.
    assert_eq!(
        provider.status(&c.provider_tx_id).await.unwrap().state,
        done.state
    );

    // Balances moved by exactly the amounts.
    let opening = SandboxBehaviour::default().opening_balance;
    assert_eq!(
        provider.balance(Currency::Usdc).await.unwrap().value,
        opening - dec!(1000)
    );
    assert_eq!(
        provider.balance(Currency::Usd).await.unwrap().value,
        opening + dec!(997.50)
    );
}

#[tokio::test]
async fn fees_round_half_away_from_zero_in_the_source_currency() {
    let provider = SandboxProvider::new(
        1,
        SandboxBehaviour {
            fee_bps: dec!(25),
            polls_to_complete: 0,
            ..SandboxBehaviour::default()
        },
    );
    // 10.02 USD × 25 bps = 0.02505 → 0.03 USD; (10.02 − 0.03) × 1 = 9.99 USDC.
    let req = ConversionRequest {
        idempotency_key: Uuid::from_u128(77),
        direction: ConversionDirection::UsdToUsdc,
        amount: Money::new(Currency::Usd, dec!(10.02)).unwrap(),
    };
    let c = provider.initiate(&req).await.unwrap();
    assert_eq!(
        c.state,
        ProviderState::Completed {
            destination_amount: Money::new(Currency::Usdc, dec!(9.99)).unwrap(),
            fee: Money::new(Currency::Usd, dec!(0.03)).unwrap(),
            rate: dec!(1),
        }
    );
}

#[tokio::test]
async fn retryable_errors_record_nothing() {
    let provider = SandboxProvider::new(
        1,
        SandboxBehaviour {
            retryable_error_probability: 1.0,
            ..SandboxBehaviour::default()
        },
    );
    for n in 0..5 {
        let err = provider
            .initiate(&usdc_request(n, dec!(10)))
            .await
            .unwrap_err();
        assert!(err.is_retryable());
    }
    assert_eq!(provider.initiated_count(), 0);
    assert_eq!(provider.initiate_calls(), 5);
}

#[tokio::test]
async fn a_lost_response_is_found_again_by_retrying_with_the_same_key() {
    let provider = SandboxProvider::new(
        1,
        SandboxBehaviour {
            lost_response_probability: 1.0,
            ..SandboxBehaviour::default()
        },
    );
    let req = usdc_request(3, dec!(10));
    let err = provider.initiate(&req).await.unwrap_err();
    assert!(err.is_retryable());
    assert!(
        err.may_have_acted(),
        "a lost answer is an unknown outcome: {err:?}"
    );
    assert_eq!(provider.initiated_count(), 1, "the provider did record it");
    let again = provider.initiate(&req).await.unwrap();
    assert_eq!(
        again.provider_tx_id,
        provider
            .conversion_for_key(req.idempotency_key)
            .unwrap()
            .provider_tx_id
    );
    assert_eq!(provider.initiated_count(), 1);
}

#[tokio::test]
async fn refusals_are_final_and_failures_end_failed() {
    let refusing = SandboxProvider::new(
        1,
        SandboxBehaviour {
            refusal_probability: 1.0,
            ..SandboxBehaviour::default()
        },
    );
    let err = refusing
        .initiate(&usdc_request(1, dec!(10)))
        .await
        .unwrap_err();
    assert!(matches!(err, ProviderError::Final { .. }));
    assert_eq!(refusing.initiated_count(), 0);

    let failing = SandboxProvider::new(
        1,
        SandboxBehaviour {
            failure_probability: 1.0,
            polls_to_complete: 1,
            ..SandboxBehaviour::default()
        },
    );
    let c = failing.initiate(&usdc_request(1, dec!(10))).await.unwrap();
    assert!(matches!(
        failing.status(&c.provider_tx_id).await.unwrap().state,
        ProviderState::Failed { .. }
    ));
    // A failed conversion moved no money.
    let opening = SandboxBehaviour::default().opening_balance;
    assert_eq!(
        failing.balance(Currency::Usdc).await.unwrap().value,
        opening
    );
}

#[tokio::test]
async fn an_outage_fails_everything_retryably_until_it_ends() {
    let provider = SandboxProvider::new(1, SandboxBehaviour::default());
    let clone = provider.clone();
    provider.set_down(true);
    assert!(
        clone
            .initiate(&usdc_request(1, dec!(10)))
            .await
            .unwrap_err()
            .is_retryable()
    );
    assert!(clone.health_check().await.is_err());
    assert_eq!(clone.initiated_count(), 0);
    provider.set_down(false);
    assert!(clone.initiate(&usdc_request(1, dec!(10))).await.is_ok());
    assert!(clone.health_check().await.is_ok());
    assert_eq!(provider.initiated_count(), 1, "clones share state");
}

#[tokio::test]
async fn unknown_ids_and_wrong_currencies_are_final() {
    let provider = SandboxProvider::new(1, SandboxBehaviour::default());
    assert!(matches!(
        provider.status("sbx_nope").await,
        Err(ProviderError::Final { ref code, .. }) if code == "not_found"
    ));
    let wrong = ConversionRequest {
        idempotency_key: Uuid::from_u128(1),
        direction: ConversionDirection::UsdToUsdc,
        amount: Money::new(Currency::Usdc, dec!(10)).unwrap(),
    };
    assert!(matches!(
        provider.initiate(&wrong).await,
        Err(ProviderError::Final { .. })
    ));
    assert_eq!(provider.initiated_count(), 0);
}

#[tokio::test]
async fn latency_is_simulated_within_the_range() {
    let provider = SandboxProvider::new(
        1,
        SandboxBehaviour {
            latency_min_ms: 20,
            latency_max_ms: 40,
            ..SandboxBehaviour::default()
        },
    );
    let started = Instant::now();
    provider.initiate(&usdc_request(1, dec!(10))).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(20));
}

#[tokio::test]
async fn quotes_match_what_a_conversion_would_cost() {
    let behaviour = SandboxBehaviour {
        fee_bps: dec!(10),
        fee_fixed: dec!(1),
        spread_bps: dec!(5),
        ..SandboxBehaviour::default()
    };
    let provider = SandboxProvider::new(1, behaviour).named("Sandbox A");
    assert_eq!(provider.name(), "Sandbox A");
    let quote = provider
        .quote(
            ConversionDirection::UsdcToUsd,
            Money::new(Currency::Usdc, dec!(1000)).unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(quote.rate, dec!(0.9995));
    assert_eq!(quote.fee, Money::new(Currency::Usdc, dec!(2)).unwrap());
}
