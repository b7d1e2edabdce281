"""Test-wide set-up: 8 CPU devices and JAX's persistent compilation cache."""

import os

# Must happen before jax is imported anywhere.
if 'xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=8').strip()

import jax  # noqa: E402

from moetrain.data.tokenizer import cache_dir  # noqa: E402

jax.config.update('jax_compilation_cache_dir', str(cache_dir() / 'jax-tests'))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.1)
