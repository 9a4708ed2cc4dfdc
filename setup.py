"""animatediff-jax: AnimateDiff in JAX/Flax, exact to the PyTorch original."""

from setuptools import find_packages, setup

setup(
    name="animatediff-jax",
    version="0.1.0",
    description="AnimateDiff (motion modules for Stable Diffusion 1.5) in JAX/Flax, TPU-native",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["animatediff_jax", "animatediff_jax.*"]),
    # The toy world's pretrained checkpoint (`animatediff-jax demo --pretrained`) ships with the package.
    package_data={"animatediff_jax.toy": ["README.md", "assets/*/*", "assets/*/*/*"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax",
        "orbax-checkpoint",
        "etils[epath]",  # every path, local or gs:// (animatediff_jax/io/fs.py), as orbax
        "ml-collections",
        "numpy",
        "safetensors",
        "Pillow",
        "PyYAML",  # sample writes (and replays) config.yaml
        "tqdm",
    ],
    extras_require={
        # Reading PyTorch checkpoints (.ckpt / .bin) and tokenising need torch + transformers;
        # converted checkpoints load without them.
        "torch": ["torch", "transformers", "diffusers"],
        "data": ["grain", "av"],
        "train": ["grain", "av", "tensorboardX"],
        # gs:// paths for real (epath's fsspec backend; orbax's gs:// checkpoints use google-cloud-storage).
        "gcs": ["gcsfs", "google-cloud-storage"],
        # jax[tpu] brings libtpu (it runs on a CPU host): tests/test_compile.py compiles for abstract TPU chips.
        "test": ["torch", "transformers", "diffusers", "peft", "pytest", "pytest-xdist", "grain", "av", "tensorboardX",
                 "jax[tpu]"],
    },
    entry_points={"console_scripts": ["animatediff-jax=animatediff_jax.cli:main"]},
)
