//! Reverse-mode autodiff that only ever sees the part of the graph leading to trainable
//! parameters: ops are recorded only when an input is tracked (`Tensor::from_storage`), so frozen
//! weights and everything computed only from them carry no history and never get gradients.

mod backward;
mod checkpoint;
mod op;

pub use checkpoint::checkpoint;
pub use op::Op;

use crate::tensor::{Tensor, TensorId};
use crate::{Error, Result};
use std::cell::Cell;
use std::collections::{HashMap, HashSet};

thread_local! {
    static GRAD_ENABLED: Cell<bool> = const { Cell::new(true) };
}

pub fn grad_enabled() -> bool {
    GRAD_ENABLED.with(|g| g.get())
}

/// Run `f` with op recording switched on or off, restoring the previous mode afterwards.
pub fn with_grad_mode<R>(enabled: bool, f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            GRAD_ENABLED.with(|g| g.set(self.0));
        }
    }
    let _restore = Restore(GRAD_ENABLED.with(|g| g.replace(enabled)));
    f()
}

/// Inference: nothing is recorded inside `f`.
pub fn no_grad<R>(f: impl FnOnce() -> R) -> R {
    with_grad_mode(false, f)
}

/// Gradients of the trainable variables reached by one backward pass.
#[derive(Default)]
pub struct GradStore(HashMap<TensorId, Tensor>);

impl GradStore {
    /// Sets the gradient of the tensor with this id (replacing any).
    pub fn insert(&mut self, id: TensorId, g: Tensor) {
        self.0.insert(id, g);
    }
    pub fn get(&self, t: &Tensor) -> Option<&Tensor> {
        self.0.get(&t.id())
    }
    pub fn get_id(&self, id: TensorId) -> Option<&Tensor> {
        self.0.get(&id)
    }
    pub fn remove(&mut self, t: &Tensor) -> Option<Tensor> {
        self.0.remove(&t.id())
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn ids(&self) -> impl Iterator<Item = &TensorId> {
        self.0.keys()
    }
    /// Add `g` to the gradient of `id` (the first contribution is stored as is).
    fn accumulate(&mut self, id: TensorId, g: Tensor) -> Result<()> {
        let new = match self.0.remove(&id) {
            Some(prev) => prev.add(&g)?,
            None => g,
        };
        self.0.insert(id, new);
        Ok(())
    }
}

/// Tracked nodes reachable from `root`, each after all of its consumers (root first).
fn reverse_topological(root: &Tensor) -> Vec<Tensor> {
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    // Iterative post-order DFS: UNet graphs are deep enough to overflow a recursive walk.
    let mut stack = vec![(root.clone(), false)];
    while let Some((t, expanded)) = stack.pop() {
        if expanded {
            order.push(t);
            continue;
        }
        if !t.tracks() || !seen.insert(t.id()) {
            continue;
        }
        stack.push((t.clone(), true));
        if let Some(op) = t.op() {
            for input in op.inputs().into_iter().rev() {
                if input.tracks() && !seen.contains(&input.id()) {
                    stack.push((input.clone(), false));
                }
            }
        }
    }
    order.reverse();
    order
}

impl Tensor {
    /// Gradients of this scalar with respect to every trainable variable it depends on.
    pub fn backward(&self) -> Result<GradStore> {
        if self.elem_count() != 1 {
            return Err(Error::Backward(format!(
                "backward() needs a scalar, got shape {:?}",
                self.dims()
            )));
        }
        self.backward_with(&self.ones_like()?)
    }

    /// Backward pass seeded with an upstream gradient of this tensor's shape.
    pub fn backward_with(&self, grad: &Tensor) -> Result<GradStore> {
        if grad.shape() != self.shape() {
            return Err(Error::Backward(format!(
                "seed gradient {:?} for tensor {:?}",
                grad.dims(),
                self.dims()
            )));
        }
        let mut grads = GradStore::default();
        if !self.tracks() {
            return Ok(grads);
        }
        grads.accumulate(self.id(), grad.detach())?;
        no_grad(|| {
            for node in reverse_topological(self) {
                let Some(g) = grads.0.remove(&node.id()) else {
                    continue;
                };
                match node.op() {
                    None => {
                        // A variable: its gradient is a result, kept.
                        grads.0.insert(node.id(), g);
                    }
                    Some(op) => {
                        for (id, dg) in backward::input_grads(&node, op, &g)? {
                            grads.accumulate(id, dg)?;
                        }
                    }
                }
            }
            Ok(grads)
        })
    }
}
