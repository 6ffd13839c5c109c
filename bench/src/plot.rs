//! An SVG of completion latency against percentile, one line per backend.
//! The x axis counts nines (-log10(1 - p)), the y axis is logarithmic.

/// `series`: (label, [(percentile, latency ns)]).
pub fn latency_svg(title: &str, series: &[(String, Vec<(f64, f64)>)]) -> String {
    const W: f64 = 720.0;
    const H: f64 = 420.0;
    const M: f64 = 60.0;
    const COLORS: [&str; 6] = [
        "#1b6ac9", "#d1495b", "#2e933c", "#8d5cc4", "#e08e0b", "#555555",
    ];
    let nines = |p: f64| -(1.0 - (p / 100.0).min(0.99999)).log10();
    let pts = series
        .iter()
        .flat_map(|(_, s)| s.iter())
        .filter(|(_, ns)| *ns > 0.0);
    let (lo, hi) = pts.fold((f64::MAX, 1.0f64), |(lo, hi), (_, ns)| {
        (lo.min(*ns), hi.max(*ns))
    });
    let ylo = lo.max(1.0).log10().floor();
    let yhi = hi.log10().ceil().max(ylo + 1.0);
    let xmax = 5.0;
    let x = |p: f64| M + nines(p) / xmax * (W - 2.0 * M);
    let y = |ns: f64| H - M - (ns.max(1.0).log10() - ylo) / (yhi - ylo) * (H - 2.0 * M);
    let mut s = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{W}' height='{H}' font-family='sans-serif' font-size='12'>\n\
         <rect width='100%' height='100%' fill='white'/>\n<text x='{M}' y='24' font-size='15'>{title}: completion latency by percentile</text>\n"
    );
    for d in (ylo as i32)..=(yhi as i32) {
        let ns = 10f64.powi(d);
        let label = if ns >= 1e6 {
            format!("{} ms", ns / 1e6)
        } else if ns >= 1e3 {
            format!("{} µs", ns / 1e3)
        } else {
            format!("{ns} ns")
        };
        let (yy, x2) = (y(ns), W - M);
        s += &format!("<line x1='{M}' x2='{x2}' y1='{yy}' y2='{yy}' stroke='#ddd'/><text x='4' y='{yy}'>{label}</text>\n");
    }
    for (p, label) in [
        (50.0, "p50"),
        (90.0, "p90"),
        (99.0, "p99"),
        (99.9, "p99.9"),
        (99.99, "p99.99"),
    ] {
        s += &format!(
            "<line x1='{0}' x2='{0}' y1='{M}' y2='{1}' stroke='#eee'/><text x='{0}' y='{2}' text-anchor='middle'>{label}</text>\n",
            x(p),
            H - M,
            H - M + 18.0
        );
    }
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let path: Vec<String> = pts
            .iter()
            .map(|(p, ns)| format!("{:.1},{:.1}", x(*p), y(*ns)))
            .collect();
        s += &format!(
            "<polyline fill='none' stroke='{c}' stroke-width='2' points='{}'/>\n",
            path.join(" ")
        );
        s += &format!(
            "<text x='{}' y='{}' fill='{c}'>{name}</text>\n",
            W - M - 150.0,
            M + 16.0 * i as f64
        );
    }
    s + "</svg>\n"
}
