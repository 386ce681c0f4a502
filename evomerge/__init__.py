"""evomerge: evolutionary search for LLM merge recipes.

The package is laid out along the data flow (see README):
``config`` -> ``space`` -> ``drivers`` -> ``recipe`` -> ``worker`` (``merge`` + ``evaluate``)
-> ``store`` -> ``export``. ``merge`` is also usable on its own as a mergekit-compatible engine.

Importing the package is deliberately cheap: heavy libraries (transformers, lm-eval, ray) are
imported only by the modules that need them, so ``evomerge merge`` starts fast.
"""

__version__ = "0.1.0"
