"""saelab: toy models of superposition, sparse autoencoders and feature dashboards in one toolkit.

The workflow runs one way through the subpackages: `saelab.toy` (toy models and their geometry) →
`saelab.sae` (sparse autoencoders) → `saelab.models` (language-model activations) → `saelab.dashboard`.
"""

from saelab.errors import SaelabError

__version__ = "0.1.0"
__all__ = ["SaelabError", "__version__"]
