//! Temporary probe (not committed). conv_probe CIN COUT HW K STRIDE RES
use edgeinfer::kernels::conv::*;
use std::time::Instant;
fn main() {
    let a: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse().unwrap())
        .collect();
    let (cin, cout, hw, kk, s, res) = (a[0], a[1], a[2], a[3], a[4], a[5] == 1);
    let w: Vec<f32> = (0..cout * cin * kk * kk)
        .map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5)
        .collect();
    let x: Vec<f32> = (0..cin * hw * hw)
        .map(|i| ((i * 104729) % 89) as f32 / 89.0 - 0.5)
        .collect();
    let bias: Vec<f32> = (0..cout).map(|i| i as f32 * 0.01).collect();
    let th: usize = std::env::var("T")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let pool = std::sync::Arc::new(edgeinfer::kernels::par::SpinPool::new(th).unwrap());
    let p = kk / 2;
    let mut line = format!("{cin}->{cout} {hw}x{hw} k{kk} s{s} res {res} T{th}:");
    let mut base = None;
    for (name, packing) in [
        ("direct", ConvPacking::Direct),
        ("trans", ConvPacking::Transposed),
        ("auto", ConvPacking::Auto(Some((hw, hw)))),
    ] {
        let pc = PackedConv::new(
            &w,
            &[cout, cin, kk, kk],
            Some(&bias),
            &[s, s],
            &[p, p, p, p],
            &[1, 1],
            1,
            packing,
        )
        .unwrap();
        let (oh, ow) = pc.out_hw(hw, hw).unwrap();
        let r: Vec<f32> = vec![0.1; cout * oh * ow];
        let mut out = vec![0f32; cout * oh * ow];
        let mut ts = vec![];
        let cold = std::env::var("COLD").is_ok();
        let mut junk = vec![0u8; if cold { 96 << 20 } else { 0 }];
        pool.install(|| {
            for it in 0..60 {
                let reps = if cold { 1 } else { 10 };
                if cold {
                    for (i, b) in junk.iter_mut().enumerate().step_by(64) {
                        *b = b.wrapping_add(i as u8 ^ it as u8);
                    }
                    let s: f32 = x.iter().chain(r.iter()).chain(out.iter()).sum();
                    std::hint::black_box(s);
                }
                let t0 = Instant::now();
                for _ in 0..reps {
                    pc.run(
                        &x,
                        (1, cin, hw, hw),
                        res.then_some(&r[..]),
                        Some(edgeinfer::graph::Activation::Relu),
                        &mut out,
                    )
                    .unwrap();
                }
                ts.push(t0.elapsed().as_secs_f64() / reps as f64);
            }
        });
        ts.sort_by(f64::total_cmp);
        let t = ts[ts.len() / 2] * 1e6;
        let b = *base.get_or_insert(t);
        line += &format!("  {name} {t:.1}us ({:.3})", t / b);
        let _ = (oh, ow);
    }
    println!("{line}");
}
