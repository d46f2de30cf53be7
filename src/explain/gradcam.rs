//! Grad-CAM's backward pass: the part of the graph after the target layer, re-run on candle's
//! CPU ops with the tapped feature map as a variable, differentiated by candle's autograd.
//! Only that tail runs twice, so a late target layer (the usual one) costs little.

use std::collections::HashMap;

use candle_core::{Device, Tensor, Var};

use crate::error::{Error, Result};
use crate::exec::{load_weights, run_nodes};
use crate::graph::{Graph, Node};
use crate::model::ModelFile;

/// The differentiable tail of a graph after one value.
pub struct GradientTail {
    feature: String,
    output: String,
    nodes: Vec<Node>,
    weights: HashMap<String, Tensor>,
}

impl GradientTail {
    /// Prepares the tail of `graph` after `feature`, with its weights read from `file` as f32
    /// CPU tensors (their own copies: the executor may have packed and dropped its own).
    pub fn new(graph: &Graph, file: &ModelFile, feature: &str) -> Result<Self> {
        let nodes =
            super::plan::gradient_tail(graph, feature).map_err(|reason| Error::Explain {
                method: "gradcam".into(),
                reason,
            })?;
        let produced: std::collections::HashSet<&str> = nodes
            .iter()
            .flat_map(|n| n.outputs.iter().map(String::as_str))
            .chain([feature])
            .collect();
        let mut names: Vec<String> = nodes
            .iter()
            .flat_map(|n| n.inputs.iter())
            .filter(|i| !i.is_empty() && !produced.contains(i.as_str()))
            .cloned()
            .collect();
        names.sort();
        names.dedup();
        let weights = load_weights(file, &names, &Device::Cpu)?;
        let output = graph
            .outputs
            .first()
            .map(|o| o.name.clone())
            .unwrap_or_default();
        Ok(GradientTail {
            feature: feature.to_string(),
            output,
            nodes,
            weights,
        })
    }

    /// The value the gradient is taken with respect to.
    pub fn feature(&self) -> &str {
        &self.feature
    }

    /// d output[0, class] / d feature, shaped like `feature` (a CPU f32 tensor).
    pub fn gradient(&self, feature: &Tensor, class: usize) -> Result<Tensor> {
        let bad = |reason: String| Error::Explain {
            method: "gradcam".into(),
            reason,
        };
        let x = Var::from_tensor(
            &feature
                .to_device(&Device::Cpu)?
                .to_dtype(candle_core::DType::F32)?,
        )?;
        let out = run_nodes(
            &self.nodes,
            (self.feature.as_str(), x.as_tensor().clone()),
            |i| self.weights.get(i).cloned(),
            &self.output,
            bad,
        )?;
        let flat = out.flatten_all()?;
        let classes = flat.dim(0)?;
        if class >= classes {
            return Err(bad(format!(
                "target class {class} is out of range: '{}' has {classes} classes",
                self.output
            )));
        }
        let score = flat.get(class)?;
        let grads = score.backward()?;
        grads
            .get(x.as_tensor())
            .cloned()
            .ok_or_else(|| bad(format!("no gradient reaches '{}'", self.feature)))
    }
}
