"""The MoE pipeline called the way the dispatch tests compare it with the per-token loop: by
backend name (the two capacity-buffer backends, or dropless), and behind a softmax router."""

import jax.numpy as jnp

from moetrain.models import dispatch, pipeline, routing, routing_stats

# The two capacity-buffer backends, and the dropless pipeline (no capacity).
BACKENDS = (*dispatch.BACKENDS, 'dropless')


def token_choice_ffn(x, experts, gates, mask, w_gate, w_up, w_down, *, capacity, backend,
                     priority_GxT=None):
  """The pipeline with `backend`'s buffers, or dropless: -> (y, kept)."""
  return pipeline.token_choice(x, experts, gates, mask, (w_gate, w_up, w_down),
                               num_experts=w_gate.shape[0],
                               capacity=None if backend == 'dropless' else capacity,
                               backend=backend, priority_GxT=priority_GxT)


def dropped_fraction(kept, mask, experts, num_experts):
  dropped, real = routing_stats.drop_counts(experts, kept, mask, num_experts)
  return dropped / jnp.maximum(real, 1.0)


def moe_ffn(x, router_w, w_gate, w_up, w_down, *, top_k, norm_topk_prob, capacity, backend,
            mask_GxT):
  """Softmax top-k routing into the pipeline: -> (y, losses and the metrics checked here)."""
  logits = jnp.einsum('gtd,de->gte', x, router_w)
  probs = routing.router_probabilities(logits)
  gates, experts = routing.top_k_gates(probs, top_k, norm_topk_prob)
  y, kept = token_choice_ffn(x, experts, gates, mask_GxT, w_gate, w_up, w_down,
                             capacity=capacity, backend=backend)
  stats = routing_stats.token_choice(
      probs_GxTxR=probs, logits_GxTxR=logits, experts_GxTxK=experts, gates_GxTxK=gates,
      kept_GxTxK=kept, mask_GxT=mask_GxT, num_experts=router_w.shape[-1],
      aux_loss=routing.load_balance_loss(probs, experts, mask_GxT), bias_E=None)
  metrics = routing_stats.layer_metrics(stats)
  return y, {'aux_loss': stats.aux_loss, 'z_loss': metrics['z_loss_per_layer'],
             'expert_fraction': metrics['expert_fraction'],
             'dropped_fraction': metrics['dropped_fraction']}
