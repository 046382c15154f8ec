//! Text renderings of the engine's state that several front ends print
//! (`treasury status`, the demo): plain functions from data to text.

use std::collections::BTreeMap;

use crate::planner::BufferLevels;
use crate::store::BufferReport;

/// The buffer table printed by `treasury status`.
pub fn render_status(report: &[BufferReport]) -> String {
    let mut out = format!(
        "{:<20} {:<5} {:>16} {:>12} {:>12} {:>12}  {}\n",
        "ACCOUNT", "CCY", "BALANCE", "MIN", "TARGET", "MAX", "STATUS"
    );
    for r in report {
        out.push_str(&format!(
            "{:<20} {:<5} {:>16} {:>12} {:>12} {:>12}  {}\n",
            r.account.as_str(),
            r.currency,
            r.balance.to_string(),
            r.min.to_string(),
            r.target.to_string(),
            r.max.to_string(),
            r.status
        ));
    }
    out
}

/// The trigger levels, return points and sweep points table printed by `treasury status`.
pub fn render_levels(levels: &BTreeMap<String, BufferLevels>) -> String {
    if levels.is_empty() {
        return "no settlement has set trigger levels yet\n".into();
    }
    let mut out = format!(
        "{:<20} {:>14} {:>14} {:>14} {:>12}\n",
        "ACCOUNT", "TRIGGER", "RETURN POINT", "SWEEP POINT", "LEAD WINDOWS"
    );
    for (account, l) in levels {
        out.push_str(&format!(
            "{:<20} {:>14} {:>14} {:>14} {:>12}\n",
            account,
            l.trigger.round_dp(2).to_string(),
            l.return_point.round_dp(2).to_string(),
            l.sweep_point.round_dp(2).to_string(),
            l.lead_windows
        ));
    }
    out
}
