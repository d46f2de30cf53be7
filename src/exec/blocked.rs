//! Channel-blocked regions: values that live in the arena as NCHWc8
//! ([`crate::kernels::nchwc`]) rather than NCHW, and the steps that read or write them.
//!
//! The plan is made at load, per value: a value is blocked when the step that makes it and
//! every step that reads it have a blocked kernel (pointwise or depthwise convolution, global
//! pooling) and its channels fill whole blocks. A run of such steps (MobileNetV2's inverted
//! residual blocks, one after another) then passes blocked maps from kernel to kernel; a
//! blocked step whose input or output is not blocked reorders it on the way in or out. Graph
//! outputs are never blocked, and a blocked value that leaves the arena (a tap, candle's op
//! standing in) is reordered to NCHW first, so nothing outside sees the layout.

use std::collections::HashSet;

use super::fuse::Fused;
use super::native::{ConvEngine, Prepared};
use super::{Ref, Step};
use crate::graph::Activation;
use crate::kernels::nchwc::{self, Depthwise, Pointwise, LANES};
use crate::kernels::scratch;

/// Where the executor keeps maps channel-blocked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChannelLayout {
    /// Blocked where the host's kernels were measured faster that way: AVX2 hosts without
    /// AVX-512 (MobileNetV2's layers measured against ONNX Runtime's blocked ones, see the
    /// README). Elsewhere as [`ChannelLayout::Planar`].
    #[default]
    Auto,
    /// Blocked wherever the plan allows (for tests and comparisons).
    Blocked,
    /// NCHW everywhere.
    Planar,
}

named_choices!(ChannelLayout, "channel layout", "auto, blocked or planar", {
    Auto => "auto",
    Blocked => "blocked",
    Planar => "planar",
});

impl ChannelLayout {
    /// Whether this policy blocks anything on this host.
    fn active(self) -> bool {
        match self {
            ChannelLayout::Blocked => true,
            ChannelLayout::Planar => false,
            ChannelLayout::Auto => {
                #[cfg(target_arch = "x86_64")]
                {
                    crate::kernels::gemm::Isa::detect() == crate::kernels::gemm::Isa::Avx2
                }
                #[cfg(not(target_arch = "x86_64"))]
                false
            }
        }
    }
}

/// A step's blocked kernel.
pub(crate) enum BlockedStep {
    /// A 1 × 1 convolution; with `residual`, its last input is added before the activation.
    Pointwise {
        kernel: Pointwise,
        activation: Option<Activation>,
        residual: bool,
    },
    /// A depthwise convolution; `residual` as for `Pointwise`.
    Depthwise {
        kernel: Depthwise,
        activation: Option<Activation>,
        residual: bool,
    },
    /// Global average (or maximum) pooling; its `[n, c, 1, 1]` output is the same in both
    /// layouts.
    GlobalPool { max: bool },
    /// A dense convolution in the by-taps form (a stem): reads NCHW, writes blocked
    /// ([`PackedConv::run_blocked`](crate::kernels::conv::PackedConv::run_blocked)), its
    /// weights those of the step's NCHW preparation. `residual` as for `Pointwise`.
    Dense {
        activation: Option<Activation>,
        residual: bool,
    },
}

impl BlockedStep {
    /// For a profile line.
    pub(crate) fn kernel_name(&self) -> &'static str {
        match self {
            BlockedStep::Pointwise { .. } => "pointwise-c8",
            BlockedStep::Depthwise { .. } => "depthwise-c8",
            BlockedStep::GlobalPool { .. } => "global-pool-c8",
            BlockedStep::Dense { .. } => "taps-c8",
        }
    }

    /// Whether the step adds its last input (a residual) before the activation.
    pub(crate) fn residual(&self) -> bool {
        match self {
            BlockedStep::Pointwise { residual, .. }
            | BlockedStep::Depthwise { residual, .. }
            | BlockedStep::Dense { residual, .. } => *residual,
            BlockedStep::GlobalPool { .. } => false,
        }
    }

    /// Whether the step may read a blocked value at input position `i` of `n` inputs.
    fn accepts(&self, i: usize, n: usize) -> bool {
        match self {
            BlockedStep::Pointwise { .. } | BlockedStep::Depthwise { .. } => {
                i == 0 || (self.residual() && i + 1 == n)
            }
            BlockedStep::GlobalPool { .. } => i == 0,
            BlockedStep::Dense { .. } => i > 0 && self.residual() && i + 1 == n,
        }
    }

    /// Whether its output may be blocked.
    fn writes_blocked(&self) -> bool {
        !matches!(self, BlockedStep::GlobalPool { .. })
    }
}

/// The layout plan: per slot, whether it is blocked; per step, its blocked kernel when it
/// touches a blocked value.
pub(crate) struct Plan {
    pub slots: Vec<bool>,
    pub steps: Vec<Option<BlockedStep>>,
}

impl Plan {
    /// Nothing blocked.
    pub(crate) fn none(slots: usize, steps: usize) -> Plan {
        Plan {
            slots: vec![false; slots],
            steps: (0..steps).map(|_| None).collect(),
        }
    }
}

/// `[n, c, h, w]` with `c` a whole number of blocks.
fn blockable(d: &[usize]) -> bool {
    matches!(d, &[_, c, _, _] if c > 0 && c.is_multiple_of(LANES))
}

/// The blocked kernel for a prepared step, when it has one for these shapes.
fn candidate(p: &Prepared, input: &[usize], output: &[usize]) -> Option<BlockedStep> {
    // A dense convolution reads NCHW, so its input may have any channel count.
    let dense = matches!(p, Prepared::Conv { conv: ConvEngine::Gemm(c), .. } if c.writes_blocked());
    if !blockable(input) && (!dense || input.len() != 4) {
        return None;
    }
    match p {
        Prepared::Conv {
            conv: ConvEngine::Gemm(c),
            activation,
            residual,
        } if blockable(output) && !c.writes_blocked() => {
            let (w, stride) = c.one_by_one_matrix()?;
            let kernel = Pointwise::new(&w, c.bias(), c.cout(), c.cin())?.with_stride(stride)?;
            let fits = kernel.cin() == input[1]
                && kernel.cout() == output[1]
                && kernel.out_hw(input[2], input[3]) == (output[2], output[3]);
            fits.then_some(BlockedStep::Pointwise {
                kernel,
                activation: *activation,
                residual: *residual,
            })
        }
        Prepared::Depthwise {
            weight,
            bias,
            kernel,
            stride,
            dilation,
            pads,
            activation,
            residual,
            ..
        } if blockable(output) => {
            let k = Depthwise::new(
                weight,
                bias.as_deref(),
                input[1],
                *kernel,
                *stride,
                *dilation,
                *pads,
            )?;
            (k.out_hw(input[2], input[3]) == Some((output[2], output[3]))).then_some(
                BlockedStep::Depthwise {
                    kernel: k,
                    activation: *activation,
                    residual: *residual,
                },
            )
        }
        Prepared::GlobalPool { max } => Some(BlockedStep::GlobalPool { max: *max }),
        Prepared::Conv {
            conv: ConvEngine::Gemm(c),
            activation,
            residual,
        } if c.writes_blocked() && blockable(output) => Some(BlockedStep::Dense {
            activation: *activation,
            residual: *residual,
        }),
        _ => None,
    }
}

/// Plans the layouts. `fused` steps keep their own kernels (which read NCHW); `in_arena[s]`
/// says whether slot `s` has an arena region of its own (not an alias); `outputs` are the
/// graph's output slots.
pub(crate) fn plan(
    policy: ChannelLayout,
    steps: &[Step],
    prepared: &[Option<Prepared>],
    fused: &[Option<Fused>],
    dims: &[Vec<usize>],
    in_arena: &[bool],
    outputs: &HashSet<usize>,
) -> Plan {
    let mut plan = Plan::none(dims.len(), steps.len());
    if !policy.active() {
        return plan;
    }
    let mut inside = vec![false; steps.len()];
    for (head, f) in fused.iter().enumerate() {
        if let Some(f) = f {
            inside[head..(head + f.len).min(steps.len())].fill(true);
        }
    }
    let slot_of = |r: &Ref| match r {
        Ref::Slot(s) => Some(*s),
        Ref::Weight(_) => None,
    };
    let cands: Vec<Option<BlockedStep>> = steps
        .iter()
        .enumerate()
        .map(|(i, step)| {
            let p = prepared[i].as_ref().filter(|_| !inside[i])?;
            let x = step.inputs.first().and_then(slot_of)?;
            let [o] = step.outputs.as_slice() else {
                return None;
            };
            candidate(p, &dims[x], &dims[*o])
        })
        .collect();
    // A slot may be blocked when its producer writes blocked and every reader accepts it.
    let mut ok = vec![false; dims.len()];
    let mut read = vec![false; dims.len()];
    for (i, step) in steps.iter().enumerate() {
        if let (Some(c), [o]) = (&cands[i], step.outputs.as_slice()) {
            ok[*o] =
                c.writes_blocked() && in_arena[*o] && blockable(&dims[*o]) && !outputs.contains(o);
        }
    }
    for (i, step) in steps.iter().enumerate() {
        let n = step.inputs.len();
        for (pos, r) in step.inputs.iter().enumerate() {
            if let Some(s) = slot_of(r) {
                read[s] = true;
                if !cands[i].as_ref().is_some_and(|c| c.accepts(pos, n)) {
                    ok[s] = false;
                }
            }
        }
    }
    for (s, blocked) in plan.slots.iter_mut().enumerate() {
        *blocked = ok[s] && read[s];
    }
    for (i, (step, c)) in steps.iter().zip(cands).enumerate() {
        let touches = step
            .inputs
            .iter()
            .filter_map(slot_of)
            .chain(step.outputs.iter().copied())
            .any(|s| plan.slots[s]);
        if touches {
            plan.steps[i] = c;
        }
    }
    plan
}

/// A computed input of a blocked step: its elements, shape and whether they are blocked.
pub(crate) struct Input<'a> {
    pub data: &'a [f32],
    pub dims: &'a [usize],
    pub blocked: bool,
}

/// `[n, c, h·w]` of a 4-D shape.
fn ncs(d: &[usize]) -> Option<(usize, usize, usize)> {
    match d {
        &[n, c, h, w] => Some((n, c, h * w)),
        _ => None,
    }
}

/// `x` blocked: itself when it already is, else reordered into a scratch buffer (given back
/// by the caller through [`scratch::give`]).
fn as_blocked<'a>(x: &Input<'a>, held: &'a mut Option<scratch::Scratch>) -> Option<&'a [f32]> {
    if x.blocked {
        return Some(x.data);
    }
    let mut buf = scratch::take(x.data.len());
    if !nchwc::to_blocked(x.data, ncs(x.dims)?, &mut buf) {
        scratch::give(buf);
        return None;
    }
    Some(&held.insert(buf)[..])
}

/// Runs a blocked step on `x` (and `residual`) into `out` (`out_dims`, blocked when
/// `out_blocked`); `prepared` is the step's NCHW preparation (a dense step's weights). False,
/// with nothing written, when the shapes do not fit the kernel.
pub(crate) fn run(
    step: &BlockedStep,
    prepared: Option<&Prepared>,
    x: Input,
    residual: Option<Input>,
    out: &mut [f32],
    out_dims: &[usize],
    out_blocked: bool,
) -> bool {
    let (Some((n, c, hw)), Some(od)) = (ncs(x.dims), ncs(out_dims)) else {
        return false;
    };
    if let BlockedStep::GlobalPool { max } = step {
        let mut held = None;
        let ok = as_blocked(&x, &mut held)
            .is_some_and(|xb| od == (n, c, 1) && nchwc::global_pool(xb, (n, c, hw), *max, out));
        if let Some(b) = held {
            scratch::give(b);
        }
        return ok;
    }
    let (mut hx, mut hr) = (None, None);
    let ok = (|| {
        // A dense step reads its input as it is (NCHW).
        let xb = if matches!(step, BlockedStep::Dense { .. }) {
            (!x.blocked).then_some(x.data)?
        } else {
            as_blocked(&x, &mut hx)?
        };
        let rb = match &residual {
            Some(r) if r.dims == out_dims => Some(as_blocked(r, &mut hr)?),
            Some(_) => return None,
            None => None,
        };
        let mut staged = (!out_blocked).then(|| scratch::take(out.len()));
        let dst: &mut [f32] = match staged.as_mut() {
            Some(b) => b,
            None => &mut *out,
        };
        let ran = match step {
            BlockedStep::Pointwise {
                kernel, activation, ..
            } => {
                let (h, w) = (x.dims[2], x.dims[3]);
                od.0 == n && kernel.run(xb, (n, h, w), rb, *activation, dst)
            }
            BlockedStep::Depthwise {
                kernel, activation, ..
            } => {
                let (h, w) = (x.dims[2], x.dims[3]);
                od.0 == n && kernel.run(xb, (n, h, w), rb, *activation, dst)
            }
            BlockedStep::GlobalPool { .. } => false,
            BlockedStep::Dense { activation, .. } => match prepared {
                Some(Prepared::Conv {
                    conv: ConvEngine::Gemm(conv),
                    ..
                }) => conv
                    .run_blocked(xb, (n, c, x.dims[2], x.dims[3]), rb, *activation, dst)
                    .is_ok(),
                _ => false,
            },
        };
        let ok = ran && staged.as_ref().is_none_or(|b| nchwc::to_planar(b, od, out));
        if let Some(b) = staged {
            scratch::give(b);
        }
        ok.then_some(())
    })()
    .is_some();
    if let Some(b) = hx {
        scratch::give(b);
    }
    if let Some(b) = hr {
        scratch::give(b);
    }
    ok
}

/// Copies blocked `src` (shape `dims`) into `dst` as NCHW.
pub(crate) fn planar_copy(src: &[f32], dims: &[usize], dst: &mut [f32]) -> bool {
    ncs(dims).is_some_and(|d| nchwc::to_planar(src, d, dst))
}

/// Reorders NCHW `data` (shape `dims`) into blocked order in place.
pub(crate) fn block_in_place(data: &mut [f32], dims: &[usize]) -> bool {
    let Some(d) = ncs(dims) else { return false };
    let mut tmp = scratch::take(data.len());
    tmp.copy_from_slice(data);
    let ok = nchwc::to_blocked(&tmp, d, data);
    scratch::give(tmp);
    ok
}
