"""For the tests and the processes they start: XLA flags (N CPU devices, compiled quickly)
and free ports."""

import functools
import os
import socket
import subprocess
import sys

# XLA:CPU's loop emitters compile the tests' small programs about twice as fast as its MLIR
# fusion emitters (a 2-layer MoE train step on 8 devices: 3.1 s → 1.4 s) and compute the same.
QUICK_COMPILE = '--xla_cpu_use_fusion_emitters=false'


@functools.cache
def quick_compile_flags() -> str:
  """`QUICK_COMPILE`, or nothing where this jaxlib does not know the flag (XLA would abort)."""
  probe = subprocess.run([sys.executable, '-c', 'import jax; jax.devices()'],
                         env=dict(os.environ, XLA_FLAGS=QUICK_COMPILE, JAX_PLATFORMS='cpu'),
                         capture_output=True, timeout=120)
  return QUICK_COMPILE if probe.returncode == 0 else ''


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a process with `devices` CPU devices."""
  return f'--xla_force_host_platform_device_count={devices} {quick_compile_flags()}'.strip()


def free_port() -> int:
  """A loopback TCP port no one listens on now (a coordinator's, an emulator's)."""
  with socket.socket() as probe:
    probe.bind(('127.0.0.1', 0))
    return probe.getsockname()[1]
