"""The package list for setuptools (everything else is in pyproject.toml).

The model bundles live in the repo's ``models/`` folder, where ``make models`` and the import scripts write them. The
wheel carries that folder as the package ``edge_agent.bundles.shipped`` (the bundles it holds are chosen by
``package-data`` in pyproject.toml), so ``pip install edge-agent`` alone gives an agent with its models:
``default_models_dir()`` looks there first, and in ``models/`` when it runs from a checkout.
"""

from setuptools import find_namespace_packages, setup

SHIPPED = "edge_agent.bundles.shipped"

setup(
    packages=[*find_namespace_packages(include=["edge_agent", "edge_agent.*"]), SHIPPED],
    package_dir={SHIPPED: "models"},
)
