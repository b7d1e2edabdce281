"""Documents packed into rows: segment ids and positions derived from end-of-document tokens.

Rows are cut from a stream of documents, each followed by `EOS_ID` (`pipeline`), so any
source gets its document boundaries the same way. The end-of-document token opens the next
document's segment (it serves as its beginning-of-document token): every target is then
predicted from its own document alone, and the first token of a document is predicted from the
end-of-document token at position 0. A row that starts inside a document starts a segment at
position 0 too.
"""

import jax
import jax.numpy as jnp


def document_segments(inputs_BxL: jax.Array, eos_id: int) -> tuple[jax.Array, jax.Array]:
  """(segment ids [B, L] int32, equal within one document of a row; positions [B, L] int32,
  restarting at 0 at each document) for rows of token ids (leading axes: any)."""
  starts_BxL = inputs_BxL == eos_id
  segments_BxL = 1 + jnp.cumsum(starts_BxL, axis=-1, dtype=jnp.int32)
  index_BxL = jnp.broadcast_to(jnp.arange(inputs_BxL.shape[-1], dtype=jnp.int32),
                               inputs_BxL.shape)
  first_BxL = jax.lax.cummax(jnp.where(starts_BxL, index_BxL, 0), axis=inputs_BxL.ndim - 1)
  return segments_BxL, index_BxL - first_BxL
