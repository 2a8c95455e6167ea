"""Integrations of kvengine with model libraries.

``kvengine.integrations.transformers`` — ``KVEngineCache`` (a transformers ``Cache`` whose layers are packed
``QuantizedKVCache``) and the ``"kvengine"`` attention implementation.  Import it (or call ``register()``) before
``model.set_attn_implementation("kvengine")``.
"""
