//! The report of one scenario run: JSON plus an SVG chart, written to the results folder.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use super::classes::RoomStep;
use super::hist::Latency;

/// One measured step: a rate of the sweep, a connection count, one sync, one storm.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Step {
    /// What was offered: messages per second (open loop), 0 for closed-loop steps.
    pub offered_rate: f64,
    /// Measured time, seconds.
    pub duration_s: f64,
    /// Requests sent.
    pub sent: u64,
    /// Requests answered with success (`SendMessageOutput`, `SyncOutput`, sign-in…).
    pub acked: u64,
    /// Messages received by receivers (each recipient device counts once).
    pub delivered: u64,
    /// Refusals, timeouts and failed connections.
    pub errors: u64,
    /// `acked / duration_s`.
    pub ack_rate: f64,
    /// `delivered / duration_s`.
    pub delivered_rate: f64,
    /// Send → ACK, from the intended send time (open loop: includes queueing in the generator).
    pub ack_latency: Latency,
    /// Send → delivered at a receiver, from the intended send time (client clock, one machine).
    pub deliver_latency: Latency,
    /// Server accept (`server_time_ms`) → delivered, millisecond resolution.
    pub server_to_deliver: Latency,
    /// Open connections during the step.
    pub connections: u64,
    /// Gateway (or `zhibo dev`) resident memory at the end of the step, KiB.
    pub rss_kib: u64,
    /// CPU the gateway (or `zhibo dev`) process used during the step, in cores.
    pub server_cpu_cores: f64,
    /// Room scenario: the class mix and what became of each class (issue 17).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room: Option<RoomStep>,
}

/// A chart: one or more series of (x, y) points.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Chart {
    /// Title.
    pub title: String,
    /// X axis label.
    pub x_label: String,
    /// Y axis label.
    pub y_label: String,
    /// Named series.
    pub series: Vec<(String, Vec<(f64, f64)>)>,
}

/// Ceilings: the raw infrastructure under zhibo, measured in the same run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Ceilings {
    /// NATS core publish → one subscriber, same payload size, messages per second.
    pub nats_pubsub_per_s: f64,
    /// NATS request/reply round trip, one requester, sequential.
    pub nats_request_latency: Latency,
    /// Redis INCR per second (pipelined, one connection).
    pub redis_incr_per_s: f64,
    /// Loopback WebSocket echo round trips per second (pipelined, one connection).
    pub ws_echo_per_s: f64,
    /// Loopback WebSocket echo round trip, sequential.
    pub ws_echo_latency: Latency,
    /// Payload size used, bytes.
    pub payload_bytes: usize,
    /// CQL plain inserts per second at concurrency [`super::ceilings::CQL_CONCURRENCY`], same node.
    #[serde(default)]
    pub cql_insert_per_s: f64,
    /// CQL lightweight-transaction inserts (`IF NOT EXISTS`) per second, same concurrency.
    #[serde(default)]
    pub cql_lwt_per_s: f64,
    /// CQL point reads (by primary key) per second, same concurrency.
    #[serde(default)]
    pub cql_read_per_s: f64,
    /// CQL plain insert round trip, one in flight (the floor of each CQL step of a send).
    #[serde(default)]
    pub cql_insert_latency: Latency,
}

/// Everything one scenario run measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// The command line that produced it.
    pub command: String,
    /// Unix seconds at the start.
    pub started_at: u64,
    /// Machine: cores, kernel, what ran on it.
    pub machine: BTreeMap<String, String>,
    /// Server mode and settings (`dev`, `distributed`, `external`; store; transport).
    pub server: BTreeMap<String, String>,
    /// The measured steps.
    pub steps: Vec<Step>,
    /// Headline figures of the scenario (names documented in `loadtest/README.md`).
    pub metrics: BTreeMap<String, f64>,
    /// Ceilings measured in the same run, when asked for.
    pub ceilings: Option<Ceilings>,
    /// zhibo's figures divided by the ceilings.
    pub ratios: BTreeMap<String, f64>,
    /// Charts to render.
    pub charts: Vec<Chart>,
    /// What to keep in mind reading the figures.
    pub notes: Vec<String>,
    /// Files written.
    pub files: Vec<String>,
}

impl Report {
    /// Writes `<dir>/<scenario>-<label>.json` and one `.svg` per chart; records their paths.
    ///
    /// # Errors
    /// When the folder or a file cannot be written.
    pub fn write(&mut self, dir: &Path, label: &str) -> anyhow::Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let stem = if label.is_empty() {
            self.scenario.clone()
        } else {
            format!("{}-{label}", self.scenario)
        };
        let mut paths = Vec::new();
        for (i, chart) in self.charts.iter().enumerate() {
            let p = dir.join(format!("{stem}-{i}.svg"));
            render_svg(chart, &p).with_context(|| format!("render {}", p.display()))?;
            paths.push(p);
        }
        let json = dir.join(format!("{stem}.json"));
        paths.push(json.clone());
        self.files = paths.iter().map(|p| p.display().to_string()).collect();
        std::fs::write(&json, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("write {}", json.display()))?;
        Ok(paths)
    }
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// Renders `chart` as an SVG line chart.
///
/// # Errors
/// When drawing or writing fails.
pub fn render_svg(chart: &Chart, path: &Path) -> anyhow::Result<()> {
    let points = chart.series.iter().flat_map(|(_, p)| p.iter());
    let (mut x0, mut x1, mut y1) = (f64::MAX, f64::MIN, 0.0f64);
    for &(x, y) in points {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1) = (0.0, 1.0);
    }
    if (x1 - x0).abs() < f64::EPSILON {
        x1 = x0 + 1.0;
    }
    let y1 = if y1 <= 0.0 { 1.0 } else { y1 * 1.1 };
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut ctx = ChartBuilder::on(&root)
        .caption(&chart.title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(72)
        .build_cartesian_2d(x0..x1, 0.0..y1)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    ctx.configure_mesh()
        .x_desc(chart.x_label.as_str())
        .y_desc(chart.y_label.as_str())
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for (i, (name, pts)) in chart.series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        ctx.draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
        ctx.draw_series(
            pts.iter()
                .map(|&(x, y)| Circle::new((x, y), 3, color.filled())),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    ctx.configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_json_and_svg() {
        let dir = std::env::temp_dir().join(format!("zhibo-report-{}", std::process::id()));
        let mut r = Report {
            scenario: "t".into(),
            charts: vec![Chart {
                title: "latency".into(),
                x_label: "rate".into(),
                y_label: "ms".into(),
                series: vec![("p99".into(), vec![(1.0, 2.0), (2.0, 3.0)])],
            }],
            ..Report::default()
        };
        let files = r.write(&dir, "x").expect("write");
        assert_eq!(files.len(), 2);
        let svg = std::fs::read_to_string(&files[0]).expect("svg");
        assert!(svg.contains("<svg"), "{svg}");
        let back: Report =
            serde_json::from_slice(&std::fs::read(&files[1]).expect("json")).expect("parse");
        assert_eq!(back.files.len(), 2);
        let _ = std::fs::remove_dir_all(dir);
    }
}
