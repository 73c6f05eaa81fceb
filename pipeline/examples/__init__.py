"""Small, offline example specs used by the docs, tests and benchmarks.

- :mod:`kdcache.pipeline.examples.mnist1d` -- ``MNIST1D`` dataset with ``train`` (4,000 labeled),
  ``test`` (1,000), ``transfer`` (unlabeled, freshly generated) and ``train+transfer`` splits,
  generated locally with ``mnist1d.data.make_dataset`` and cached on disk.
- :mod:`kdcache.pipeline.examples.models` -- ``TeacherCNN`` (hookable ``features``), and the students
  ``StudentMLP`` (hookable ``hidden``) and ``StudentCNN`` (hookable ``features``).
- :mod:`kdcache.pipeline.examples.text` -- ``TextBlocks``: fixed-length token blocks of the Python
  sources of the pinned torch (``train`` / ``validation`` by file), tokenized with a byte-level BPE
  trained offline on the train split and cached on disk.
- :mod:`kdcache.pipeline.examples.lm` -- causal LMs: ``gpt2`` (a ``transformers`` GPT-2 from a
  config, seeded), ``from_folder`` (a saved causal LM, local files only) and ``TinyCausalLM``.
"""
