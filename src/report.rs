//! Text renderings of the engine's state that several front ends print
//! (`treasury status`, the demo): plain functions from data to text.

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
