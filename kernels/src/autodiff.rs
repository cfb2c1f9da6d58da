//! Hand-written backward passes: each fused op is one node in burn's autodiff graph whose
//! backward calls the inner backend's `*_backward` method (a CubeCL kernel on Cube
//! backends, the primitive-op twin elsewhere). The forward keeps only its inputs.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::{Autodiff, NodeId};
use burn::backend::tensor::{BoolTensor, FloatTensor, IntTensor};
use burn::backend::{AutodiffBackend, TensorMetadata};

use crate::extension::FusedOps;

impl<B: FusedOps, C: CheckpointStrategy> FusedOps for Autodiff<B, C> {
    fn rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f32) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct RmsNorm;

        impl<B: FusedOps> Backward<B, 2> for RmsNorm {
            type State = (NodeId, NodeId, f32);

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                checkpointer: &mut Checkpointer,
            ) {
                let (x, weight, eps) = ops.state;
                let x: FloatTensor<B> = checkpointer.retrieve_node_output(x);
                let weight: FloatTensor<B> = checkpointer.retrieve_node_output(weight);
                let [x_node, w_node] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let w_shape = weight.shape();
                let (dx, dw_rows) = B::rms_norm_backward(x, weight, grad, eps);
                if let Some(node) = w_node {
                    let dw = B::float_reshape(B::float_sum_dim(dw_rows, 0), w_shape);
                    grads.register::<B>(node.id, dw);
                }
                if let Some(node) = x_node {
                    grads.register::<B>(node.id, dx);
                }
            }
        }

        match RmsNorm
            .prepare::<C>([x.node(), weight.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let state = (prep.checkpoint(&x), prep.checkpoint(&weight), eps);
                let out = B::rms_norm(x.into_primitive(), weight.into_primitive(), eps);
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::rms_norm(
                x.into_primitive(),
                weight.into_primitive(),
                eps,
            )),
        }
    }

    /// Backward halves are not differentiated again: their outputs are constants.
    fn rms_norm_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        eps: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (dx, dw) = B::rms_norm_backward(
            x.into_primitive(),
            weight.into_primitive(),
            grad.into_primitive(),
            eps,
        );
        (Self::from_inner(dx), Self::from_inner(dw))
    }

    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct Swiglu;

        impl<B: FusedOps> Backward<B, 2> for Swiglu {
            type State = (NodeId, NodeId);

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                checkpointer: &mut Checkpointer,
            ) {
                let (gate, up) = ops.state;
                let gate: FloatTensor<B> = checkpointer.retrieve_node_output(gate);
                let up: FloatTensor<B> = checkpointer.retrieve_node_output(up);
                let [gate_node, up_node] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (d_gate, d_up) = B::swiglu_backward(gate, up, grad);
                if let Some(node) = gate_node {
                    grads.register::<B>(node.id, d_gate);
                }
                if let Some(node) = up_node {
                    grads.register::<B>(node.id, d_up);
                }
            }
        }

        match Swiglu
            .prepare::<C>([gate.node(), up.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let state = (prep.checkpoint(&gate), prep.checkpoint(&up));
                let out = B::swiglu(gate.into_primitive(), up.into_primitive());
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::swiglu(gate.into_primitive(), up.into_primitive()))
            }
        }
    }

    fn lora_up(
        base: FloatTensor<Self>,
        down: FloatTensor<Self>,
        b: FloatTensor<Self>,
        scale: f32,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct LoraUp;

        impl<B: FusedOps> Backward<B, 3> for LoraUp {
            /// The factors: the base output is not needed, its gradient is the output's.
            type State = (NodeId, NodeId, f32);

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                checkpointer: &mut Checkpointer,
            ) {
                let (down, b, scale) = ops.state;
                let [base_node, down_node, b_node] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let down: FloatTensor<B> = checkpointer.retrieve_node_output(down);
                let b: FloatTensor<B> = checkpointer.retrieve_node_output(b);
                if down_node.is_some() || b_node.is_some() {
                    let (d_down, d_b) = B::lora_up_backward(down, b, grad.clone(), scale);
                    if let Some(node) = down_node {
                        grads.register::<B>(node.id, d_down);
                    }
                    if let Some(node) = b_node {
                        grads.register::<B>(node.id, d_b);
                    }
                }
                if let Some(node) = base_node {
                    grads.register::<B>(node.id, grad);
                }
            }
        }

        match LoraUp
            .prepare::<C>([base.node(), down.node(), b.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let state = (prep.checkpoint(&down), prep.checkpoint(&b), scale);
                let out = B::lora_up(
                    base.into_primitive(),
                    down.into_primitive(),
                    b.into_primitive(),
                    scale,
                );
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::lora_up(
                base.into_primitive(),
                down.into_primitive(),
                b.into_primitive(),
                scale,
            )),
        }
    }

    fn lora_up_backward(
        down: FloatTensor<Self>,
        b: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        scale: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (d_down, d_b) = B::lora_up_backward(
            down.into_primitive(),
            b.into_primitive(),
            grad.into_primitive(),
            scale,
        );
        (Self::from_inner(d_down), Self::from_inner(d_b))
    }

    fn linear_logprob(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        chunk: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        #[derive(Debug)]
        struct LinearLogprob;

        impl<B: FusedOps> Backward<B, 2> for LinearLogprob {
            /// Inputs, targets, the forward's log-sum-exp and the chunk size: the logits are
            /// rebuilt chunk by chunk, never kept.
            type State = (NodeId, NodeId, IntTensor<B>, FloatTensor<B>, usize);

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                checkpointer: &mut Checkpointer,
            ) {
                let (hidden, weight, targets, lse, chunk) = ops.state;
                let hidden: FloatTensor<B> = checkpointer.retrieve_node_output(hidden);
                let weight: FloatTensor<B> = checkpointer.retrieve_node_output(weight);
                let [h_node, w_node] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let dh = match w_node {
                    Some(node) => {
                        let (dh, dw) = B::linear_logprob_backward_weight(
                            hidden, weight, targets, lse, grad, chunk,
                        );
                        grads.register::<B>(node.id, dw);
                        dh
                    }
                    None if h_node.is_some() => {
                        B::linear_logprob_backward(hidden, weight, targets, lse, grad, chunk)
                    }
                    None => return,
                };
                if let Some(node) = h_node {
                    grads.register::<B>(node.id, dh);
                }
            }
        }

        match LinearLogprob
            .prepare::<C>([hidden.node(), weight.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let (h_state, w_state) = (prep.checkpoint(&hidden), prep.checkpoint(&weight));
                let (lp, lse, hit) = B::linear_logprob(
                    hidden.into_primitive(),
                    weight.into_primitive(),
                    targets.clone(),
                    chunk,
                );
                let state = (h_state, w_state, targets, lse.clone(), chunk);
                (
                    prep.finish(state, lp),
                    Self::from_inner(lse),
                    Self::from_inner(hit),
                )
            }
            OpsKind::UnTracked(prep) => {
                let (lp, lse, hit) = B::linear_logprob(
                    hidden.into_primitive(),
                    weight.into_primitive(),
                    targets,
                    chunk,
                );
                (
                    prep.finish(lp),
                    Self::from_inner(lse),
                    Self::from_inner(hit),
                )
            }
        }
    }

    fn linear_logprob_backward(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        chunk: usize,
    ) -> FloatTensor<Self> {
        Self::from_inner(B::linear_logprob_backward(
            hidden.into_primitive(),
            weight.into_primitive(),
            targets,
            lse.into_primitive(),
            grad.into_primitive(),
            chunk,
        ))
    }

    fn linear_logprob_backward_weight(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        chunk: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (dh, dw) = B::linear_logprob_backward_weight(
            hidden.into_primitive(),
            weight.into_primitive(),
            targets,
            lse.into_primitive(),
            grad.into_primitive(),
            chunk,
        );
        (Self::from_inner(dh), Self::from_inner(dw))
    }

    fn grouped_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        masked: BoolTensor<Self>,
        block: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        #[derive(Debug)]
        struct Attention;

        /// Inputs, the mask, the output and its softmax statistics: O(T) beyond the inputs.
        type State<B> = (
            [NodeId; 3],
            BoolTensor<B>,
            FloatTensor<B>,
            FloatTensor<B>,
            usize,
        );

        impl<B: FusedOps> Backward<B, 3> for Attention {
            type State = State<B>;

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                checkpointer: &mut Checkpointer,
            ) {
                let ([q, k, v], masked, out, stats, block) = ops.state;
                let q: FloatTensor<B> = checkpointer.retrieve_node_output(q);
                let k: FloatTensor<B> = checkpointer.retrieve_node_output(k);
                let v: FloatTensor<B> = checkpointer.retrieve_node_output(v);
                let grad = grads.consume::<B>(&ops.node);
                let (dq, dk, dv) =
                    B::grouped_attention_backward(q, k, v, masked, out, stats, grad, block);
                for (node, g) in ops.parents.into_iter().zip([dq, dk, dv]) {
                    if let Some(node) = node {
                        grads.register::<B>(node.id, g);
                    }
                }
            }
        }

        match Attention
            .prepare::<C>([q.node(), k.node(), v.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let ids = [
                    prep.checkpoint(&q),
                    prep.checkpoint(&k),
                    prep.checkpoint(&v),
                ];
                let (out, lse) = B::grouped_attention(
                    q.into_primitive(),
                    k.into_primitive(),
                    v.into_primitive(),
                    masked.clone(),
                    block,
                );
                let state = (ids, masked, out.clone(), lse.clone(), block);
                (prep.finish(state, out), Self::from_inner(lse))
            }
            OpsKind::UnTracked(prep) => {
                let (out, lse) = B::grouped_attention(
                    q.into_primitive(),
                    k.into_primitive(),
                    v.into_primitive(),
                    masked,
                    block,
                );
                (prep.finish(out), Self::from_inner(lse))
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn grouped_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        masked: BoolTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        block: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (dq, dk, dv) = B::grouped_attention_backward(
            q.into_primitive(),
            k.into_primitive(),
            v.into_primitive(),
            masked,
            out.into_primitive(),
            lse.into_primitive(),
            grad.into_primitive(),
            block,
        );
        (
            Self::from_inner(dq),
            Self::from_inner(dk),
            Self::from_inner(dv),
        )
    }

    /// The tables are positions' functions, not parameters: no gradient flows to them.
    fn rotary(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct Rotary;

        impl<B: FusedOps> Backward<B, 1> for Rotary {
            type State = (FloatTensor<B>, FloatTensor<B>);

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let (cos, sin) = ops.state;
                let grad = grads.consume::<B>(&ops.node);
                if let [Some(node)] = ops.parents {
                    grads.register::<B>(node.id, B::rotary_backward(grad, cos, sin));
                }
            }
        }

        let (cos, sin) = (cos.into_primitive(), sin.into_primitive());
        match Rotary.prepare::<C>([x.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let out = B::rotary(x.into_primitive(), cos.clone(), sin.clone());
                prep.finish((cos, sin), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::rotary(x.into_primitive(), cos, sin)),
        }
    }

    fn rotary_backward(
        grad: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        Self::from_inner(B::rotary_backward(
            grad.into_primitive(),
            cos.into_primitive(),
            sin.into_primitive(),
        ))
    }

    fn swiglu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (d_gate, d_up) = B::swiglu_backward(
            gate.into_primitive(),
            up.into_primitive(),
            grad.into_primitive(),
        );
        (Self::from_inner(d_gate), Self::from_inner(d_up))
    }
}
