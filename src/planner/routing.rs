//! Who pays whom: from each buffer's position and levels to a set of
//! movements between buffers, in one direction per cycle.
//!
//! - A buffer projected below its trigger *needs* money up to its return
//!   point; a buffer that needs gives nothing.
//! - Any other buffer can *give* what it holds (balance less what is already
//!   leaving; never money still in flight toward it) above its return point,
//!   or, when some buffer is below its minimum or needs money it is expected
//!   to miss before a refill lands ([urgent](super::BufferLevels::urgent)),
//!   above its trigger.
//! - A USD need is met first by a `usd_transfer` from the other USD buffer
//!   when some provider offers transfers (one hop, no spread: the cheapest
//!   and quickest money there is), then by converting the USDC buffer's
//!   surplus. A USDC need is met from the USD givers, largest first.
//! - With no transfer provider, a USD need the USDC buffer cannot meet is
//!   routed through USDC: the other USD buffer converts into the USDC
//!   buffer, which passes the money on once it has landed (what is already
//!   on its way to the USDC buffer beyond its own return point counts toward
//!   that).
//! - A buffer above its ceiling (its maximum) sweeps down to its sweep
//!   point (a batch below the maximum, never below its return point) into the
//!   buffer it can reach (the other currency's, or the other USD buffer by
//!   transfer) furthest below its own return point, never filling it past
//!   that buffer's ceiling, and never into a buffer that pays another in the
//!   same plan.
//! - Opposite conversions are netted across cycles: if both were wanted, the
//!   direction serving a buffer below its minimum (else the larger total)
//!   runs now and the other waits for the next cycle, when the positions
//!   have moved. Transfers are not conversions and always run.

use std::collections::BTreeMap;

use rust_decimal::{Decimal, RoundingStrategy};

use super::levels::BufferLevels;
use super::{BufferPosition, PlanNote};
use crate::domain::{BufferAccount, ConversionDirection, ConversionTrigger};

/// Money to move from one buffer to another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Movement {
    pub source: BufferAccount,
    pub destination: BufferAccount,
    /// In the source currency, at its scale.
    pub amount: Decimal,
    pub trigger: ConversionTrigger,
    pub direction: ConversionDirection,
}

/// A buffer as routing tracks it while it plans.
#[derive(Debug, Clone, Copy)]
struct Standing {
    levels: BufferLevels,
    min: Decimal,
    /// Balance + in flight + planned so far.
    projected: Decimal,
    /// Balance − what is leaving (in flight and planned): what it can pay.
    spendable: Decimal,
    needy: bool,
}

fn scale_down(amount: Decimal, account: BufferAccount) -> Decimal {
    amount
        .max(Decimal::ZERO)
        .round_dp_with_strategy(account.currency().scale(), RoundingStrategy::ToZero)
}

struct Router {
    standing: BTreeMap<BufferAccount, Standing>,
    urgent: bool,
    /// Whether some provider carries out `usd_transfer`.
    transfers: bool,
    movements: Vec<Movement>,
    notes: Vec<PlanNote>,
}

impl Router {
    fn giveable(&self, account: BufferAccount) -> Decimal {
        let s = self.standing[&account];
        if s.needy {
            return Decimal::ZERO;
        }
        let keep = if self.urgent {
            s.levels.trigger
        } else {
            s.levels.return_point
        };
        scale_down(s.spendable - keep.max(s.min), account)
    }

    fn record(
        &mut self,
        source: BufferAccount,
        destination: BufferAccount,
        amount: Decimal,
        trigger: ConversionTrigger,
    ) {
        let Some(direction) = ConversionDirection::between(source, destination) else {
            return;
        };
        if amount <= Decimal::ZERO {
            return;
        }
        if let Some(s) = self.standing.get_mut(&source) {
            s.spendable -= amount;
            s.projected -= amount;
        }
        if let Some(d) = self.standing.get_mut(&destination) {
            d.projected += amount;
        }
        self.movements.push(Movement {
            source,
            destination,
            amount,
            trigger,
            direction,
        });
    }

    /// Whether `account` already pays some other buffer in this plan (it
    /// then takes no sweep: money would pass through it for nothing).
    fn gives(&self, account: BufferAccount) -> bool {
        self.movements.iter().any(|m| m.source == account)
    }

    /// Whether money can move from `source` to `destination` this cycle: a
    /// conversion always, a USD transfer when a provider offers it.
    fn reachable(&self, source: BufferAccount, destination: BufferAccount) -> bool {
        match ConversionDirection::between(source, destination) {
            Some(d) => d.is_conversion() || self.transfers,
            None => false,
        }
    }

    /// Who can pay `account`: the other USD buffer by transfer first (when
    /// transfers are offered), then the other currency's buffers, largest
    /// giver first.
    fn givers_for(&self, account: BufferAccount) -> Vec<BufferAccount> {
        let mut givers: Vec<BufferAccount> = self
            .standing
            .keys()
            .copied()
            .filter(|a| self.reachable(*a, account))
            .collect();
        givers.sort_by(|a, b| {
            let transfer = |x: &BufferAccount| x.currency() == account.currency();
            transfer(b)
                .cmp(&transfer(a))
                .then(self.giveable(*b).cmp(&self.giveable(*a)))
                .then(a.cmp(b))
        });
        givers
    }

    fn meet(&mut self, account: BufferAccount) {
        let s = self.standing[&account];
        let trigger = if s.projected < s.min {
            ConversionTrigger::Emergency
        } else {
            ConversionTrigger::BufferReplenishment
        };
        let mut remaining = s.levels.return_point - s.projected;
        for giver in self.givers_for(account) {
            let amount = scale_down(remaining.min(self.giveable(giver)), giver);
            if amount > Decimal::ZERO {
                self.record(giver, account, amount, trigger);
                remaining -= amount;
            }
        }
        if remaining <= Decimal::ZERO {
            return;
        }
        if account.currency() == crate::domain::Currency::Usd && !self.transfers {
            self.route_through_usdc(account, remaining);
        } else {
            self.notes.push(PlanNote {
                account,
                note: format!(
                    "needs {} more than the USD buffers can give",
                    remaining.round_dp(2)
                ),
            });
        }
    }

    fn route_through_usdc(&mut self, account: BufferAccount, remaining: Decimal) {
        let usdc = BufferAccount::SystemBufferUsdc;
        let Some(u) = self.standing.get(&usdc).copied() else {
            return;
        };
        let on_its_way = (u.projected - u.levels.return_point).max(Decimal::ZERO);
        let mut wanted = remaining - on_its_way;
        if wanted <= Decimal::ZERO {
            self.notes.push(PlanNote {
                account,
                note: "waits for USDC already on its way to system_buffer_usdc".into(),
            });
            return;
        }
        let others: Vec<BufferAccount> = self
            .standing
            .keys()
            .copied()
            .filter(|a| *a != account && a.currency() == account.currency())
            .collect();
        for other in others {
            let amount = scale_down(wanted.min(self.giveable(other)), other);
            if amount > Decimal::ZERO {
                self.record(other, usdc, amount, ConversionTrigger::ScheduledRebalance);
                wanted -= amount;
            }
        }
        if wanted > Decimal::ZERO {
            self.notes.push(PlanNote {
                account,
                note: format!("needs {} more than any buffer can give", wanted.round_dp(2)),
            });
        }
    }

    fn sweep(&mut self, account: BufferAccount) {
        let s = self.standing[&account];
        if s.needy || s.projected <= s.levels.ceiling {
            return;
        }
        let mut excess = scale_down(
            (s.projected.min(s.spendable) - s.levels.sweep_point).min(self.giveable(account)),
            account,
        );
        let mut destinations: Vec<BufferAccount> = self
            .standing
            .keys()
            .copied()
            .filter(|a| self.reachable(account, *a) && !self.gives(*a))
            .collect();
        let shortfall = |r: &Router, a: BufferAccount| {
            let d = r.standing[&a];
            d.levels.return_point - d.projected
        };
        destinations.sort_by(|a, b| shortfall(self, *b).cmp(&shortfall(self, *a)).then(a.cmp(b)));
        for destination in destinations {
            let d = self.standing[&destination];
            let room = scale_down(d.levels.ceiling - d.projected, account);
            let amount = excess.min(room);
            if amount > Decimal::ZERO {
                self.record(
                    account,
                    destination,
                    amount,
                    ConversionTrigger::ScheduledRebalance,
                );
                excess -= amount;
            }
        }
    }

    /// Keeps one direction: the one serving an emergency, else the larger.
    fn one_direction(&mut self) {
        let score = |d: ConversionDirection, moves: &[Movement]| {
            let urgent = moves
                .iter()
                .any(|m| m.direction == d && m.trigger == ConversionTrigger::Emergency);
            let needs: Decimal = moves
                .iter()
                .filter(|m| m.direction == d && m.trigger != ConversionTrigger::ScheduledRebalance)
                .map(|m| m.amount)
                .sum();
            let total: Decimal = moves
                .iter()
                .filter(|m| m.direction == d)
                .map(|m| m.amount)
                .sum();
            (urgent, needs, total)
        };
        let a = score(ConversionDirection::UsdToUsdc, &self.movements);
        let b = score(ConversionDirection::UsdcToUsd, &self.movements);
        if a.2.is_zero() || b.2.is_zero() {
            return;
        }
        let keep = if a >= b {
            ConversionDirection::UsdToUsdc
        } else {
            ConversionDirection::UsdcToUsd
        };
        let (kept, dropped): (Vec<Movement>, Vec<Movement>) = self
            .movements
            .iter()
            .partition(|m| m.direction == keep || !m.direction.is_conversion());
        for m in dropped {
            self.notes.push(PlanNote {
                account: m.destination,
                note: format!(
                    "{} {} from {} waits: {keep} runs this cycle (no opposite conversions in one cycle)",
                    m.direction, m.amount, m.source
                ),
            });
        }
        self.movements = kept;
    }
}

/// The movements for one cycle, with notes on what could not be met;
/// `transfers` says whether some provider carries out `usd_transfer`.
pub fn route(
    positions: &[BufferPosition],
    levels: &BTreeMap<BufferAccount, BufferLevels>,
    transfers: bool,
) -> (Vec<Movement>, Vec<PlanNote>) {
    let standing: BTreeMap<BufferAccount, Standing> = positions
        .iter()
        .filter_map(|p| {
            let l = *levels.get(&p.account)?;
            let projected = p.projected();
            Some((
                p.account,
                Standing {
                    levels: l,
                    min: p.thresholds.min(),
                    projected,
                    spendable: p.balance - p.outgoing,
                    needy: projected < l.trigger,
                },
            ))
        })
        .collect();
    let urgent = standing
        .values()
        .any(|s| s.projected < s.min || s.levels.urgent_need(s.projected, s.min));
    let mut router = Router {
        standing,
        urgent,
        transfers,
        movements: Vec::new(),
        notes: Vec::new(),
    };
    let mut needs: Vec<BufferAccount> = router
        .standing
        .iter()
        .filter(|(_, s)| s.needy)
        .map(|(a, _)| *a)
        .collect();
    let key = |r: &Router, a: &BufferAccount| {
        let s = r.standing[a];
        (
            s.projected >= s.min,
            s.projected - s.levels.return_point,
            *a,
        )
    };
    needs.sort_by_key(|a| key(&router, a));
    for account in needs {
        router.meet(account);
    }
    for account in BufferAccount::ALL {
        if router.standing.contains_key(&account) {
            router.sweep(account);
        }
    }
    router.one_direction();
    (router.movements, router.notes)
}
