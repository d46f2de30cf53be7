//! Block fusion: runs of consecutive prepared steps that one kernel computes together, without
//! writing the values between them. Today: the inverted residual block (pointwise expand →
//! depthwise → pointwise project, or depthwise → project) on maps whose expanded value is too
//! big for the L2 cache ([`crate::kernels::bottleneck`]).
//!
//! The steps keep their own preparations: a frame that taps a value inside a block runs the
//! block step by step, and the plan gives those values their arena regions as usual.

use std::collections::HashSet;

use super::native::{ConvEngine, Prepared};
use super::{Ref, Step};
use crate::kernels::bottleneck::{Bottleneck, DepthwiseStage, Pointwise};

/// Whether inverted residual blocks run fused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BlockFusion {
    /// Blocks whose expanded map is at least `MIN_EXPANDED_BYTES` (1 MB) and whose rows are
    /// at least `MIN_WIDTH` (64) wide.
    Auto,
    /// Every block, whatever its size (for tests and comparisons).
    Always,
    /// Never: every node runs on its own (the default: on the x86 host we measure on, whose
    /// 32 MB L3 holds every expanded map, fusing measured no faster end to end, 1 or 2
    /// threads; it is meant for CPUs with small caches, such as Jetson's 2 MB L3).
    #[default]
    Never,
}

named_choices!(BlockFusion, "block fusion policy", "auto, always or never", {
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
}

/// The steps' single computed input and single output, when that is all they have.
fn io(step: &Step) -> Option<(usize, usize)> {
    match (step.inputs.first(), step.outputs.as_slice()) {
        (Some(Ref::Slot(x)), [o]) => Some((*x, *o)),
        _ => None,
    }
}

fn pointwise(p: Option<&Prepared>) -> Option<bool> {
    match p? {
        Prepared::Conv {
            conv: ConvEngine::Gemm(c),
            residual,
            ..
        } if c.is_pointwise() => Some(*residual),
        _ => None,
    }
}

/// The blocks of a planned graph, by head step. `uses[s]` counts the steps reading slot `s`;
/// `outputs` are the graph's output slots; `dims` the planned shapes.
pub(crate) fn plan(
    policy: BlockFusion,
    steps: &[Step],
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
            let (x, first) = io(&steps[i])?;
            let (dw_in, dw_out) = io(steps.get(dw_at)?)?;
            let Some(Prepared::Depthwise {
                residual: false, ..
            }) = prepared[dw_at]
            else {
                return None;
            };
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
            let block = block(&prepared[i..dw_at + 2])?;
            // Shapes known and consistent with what the block computes.
            let (&[1, cin, h, w], &[1, cout, oh, ow]) = (dims[x].as_slice(), dims[out].as_slice())
            else {
                return None;
            };
            let mid = block.depthwise.weight.len()
                / (block.depthwise.kernel.0 * block.depthwise.kernel.1).max(1);
            let consistent = block.out_hw(h, w) == Some((oh, ow))
                && block.project.conv.cout() == cout
                && block.expand.map_or(cin == mid, |e| e.conv.cin() == cin)
                && residual.is_none_or(|r| dims[r] == dims[out]);
            let big = mid * h * w * 4 >= MIN_EXPANDED_BYTES && w >= MIN_WIDTH;
            (consistent && (big || policy == BlockFusion::Always)).then(|| Fused {
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

/// A pointwise convolution step as a block stage.
fn stage(p: &Option<Prepared>) -> Option<Pointwise<'_>> {
    match p {
        Some(Prepared::Conv {
            conv: ConvEngine::Gemm(c),
            activation,
            ..
        }) if c.is_pointwise() => Some(Pointwise {
            conv: c,
            activation: *activation,
        }),
        _ => None,
    }
}

/// The block that the prepared steps `p` (2 or 3 of them) make.
pub(crate) fn block(p: &[Option<Prepared>]) -> Option<Bottleneck<'_>> {
    let (expand, rest) = match p {
        [e, rest @ ..] if p.len() == 3 => (Some(stage(e)?), rest),
        _ => (None, p),
    };
    let [Some(Prepared::Depthwise {
        weight,
        bias,
        kernel,
        stride,
        dilation,
        pads,
        activation,
        residual: false,
    }), project] = rest
    else {
        return None;
    };
    Some(Bottleneck {
        expand,
        depthwise: DepthwiseStage {
            weight,
            bias: bias.as_deref(),
            kernel: *kernel,
            stride: *stride,
            dilation: *dilation,
            pads: *pads,
            activation: *activation,
        },
        project: stage(project)?,
    })
}
