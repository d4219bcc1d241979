"""spectraformer-jax: random-feature (linearised) attention for JAX/Flax and the LRA study."""

from setuptools import find_packages, setup

# The public repository. The notebooks' "Open in Colab" badges and clone cells and the README's
# clone command spell it out too; tests/test_notebook.py checks that they agree with this.
REPOSITORY = "https://github.com/spectraformer-jax/spectraformer-jax"

with open("README.md", encoding="utf-8") as f:
  long_description = f.read()

setup(
    name="spectraformer-jax",
    version="0.1.0",
    description="Random-feature attention (component function x weight matrix) for JAX/Flax, "
    "with the Long Range Arena benchmarks.",
    long_description=long_description,
    long_description_content_type="text/markdown",
    url=REPOSITORY,
    packages=find_packages(include=["spectraformer_jax", "spectraformer_jax.*",
                                    "lra_benchmarks", "lra_benchmarks.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax",
        "chex",
        "ml-collections",
        "absl-py",
        "tensorflow-datasets",
        "orbax-checkpoint",
        "numpy",
        "scipy",
        "tensorboardX",
        "tqdm",
        "pillow",
        "importlib_resources",
    ],
    extras_require={
        "bench": ["matplotlib"],
        "test": ["pytest", "pytest-xdist", "matplotlib"],
        "tf": ["tensorflow-cpu"],
        "tensorboard": ["tensorboard"],
    },
    license="Apache-2.0",
)
