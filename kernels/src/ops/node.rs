//! The autodiff glue every fused op shares. Each op is one node in burn's graph: its
//! forward runs on the inner backend and keeps what its backward reads, and its backward
//! calls the inner backend's `*_backward` methods, so gradients never go through the
//! forward's intermediate tensors. What differs between ops (which inputs to keep, what
//! else to save, how the gradients follow) is a [`Backprop`] impl; the bookkeeping of
//! checkpoints, graph parents and gradient registration is written once, here.

use burn::backend::Backend;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::{Autodiff, NodeId};
use burn::backend::tensor::FloatTensor;

/// A fused op's backward with `N` float inputs, the part of its node that is its own.
pub(crate) trait Backprop<B: Backend, const N: usize>:
    core::fmt::Debug + Send + 'static
{
    /// The inputs the backward reads. Only those are checkpointed: an input the backward
    /// does not need (LoRA's base output) is not kept alive until it runs.
    const KEEPS: [bool; N];

    /// What the backward reads besides the kept inputs: scalars, constants (masks,
    /// targets, tables) and outputs of the forward.
    type Saved: Clone + Send + core::fmt::Debug + 'static;

    /// The inputs' gradients from the output's `grad`. `inputs[i]` is present where
    /// [`Self::KEEPS`] says so; `wanted[i]` says whether input `i` is tracked, so a
    /// gradient nobody asked for need not be computed (it is dropped if it is).
    fn backward(
        inputs: [Option<FloatTensor<B>>; N],
        saved: Self::Saved,
        grad: FloatTensor<B>,
        wanted: [bool; N],
    ) -> [Option<FloatTensor<B>>; N];
}

#[derive(Debug)]
struct Node<O>(O);

impl<B: Backend, O: Backprop<B, N>, const N: usize> Backward<B, N> for Node<O> {
    type State = ([Option<NodeId>; N], O::Saved);

    fn backward(
        self,
        ops: Ops<Self::State, N>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let (kept, saved) = ops.state;
        let inputs = kept.map(|id| id.map(|id| checkpointer.retrieve_node_output(id)));
        let wanted = ops.parents.each_ref().map(Option::is_some);
        let grad = grads.consume::<B>(&ops.node);
        let input_grads = O::backward(inputs, saved, grad, wanted);
        for (parent, input_grad) in ops.parents.into_iter().zip(input_grads) {
            if let (Some(node), Some(input_grad)) = (parent, input_grad) {
                grads.register::<B>(node.id, input_grad);
            }
        }
    }
}

/// Runs `forward` on the inner backend as one node of `op`, returning its tracked output
/// and its untracked `extra` outputs (statistics, flags), constants to the graph. The
/// checkpoint strategy `C` is not in the tensors' types: callers name it,
/// `record::<B, C, _, _, _, _>`.
///
/// `constants` are the non-float inputs both passes read (a mask, targets, tables): the
/// forward gets a copy and `save` the original only when the node is tracked, so an
/// untracked call holds no second handle. `save` builds the backward's state from them
/// and from the forward's outputs.
pub(crate) fn record<B, C, O, K, X, const N: usize>(
    op: O,
    inputs: [FloatTensor<Autodiff<B, C>>; N],
    constants: K,
    forward: impl FnOnce([FloatTensor<B>; N], K) -> (FloatTensor<B>, X),
    save: impl FnOnce(K, &FloatTensor<B>, &X) -> O::Saved,
) -> (FloatTensor<Autodiff<B, C>>, X)
where
    B: Backend,
    C: CheckpointStrategy,
    O: Backprop<B, N>,
    K: Clone,
{
    let nodes = inputs.each_ref().map(|x| x.node());
    let prep = Backward::<B, N>::prepare::<C>(Node(op), nodes);
    match prep.compute_bound().stateful() {
        OpsKind::Tracked(mut prep) => {
            let kept: [Option<NodeId>; N] =
                core::array::from_fn(|i| O::KEEPS[i].then(|| prep.checkpoint(&inputs[i])));
            let (out, extra) = forward(inputs.map(|x| x.into_primitive()), constants.clone());
            let saved = save(constants, &out, &extra);
            (prep.finish((kept, saved), out), extra)
        }
        OpsKind::UnTracked(prep) => {
            let (out, extra) = forward(inputs.map(|x| x.into_primitive()), constants);
            (prep.finish(out), extra)
        }
    }
}

/// The inputs of a node that keeps all of them.
pub(crate) fn all_kept<T, const N: usize>(inputs: [Option<T>; N]) -> [T; N] {
    inputs.map(|x| x.expect("the node keeps every input"))
}

/// The `*_backward` halves on `Autodiff`: they run on the inner backend, their outputs
/// constants that are never differentiated again. Arguments are written `name: Float`
/// (an autodiff float tensor, unwrapped), `name: Int` / `name: Bool` (the same on both
/// backends) or `name: T` (a scalar); every output is a float tensor.
macro_rules! on_inner {
    ($(fn $name:ident($($arg:ident: $kind:ident),* $(,)?) -> $out:tt;)*) => {
        $(
            #[allow(clippy::too_many_arguments)]
            fn $name($($arg: $crate::ops::node::on_inner!(@type $kind)),*)
                -> $crate::ops::node::on_inner!(@type $out)
            {
                let out = B::$name($($crate::ops::node::on_inner!(@arg $arg $kind)),*);
                $crate::ops::node::on_inner!(@wrap out $out)
            }
        )*
    };
    (@type Float) => { burn::backend::tensor::FloatTensor<Self> };
    (@type Int) => { burn::backend::tensor::IntTensor<Self> };
    (@type Bool) => { burn::backend::tensor::BoolTensor<Self> };
    (@type ($a:ident, $b:ident)) => {
        ($crate::ops::node::on_inner!(@type $a), $crate::ops::node::on_inner!(@type $b))
    };
    (@type ($a:ident, $b:ident, $c:ident)) => {
        (
            $crate::ops::node::on_inner!(@type $a),
            $crate::ops::node::on_inner!(@type $b),
            $crate::ops::node::on_inner!(@type $c),
        )
    };
    (@type $scalar:ident) => { $scalar };
    (@arg $arg:ident Float) => { $arg.into_primitive() };
    (@arg $arg:ident $other:ident) => { $arg };
    (@wrap $out:ident Float) => { <Self as burn::backend::AutodiffBackend>::from_inner($out) };
    (@wrap $out:ident ($a:ident, $b:ident)) => {{
        let (a, b) = $out;
        (<Self as burn::backend::AutodiffBackend>::from_inner(a), <Self as burn::backend::AutodiffBackend>::from_inner(b))
    }};
    (@wrap $out:ident ($a:ident, $b:ident, $c:ident)) => {{
        let (a, b, c) = $out;
        (
            <Self as burn::backend::AutodiffBackend>::from_inner(a),
            <Self as burn::backend::AutodiffBackend>::from_inner(b),
            <Self as burn::backend::AutodiffBackend>::from_inner(c),
        )
    }};
}

pub(crate) use on_inner;
