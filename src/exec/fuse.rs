//! Block fusion: runs of consecutive prepared steps that one kernel computes together, without
//! writing the values between them. Today: the inverted residual block (pointwise expand →
//! depthwise → pointwise project, or depthwise → project), on small maps channels-last
//! ([`crate::kernels::channels_last`]) and on maps whose expanded value is too big for the L2
//! cache in bands of rows ([`crate::kernels::bottleneck`]).
//!
//! The steps keep their own preparations: a frame that taps a value inside a block runs the
//! block step by step, and the plan gives those values their arena regions as usual.

use std::collections::HashSet;

use super::native::{ConvEngine, Prepared};
use super::{Ref, Step};
use crate::kernels::bottleneck::{Bottleneck, DepthwiseStage, Pointwise};
use crate::kernels::channels_last::{self, ChannelsLast};
use crate::kernels::conv::PackedConv;

/// Whether inverted residual blocks run fused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BlockFusion {
    /// Blocks with an expand stage whose output map has at most
    /// [`channels_last::MAX_POSITIONS`] positions, channels-last (the default: MobileNetV2's
    /// four 7 × 7 blocks measured 0.77–0.91 × their layer-by-layer time, 1 thread; 14 × 14
    /// blocks measured no faster and stay layer by layer).
    #[default]
    Small,
    /// The small blocks, plus blocks whose expanded map is at least `MIN_EXPANDED_BYTES`
    /// (1 MB) and whose rows are at least `MIN_WIDTH` (64) wide, in bands of rows (on the x86
    /// host we measure on, whose 32 MB L3 holds every expanded map, the bands measured no
    /// faster end to end; they are meant for CPUs with small caches, such as Jetson's 2 MB L3).
    Auto,
    /// Every block, whatever its size: small ones channels-last, the others in bands (for
    /// tests and comparisons).
    Always,
    /// Never: every node runs on its own.
    Never,
}

named_choices!(BlockFusion, "block fusion policy", "small, auto, always or never", {
    Small => "small",
    Auto => "auto",
    Always => "always",
    Never => "never",
});

/// Smallest expanded map (bytes) fused under [`BlockFusion::Auto`]: below it the layer-by-layer
/// path keeps the value in L2 anyway and the bands only add overhead.
pub const MIN_EXPANDED_BYTES: usize = 1 << 20;
/// ... and narrowest input rows: a band's products run on a few rows, which fill the
/// micro-kernel's panels well only when the rows are wide (per-node profile of MobileNetV2, 1
/// thread: 28-wide blocks 1.2× slower fused, 56-wide ones even).
pub const MIN_WIDTH: usize = 64;

/// Consecutive steps `head .. head + len` that run as one block.
#[derive(Debug, Clone)]
pub(crate) struct Fused {
    /// Steps in the block (2: depthwise → project, 3: expand → depthwise → project).
    pub len: usize,
    /// The block's input slot.
    pub input: usize,
    /// The project step's residual input slot.
    pub residual: Option<usize>,
    /// The block's output slot (the project step's).
    pub output: usize,
    /// Values produced inside the block, which a fused run never writes.
    pub inner: Vec<usize>,
    /// Runs channels-last ([`ChannelsLast`]; its pointwise stages are packed in the
    /// transposed form), else in bands of rows ([`Bottleneck`]).
    pub channels_last: bool,
}

/// The steps' single computed input and single output, when that is all they have.
fn io(step: &Step) -> Option<(usize, usize)> {
    match (step.inputs.first(), step.outputs.as_slice()) {
        (Some(Ref::Slot(x)), [o]) => Some((*x, *o)),
        _ => None,
    }
}

/// For a 1 × 1, stride-1, unpadded, single-group convolution (either GEMM form): whether it
/// adds a residual.
fn pointwise(p: Option<&Prepared>) -> Option<bool> {
    match p? {
        Prepared::Conv {
            conv: ConvEngine::Gemm(c),
            residual,
            ..
        } if c.is_one_by_one() => Some(*residual),
        _ => None,
    }
}

/// The blocks of a planned graph, by head step. `uses[s]` counts the steps reading slot `s`;
/// `outputs` are the graph's output slots; `dims` the planned shapes; `taken[i]` marks steps
/// that already run another way (channel-blocked), which no block may include.
pub(crate) fn plan(
    policy: BlockFusion,
    steps: &[Step],
    taken: &[bool],
    prepared: &[Option<Prepared>],
    dims: &[Vec<usize>],
    uses: &[usize],
    outputs: &HashSet<usize>,
) -> Vec<Option<Fused>> {
    let mut plan: Vec<Option<Fused>> = vec![None; steps.len()];
    if policy == BlockFusion::Never {
        return plan;
    }
    // A value passed only to the next step of the block.
    let private = |s: usize| uses[s] == 1 && !outputs.contains(&s);
    let mut i = 0;
    while i < steps.len() {
        let expand = pointwise(prepared[i].as_ref()) == Some(false);
        let dw_at = i + usize::from(expand);
        let found = (|| {
            if taken.get(i..dw_at + 2)?.iter().any(|&t| t) {
                return None;
            }
            let (x, first) = io(&steps[i])?;
            let (dw_in, dw_out) = io(steps.get(dw_at)?)?;
            let dw = depthwise_stage(&prepared[dw_at])?;
            if expand && (dw_in != first || !private(first)) {
                return None;
            }
            let (p_in, out) = io(steps.get(dw_at + 1)?)?;
            let residual = pointwise(prepared[dw_at + 1].as_ref())?;
            if p_in != dw_out || !private(dw_out) {
                return None;
            }
            let residual = if residual {
                match steps[dw_at + 1].inputs.last() {
                    Some(Ref::Slot(r)) => Some(*r),
                    _ => return None,
                }
            } else {
                None
            };
            // Shapes known and consistent with what the block computes.
            let (&[1, cin, h, w], &[1, cout, oh, ow]) = (dims[x].as_slice(), dims[out].as_slice())
            else {
                return None;
            };
            fn conv(p: &Option<Prepared>) -> Option<&PackedConv> {
                match p {
                    Some(Prepared::Conv {
                        conv: ConvEngine::Gemm(c),
                        ..
                    }) => Some(c),
                    _ => None,
                }
            }
            let project = conv(&prepared[dw_at + 1])?;
            let expand_conv = if expand {
                Some(conv(&prepared[i])?)
            } else {
                None
            };
            let mid = dw.channels();
            let consistent = dw.shape(h, w).out_hw() == Some((oh, ow))
                && project.cin() == mid
                && project.cout() == cout
                && expand_conv.map_or(cin == mid, |e| e.cin() == cin && e.cout() == mid)
                && residual.is_none_or(|r| dims[r] == dims[out]);
            let big = mid * h * w * 4 >= MIN_EXPANDED_BYTES && w >= MIN_WIDTH;
            let small = expand && oh * ow <= channels_last::MAX_POSITIONS;
            // Bands need both pointwise stages in the direct form.
            let banded = match policy {
                BlockFusion::Always => !small,
                BlockFusion::Auto => big && !small,
                _ => false,
            } && block(&prepared[i..dw_at + 2]).is_some();
            (consistent && (small || banded)).then(|| Fused {
                channels_last: small,
                len: dw_at + 2 - i,
                input: x,
                residual,
                output: out,
                inner: if expand {
                    vec![first, dw_out]
                } else {
                    vec![dw_out]
                },
            })
        })();
        match found {
            Some(f) => {
                let len = f.len;
                plan[i] = Some(f);
                i += len;
            }
            None => i += 1,
        }
    }
    plan
}

/// A pointwise convolution step as a block stage, if its packing is the one `form` wants
/// (direct for bottleneck bands, transposed for channels-last blocks).
fn stage(p: &Option<Prepared>, form: impl Fn(&PackedConv) -> bool) -> Option<Pointwise<'_>> {
    match p {
        Some(Prepared::Conv {
            conv: ConvEngine::Gemm(c),
            activation,
            ..
        }) if form(c) => Some(Pointwise {
            conv: c,
            activation: *activation,
        }),
        _ => None,
    }
}

/// The depthwise step `p` as a block stage (one that adds no residual of its own).
fn depthwise_stage(p: &Option<Prepared>) -> Option<DepthwiseStage<'_>> {
    match p {
        Some(Prepared::Depthwise {
            weight,
            bias,
            kernel,
            stride,
            dilation,
            pads,
            activation,
            residual: false,
            ..
        }) => Some(DepthwiseStage {
            weight,
            bias: bias.as_deref(),
            kernel: *kernel,
            stride: *stride,
            dilation: *dilation,
            pads: *pads,
            activation: *activation,
        }),
        _ => None,
    }
}

/// The channels-last block that the prepared steps `p` (expand, depthwise, project) make, once
/// [`make_transposed`] has repacked its pointwise stages.
pub(crate) fn channels_last_block(p: &[Option<Prepared>]) -> Option<ChannelsLast<'_>> {
    let transposed = |c: &PackedConv| c.transposed().is_some();
    let [expand, depthwise, project] = p else {
        return None;
    };
    let Some(Prepared::Depthwise { by_tap, .. }) = depthwise else {
        return None;
    };
    Some(ChannelsLast {
        expand: stage(expand, transposed)?,
        depthwise: depthwise_stage(depthwise)?,
        by_tap,
        project: stage(project, transposed)?,
    })
}

/// Repacks the pointwise stages of every channels-last block in `plan` in the transposed form
/// (their steps, run one by one when a frame taps a value inside the block, then take the
/// transposed GEMM form too), and lays its depthwise weights out by tap.
pub(crate) fn make_transposed(plan: &[Option<Fused>], prepared: &mut [Option<Prepared>]) {
    for (head, f) in plan.iter().enumerate() {
        let Some(f) = f.as_ref().filter(|f| f.channels_last) else {
            continue;
        };
        for i in [head, head + f.len - 1] {
            if let Some(Prepared::Conv {
                conv: ConvEngine::Gemm(c),
                ..
            }) = prepared.get_mut(i).and_then(Option::as_mut)
            {
                c.make_transposed();
            }
        }
        if let Some(Prepared::Depthwise {
            weight,
            kernel,
            by_tap,
            ..
        }) = prepared.get_mut(head + 1).and_then(Option::as_mut)
        {
            *by_tap = channels_last::weights_by_tap(weight, kernel.0 * kernel.1);
        }
    }
}

/// The block that the prepared steps `p` (2 or 3 of them) make.
pub(crate) fn block(p: &[Option<Prepared>]) -> Option<Bottleneck<'_>> {
    let (expand, rest) = match p {
        [e, rest @ ..] if p.len() == 3 => (Some(stage(e, PackedConv::is_pointwise)?), rest),
        _ => (None, p),
    };
    let [depthwise, project] = rest else {
        return None;
    };
    Some(Bottleneck {
        expand,
        depthwise: depthwise_stage(depthwise)?,
        project: stage(project, PackedConv::is_pointwise)?,
    })
}
