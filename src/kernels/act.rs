//! Activations applied in place to a run of f32 values, for fused epilogues.

use crate::graph::Activation;

/// Applies `act` to every value of `v` (nothing when `None`). Matches the candle reference
/// (`exec::ops::apply_activation`) within f32 rounding; GELU's erf is [`erf_fast`]
/// (absolute error ≤ 2.5e-7). NaN stays NaN, as in the reference.
pub fn apply_activation(act: Option<Activation>, v: &mut [f32]) {
    let Some(act) = act else { return };
    #[cfg(target_arch = "x86_64")]
    match super::gemm::Isa::detect() {
        // SAFETY: detect() saw these features on this CPU.
        super::gemm::Isa::Avx512 => return unsafe { apply_avx512(act, v) },
        super::gemm::Isa::Avx2 => return unsafe { apply_avx2(act, v) },
        super::gemm::Isa::Portable => {}
    }
    apply_body(act, v)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn apply_avx512(act: Activation, v: &mut [f32]) {
    apply_body(act, v)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn apply_avx2(act: Activation, v: &mut [f32]) {
    apply_body(act, v)
}

/// Comparisons and `clamp` rather than `f32::max`/`min`, whose NaN rules block vectorisation.
#[inline(always)]
fn apply_body(act: Activation, v: &mut [f32]) {
    match act {
        Activation::Relu => v
            .iter_mut()
            .for_each(|x| *x = if *x < 0.0 { 0.0 } else { *x }),
        Activation::Clip { min, max } => {
            let (lo, hi) = (
                min.unwrap_or(f32::NEG_INFINITY),
                max.unwrap_or(f32::INFINITY),
            );
            v.iter_mut().for_each(|x| {
                let y = if *x < lo { lo } else { *x };
                *x = if y > hi { hi } else { y };
            });
        }
        Activation::LeakyRelu { alpha } => v
            .iter_mut()
            .for_each(|x| *x = if *x >= 0.0 { *x } else { alpha * *x }),
        Activation::Sigmoid => v.iter_mut().for_each(|x| *x = 1.0 / (1.0 + (-*x).exp())),
        Activation::HardSigmoid { alpha, beta } => v.iter_mut().for_each(|x| {
            let y = alpha * *x + beta;
            *x = y.clamp(0.0, 1.0);
        }),
        Activation::HardSwish => v.iter_mut().for_each(|x| {
            let g = *x / 6.0 + 0.5;
            *x *= g.clamp(0.0, 1.0);
        }),
        Activation::Tanh => v.iter_mut().for_each(|x| *x = x.tanh()),
        Activation::Gelu { tanh: false } => v
            .iter_mut()
            .for_each(|x| *x = 0.5 * *x * (1.0 + erf_fast(*x * std::f32::consts::FRAC_1_SQRT_2))),
        Activation::Gelu { tanh: true } => {
            const C: f32 = 0.797_884_6; // sqrt(2 / pi)
            v.iter_mut()
                .for_each(|x| *x = 0.5 * *x * (1.0 + (C * (*x + 0.044715 * *x * *x * *x)).tanh()))
        }
    }
}

/// erf(x) as x·P(x²)/Q(x²), P of degree 6 and Q of degree 4, with |x| clamped to 3.85 (where
/// erf is 1 to within 1.1e-7): |error| ≤ 2.5e-7 over f32 (FMA evaluation). No exp and one
/// division, so a run of it vectorises to ~16 vector operations per 8 values. The A & S
/// 7.1.26 form it replaced (a division, a polynomial and an exp, ~30 operations) left the GELU
/// in ViT-Tiny's fc1 epilogues 5.0 % of a 1-thread frame; this one 4.0 % (frames with and
/// without the GELU, alternating in one process). Coefficients: our own weighted
/// least-squares fit of erf(x)/x on [0, 3.92] (`benches/fit_erf.py`).
#[inline(always)]
pub fn erf_fast(x: f32) -> f32 {
    // NaN passes through clamp (and the comparisons it is made of vectorise).
    let x = x.clamp(-ERF_CLAMP, ERF_CLAMP);
    let u = x * x;
    // Horner from the top coefficient, as the AVX2 GEMM epilogue's `gelu` does.
    let p = ERF_P[..6]
        .iter()
        .rev()
        .fold(ERF_P[6], |acc, &c| acc.mul_add(u, c));
    let q = ERF_Q[..4]
        .iter()
        .rev()
        .fold(ERF_Q[4], |acc, &c| acc.mul_add(u, c));
    x * p / q
}

/// [`erf_fast`]'s clamp on |x|.
pub(crate) const ERF_CLAMP: f32 = 3.85;
/// [`erf_fast`]'s numerator, coefficients of u⁰ … u⁶ (u = x²).
pub(crate) const ERF_P: [f32; 7] = [
    1.128_378_9,
    2.044_630_3e-1,
    5.117_806_4e-2,
    3.902_479_3e-3,
    1.472_921_6e-4,
    -1.988_797e-6,
    1.998_121_3e-8,
];
/// [`erf_fast`]'s denominator, coefficients of u⁰ … u⁴.
pub(crate) const ERF_Q: [f32; 5] = [
    1.0,
    5.145_3e-1,
    1.168_809_9e-1,
    1.474_763_8e-2,
    1.006_993_8e-3,
];

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference the fast erf is checked against: erf(x) = 1 - erfc(x), erfc from the
    /// Chebyshev fit in Numerical Recipes (`erfcc`, fractional error < 1.2e-7), in f64.
    fn erf(x: f32) -> f32 {
        let z = (x as f64).abs();
        let t = 1.0 / (1.0 + 0.5 * z);
        let poly = -z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87
                                        + t * (-0.822_152_23 + t * 0.170_872_77))))))));
        let erfc = t * poly.exp();
        (if x >= 0.0 { 1.0 - erfc } else { erfc - 1.0 }) as f32
    }

    #[test]
    fn fast_erf_is_within_4e7_of_the_accurate_one() {
        for i in -4000..=4000 {
            let x = i as f32 / 1000.0;
            assert!(
                (erf_fast(x) - erf(x)).abs() < 4e-7,
                "x = {x}: {} vs {}",
                erf_fast(x),
                erf(x)
            );
        }
        assert!(erf_fast(f32::NAN).is_nan());
    }

    #[test]
    fn erf_matches_known_values() {
        // erf values from tables (Abramowitz & Stegun, table 7.1).
        for (x, want) in [
            (0.0f32, 0.0f64),
            (0.1, 0.112_462_916),
            (0.5, 0.520_499_878),
            (1.0, 0.842_700_793),
            (2.0, 0.995_322_265),
            (3.0, 0.999_977_910),
        ] {
            let want = want as f32;
            assert!(
                (erf(x) - want).abs() < 1e-7,
                "erf({x}) = {} want {want}",
                erf(x)
            );
            assert!((erf(-x) + want).abs() < 1e-7);
        }
    }
}
