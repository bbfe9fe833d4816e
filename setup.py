"""Packaging for deepmomentum."""

import re
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
VERSION = re.search(r'^__version__ = "([^"]+)"', (ROOT / "deepmomentum" / "__init__.py").read_text(),
                    re.M).group(1)
TRITON = 'triton>=3.4; platform_system == "Linux"'

setup(
    name="deepmomentum",
    version=VERSION,
    description="Deep-memory optimizers for PyTorch (Nested Learning): associative, delta-rule, "
                "preconditioned and MLP momentum, Muon, M3, multi-frequency updates",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    license_files=["LICENSE"],
    packages=find_packages(include=["deepmomentum", "deepmomentum.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "numpy",
    ],
    extras_require={
        # Triton is optional: torch's CUDA wheels already bring it, and without it the package
        # runs its torch paths (kernels.triton_available()). This extra is for CPU-only torch
        # installs that want the kernels under TRITON_INTERPRET=1.
        "triton": [TRITON],
        # the benchmark smoke tests and the kernels' interpreter tests run in CI, so the test
        # extra carries what they import
        "test": ["pytest>=7", "hypothesis>=6.100", "pytest-benchmark>=4", "matplotlib",
                 "scikit-learn", TRITON],
        "bench": ["matplotlib", "scikit-learn", "tqdm"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Intended Audience :: Science/Research",
    ],
)
