"""Which packages the wheel holds (everything else is in pyproject.toml).

Every package under f2llm/ is found, not listed, so a new subpackage cannot be left out of the wheel. Two top-level
rooms are installed inside f2llm: kernels/ as f2llm.kernels (a top-level package named `kernels` would be mistaken
by transformers for Hugging Face's `kernels` library) and train/configs/ as f2llm.configs (the shipped configs, so
that `f2llm train --config f2llm-0.6b` works from a wheel). tests/package/test_wheel.py builds the wheel and runs it.
"""

from setuptools import find_packages, setup

ROOMS = {"f2llm.kernels": "kernels", "f2llm.configs": "train/configs"}

setup(
    packages=[*find_packages(include=["f2llm", "f2llm.*"]), *ROOMS],
    package_dir={"f2llm": "f2llm", **ROOMS},
)
