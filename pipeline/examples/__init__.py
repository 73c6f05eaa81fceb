"""Small, offline example specs used by the docs, tests and benchmarks.

- :mod:`kdcache.pipeline.examples.mnist1d` -- ``MNIST1D`` dataset with ``train`` (4,000 labeled),
  ``test`` (1,000), ``transfer`` (unlabeled, freshly generated) and ``train+transfer`` splits,
  generated locally with ``mnist1d.data.make_dataset`` and cached on disk.
- :mod:`kdcache.pipeline.examples.models` -- ``TeacherCNN`` (hookable ``features``), and the students
  ``StudentMLP`` (hookable ``hidden``) and ``StudentCNN`` (hookable ``features``).
"""
