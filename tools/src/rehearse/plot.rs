//! The picture of a rehearsal: per strategy, requests and failures per 100 ms over time, with
//! the termination's events marked. An SVG, one panel per strategy (its first run).

use std::path::Path;

use plotters::prelude::*;

use super::Mode;
use super::report::{EventKind, Rehearsal};
use crate::error::Error;

const PANEL_HEIGHT: u32 = 260;
const WIDTH: u32 = 1100;

pub fn draw(path: &Path, rehearsals: &[Rehearsal]) -> Result<(), Error> {
    let mut shown: Vec<&Rehearsal> = Vec::new();
    for r in rehearsals {
        if !shown.iter().any(|s| s.strategy == r.strategy) {
            shown.push(r);
        }
    }
    if shown.is_empty() {
        return Ok(());
    }
    draw_panels(path, &shown).map_err(|e| Error::Rehearsal(format!("cannot draw {}: {e}", path.display())))
}

fn draw_panels(path: &Path, shown: &[&Rehearsal]) -> Result<(), Box<dyn std::error::Error>> {
    // One time axis for every panel, so that strategies line up.
    let points = shown
        .iter()
        .flat_map(|r| r.modes.iter().flat_map(|m| m.series.iter()));
    let (mut x_min, mut x_max, mut y_max) = (0i64, 1000i64, 1u32);
    for p in points {
        x_min = x_min.min(p.at_ms);
        x_max = x_max.max(p.at_ms + 100);
        y_max = y_max.max(p.ok + p.failed);
    }
    for r in shown {
        for e in &r.events {
            x_max = x_max.max(e.at_ms + 100);
        }
    }
    let (x_min, x_max) = (x_min as f64 / 1000.0, x_max as f64 / 1000.0);
    let y_max = f64::from(y_max) * 1.25;

    let root = SVGBackend::new(path, (WIDTH, PANEL_HEIGHT * shown.len() as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    for (panel, r) in root.split_evenly((shown.len(), 1)).iter().zip(shown) {
        let failed: u64 = r.modes.iter().map(|m| m.summary.failed).sum();
        let total: u64 = r.modes.iter().map(|m| m.summary.requests).sum();
        let caption = match &r.rollout {
            Some(facts) => format!(
                "{}: {failed} of {total} requests failed; {} pods replaced in {:.1} s (rollout)",
                r.strategy,
                facts.limits.replicas,
                r.exit_after.as_secs_f64()
            ),
            None => format!(
                "{}: {failed} of {total} requests failed; pod {} after {:.1} s",
                r.strategy,
                r.exit,
                r.exit_after.as_secs_f64()
            ),
        };
        let mut chart = ChartBuilder::on(panel)
            .caption(caption, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(x_min..x_max, 0f64..y_max)?;
        chart
            .configure_mesh()
            .x_desc(match r.rollout {
                Some(_) => "seconds from the start of the rollout",
                None => "seconds from the start of the termination",
            })
            .y_desc("requests per 100 ms")
            .light_line_style(WHITE)
            .draw()?;
        // A rollout has many events: each old pod's termination and exit are shown, named.
        let rollout = r.rollout.is_some();
        let events = r.events.iter().filter(|e| match rollout {
            true => matches!(
                e.kind,
                EventKind::Terminating | EventKind::Exited | EventKind::Killed
            ),
            false => e.kind != EventKind::LoadStart,
        });
        for (row, event) in events.enumerate() {
            let x = event.at_ms as f64 / 1000.0;
            let color = match event.kind {
                EventKind::Killed => RED.mix(0.8),
                _ => BLACK.mix(0.35),
            };
            chart.draw_series(LineSeries::new([(x, 0.0), (x, y_max)], color.stroke_width(1)))?;
            let label = match rollout {
                true => format!(
                    "{} {}",
                    event.detail.split([' ', ':']).next().unwrap_or(""),
                    event.kind.label()
                ),
                false => event.kind.label().to_owned(),
            };
            chart.draw_series([Text::new(
                label,
                // Events often fall together: their labels go on rows of their own.
                (x, y_max * (0.97 - 0.08 * (row % 5) as f64)),
                ("sans-serif", 11),
            )])?;
        }
        for mode in &r.modes {
            let color = match mode.mode {
                Mode::Close => BLUE,
                Mode::Keepalive => GREEN,
                Mode::FirstField => RGBColor(140, 60, 170),
            };
            let line = mode
                .series
                .iter()
                .map(|p| (p.at_ms as f64 / 1000.0 + 0.05, f64::from(p.ok)));
            chart
                .draw_series(LineSeries::new(line, color.stroke_width(2)))?
                .label(format!("{} ok", mode.mode.name()))
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color.stroke_width(2)));
        }
        // Failures as bars, one mode stacked on the other.
        let mut stacked: std::collections::BTreeMap<i64, f64> = Default::default();
        for mode in &r.modes {
            let color = match mode.mode {
                Mode::Close => RED,
                Mode::Keepalive => RGBColor(255, 150, 0),
                Mode::FirstField => RGBColor(120, 40, 0),
            };
            let mut bars = Vec::new();
            for p in mode.series.iter().filter(|p| p.failed > 0) {
                let x = p.at_ms as f64 / 1000.0;
                let below = stacked.entry(p.at_ms).or_insert(0.0);
                let top = *below + f64::from(p.failed);
                bars.push(Rectangle::new([(x, *below), (x + 0.1, top)], color.filled()));
                *below = top;
            }
            chart
                .draw_series(bars)?
                .label(format!("{} failed", mode.mode.name()))
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 16, y + 5)], color.filled()));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .draw()?;
    }
    root.present()?;
    Ok(())
}
