"""Test-wide set-up: 8 CPU devices, JAX's persistent compilation cache, quick compiles."""

import os

from tests.devices import quick_compile_flags

# Must happen before jax is imported anywhere.
if 'xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=8').strip()
# Inherited by the processes the tests start, unless they set XLA_FLAGS (tests.devices).
os.environ['XLA_FLAGS'] = f'{os.environ["XLA_FLAGS"]} {quick_compile_flags()}'.strip()
# Tests check what programs compute, not how fast XLA's optimised code runs them: skipping most
# of XLA's optimisation passes compiles the suite's ~6,000 programs much faster (a cold
# `make test` on 2 cores: 10:41 → 7:50 of pytest). Set in the environment, so the command-line
# runs the tests start as subprocesses skip them too (the checkpoint CLI tests: 113 s → 67 s);
# benchmarks and real training keep full optimisation.
os.environ['JAX_DISABLE_MOST_OPTIMIZATIONS'] = '1'

import jax  # noqa: E402

from moetrain.data.tokenizer import cache_dir  # noqa: E402

jax.config.update('jax_compilation_cache_dir', str(cache_dir() / 'jax-tests'))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.1)
jax.config.update('jax_disable_most_optimizations', True)  # were jax imported before
