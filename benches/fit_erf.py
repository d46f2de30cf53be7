#!/usr/bin/env python3
"""Fits the rational erf that `src/kernels/act.rs::erf_fast` uses: erf(x) ≈ x·P(x²)/Q(x²),
P of degree 6, Q of degree 4 (Q(0) = 1), by iteratively reweighted linear least squares on
[0, 3.92] (weights push the absolute error of x·P/Q towards equal ripple), then checks the f32
evaluation (FMA Horner steps, |x| clamped to CLAMP) against math.erf on a 1e-3 grid over
[-4, 4].

    python3 benches/fit_erf.py      # numpy only; prints the coefficients and the max error
"""
from math import erf

import numpy as np

FIT_TO = 3.92
CLAMP = 3.85
DP, DQ = 6, 4


def fit(iters: int = 60):
    xs = np.concatenate([
        np.cos(np.linspace(0, np.pi, 4000)) * 0.5 * FIT_TO + 0.5 * FIT_TO,
        np.linspace(1e-4, FIT_TO, 4000),
    ])
    f = np.array([erf(x) / x if x > 0 else 2 / np.sqrt(np.pi) for x in xs])
    u = xs ** 2
    w = np.ones_like(u)
    for it in range(iters):
        # P(u) - f·(Q(u) - 1) = f, linear in the coefficients.
        a = np.hstack([u[:, None] ** np.arange(DP + 1),
                       -f[:, None] * u[:, None] ** np.arange(1, DQ + 1)])
        sol, *_ = np.linalg.lstsq(a * w[:, None], f * w, rcond=None)
        p, q = sol[:DP + 1], np.concatenate([[1.0], sol[DP + 1:]])
        qv = np.polyval(q[::-1], u)
        err = xs * (np.polyval(p[::-1], u) / qv - f)
        # x/Q turns the linearised residual into erf's absolute error; after a few rounds,
        # weight by the current error (Lawson) towards the minimax fit.
        w = xs / np.abs(qv)
        if it > 5:
            w = w * (np.abs(err) / np.abs(err).max() + 0.05) ** 0.5
    return np.float32(p), np.float32(q)


def eval_f32(p, q, x):
    """As the Rust code: clamp, then FMA Horner steps (exact product and sum, one rounding)."""
    x = np.where(x > CLAMP, np.float32(CLAMP), np.where(x < -CLAMP, np.float32(-CLAMP), x))
    x = x.astype(np.float32)
    u = (x.astype(np.float64) ** 2).astype(np.float32)

    def horner(c):
        acc = np.full_like(u, c[-1])
        for k in c[-2::-1]:
            acc = (acc.astype(np.float64) * u + np.float64(k)).astype(np.float32)
        return acc

    num = (x.astype(np.float64) * horner(p)).astype(np.float32)
    return (num.astype(np.float64) / horner(q)).astype(np.float32)


def main():
    p, q = fit()
    xt = (np.arange(-4000, 4001) / 1000).astype(np.float32)
    ref = np.array([erf(float(x)) for x in xt])
    print("P (u^0 first):", [repr(float(c)) for c in p])
    print("Q (u^0 first):", [repr(float(c)) for c in q])
    print(f"max |erf_fast - erf| on [-4, 4]: {np.abs(eval_f32(p, q, xt) - ref).max():.3e}")


if __name__ == "__main__":
    main()
