"""Integrations of nvfp4lib into inference engines.

- :mod:`nvfp4lib.integrations.vllm`: the vLLM plugin (entry point ``vllm.general_plugins``). Importing
  the module does not import vLLM; only :func:`nvfp4lib.integrations.vllm.register` and the vLLM
  classes it builds do, so the post-load and apply math there also runs on hosts without vLLM.
"""
