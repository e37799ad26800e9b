"""Sphinx configuration for parakeet-server's documentation.

Build it with warnings as errors::

    sphinx-build -W -b html docs docs/_build/html
"""

import os
import re

project = "parakeet-server"
author = "parakeet-server contributors"
copyright = "parakeet-server contributors"

# The package's version, read without importing it (and so torch and NeMo).
with open(os.path.join(os.path.dirname(__file__), "..", "parakeet", "__init__.py")) as f:
    release = re.search(r'__version__ = "([^"]+)"', f.read()).group(1)
version = release

# Plain reStructuredText only: no extension, nothing fetched from the network.
extensions = []

root_doc = "index"
exclude_patterns = ["_build"]
html_theme = "alabaster"
