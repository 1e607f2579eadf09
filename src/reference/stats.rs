//! Error measures used by tests, the demo and the CLI.

/// How far a result is from its reference.
#[derive(Clone, Copy, Debug)]
pub struct ErrorStats {
    /// ‖got − want‖₂ / max(‖want‖₂, FLOOR·√n): relative L2 error, measured against an RMS of
    /// at least FLOOR so that a near-zero reference (a one-key LSE, say) is not ill-conditioned.
    pub rel_l2: f64,
    /// max |got − want|.
    pub max_abs: f64,
    /// Number of NaN or infinite values in `got`.
    pub non_finite: usize,
}

impl ErrorStats {
    /// True when every value is finite and the relative L2 error is within `tol`.
    pub fn within(&self, tol: f64) -> bool {
        self.non_finite == 0 && self.rel_l2 <= tol
    }
}

/// Smallest RMS the relative error is measured against (see [`ErrorStats::rel_l2`]). Test
/// inputs are N(0, 1), whose attention outputs and gradients have RMS from ~0.05 to ~1; an
/// exactly-zero reference (dQ with a single key) or a near-zero one (a one-key LSE) would
/// otherwise be judged against float rounding noise.
pub const FLOOR: f64 = 5e-2;

/// Compare `got` with `want` (lengths must match; a length mismatch counts as non-finite).
pub fn compare(got: &[f32], want: &[f32]) -> ErrorStats {
    if got.len() != want.len() {
        return ErrorStats {
            rel_l2: f64::INFINITY,
            max_abs: f64::INFINITY,
            non_finite: got.len().max(want.len()),
        };
    }
    let (mut num, mut den, mut max_abs, mut bad) = (0f64, 0f64, 0f64, 0usize);
    for (&g, &w) in got.iter().zip(want) {
        if !g.is_finite() {
            bad += 1;
            continue;
        }
        let e = g as f64 - w as f64;
        num += e * e;
        den += w as f64 * w as f64;
        max_abs = max_abs.max(e.abs());
    }
    let floor = FLOOR * FLOOR * got.len().max(1) as f64;
    let rel_l2 = (num / den.max(floor)).sqrt();
    ErrorStats {
        rel_l2,
        max_abs,
        non_finite: bad,
    }
}
