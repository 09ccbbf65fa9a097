//! Gradient checkpointing as an explicit segment: the forward runs without recording, keeping
//! only the segment's inputs; the backward re-runs the segment with recording on and
//! backpropagates through that fresh sub-graph.

use super::{with_grad_mode, Op};
use crate::tensor::{Tensor, TensorId};
use crate::Result;
use std::sync::Arc;

type SegmentFn = dyn Fn(&[Tensor]) -> Result<Tensor> + Send + Sync;

pub struct Segment {
    inputs: Vec<Tensor>,
    f: Box<SegmentFn>,
}

impl Segment {
    pub fn inputs(&self) -> &[Tensor] {
        &self.inputs
    }

    /// Recompute the inside and return gradients for the tracked inputs and for every trainable
    /// variable the segment captured.
    pub(super) fn backward(&self, g: &Tensor) -> Result<Vec<(TensorId, Tensor)>> {
        // Fresh leaves stand in for tracked inputs so their gradients can be read back.
        let leaves: Vec<Tensor> = self
            .inputs
            .iter()
            .map(|x| {
                if x.tracks() {
                    x.detach().as_leaf()
                } else {
                    x.clone()
                }
            })
            .collect();
        let out = with_grad_mode(true, || (self.f)(&leaves))?;
        let mut grads = out.backward_with(g)?;
        let mut result = Vec::new();
        for (leaf, input) in leaves.iter().zip(&self.inputs) {
            if input.tracks() {
                if let Some(dg) = grads.remove(leaf) {
                    result.push((input.id(), dg));
                }
            }
        }
        let ids: Vec<TensorId> = grads.ids().copied().collect();
        for id in ids {
            if let Some(dg) = grads.get_id(id) {
                result.push((id, dg.clone()));
            }
        }
        Ok(result)
    }
}

/// Run `f(inputs)` as a checkpointed segment. Outside grad mode this is a plain call.
/// `f` must be deterministic: it runs again in backward.
pub fn checkpoint(
    inputs: &[Tensor],
    f: impl Fn(&[Tensor]) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    if !super::grad_enabled() {
        return f(inputs);
    }
    let detached: Vec<Tensor> = inputs.iter().map(|t| t.detach()).collect();
    let value = with_grad_mode(false, || f(&detached))?;
    let seg = Arc::new(Segment {
        inputs: inputs.to_vec(),
        f: Box::new(f),
    });
    Ok(value.with_op(Op::Checkpoint(seg)))
}
