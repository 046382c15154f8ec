//! The provider registry: builds providers from rows by provider_type, and
//! names what is wrong when it cannot.

use std::collections::HashMap;
use std::sync::Arc;

use rust_decimal_macros::dec;
use treasury::domain::{ConversionDirection, Currency, Money};
use treasury::providers::{
    ConversionProvider, ConversionRequest, ProviderError, ProviderRegistry, ProviderRow,
    ProviderStatus, SandboxBehaviour, SandboxProvider,
};
use uuid::Uuid;

fn row(name: &str, provider_type: &str) -> ProviderRow {
    ProviderRow {
        id: Uuid::new_v5(&Uuid::NAMESPACE_OID, name.as_bytes()),
        name: name.to_owned(),
        provider_type: provider_type.to_owned(),
        priority: 1,
        status: ProviderStatus::Active,
        supports_usdc_to_usd: true,
        supports_usd_to_usdc: true,
        supports_usd_transfer: false,
        min_amount: dec!(100),
        max_amount: dec!(1000000),
        daily_volume_limit: None,
        daily_volume_used: dec!(0),
        success_count: 0,
        failure_count: 0,
        fee_percentage: dec!(0.001),
        fee_fixed: dec!(0),
        spread_bps: dec!(5),
        credentials_ref: None,
        base_url: None,
    }
}

fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + Send + Sync + 'static {
    let map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |k| map.get(k).cloned()
}

fn config_error(result: Result<Arc<dyn ConversionProvider>, ProviderError>) -> String {
    match result {
        Err(ProviderError::Configuration(message)) => message,
        Err(other) => panic!("expected a configuration error, got {other:?}"),
        Ok(p) => panic!("expected a configuration error, built {}", p.name()),
    }
}

const DUE_ENV: &[(&str, &str)] = &[
    ("DUE_API_KEY", "k"),
    ("DUE_USD_RECIPIENT_ID", "rcp_usd"),
    ("DUE_USDC_RECIPIENT_ID", "rcp_usdc"),
];

const ZEROHASH_ENV: &[(&str, &str)] = &[
    ("ZEROHASH_API_KEY", "k"),
    ("ZEROHASH_API_SECRET", "c2VjcmV0"),
    ("ZEROHASH_PASSPHRASE", "p"),
    ("ZEROHASH_PARTICIPANT_CODE", "TRSY01"),
];

#[test]
fn an_unknown_provider_type_is_named() {
    let registry = ProviderRegistry::standard(env(&[]), None);
    let message = config_error(registry.build(&row("Acme", "acme_fx")));
    assert!(message.contains("acme_fx"), "{message}");
    assert!(message.contains("Acme"), "{message}");
}

#[test]
fn a_missing_credential_names_the_variable() {
    let registry = ProviderRegistry::standard(env(&DUE_ENV[1..]), None);
    let message = config_error(registry.build(&row("Due", "due")));
    assert!(message.contains("DUE_API_KEY"), "{message}");

    // credentials_ref chooses the variable, and the error names that one.
    let mut custom = row("Due EU", "due");
    custom.credentials_ref = Some("DUE_EU_API_KEY".to_owned());
    let registry = ProviderRegistry::standard(env(DUE_ENV), None);
    let message = config_error(registry.build(&custom));
    assert!(message.contains("DUE_EU_API_KEY"), "{message}");

    for missing in [
        "ZEROHASH_API_KEY",
        "ZEROHASH_API_SECRET",
        "ZEROHASH_PASSPHRASE",
        "ZEROHASH_PARTICIPANT_CODE",
    ] {
        let vars: Vec<_> = ZEROHASH_ENV
            .iter()
            .copied()
            .filter(|(k, _)| *k != missing)
            .collect();
        let registry = ProviderRegistry::standard(env(&vars), None);
        let message = config_error(registry.build(&row("ZeroHash", "zerohash")));
        assert!(message.contains(missing), "{message}");
    }
}

#[test]
fn a_secret_that_is_not_base64_is_named() {
    let mut vars = ZEROHASH_ENV.to_vec();
    vars[1] = ("ZEROHASH_API_SECRET", "not base64 !!");
    let registry = ProviderRegistry::standard(env(&vars), None);
    let message = config_error(registry.build(&row("ZeroHash", "zerohash")));
    assert!(message.contains("ZEROHASH_API_SECRET"), "{message}");
}

#[test]
fn a_bad_timeout_is_named() {
    let mut vars = DUE_ENV.to_vec();
    vars.push(("DUE_TIMEOUT_MS", "fast"));
    let registry = ProviderRegistry::standard(env(&vars), None);
    let message = config_error(registry.build(&row("Due", "due")));
    assert!(message.contains("DUE_TIMEOUT_MS"), "{message}");
}

#[test]
fn configured_providers_build_with_the_rows_name() {
    let mut vars = DUE_ENV.to_vec();
    vars.extend_from_slice(ZEROHASH_ENV);
    let registry = ProviderRegistry::standard(env(&vars), None);
    assert_eq!(
        registry.provider_types(),
        vec!["due", "sandbox", "zerohash"]
    );
    assert_eq!(registry.build(&row("Due", "due")).unwrap().name(), "Due");
    // provider_type is matched case-insensitively.
    assert_eq!(
        registry.build(&row("ZeroHash", "ZeroHash")).unwrap().name(),
        "ZeroHash"
    );
}

#[tokio::test]
async fn a_shared_sandbox_serves_sandbox_rows_and_shows_what_it_saw() {
    let sandbox = SandboxProvider::new(11, SandboxBehaviour::default());
    let registry = ProviderRegistry::standard(env(&[]), Some(sandbox.clone()));
    let built = registry.build(&row("Sandbox", "sandbox")).unwrap();
    assert_eq!(built.name(), "Sandbox");
    let request = ConversionRequest {
        idempotency_key: Uuid::from_u128(1),
        direction: ConversionDirection::UsdToUsdc,
        amount: Money::new(Currency::Usd, dec!(500)).unwrap(),
    };
    built.initiate(&request).await.unwrap();
    // Building again (e.g. after a restart of the executor loop) is the same provider.
    registry
        .build(&row("Sandbox", "sandbox"))
        .unwrap()
        .initiate(&request)
        .await
        .unwrap();
    assert_eq!(sandbox.initiated_count(), 1);
    assert_eq!(sandbox.initiate_calls(), 2);
}

#[tokio::test]
async fn an_unshared_sandbox_keeps_its_state_across_builds() {
    let registry = ProviderRegistry::standard(env(&[("SANDBOX_SEED", "99")]), None);
    let sandbox_row = row("Sandbox", "sandbox");
    let request = ConversionRequest {
        idempotency_key: Uuid::from_u128(2),
        direction: ConversionDirection::UsdcToUsd,
        amount: Money::new(Currency::Usdc, dec!(500)).unwrap(),
    };
    let started = registry
        .build(&sandbox_row)
        .unwrap()
        .initiate(&request)
        .await
        .unwrap();
    let followed = registry
        .build(&sandbox_row)
        .unwrap()
        .status(&started.provider_tx_id)
        .await;
    assert!(followed.is_ok(), "{followed:?}");

    let registry = ProviderRegistry::standard(env(&[("SANDBOX_SEED", "minus one")]), None);
    let message = config_error(registry.build(&sandbox_row));
    assert!(message.contains("SANDBOX_SEED"), "{message}");
}

#[test]
fn a_new_provider_is_one_registration() {
    let mut registry = ProviderRegistry::new(env(&[]));
    registry.register("echo", |row, _env| {
        Ok(
            Arc::new(SandboxProvider::new(0, SandboxBehaviour::default()).named(row.name.clone()))
                as Arc<dyn ConversionProvider>,
        )
    });
    assert_eq!(registry.build(&row("Echo", "echo")).unwrap().name(), "Echo");
    let message = config_error(registry.build(&row("Due", "due")));
    assert!(message.contains("\"due\""), "{message}");
}
