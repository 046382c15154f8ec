//! The chart a treasurer looks at after a simulation: each buffer's balance
//! over time against its min/target/max band, with the conversions that
//! refilled or drained it marked, one panel per buffer stacked vertically,
//! as PNG or SVG (chosen by the file's extension).
//!
//! Amounts are exact [`Decimal`]s everywhere else; they become `f64` here
//! only as drawing coordinates. Series longer than [`MAX_POINTS`] are
//! downsampled to the lowest and highest balance in each pixel column, so a
//! dip below the minimum stays visible however long the run. Text is drawn
//! with DejaVu Sans, embedded in the binary (see `DejaVuSans.LICENSE`).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use chrono::{DateTime, Duration, Utc};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;
use plotters::style::full_palette::{GREEN_800, RED_800};
use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;

use crate::domain::{BufferAccount, ConversionDirection};

/// Series with more balance points than this are downsampled before drawing.
pub const MAX_POINTS: usize = 5_000;
/// Width of the picture, in pixels.
pub const WIDTH: u32 = 1_600;
/// Height of one buffer's panel, in pixels.
pub const PANEL_HEIGHT: u32 = 400;

/// Pixel columns a downsampled series keeps (about the plotting area's width).
const BUCKETS: usize = 1_400;
const FONT_FAMILIES: [&str; 3] = ["sans-serif", "serif", "monospace"];
static DEJAVU_SANS: &[u8] = include_bytes!("DejaVuSans.ttf");
static FONT_REGISTERED: OnceLock<bool> = OnceLock::new();

/// One buffer's history: its thresholds, its balance and its conversions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BufferSeries {
    /// The buffer (its name titles the panel, its currency labels the axis).
    pub account: BufferAccount,
    /// Below this the buffer is critically low.
    pub min: Decimal,
    /// The level refills aim for.
    pub target: Decimal,
    /// Above this the buffer holds idle capital.
    pub max: Decimal,
    /// The balance from each time on, in time order.
    pub balance: Vec<(DateTime<Utc>, Decimal)>,
    /// Conversions that moved money into or out of this buffer.
    pub conversions: Vec<ConversionMark>,
}

/// A conversion, as marked on a buffer's panel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConversionMark {
    /// When it took effect on the buffer.
    pub at: DateTime<Utc>,
    /// Which way it converted.
    pub direction: ConversionDirection,
    /// The amount, in the buffer's currency.
    pub amount: Decimal,
    /// Whether this buffer receives (up-triangle) rather than pays (down-triangle).
    pub incoming: bool,
}

/// Why a chart could not be drawn.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// The extension is neither `.png` nor `.svg`.
    #[error("{0}: unknown image format (expected a name ending in .png or .svg)")]
    UnknownFormat(PathBuf),
    /// No buffers, or no points in time to put on the axis.
    #[error("nothing to plot: no buffer has a balance point or a conversion")]
    Empty,
    /// The embedded font could not be loaded.
    #[error("the embedded chart font could not be loaded")]
    Font,
    /// Drawing or writing the file failed.
    #[error("cannot draw {path}: {message}")]
    Draw { path: PathBuf, message: String },
}

/// The picture formats [`plot`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// A bitmap.
    Png,
    /// A vector drawing.
    Svg,
}

impl ImageFormat {
    /// The format named by `path`'s extension, case-insensitively.
    pub fn of(path: &Path) -> Result<ImageFormat, PlotError> {
        let extension = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase());
        match extension.as_deref() {
            Some("png") => Ok(ImageFormat::Png),
            Some("svg") => Ok(ImageFormat::Svg),
            _ => Err(PlotError::UnknownFormat(path.to_path_buf())),
        }
    }
}

/// Draws one panel per buffer in `series`, stacked under `title`, into `path`
/// (PNG or SVG by extension, [`WIDTH`] wide and [`PANEL_HEIGHT`] per panel).
pub fn plot(path: &Path, title: &str, series: &[BufferSeries]) -> Result<(), PlotError> {
    let format = ImageFormat::of(path)?;
    let span = time_span(series).ok_or(PlotError::Empty)?;
    register_font()?;
    let size = (WIDTH, PANEL_HEIGHT * series.len() as u32);
    let failed = |message: String| PlotError::Draw {
        path: path.to_path_buf(),
        message,
    };
    match format {
        ImageFormat::Png => {
            let root = BitMapBackend::new(path, size).into_drawing_area();
            draw(&root, title, series, span).map_err(|e| failed(e.to_string()))
        }
        ImageFormat::Svg => {
            let root = SVGBackend::new(path, size).into_drawing_area();
            draw(&root, title, series, span).map_err(|e| failed(e.to_string()))
        }
    }
}

fn register_font() -> Result<(), PlotError> {
    let registered = FONT_REGISTERED.get_or_init(|| {
        FONT_FAMILIES.iter().all(|family| {
            plotters::style::register_font(family, FontStyle::Normal, DEJAVU_SANS).is_ok()
        })
    });
    if *registered {
        Ok(())
    } else {
        Err(PlotError::Font)
    }
}

/// The earliest and latest time of any point or conversion (an hour wide at least).
fn time_span(series: &[BufferSeries]) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
    let times = series.iter().flat_map(|s| {
        let balances = s.balance.iter().map(|(t, _)| *t);
        balances.chain(s.conversions.iter().map(|c| c.at))
    });
    let (first, last) = times.fold(None, |span, t| match span {
        None => Some((t, t)),
        Some((a, b)) => Some((t.min(a), t.max(b))),
    })?;
    Some((first, last.max(first + Duration::hours(1))))
}

type Span = (DateTime<Utc>, DateTime<Utc>);

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    series: &[BufferSeries],
    span: Span,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    root.fill(&WHITE)?;
    let body = root.titled(title, ("sans-serif", 30))?;
    for (panel, buffer) in body.split_evenly((series.len(), 1)).iter().zip(series) {
        draw_panel(panel, buffer, span)?;
    }
    root.present()
}

fn draw_panel<DB: DrawingBackend>(
    panel: &DrawingArea<DB, Shift>,
    buffer: &BufferSeries,
    (start, end): Span,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let balance: Vec<(DateTime<Utc>, f64)> = buffer
        .balance
        .iter()
        .map(|(t, v)| (*t, to_f64(*v)))
        .collect();
    let (low, high) = value_range(buffer, &balance);
    let date_format = if end - start > Duration::days(3) {
        "%b %d"
    } else {
        "%b %d %H:%M"
    };
    let mut chart = ChartBuilder::on(panel)
        .caption(buffer.account.as_str(), ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(100)
        .build_cartesian_2d(start..end, low..high)?;
    chart
        .configure_mesh()
        .x_labels(16)
        .y_labels(8)
        .x_label_formatter(&|t| t.format(date_format).to_string())
        .y_label_formatter(&|v| amount_label(*v))
        .x_desc("time (UTC)")
        .y_desc(buffer.account.currency().code())
        .light_line_style(BLACK.mix(0.04))
        .draw()?;
    let (min, target, max) = (
        to_f64(buffer.min),
        to_f64(buffer.target),
        to_f64(buffer.max),
    );
    let band = GREEN.mix(0.12).filled();
    chart
        .draw_series(std::iter::once(Rectangle::new(
            [(start, min), (end, max)],
            band,
        )))?
        .label("min–max band")
        .legend(move |(x, y)| Rectangle::new([(x - 10, y - 6), (x + 10, y + 6)], band));
    let zero = BLACK.stroke_width(1);
    chart.draw_series(LineSeries::new([(start, 0.0), (end, 0.0)], zero))?;
    for (name, value, color) in [
        ("min", min, RED),
        ("target", target, GREEN),
        ("max", max, MAGENTA),
    ] {
        let style = color.stroke_width(2);
        chart
            .draw_series(LineSeries::new([(start, value), (end, value)], style))?
            .label(format!("{name} {}", amount_label(value)))
            .legend(move |(x, y)| PathElement::new([(x - 10, y), (x + 10, y)], style));
    }
    let line = BLUE.stroke_width(2);
    let drawn = steps(&downsample(&balance, BUCKETS), end);
    chart
        .draw_series(LineSeries::new(drawn, line))?
        .label("balance")
        .legend(move |(x, y)| PathElement::new([(x - 10, y), (x + 10, y)], line));
    draw_marks(&mut chart, buffer, &balance)?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .label_font(("sans-serif", 15))
        .draw()
}

type Chart<'a, DB> = ChartContext<
    'a,
    DB,
    Cartesian2d<
        plotters::coord::types::RangedDateTime<DateTime<Utc>>,
        plotters::coord::types::RangedCoordf64,
    >,
>;

/// Up-triangles where the buffer received a conversion, down-triangles where it paid one.
fn draw_marks<DB: DrawingBackend>(
    chart: &mut Chart<'_, DB>,
    buffer: &BufferSeries,
    balance: &[(DateTime<Utc>, f64)],
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let incoming = GREEN_800.filled();
    chart
        .draw_series(
            marks(buffer, balance, true)
                .into_iter()
                .map(|p| TriangleMarker::new(p, 7, incoming)),
        )?
        .label("conversion in")
        .legend(move |p| TriangleMarker::new(p, 7, incoming));
    let outgoing = RED_800.filled();
    chart
        .draw_series(
            marks(buffer, balance, false)
                .into_iter()
                .map(|p| EmptyElement::at(p) + Polygon::new([(-7, -5), (7, -5), (0, 7)], outgoing)),
        )?
        .label("conversion out")
        .legend(move |(x, y)| Polygon::new([(x - 7, y - 5), (x + 7, y - 5), (x, y + 7)], outgoing));
    Ok(())
}

/// Where the conversions received (or paid, when `incoming` is false) sit:
/// at their time, on the balance line.
fn marks(
    buffer: &BufferSeries,
    balance: &[(DateTime<Utc>, f64)],
    incoming: bool,
) -> Vec<(DateTime<Utc>, f64)> {
    buffer
        .conversions
        .iter()
        .filter(|m| m.incoming == incoming)
        .map(|m| (m.at, balance_at(balance, m.at, buffer.target)))
        .collect()
}

/// The balance in force at `at` (the last point not after it), or `fallback`
/// when the series starts later or is empty.
fn balance_at(balance: &[(DateTime<Utc>, f64)], at: DateTime<Utc>, fallback: Decimal) -> f64 {
    let after = balance.partition_point(|(t, _)| *t <= at);
    match after.checked_sub(1).and_then(|i| balance.get(i)) {
        Some((_, value)) => *value,
        None => balance.first().map_or(to_f64(fallback), |(_, v)| *v),
    }
}

/// The vertical axis: every balance, every threshold and zero, with a margin.
fn value_range(buffer: &BufferSeries, balance: &[(DateTime<Utc>, f64)]) -> (f64, f64) {
    let thresholds = [buffer.min, buffer.target, buffer.max].map(to_f64);
    let values = balance
        .iter()
        .map(|(_, v)| *v)
        .chain(thresholds)
        .chain([0.0]);
    let (low, high) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    let pad = ((high - low) * 0.06).max(1.0);
    (low - pad, high + pad)
}

/// Keeps at most the lowest and the highest point of each of `buckets` equal
/// time slices (in time order) when the series is longer than [`MAX_POINTS`].
pub fn downsample<T: Copy + PartialOrd>(
    points: &[(DateTime<Utc>, T)],
    buckets: usize,
) -> Vec<(DateTime<Utc>, T)> {
    let (Some(first), Some(last)) = (points.first(), points.last()) else {
        return Vec::new();
    };
    if points.len() <= MAX_POINTS || buckets == 0 {
        return points.to_vec();
    }
    let width = (last.0 - first.0).num_milliseconds().max(1) as f64;
    let bucket_of = |t: DateTime<Utc>| {
        let share = (t - first.0).num_milliseconds() as f64 / width;
        ((share * buckets as f64) as usize).min(buckets - 1)
    };
    let mut kept = Vec::with_capacity(2 * buckets);
    let mut start = 0;
    while start < points.len() {
        let bucket = bucket_of(points[start].0);
        let end = start + points[start..].partition_point(|(t, _)| bucket_of(*t) == bucket);
        keep_extremes(&points[start..end], &mut kept);
        start = end;
    }
    kept
}

fn keep_extremes<T: Copy + PartialOrd>(
    slice: &[(DateTime<Utc>, T)],
    kept: &mut Vec<(DateTime<Utc>, T)>,
) {
    let mut low = 0;
    let mut high = 0;
    for (i, (_, v)) in slice.iter().enumerate() {
        if *v < slice[low].1 {
            low = i;
        }
        if *v > slice[high].1 {
            high = i;
        }
    }
    let (a, b) = (low.min(high), low.max(high));
    kept.push(slice[a]);
    if b != a {
        kept.push(slice[b]);
    }
}

/// The balance as a step line: each value holds until the next point, the last until `end`.
fn steps(points: &[(DateTime<Utc>, f64)], end: DateTime<Utc>) -> Vec<(DateTime<Utc>, f64)> {
    let mut drawn = Vec::with_capacity(points.len() * 2 + 1);
    for (i, point) in points.iter().enumerate() {
        if let Some(previous) = i.checked_sub(1).map(|j| points[j]) {
            drawn.push((point.0, previous.1));
        }
        drawn.push(*point);
    }
    if let Some(last) = points.last().filter(|p| p.0 < end) {
        drawn.push((end, last.1));
    }
    drawn
}

fn to_f64(value: Decimal) -> f64 {
    value.to_f64().unwrap_or(0.0)
}

/// An amount for an axis or a legend: whole units with thousands separators.
pub fn amount_label(value: f64) -> String {
    let rounded = value.round();
    let digits = format!("{:.0}", rounded.abs());
    let mut grouped = String::with_capacity(digits.len() + digits.len() / 3 + 1);
    if rounded < 0.0 {
        grouped.push('-');
    }
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(c);
    }
    grouped
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(minute: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap() + Duration::minutes(minute)
    }

    #[test]
    fn amounts_are_labelled_with_thousands_separators() {
        assert_eq!(amount_label(0.0), "0");
        assert_eq!(amount_label(999.6), "1,000");
        assert_eq!(amount_label(-1_234_567.0), "-1,234,567");
        assert_eq!(amount_label(100_000.0), "100,000");
    }

    #[test]
    fn the_format_comes_from_the_extension() {
        assert_eq!(
            ImageFormat::of(Path::new("a.PNG")).ok(),
            Some(ImageFormat::Png)
        );
        assert_eq!(
            ImageFormat::of(Path::new("a.svg")).ok(),
            Some(ImageFormat::Svg)
        );
        assert!(ImageFormat::of(Path::new("a.jpg")).is_err());
    }

    #[test]
    fn short_series_are_kept_whole() {
        let points: Vec<_> = (0..100).map(|i| (t(i), i as f64)).collect();
        assert_eq!(downsample(&points, 10), points);
    }

    #[test]
    fn downsampling_keeps_every_dip_and_spike() {
        let mut points: Vec<_> = (0..50_000).map(|i| (t(i), (i % 7) as f64)).collect();
        points[31_337].1 = -500.0;
        points[4_242].1 = 900.0;
        let kept = downsample(&points, 1_000);
        assert!(kept.len() <= 2_000, "{}", kept.len());
        assert!(kept.contains(&points[31_337]));
        assert!(kept.contains(&points[4_242]));
        assert!(kept.windows(2).all(|w| w[0].0 < w[1].0));
    }

    #[test]
    fn steps_hold_each_balance_until_the_next() {
        let drawn = steps(&[(t(0), 1.0), (t(10), 3.0)], t(20));
        assert_eq!(
            drawn,
            vec![(t(0), 1.0), (t(10), 1.0), (t(10), 3.0), (t(20), 3.0)]
        );
    }

    #[test]
    fn a_mark_sits_on_the_balance_in_force() {
        let balance = [(t(0), 1.0), (t(10), 3.0)];
        assert_eq!(balance_at(&balance, t(5), Decimal::ZERO), 1.0);
        assert_eq!(balance_at(&balance, t(10), Decimal::ZERO), 3.0);
        assert_eq!(balance_at(&balance, t(-5), Decimal::ZERO), 1.0);
        assert_eq!(balance_at(&[], t(0), Decimal::TEN), 10.0);
    }

    #[test]
    fn nothing_to_plot_is_an_error() {
        let dir = std::env::temp_dir().join("treasury-plot-empty.png");
        assert!(matches!(plot(&dir, "x", &[]), Err(PlotError::Empty)));
    }
}
