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
    # Floors: the oldest versions the code runs on; constraints/minimum.txt pins each of them (CI runs
    # the fast tests there) and tests/test_install.py keeps the two equal. Why each: CONTRIBUTING.md.
    python_requires=">=3.11",  # jax >= 0.7 needs 3.11
    install_requires=[
        "jax>=0.10.2",  # jaxlib._hlo (xla_cost: loop-aware costs); jax.set_mesh needs 0.7.1
        "jaxlib>=0.10.2",
        "flax>=0.11.0",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.12.8",  # gcs_utils.get_kvstore_for_gcs (tests/test_remote_paths.py's fake bucket)
        "etils[epath]>=1.13.0",  # every path, local or gs:// (animatediff_jax/io/fs.py), as orbax
        "ml-collections>=1.1.0",  # dict fields overridable on the command line
        "numpy>=2.0.2",
        "safetensors>=0.8.0",
        "Pillow>=10.0.0",
        "PyYAML>=6.0.1",  # sample writes (and replays) config.yaml
        "tqdm>=4.66.0",
    ],
    extras_require={
        # Reading PyTorch checkpoints (.ckpt / .bin) and tokenising need torch + transformers;
        # converted checkpoints load without them. Floors: the versions the parity tests run against.
        "torch": ["torch>=2.13.0", "transformers>=5.25.0", "diffusers>=0.42.1"],
        "data": ["grain>=0.2.12", "av>=18.1.0"],  # grain.MultiprocessingOptions at the top level (0.2.12)
        "train": ["grain>=0.2.12", "av>=18.1.0", "tensorboardX>=2.6.5"],
        # gs:// paths for real (epath's fsspec backend; orbax's gs:// checkpoints use google-cloud-storage).
        "gcs": ["gcsfs", "google-cloud-storage"],
        # int8 for the spatial UNet (`quantize`: models/quantize.py): Google's qwix (AQT's successor), which
        # quantizes a Flax linen model's matmuls and convs by module path.
        "int8": ["qwix>=0.1.8"],
        # jax[tpu] brings libtpu (it runs on a CPU host): tests/test_compile.py compiles for abstract TPU chips.
        # ruff: .ci/run lints (ruff.toml).
        "test": ["torch>=2.13.0", "transformers>=5.25.0", "diffusers>=0.42.1", "peft>=0.21.2", "pytest>=9.0.3",
                 "pytest-xdist>=3.8.0", "grain>=0.2.12", "av>=18.1.0", "tensorboardX>=2.6.5", "jax[tpu]>=0.10.2",
                 "ruff>=0.17.6", "qwix>=0.1.8"],
    },
    entry_points={"console_scripts": ["animatediff-jax=animatediff_jax.cli:main"]},
)
