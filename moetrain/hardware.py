"""Accelerators the cost model and MFU know: peak bf16 and FP8 FLOP/s, memory, and the two link
classes.

Figures are the vendors' datasheet numbers (dense, no sparsity). A step that runs at the
datasheet peak is 100% MFU; real kernels reach well under it (docs/performance.md: ~690
TFLOP/s for a large bf16 matmul on an H100, 70% of its 989).

Chips are joined by two classes of links: fast ones inside a node (NVLink inside one HGX
server; ICI inside a TPU slice, which is one "node" here) and the network between nodes
(InfiniBand; the data-centre network between slices). Device ids map to nodes in order:
device i sits on node i // node_size, as `jax.devices()` lists one process's devices together.
"""

import dataclasses

import numpy as np

LINKS = ('intra', 'inter')  # inside a node; between nodes


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  peak_flops: float  # dense bf16 FLOP/s
  fp8_flops: float  # dense FP8 FLOP/s; 0 where the chip has no FP8 matmul unit
  hbm_bytes: float  # memory per chip
  hbm_bandwidth: float  # bytes/s
  link_bandwidth: float  # bytes/s one chip sends inside its node (NVLink, ICI)
  node_size: int  # chips joined by those links (one HGX node; one TPU slice)
  network_bandwidth: float  # bytes/s one chip sends to chips on other nodes
  link_names: tuple  # what the intra- and inter-node links are called
  # Fixed cost of one collective (launch, synchronisation), paid per exchange chunk. Order of
  # magnitude of small-message all-to-alls; an assumption, not a datasheet figure.
  link_latency: float = 20e-6
  network_latency: float = 50e-6
  source: str = ''

  def matmul_flops(self, fp8: bool) -> float:
    """FLOP/s of matmuls with FP8 operands (`fp8`) or bf16 ones: a chip without an FP8 unit
    runs FP8 matmuls at its bf16 rate (their operands widened)."""
    return self.fp8_flops if fp8 and self.fp8_flops else self.peak_flops

  def bandwidth(self, link: str) -> float:
    """Bytes/s one chip sends over `link` ('intra' or 'inter')."""
    return self.link_bandwidth if link == 'intra' else self.network_bandwidth

  def latency(self, link: str) -> float:
    """Seconds one collective costs over `link` before its first byte."""
    return self.link_latency if link == 'intra' else self.network_latency


CHIPS = {
    'h100': Chip(
        'NVIDIA H100 SXM5 80GB', peak_flops=989e12, fp8_flops=1979e12, hbm_bytes=80e9,
        hbm_bandwidth=3.35e12,
        # NVLink 4: 900 GB/s per GPU counting both directions; one 400 Gb/s InfiniBand NIC
        # per GPU between nodes.
        link_bandwidth=450e9, node_size=8, network_bandwidth=50e9,
        link_names=('NVLink', 'InfiniBand'),
        source='NVIDIA H100 Tensor Core GPU datasheet (SXM5), DGX H100 user guide'),
    'h200': Chip(
        'NVIDIA H200 SXM 141GB', peak_flops=989e12, fp8_flops=1979e12, hbm_bytes=141e9,
        hbm_bandwidth=4.8e12,
        link_bandwidth=450e9, node_size=8, network_bandwidth=50e9,
        link_names=('NVLink', 'InfiniBand'),
        source='NVIDIA H200 Tensor Core GPU datasheet (SXM)'),
    'tpu-v5p': Chip(
        # No FP8 in the MXU (its 918 TOPS are int8): FP8 matmuls run at the bf16 rate.
        'Google TPU v5p', peak_flops=459e12, fp8_flops=0.0, hbm_bytes=95e9,
        hbm_bandwidth=2765e9,
        # 4800 Gb/s of inter-chip interconnect per chip, all links of the 3D torus together;
        # slices reach 8960 chips, so every collective inside a slice uses ICI.
        link_bandwidth=600e9, node_size=8960, network_bandwidth=25e9, link_names=('ICI', 'DCN'),
        source='cloud.google.com/tpu/docs/v5p (system architecture: per-chip specifications)'),
    'tpu-v5e': Chip(
        'Google TPU v5e', peak_flops=197e12, fp8_flops=0.0, hbm_bytes=16e9, hbm_bandwidth=819e9,
        link_bandwidth=200e9, node_size=256, network_bandwidth=25e9, link_names=('ICI', 'DCN'),
        source='cloud.google.com/tpu/docs/v5e (system architecture: per-chip specifications)'),
}

# `jax.Device.device_kind` strings → CHIPS keys, for MFU of a running job.
_DEVICE_KINDS = {'h100': 'h100', 'h200': 'h200', 'tpu v5p': 'tpu-v5p', 'tpu v5': 'tpu-v5p',
                 'tpu v5 lite': 'tpu-v5e', 'tpu v5e': 'tpu-v5e'}


def chip_for_device(device_kind: str) -> Chip | None:
  """The chip a device kind names ('NVIDIA H100 80GB HBM3', 'TPU v5p', …); None if unknown."""
  kind = device_kind.lower()
  matches = [key for key in _DEVICE_KINDS if key in kind]
  return CHIPS[_DEVICE_KINDS[max(matches, key=len)]] if matches else None


def node_map(devices: int, node_size: int) -> np.ndarray:
  """The node of each device id 0..devices-1, `node_size` devices to a node."""
  return np.arange(devices) // node_size
