"""Slow, obviously-correct per-token loop reference of a top-k SwiGLU MoE feed-forward layer.

Written in jnp float32 with plain Python loops over groups, choices and tokens so that `jax.grad`
works through it (eagerly; tiny shapes only). Routing decisions are taken on concrete values, so
this must not be called under `jax.jit`. It deliberately calls nothing from `moetrain`.
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


def moe_loop_reference(x_GxTxD, mask_GxT, router_w, w_gate, w_up, w_down, *, top_k,
                       norm_topk_prob, capacity):
  """Per-token loop MoE: -> (y [G, T, D], info dict).

  info: aux_loss, z_loss (jnp scalars, differentiable), expert_fraction ([E] numpy),
  dropped_fraction (float), dropped (set of dropped real (g, t, j)) and slots
  ({(g, t, j): slot} of the kept ones).
  """
  num_groups, tokens, _ = x_GxTxD.shape
  num_experts = router_w.shape[1]
  real = np.asarray(mask_GxT) > 0
  router_w = jnp.asarray(router_w, jnp.float32)

  y = jnp.zeros(x_GxTxD.shape, x_GxTxD.dtype)
  group_losses, z_terms = [], []
  counts = np.zeros(num_experts)
  dropped, slots = set(), {}

  for g in range(num_groups):
    real_tokens = [t for t in range(tokens) if real[g, t]]
    probs, chosen, gates = {}, {}, {}
    for t in real_tokens:
      z_E = jnp.asarray(x_GxTxD[g, t], jnp.float32) @ router_w
      z_terms.append(_logsumexp(z_E) ** 2)
      probs[t] = _softmax(z_E)
      p_np = np.asarray(jax.lax.stop_gradient(probs[t]))
      # Highest probability first; equal probabilities go to the lowest expert index.
      chosen[t] = sorted(range(num_experts), key=lambda e: (-p_np[e], e))[:top_k]
      gates[t] = [probs[t][e] for e in chosen[t]]
      if norm_topk_prob:
        total = sum(gates[t])
        gates[t] = [gate / total for gate in gates[t]]

    used = [0] * num_experts
    for j in range(top_k):
      for t in real_tokens:
        e = chosen[t][j]
        counts[e] += 1
        if used[e] >= capacity:
          dropped.add((g, t, j))
          continue
        slots[(g, t, j)] = used[e]
        used[e] += 1
        out_D = _swiglu_expert(x_GxTxD[g, t], w_gate[e], w_up[e], w_down[e])
        y = y.at[g, t].add(gates[t][j] * out_D)

    if real_tokens:
      n = len(real_tokens)
      loss = 0.0
      for e in range(num_experts):
        f_e = sum(chosen[t].count(e) for t in real_tokens) / (top_k * n)
        p_e = sum(probs[t][e] for t in real_tokens) / n
        loss = loss + f_e * p_e
      group_losses.append(num_experts * loss)

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
