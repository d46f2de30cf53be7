//! The CPU kernels one at a time, on the layer shapes of the four models `compare_ort.py`
//! pairs against ONNX Runtime, on one thread of our pool: Winograd against direct and
//! transposed convolution, stride-2 and 7 × 7 stems, depthwise, max pooling.
//! `cargo bench --bench kernels [-- FILTER]`; `EDGEINFER_PROFILE=nodes edgeinfer run …` gives
//! the same layers inside a whole frame (where caches are colder).

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use edgeinfer::graph::Activation;
use edgeinfer::kernels::bottleneck::{DepthwiseStage, Pointwise};
use edgeinfer::kernels::channels_last::{weights_by_tap, ChannelsLast};
use edgeinfer::kernels::conv::{ConvPacking, PackedConv};
use edgeinfer::kernels::depthwise::{depthwise_conv2d, DepthwiseShape};
use edgeinfer::kernels::par::SpinPool;
use edgeinfer::kernels::pool::max_pool2d;
use edgeinfer::kernels::winograd::WinogradConv;

/// Deterministic values in [-0.5, 0.5).
fn values(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (s >> 8) as f32 / 16_777_216.0 - 0.5
        })
        .collect()
}

fn pool() -> Arc<SpinPool> {
    Arc::new(SpinPool::new(1).expect("a one-thread pool"))
}

/// 3 × 3 stride-1 convolutions (pad 1) as direct GEMM, transposed GEMM, F(2×2) and F(4×4):
/// the choice `--winograd auto` times at load.
fn conv3x3(c: &mut Criterion) {
    let pool = pool();
    let mut group = c.benchmark_group("conv3x3_s1");
    for &(cin, cout, hw) in &[
        (32usize, 32usize, 56usize),
        (64, 64, 56),
        (32, 32, 28),
        (128, 128, 28),
        (256, 256, 14),
        (200, 160, 7),
        (512, 512, 7),
    ] {
        let (w, b, x) = (
            values(cout * cin * 9, 1),
            values(cout, 2),
            values(cin * hw * hw, 3),
        );
        let mut out = vec![0f32; cout * hw * hw];
        let shape = format!("{cin}x{cout}@{hw}");
        for (name, packing) in [
            ("direct", ConvPacking::Direct),
            ("transposed", ConvPacking::Transposed),
        ] {
            let conv = PackedConv::new(
                &w,
                &[cout, cin, 3, 3],
                Some(&b),
                &[1, 1],
                &[1; 4],
                &[1, 1],
                1,
                packing,
            )
            .expect("a valid convolution");
            group.bench_function(BenchmarkId::new(name, &shape), |bench| {
                pool.install(|| {
                    bench.iter(|| {
                        conv.run(&x, (1, cin, hw, hw), None, Some(Activation::Relu), &mut out)
                            .expect("sizes fit")
                    })
                })
            });
        }
        for tile in [2, 4] {
            let conv = WinogradConv::with_tile(&w, cout, cin, Some(&b), &[1; 4], tile)
                .expect("a valid convolution");
            group.bench_function(
                BenchmarkId::new(format!("winograd-f{tile}"), &shape),
                |bench| {
                    pool.install(|| {
                        bench.iter(|| {
                            assert!(conv.run(
                                &x,
                                (1, hw, hw),
                                None,
                                Some(Activation::Relu),
                                &mut out
                            ))
                        })
                    })
                },
            );
        }
    }
    group.finish();
}

/// Strided and pointwise convolutions in the form `ConvPacking::Auto` picks for them.
fn conv_other(c: &mut Criterion) {
    let pool = pool();
    let mut group = c.benchmark_group("conv_auto");
    // (cin, cout, input side, kernel, stride)
    for &(cin, cout, hw, k, stride) in &[
        (3usize, 64usize, 224usize, 7usize, 2usize),
        (3, 32, 224, 7, 2),
        (3, 32, 224, 3, 2),
        (64, 128, 56, 3, 2),
        (128, 128, 56, 3, 2),
        (256, 256, 28, 3, 2),
        (256, 512, 56, 1, 2),
        (960, 160, 7, 1, 1),
        (160, 960, 7, 1, 1),
    ] {
        let (w, b, x) = (
            values(cout * cin * k * k, 4),
            values(cout, 5),
            values(cin * hw * hw, 6),
        );
        let p = k / 2;
        let conv = PackedConv::new(
            &w,
            &[cout, cin, k, k],
            Some(&b),
            &[stride, stride],
            &[p; 4],
            &[1, 1],
            1,
            ConvPacking::Auto(Some((hw, hw))),
        )
        .expect("a valid convolution");
        let (oh, ow) = conv.out_hw(hw, hw).expect("the kernel fits");
        let mut out = vec![0f32; cout * oh * ow];
        let id = format!("{cin}x{cout}@{hw}_k{k}s{stride}");
        group.bench_function(id, |bench| {
            pool.install(|| {
                bench.iter(|| {
                    conv.run(&x, (1, cin, hw, hw), None, Some(Activation::Relu), &mut out)
                        .expect("sizes fit")
                })
            })
        });
    }
    group.finish();
}

/// A 3 × 3, pad-1 window over `c` square planes of side `hw`.
fn shape(c: usize, hw: usize, stride: usize) -> DepthwiseShape {
    DepthwiseShape {
        n: 1,
        c,
        h: hw,
        w: hw,
        kh: 3,
        kw: 3,
        stride: (stride, stride),
        dilation: (1, 1),
        pad_begin: (1, 1),
        pad_end: (1, 1),
    }
}

/// MobileNetV2's depthwise shapes (3 × 3, pad 1, ReLU6) and ResNet's 3 × 3 stride-2 max pool.
fn depthwise_and_pool(c: &mut Criterion) {
    let pool = pool();
    let mut group = c.benchmark_group("depthwise_pool");
    for &(ch, hw, stride) in &[
        (32usize, 112usize, 1usize),
        (96, 112, 2),
        (144, 56, 1),
        (384, 14, 1),
        (576, 14, 2),
        (960, 7, 1),
    ] {
        let s = shape(ch, hw, stride);
        let (oh, ow) = s.out_hw().expect("the kernel fits");
        let (x, w, b) = (values(ch * hw * hw, 7), values(ch * 9, 8), values(ch, 9));
        let mut y = vec![0f32; ch * oh * ow];
        let relu6 = Some(Activation::Clip {
            min: Some(0.0),
            max: Some(6.0),
        });
        group.bench_function(format!("dw_{ch}@{hw}s{stride}"), |bench| {
            pool.install(|| {
                bench.iter(|| assert!(depthwise_conv2d(&s, &x, &w, Some(&b), None, relu6, &mut y)))
            })
        });
    }
    for ch in [32usize, 64] {
        let s = shape(ch, 112, 2);
        let (oh, ow) = s.out_hw().expect("the window fits");
        let x = values(ch * 112 * 112, 10);
        let mut y = vec![0f32; ch * oh * ow];
        group.bench_function(format!("maxpool_{ch}@112s2"), |bench| {
            pool.install(|| bench.iter(|| assert!(max_pool2d(&s, &x, &mut y))))
        });
    }
    group.finish();
}

/// MobileNetV2's blocks that end on 7 × 7 maps, channels-last (the default fusion) against the
/// same three layers run one by one by the NCHW kernels.
fn channels_last_blocks(c: &mut Criterion) {
    let pool = pool();
    let mut group = c.benchmark_group("block");
    let relu6 = Some(Activation::Clip {
        min: Some(0.0),
        max: Some(6.0),
    });
    // (cin, mid, cout, input side, depthwise stride)
    for &(cin, mid, cout, hw, stride) in &[
        (96usize, 576usize, 160usize, 14usize, 2usize),
        (160, 960, 160, 7, 1),
    ] {
        let pointwise = |ci: usize, co: usize, seed: u32| {
            PackedConv::new(
                &values(co * ci, seed),
                &[co, ci, 1, 1],
                Some(&values(co, seed + 1)),
                &[1, 1],
                &[0; 4],
                &[1, 1],
                1,
                ConvPacking::Direct,
            )
            .expect("a valid pointwise convolution")
        };
        let (expand, project) = (pointwise(cin, mid, 11), pointwise(mid, cout, 13));
        let (mut expand_t, mut project_t) = (pointwise(cin, mid, 11), pointwise(mid, cout, 13));
        expand_t.make_transposed();
        project_t.make_transposed();
        let (dw_w, dw_b, x) = (
            values(mid * 9, 15),
            values(mid, 16),
            values(cin * hw * hw, 17),
        );
        let by_tap = weights_by_tap(&dw_w, 9);
        let block = ChannelsLast {
            expand: Pointwise {
                conv: &expand_t,
                activation: relu6,
            },
            by_tap: &by_tap,
            depthwise: DepthwiseStage {
                weight: &dw_w,
                bias: Some(&dw_b),
                kernel: (3, 3),
                stride: (stride, stride),
                dilation: (1, 1),
                pads: [1; 4],
                activation: relu6,
            },
            project: Pointwise {
                conv: &project_t,
                activation: None,
            },
        };
        let s = shape(mid, hw, stride);
        let (oh, ow) = s.out_hw().expect("the kernel fits");
        let (mut e, mut d) = (vec![0f32; mid * hw * hw], vec![0f32; mid * oh * ow]);
        let (mut y1, mut y2) = (vec![0f32; cout * oh * ow], vec![0f32; cout * oh * ow]);
        let name = format!("{cin}-{mid}-{cout}@{hw}s{stride}");
        group.bench_function(BenchmarkId::new("layers", &name), |bench| {
            pool.install(|| {
                bench.iter(|| {
                    expand
                        .run(&x, (1, cin, hw, hw), None, relu6, &mut e)
                        .expect("sizes fit");
                    assert!(depthwise_conv2d(
                        &s,
                        &e,
                        &dw_w,
                        Some(&dw_b),
                        None,
                        relu6,
                        &mut d
                    ));
                    project
                        .run(&d, (1, mid, oh, ow), None, None, &mut y1)
                        .expect("sizes fit");
                })
            })
        });
        group.bench_function(BenchmarkId::new("channels-last", &name), |bench| {
            pool.install(|| {
                bench.iter(|| {
                    block
                        .run(&x, (cin, hw, hw), None, &mut y2)
                        .expect("sizes fit")
                })
            })
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    conv3x3,
    conv_other,
    depthwise_and_pool,
    channels_last_blocks
);
criterion_main!(benches);
