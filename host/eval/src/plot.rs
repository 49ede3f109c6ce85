//! The eval's figures, drawn with plotters as SVG and rasterised to PNG with
//! resvg. The PNGs use a bundled DejaVu Sans, so they render the same on a
//! machine without fonts.

use super::attack::ProcrustesRow;
use plotters::prelude::*;
use std::path::{Path, PathBuf};

const SIZE: (u32, u32) = (900, 560);
const FONT: &[u8] = include_bytes!("font/DejaVuSans.ttf");

type PlotResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn err<E: std::fmt::Display>(e: E) -> Box<dyn std::error::Error + Send + Sync> {
    e.to_string().into()
}

/// Writes DIR/NAME.svg and DIR/NAME.png; returns both paths.
fn save(
    dir: &Path,
    name: &str,
    draw: impl FnOnce(&DrawingArea<SVGBackend, plotters::coord::Shift>) -> PlotResult<()>,
) -> PlotResult<Vec<PathBuf>> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        draw(&root)?;
        root.present().map_err(err)?;
    }
    let svg_path = dir.join(format!("{name}.svg"));
    std::fs::write(&svg_path, &svg)?;
    let mut opt = resvg::usvg::Options::default();
    let db = opt.fontdb_mut();
    db.load_font_data(FONT.to_vec());
    db.set_sans_serif_family("DejaVu Sans");
    opt.font_family = "DejaVu Sans".into();
    let tree = resvg::usvg::Tree::from_str(&svg, &opt).map_err(err)?;
    let mut pixmap = resvg::tiny_skia::Pixmap::new(SIZE.0, SIZE.1).ok_or("empty image")?;
    pixmap.fill(resvg::tiny_skia::Color::WHITE);
    resvg::render(&tree, resvg::tiny_skia::Transform::default(), &mut pixmap.as_mut());
    let png_path = dir.join(format!("{name}.png"));
    pixmap.save_png(&png_path).map_err(err)?;
    Ok(vec![svg_path, png_path])
}

/// Histogram (as a density) of the readout cosines with the N(0, 1/d) density over it.
pub fn readout(dir: &Path, caption: &str, cos: &[f64], d: usize) -> PlotResult<Vec<PathBuf>> {
    let sigma = 1.0 / (d as f64).sqrt();
    let lim = 5.5 * sigma;
    let bins = 88usize;
    let width = 2.0 * lim / bins as f64;
    let mut counts = vec![0usize; bins];
    for &c in cos {
        let b = ((c + lim) / width).floor();
        if b >= 0.0 && (b as usize) < bins {
            counts[b as usize] += 1;
        }
    }
    let n = cos.len().max(1) as f64;
    let density: Vec<(f64, f64)> =
        counts.iter().enumerate().map(|(i, &c)| (-lim + i as f64 * width, c as f64 / (n * width))).collect();
    let peak = 1.0 / (sigma * (2.0 * std::f64::consts::PI).sqrt());
    let top = density.iter().map(|p| p.1).fold(peak, f64::max) * 1.1;
    save(dir, "readout_cosines", |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(caption, ("sans-serif", 18))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(60)
            .build_cartesian_2d(-lim..lim, 0.0..top)
            .map_err(err)?;
        chart.configure_mesh().x_desc("cos(k, R_a^T R_b k)").y_desc("density").draw().map_err(err)?;
        chart
            .draw_series(
                density.iter().map(|&(x, y)| Rectangle::new([(x, 0.0), (x + width, y)], BLUE.mix(0.35).filled())),
            )
            .map_err(err)?
            .label(format!("measured ({} pairs)", cos.len()))
            .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], BLUE.mix(0.35).filled()));
        let curve = (0..=400).map(|i| {
            let x = -lim + 2.0 * lim * i as f64 / 400.0;
            (x, peak * (-(x * x) / (2.0 * sigma * sigma)).exp())
        });
        chart
            .draw_series(LineSeries::new(curve, RED.stroke_width(2)))
            .map_err(err)?
            .label(format!("N(0, 1/d), d = {d}"))
            .legend(|(x, y)| PathElement::new([(x, y), (x + 14, y)], RED.stroke_width(2)));
        chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(err)?;
        Ok(())
    })
}

/// Key error (log scale) and decryption accuracy against the number of known pairs, d marked.
pub fn procrustes(dir: &Path, caption: &str, rows: &[ProcrustesRow]) -> PlotResult<Vec<PathBuf>> {
    let Some(first) = rows.first() else { return Ok(Vec::new()) };
    let d = first.head_dim as f64;
    let max_n = rows.iter().flat_map(|r| r.points.iter().map(|p| p.pairs)).max().unwrap_or(1) as f64;
    let colours = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    save(dir, "procrustes", |root| {
        let root = root.titled(caption, ("sans-serif", 18)).map_err(err)?;
        let (left, right) = root.split_horizontally(SIZE.0 / 2);
        let mut err_chart = ChartBuilder::on(&left)
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(0.0..max_n + 1.0, (1e-8f64..10.0).log_scale())
            .map_err(err)?;
        err_chart
            .configure_mesh()
            .x_desc("known pairs n")
            .y_desc("|R_est - R|_F / |R|_F")
            .y_label_formatter(&|y| format!("{y:.0e}"))
            .draw()
            .map_err(err)?;
        let mut acc_chart = ChartBuilder::on(&right)
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..max_n + 1.0, 0.0..1.05)
            .map_err(err)?;
        acc_chart
            .configure_mesh()
            .x_desc("known pairs n")
            .y_desc("rows decrypted (cos >= 0.99)")
            .draw()
            .map_err(err)?;
        for (i, row) in rows.iter().enumerate() {
            let colour = colours[i % colours.len()];
            let label = format!("{} layer {}", row.adversary, row.layer);
            let errs: Vec<(f64, f64)> = row.points.iter().map(|p| (p.pairs as f64, p.key_error.max(1e-8))).collect();
            err_chart
                .draw_series(LineSeries::new(errs, colour.stroke_width(2)).point_size(3))
                .map_err(err)?
                .label(label.clone())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 14, y)], colour.stroke_width(2)));
            let accs: Vec<(f64, f64)> = row.points.iter().map(|p| (p.pairs as f64, p.decrypt_accuracy)).collect();
            acc_chart.draw_series(LineSeries::new(accs, colour.stroke_width(2)).point_size(3)).map_err(err)?;
        }
        let mark = |y0: f64, y1: f64| PathElement::new([(d, y0), (d, y1)], BLACK.stroke_width(1));
        err_chart
            .draw_series([mark(1e-8, 10.0)])
            .map_err(err)?
            .label(format!("n = d = {d}"))
            .legend(|(x, y)| PathElement::new([(x, y), (x + 14, y)], BLACK));
        acc_chart.draw_series([mark(0.0, 1.05)]).map_err(err)?;
        err_chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
        Ok(())
    })
}

/// Recall bars: matched key, wrong key, no context (rates with their counts).
pub fn recall(dir: &Path, caption: &str, bars: &[(String, usize, usize)]) -> PlotResult<Vec<PathBuf>> {
    save(dir, "recall", |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(caption, ("sans-serif", 18))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(60)
            .build_cartesian_2d((0..bars.len().saturating_sub(1)).into_segmented(), 0.0..1.1)
            .map_err(err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_label_formatter(&|x| match x {
                SegmentValue::CenterOf(i) => bars.get(*i).map(|b| b.0.clone()).unwrap_or_default(),
                _ => String::new(),
            })
            .y_desc("secret recalled")
            .draw()
            .map_err(err)?;
        let colours = [GREEN, RED, BLACK];
        chart
            .draw_series(bars.iter().enumerate().map(|(i, (_, hits, n))| {
                let rate = *hits as f64 / (*n).max(1) as f64;
                let mut bar = Rectangle::new(
                    [(SegmentValue::Exact(i), 0.0), (SegmentValue::Exact(i + 1), rate)],
                    colours[i % colours.len()].mix(0.6).filled(),
                );
                bar.set_margin(0, 0, 30, 30);
                bar
            }))
            .map_err(err)?;
        chart
            .draw_series(bars.iter().enumerate().map(|(i, (_, hits, n))| {
                let rate = *hits as f64 / (*n).max(1) as f64;
                Text::new(format!("{hits} / {n}"), (SegmentValue::CenterOf(i), rate + 0.04), ("sans-serif", 16))
            }))
            .map_err(err)?;
        Ok(())
    })
}
