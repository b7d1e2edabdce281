"""Slow, obviously-correct per-token loop references of SwiGLU MoE feed-forward layers.

Written in jnp float32 with plain Python loops over groups, choices, tokens and slots so that
`jax.grad` works through them (eagerly; tiny shapes only). Routing decisions are taken on concrete
values, so these must not be called under `jax.jit`. They deliberately call nothing from
`moetrain`.
"""

import jax
import jax.numpy as jnp
import numpy as np


def _softmax(z_E):
  e_E = jnp.exp(z_E - jnp.max(z_E))
  return e_E / jnp.sum(e_E)


def _logsumexp(z_E):
  m = jnp.max(z_E)
  return m + jnp.log(jnp.sum(jnp.exp(z_E - m)))


def _swiglu_expert(x_D, w_gate_DxF, w_up_DxF, w_down_FxD):
  gate_F = x_D @ w_gate_DxF
  return (gate_F * jax.nn.sigmoid(gate_F) * (x_D @ w_up_DxF)) @ w_down_FxD


def _assemble(out, shape, dtype):
  """[G, T, D] array of the per-token sums out[g, t]; tokens not in `out` get zeros."""
  zeros_D = jnp.zeros(shape[-1:], dtype)
  return jnp.stack([jnp.stack([out.get((g, t), zeros_D) for t in range(shape[1])])
                    for g in range(shape[0])])


def _serve(x_GxTxD, real, chosen, gates, k, w_gate, w_up, w_down, capacity, priority):
  """Serves choices in order: -> (y, dropped set, slots dict, real-expert assignment count).

  chosen[g, t] / gates[g, t]: the expert indices / gate weights of real token t of group g.
  """
  num_groups, tokens, _ = x_GxTxD.shape
  num_experts = w_gate.shape[0]
  # Slicing once up front keeps the number of eager ops (and so the test time) down.
  expert_w = [(w_gate[e], w_up[e], w_down[e]) for e in range(num_experts)]
  x_rows = {(g, t): x_GxTxD[g, t] for g, t in chosen}
  out, dropped, slots, assignments = {}, set(), {}, 0
  for g in range(num_groups):
    order = [t for t in range(tokens) if real[g, t]]
    if priority is not None:
      # Highest priority first; equal priorities keep position order.
      order.sort(key=lambda t: (-priority[g, t], t))
    used = [0] * num_experts
    for j in range(k):
      for t in order:
        e = chosen[g, t][j]
        if e >= num_experts:  # a null expert: no compute, no capacity, not a drop
          continue
        assignments += 1
        if used[e] >= capacity:
          dropped.add((g, t, j))
          continue
        slots[(g, t, j)] = used[e]
        used[e] += 1
        out_D = gates[g, t][j] * _swiglu_expert(x_rows[g, t], *expert_w[e])
        out[g, t] = out[g, t] + out_D if (g, t) in out else out_D
  return _assemble(out, x_GxTxD.shape, x_GxTxD.dtype), dropped, slots, assignments


def token_choice_loop_reference(x_GxTxD, mask_GxT, experts_GxTxK, weights_GxTxK, w_gate, w_up,
                                w_down, *, capacity, priority_GxT=None):
  """Given top-k choices (index >= E: null expert): -> (y [G, T, D], info dict).

  info: dropped (set of dropped real (g, t, j)), slots ({(g, t, j): slot} of the kept ones),
  dropped_fraction (over real tokens' real-expert assignments).
  """
  real = np.asarray(mask_GxT) > 0
  experts = np.asarray(experts_GxTxK)
  priority = None if priority_GxT is None else np.asarray(priority_GxT)
  chosen, gates = {}, {}
  for g, t in zip(*np.nonzero(real)):
    chosen[g, t] = [int(e) for e in experts[g, t]]
    gates[g, t] = [weights_GxTxK[g, t, j] for j in range(experts.shape[-1])]
  y, dropped, slots, assignments = _serve(x_GxTxD, real, chosen, gates, experts.shape[-1],
                                          w_gate, w_up, w_down, capacity, priority)
  info = {'dropped': dropped, 'slots': slots,
          'dropped_fraction': len(dropped) / max(assignments, 1)}
  return y, info


def expert_choice_loop_reference(x_GxTxD, tokens_GxExC, weights_GxExC, w_gate, w_up, w_down):
  """Each expert's slots, token index T meaning empty: -> y [G, T, D]."""
  num_groups, tokens, _ = x_GxTxD.shape
  table = np.asarray(tokens_GxExC)
  out = {}
  for g in range(num_groups):
    for e in range(table.shape[1]):
      for c in range(table.shape[2]):
        t = int(table[g, e, c])
        if t == tokens:
          continue
        out_D = weights_GxExC[g, e, c] * _swiglu_expert(x_GxTxD[g, t], w_gate[e], w_up[e],
                                                         w_down[e])
        out[g, t] = out[g, t] + out_D if (g, t) in out else out_D
  return _assemble(out, x_GxTxD.shape, x_GxTxD.dtype)


def moe_loop_reference(x_GxTxD, mask_GxT, router_w, w_gate, w_up, w_down, *, top_k,
                       norm_topk_prob, capacity, priority=False):
  """Per-token loop softmax top-k MoE: -> (y [G, T, D], info dict).

  `priority`: serve tokens by their top router probability (BPR) instead of position.
  info: aux_loss, z_loss (jnp scalars, differentiable), expert_fraction ([E] numpy),
  dropped_fraction (float), dropped (set of dropped real (g, t, j)) and slots
  ({(g, t, j): slot} of the kept ones).
  """
  num_groups, tokens, _ = x_GxTxD.shape
  num_experts = router_w.shape[1]
  real = np.asarray(mask_GxT) > 0
  router_w = jnp.asarray(router_w, jnp.float32)

  group_losses, z_terms = [], []
  counts = np.zeros(num_experts)
  probs, chosen, gates = {}, {}, {}
  top_prob = np.zeros((num_groups, tokens))
  for g in range(num_groups):
    real_tokens = [t for t in range(tokens) if real[g, t]]
    for t in real_tokens:
      z_E = jnp.asarray(x_GxTxD[g, t], jnp.float32) @ router_w
      z_terms.append(_logsumexp(z_E) ** 2)
      probs[g, t] = _softmax(z_E)
      p_np = np.asarray(jax.lax.stop_gradient(probs[g, t]))
      top_prob[g, t] = p_np.max()
      # Highest probability first; equal probabilities go to the lowest expert index.
      chosen[g, t] = sorted(range(num_experts), key=lambda e: (-p_np[e], e))[:top_k]
      for e in chosen[g, t]:
        counts[e] += 1
      gates[g, t] = [probs[g, t][e] for e in chosen[g, t]]
      if norm_topk_prob:
        total = sum(gates[g, t])
        gates[g, t] = [gate / total for gate in gates[g, t]]

    if real_tokens:
      n = len(real_tokens)
      loss = 0.0
      for e in range(num_experts):
        f_e = sum(chosen[g, t].count(e) for t in real_tokens) / (top_k * n)
        p_e = sum(probs[g, t][e] for t in real_tokens) / n
        loss = loss + f_e * p_e
      group_losses.append(num_experts * loss)

  y, dropped, slots, _ = _serve(x_GxTxD, real, chosen, gates, top_k, w_gate, w_up, w_down,
                                capacity, top_prob if priority else None)
  total_assignments = counts.sum()
  info = {
      'aux_loss': sum(group_losses) / max(len(group_losses), 1),
      'z_loss': sum(z_terms) / max(len(z_terms), 1),
      'expert_fraction': counts / max(total_assignments, 1),
      'dropped_fraction': len(dropped) / max(total_assignments, 1),
      'dropped': dropped,
      'slots': slots,
  }
  return y, info
