//! Buffer alerts that fire once per crossing: when a settlement leaves a
//! buffer in another status than the one last announced, one record goes to
//! `treasury.buffer-alerts` through the outbox, in the settlement's own
//! transaction. Nothing is published while a buffer stays where it is.
//!
//! [`crossings`] is the pure decision (statuses before and after, thresholds →
//! alert records); [`announce`] is the thin driver the settlement cycle calls.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use uuid::Uuid;

use crate::codec::Codec;
use crate::codec::alert::encode_buffer_alert;
use crate::domain::{BufferAccount, BufferStatus, Thresholds};
use crate::planner::BufferPosition;
use crate::store::{OutboxMessage, StoreError, StoreTx};

/// Namespace of alert ids: UUIDv5 over (cycle, account).
const ALERT_ID_NAMESPACE: Uuid = Uuid::from_u128(0x2c8e_51a0_7d3f_4b19_a6c2_93e4_0f5b_d817);

/// The settlement window whose close is announced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertWindow {
    /// The window's cycle id (`window:<start>`).
    pub cycle_id: String,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

/// One buffer that changed status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BufferAlert {
    /// Deterministic: the same window and account always give the same id.
    pub alert_id: Uuid,
    pub account: BufferAccount,
    pub from: BufferStatus,
    pub to: BufferStatus,
    /// The balance after the window, in the buffer's currency.
    pub balance: Decimal,
    pub thresholds: Thresholds,
    pub cycle_id: String,
    pub window_start: DateTime<Utc>,
    pub window_end: DateTime<Utc>,
    /// When the crossing happened in event time: the window's end.
    pub occurred_at: DateTime<Utc>,
}

impl BufferAlert {
    /// The id of the alert for `account` in `cycle_id`.
    pub fn derive_id(cycle_id: &str, account: BufferAccount) -> Uuid {
        let name = format!("{cycle_id}|{}", account.as_str());
        Uuid::new_v5(&ALERT_ID_NAMESPACE, name.as_bytes())
    }
}

/// The alerts for one settled window: one per buffer whose status after the
/// window (`positions`, balances with the window's flows applied) differs
/// from `previous` (the last status announced for it). A buffer with no
/// previous status is compared with `fallback` (its status before the
/// window), and one absent from both is not announced.
pub fn crossings(
    previous: &BTreeMap<BufferAccount, BufferStatus>,
    fallback: &BTreeMap<BufferAccount, BufferStatus>,
    positions: &[BufferPosition],
    window: &AlertWindow,
) -> Vec<BufferAlert> {
    positions
        .iter()
        .filter_map(|p| {
            let from = previous
                .get(&p.account)
                .or_else(|| fallback.get(&p.account))
                .copied()?;
            let to = p.thresholds.status(p.balance);
            (from != to).then(|| BufferAlert {
                alert_id: BufferAlert::derive_id(&window.cycle_id, p.account),
                account: p.account,
                from,
                to,
                balance: p.balance,
                thresholds: p.thresholds,
                cycle_id: window.cycle_id.clone(),
                window_start: window.start,
                window_end: window.end,
                occurred_at: window.end,
            })
        })
        .collect()
}

/// Each buffer's status at its balance (not counting conversions in flight).
pub fn statuses(positions: &[BufferPosition]) -> BTreeMap<BufferAccount, BufferStatus> {
    positions
        .iter()
        .map(|p| (p.account, p.thresholds.status(p.balance)))
        .collect()
}

/// Announces the crossings of a window whose flows `tx` has just applied:
/// compares each buffer with its last announced status (or, the first time,
/// with `before`, its balance before the flows), queues one record per
/// crossing on `topic` and stores the new statuses. Returns the alerts.
pub async fn announce(
    tx: &mut dyn StoreTx,
    codec: &Codec,
    topic: &str,
    window: &AlertWindow,
    before: &BTreeMap<BufferAccount, Decimal>,
) -> Result<Vec<BufferAlert>, StoreError> {
    let positions = tx.buffer_positions().await?;
    let fallback = positions
        .iter()
        .filter_map(|p| Some((p.account, p.thresholds.status(*before.get(&p.account)?))))
        .collect();
    let previous = tx.announced_statuses().await?;
    let alerts = crossings(&previous, &fallback, &positions, window);
    let messages = alerts
        .iter()
        .map(|alert| alert_message(codec, topic, alert))
        .collect::<Result<Vec<_>, _>>()?;
    tx.enqueue(&messages).await?;
    tx.record_announced(&statuses(&positions)).await?;
    for alert in &alerts {
        tracing::warn!(
            account = alert.account.as_str(),
            from = alert.from.as_str(),
            to = alert.to.as_str(),
            balance = %alert.balance,
            cycle = %alert.cycle_id,
            "buffer status changed"
        );
        metrics::counter!(
            "treasury_buffer_status_changes_total",
            "account" => alert.account.as_str(),
            "from" => alert.from.as_str(),
            "to" => alert.to.as_str()
        )
        .increment(1);
    }
    Ok(alerts)
}

fn alert_message(
    codec: &Codec,
    topic: &str,
    alert: &BufferAlert,
) -> Result<OutboxMessage, StoreError> {
    let payload = encode_buffer_alert(codec, alert)
        .map_err(|e| StoreError::Corrupt(format!("buffer alert does not encode: {e}")))?;
    Ok(OutboxMessage {
        id: alert.alert_id,
        topic: topic.to_owned(),
        key: Some(alert.account.as_str().to_owned()),
        payload,
        headers: vec![
            ("message-id".into(), alert.alert_id.to_string()),
            ("cycle-id".into(), alert.cycle_id.clone()),
            ("from-status".into(), alert.from.as_str().into()),
            ("to-status".into(), alert.to.as_str().into()),
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use rust_decimal_macros::dec;

    fn position(account: BufferAccount, balance: Decimal) -> BufferPosition {
        BufferPosition {
            account,
            thresholds: Thresholds::new(dec!(10000), dec!(50000), dec!(100000)).unwrap(),
            batch_size: dec!(20000),
            balance,
            incoming: Decimal::ZERO,
            outgoing: Decimal::ZERO,
        }
    }

    fn window() -> AlertWindow {
        let start = Utc.with_ymd_and_hms(2026, 1, 5, 9, 0, 0).unwrap();
        AlertWindow {
            cycle_id: "window:2026-01-05T09:00:00Z".into(),
            start,
            end: start + chrono::Duration::minutes(5),
        }
    }

    #[test]
    fn a_crossing_gives_one_alert_and_staying_gives_none() {
        let usdc = BufferAccount::SystemBufferUsdc;
        let previous = BTreeMap::from([(usdc, BufferStatus::Healthy)]);
        let alerts = crossings(
            &previous,
            &BTreeMap::new(),
            &[position(usdc, dec!(9999.99))],
            &window(),
        );
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].from, BufferStatus::Healthy);
        assert_eq!(alerts[0].to, BufferStatus::CriticalLow);
        assert_eq!(alerts[0].balance, dec!(9999.99));
        assert_eq!(alerts[0].occurred_at, window().end);
        let stays = BTreeMap::from([(usdc, BufferStatus::CriticalLow)]);
        assert!(
            crossings(
                &stays,
                &BTreeMap::new(),
                &[position(usdc, dec!(5))],
                &window()
            )
            .is_empty()
        );
    }

    #[test]
    fn the_last_announced_status_wins_over_the_balance_before_the_window() {
        // A conversion completed between windows moved the balance back up
        // unannounced: the next settlement announces the recovery.
        let usdc = BufferAccount::SystemBufferUsdc;
        let previous = BTreeMap::from([(usdc, BufferStatus::CriticalLow)]);
        let fallback = BTreeMap::from([(usdc, BufferStatus::Healthy)]);
        let alerts = crossings(
            &previous,
            &fallback,
            &[position(usdc, dec!(60000))],
            &window(),
        );
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].from, BufferStatus::CriticalLow);
        assert_eq!(alerts[0].to, BufferStatus::Healthy);
    }

    #[test]
    fn ids_are_deterministic_per_window_and_account() {
        let w = window();
        let a = BufferAlert::derive_id(&w.cycle_id, BufferAccount::SystemBufferUsdc);
        assert_eq!(
            a,
            BufferAlert::derive_id(&w.cycle_id, BufferAccount::SystemBufferUsdc)
        );
        assert_ne!(
            a,
            BufferAlert::derive_id(&w.cycle_id, BufferAccount::SystemBufferFiat)
        );
        assert_ne!(
            a,
            BufferAlert::derive_id("window:other", BufferAccount::SystemBufferUsdc)
        );
    }

    #[test]
    fn a_buffer_never_seen_is_compared_with_its_status_before_the_window() {
        let fiat = BufferAccount::SystemBufferFiat;
        let fallback = BTreeMap::from([(fiat, BufferStatus::Healthy)]);
        let alerts = crossings(
            &BTreeMap::new(),
            &fallback,
            &[position(fiat, dec!(100000.01))],
            &window(),
        );
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].to, BufferStatus::OverCapitalized);
        assert!(
            crossings(
                &BTreeMap::new(),
                &BTreeMap::new(),
                &[position(fiat, dec!(1))],
                &window()
            )
            .is_empty()
        );
    }
}
