"""Expert pruning and merging on flat per-layer weights (`layout.to_layers` names).

Pruning (Lu et al. 2024, "Not All Experts are Equal") keeps, in every MoE layer, the experts its
calibration statistics rank highest and drops the rest with their router columns. Merging
(MC-SMoE, Li et al. 2024; HC-SMoE, Chen et al. 2024) groups similar experts, averages each
group's weights weighted by usage and keeps every router output, mapped to its group's expert
(`model.moe.router_outputs`, the `expert_map` buffer), so a token that chose two experts of one
group reaches the merged expert with the sum of their gates. The choices (which experts to keep,
which to group) are made on the host from per-expert statistics and router columns; the
weights move inside one jitted function in their shardings (jax arrays or numpy alike), so no
host ever holds the experts.

Shape suffixes: E experts, R router outputs, N experts kept, D model width, F features.
"""

import jax.numpy as jnp
import numpy as np
from scipy import spatial
from scipy.cluster import hierarchy

EXPERT_NAMES = ('w_gate', 'w_up', 'w_down')


def moe_layers(flat: dict) -> list[int]:
  """The indices of the layers with routed experts, in order."""
  return sorted(int(name.split('/')[1]) for name in flat
                if name.startswith('blocks/') and name.endswith('/ffn/router'))


def top_experts(score_E: np.ndarray, keep: int) -> np.ndarray:
  """The `keep` highest-scoring experts, ties to the lower index, in index order: -> [N] i32."""
  order_E = np.argsort(-np.asarray(score_E, np.float64), kind='stable')
  return np.sort(order_E[:keep]).astype(np.int32)


def count_for_mass(mass_E: np.ndarray, fraction: float) -> int:
  """The fewest experts whose gate mass reaches `fraction` of the layer's total (>= 1)."""
  share_E = np.sort(np.asarray(mass_E, np.float64))[::-1] / max(float(np.sum(mass_E)), 1e-30)
  return int(min(np.searchsorted(np.cumsum(share_E), fraction - 1e-12) + 1, len(share_E)))


def prune_layer(params: dict, buffers: dict, layer: int, keep_N: np.ndarray,
                num_experts: int) -> None:
  """Keeps experts `keep_N` of MoE layer `layer` in place: their weights, router columns
  (null-expert columns after the E real ones stay) and balancing bias entries."""
  prefix = f'blocks/{layer}/ffn/'
  for name in EXPERT_NAMES:
    params[prefix + name] = params[prefix + name][keep_N]
  router_DxR = params[prefix + 'router']
  columns = np.concatenate([keep_N, np.arange(num_experts, router_DxR.shape[1])])
  params[prefix + 'router'] = router_DxR[:, columns]
  if prefix + 'router_bias' in buffers:
    buffers[prefix + 'router_bias'] = buffers[prefix + 'router_bias'][keep_N]


def cosine_similarity(features_ExF: np.ndarray) -> np.ndarray:
  """Cosine similarity between the experts' feature vectors: [E, F] -> [E, E] f64."""
  x_ExF = np.asarray(features_ExF, np.float64)
  x_ExF = x_ExF / np.maximum(np.linalg.norm(x_ExF, axis=-1, keepdims=True), 1e-30)
  return x_ExF @ x_ExF.T


def cluster(similarity_ExE: np.ndarray, groups: int) -> np.ndarray:
  """Average-linkage agglomerative clustering (HC-SMoE) of the experts into `groups` groups, on
  the distance 1 − similarity: -> group of each expert [E] i32, groups numbered in the order of
  their lowest expert."""
  distance_ExE = np.clip(1.0 - np.asarray(similarity_ExE, np.float64), 0.0, None)
  np.fill_diagonal(distance_ExE, 0.0)
  distance_ExE = (distance_ExE + distance_ExE.T) / 2
  tree = hierarchy.linkage(spatial.distance.squareform(distance_ExE, checks=False), 'average')
  labels_E = hierarchy.cut_tree(tree, n_clusters=groups).ravel()
  # Renumber so that group g is the one whose lowest expert comes g-th.
  _, first = np.unique(labels_E, return_index=True)
  order = np.argsort(np.argsort(first))
  return order[labels_E].astype(np.int32)


def merge_weights(w_ExAxB, group_E: np.ndarray, usage_E: np.ndarray):
  """Usage-weighted average of each group's experts (a group never used: the plain mean):
  [E, A, B] -> [N, A, B] in w's dtype."""
  member_NxE = np.arange(int(group_E.max()) + 1)[:, None] == np.asarray(group_E)[None, :]
  usage_NxE = member_NxE * np.asarray(usage_E, np.float64)[None, :]
  unused_N = usage_NxE.sum(axis=1) == 0
  weight_NxE = np.where(unused_N[:, None], member_NxE, usage_NxE)
  weight_NxE = (weight_NxE / weight_NxE.sum(axis=1, keepdims=True)).astype(np.float32)
  w_ExAxB = jnp.asarray(w_ExAxB)
  merged = jnp.einsum('ne,eab->nab', weight_NxE, w_ExAxB.astype(jnp.float32))
  return merged.astype(w_ExAxB.dtype)


def merge_layer(params: dict, layer: int, group_E: np.ndarray, usage_E: np.ndarray,
                map_R: np.ndarray) -> np.ndarray:
  """Merges MoE layer `layer`'s experts by `group_E` in place; router and bias unchanged.
  `map_R` sends router outputs to the current experts: -> the new map [R] i32 (to groups)."""
  prefix = f'blocks/{layer}/ffn/'
  for name in EXPERT_NAMES:
    params[prefix + name] = merge_weights(params[prefix + name], group_E, usage_E)
  return group_E[map_R].astype(np.int32)


def expert_usage(per_output_R: np.ndarray, map_R: np.ndarray, num_experts: int) -> np.ndarray:
  """A per-router-output statistic summed onto the experts that compute them: -> [E]."""
  return np.bincount(map_R, weights=np.asarray(per_output_R, np.float64), minlength=num_experts)
