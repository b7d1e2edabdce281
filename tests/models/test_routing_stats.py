"""Routing statistics combined over parts of a batch."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moetrain.models import routing, routing_stats


@pytest.mark.parametrize('mode', ['local', 'sequence'])
def test_chunks_balance_loss_merges_to_the_whole_batchs(mode):
  """Disjoint chunks of groups, each with its own count of units holding real tokens, merge
  (`routing_stats.merge_chunks`, weighted by `balance_units`) to the loss of all groups."""
  groups, seq_len, num_experts = 6, 4, 4
  probs = jax.nn.softmax(jax.random.normal(jax.random.key(0), (groups, 2 * seq_len, num_experts)))
  experts = routing.select_experts(probs, 2)
  mask = np.ones((groups, 2 * seq_len), np.float32)
  mask[1] = 0  # a group of padding only: no unit of it counts
  mask[4, seq_len:] = 0  # a sequence of padding only
  loss = lambda g: routing.load_balance_loss(probs[g], experts[g], mask[g], mode=mode,
                                             seq_len=seq_len)
  units = [routing.balance_units(mask[g], mode=mode, seq_len=seq_len)
           for g in (slice(0, 2), slice(2, 6))]
  assert [float(u) for u in units] == ([1, 4] if mode == 'local' else [2, 7])
  empty = routing_stats.empty(num_experts)
  stats = [jax.tree.map(lambda a: jnp.zeros(a.shape[1:]), empty) for _ in units]
  stats = [dataclasses.replace(s, aux_loss=loss(g)) for s, g in zip(stats, (slice(0, 2),
                                                                           slice(2, 6)))]
  merged = routing_stats.merge_chunks(stats, units)
  np.testing.assert_allclose(merged.aux_loss, loss(slice(None)), rtol=1e-6)
  unweighted = (stats[0].aux_loss + stats[1].aux_loss) / 2
  assert abs(float(unweighted) - float(loss(slice(None)))) > 1e-4  # the weights matter
