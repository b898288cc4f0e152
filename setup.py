"""Package metadata for `attn`: attention mechanisms in JAX, with Pallas kernels and a training harness."""

from setuptools import find_packages, setup

_REQUIRES = [
    "jax>=0.7",
    "flax>=0.11",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11",
    "ml-collections>=1.0",
    "absl-py>=2.0",
    "numpy>=1.26",
    "tensorboard>=2.15",  # event-file reading for tests/tools; no TensorFlow needed
    "tensorboardX>=2.6",  # event-file writing without TensorFlow
    "matplotlib>=3.8",  # PNG plots written by eval/
    "safetensors>=0.4",  # Hugging Face checkpoints (attn.pretrained)
    "tokenizers>=0.21",  # tokenizer.json of Hugging Face checkpoints (DecodeStream since 0.21)
    "grain>=0.2.6",  # train/data's pipeline (MapDataset batching, process sharding, prefetch); ~1 MB, pure Python
]

_EXTRAS = {
    # pyarrow: the Parquet records of train/data (a ~55 MB wheel, so a test extra, not a dependency).
    "test": ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100", "ruff>=0.6", "pyarrow>=14"],
    "gpu": ["jax[cuda12]"],
    "tpu": ["jax[tpu]"],
}

setup(
    name="attn",
    version="0.1.0",
    description="Every attention mechanism of the seed papers in JAX: Flax modules, pure-JAX references, "
    "Pallas kernels, a sharded training loop and evaluation tools.",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # The trainer and the evaluation tools are the folders train/ and eval/ (`python -m train` from a checkout),
    # installed under names that a user's own train.py or eval/ cannot shadow: attn_train and attn_eval.
    packages=find_packages(include=["attn", "attn.*", "pallas_kernels", "pallas_kernels.*"])
    + [f"attn_{top}{sub}" for top in ("train", "eval") for sub in ["", *(f".{p}" for p in find_packages(top))]],
    package_dir={"attn_train": "train", "attn_eval": "eval"},
    install_requires=_REQUIRES,
    extras_require=_EXTRAS,
    # Commands that run this package's tools from any directory, even one with its own train.py or eval/
    # (`python -m train` would import those instead): eval/console_scripts.py.
    entry_points={
        "console_scripts": [
            "attn-train = attn_eval.console_scripts:train_main",
            "attn-eval = attn_eval.console_scripts:eval_main",
        ]
    },
    license="Apache-2.0",
    classifiers=["Programming Language :: Python :: 3", "Topic :: Scientific/Engineering :: Artificial Intelligence"],
)
