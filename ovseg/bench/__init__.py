"""Leaderboard reproduction: paper metafiles, evaluation suites, generated result tables.

- :mod:`ovseg.bench.metafile`: ``benchmarks/metafiles/*.yaml`` (one per method variant: paper, config,
  protocol, the paper's numbers with their sources, weights, hardware) — loading and validation.
- :mod:`ovseg.bench.citations`: checks each cited number against the document it cites.
- :mod:`ovseg.bench.suite`: ``benchmarks/suites/*.yaml`` — a suite's entries and their runs.
- :mod:`ovseg.bench.suite_runner`: runs every evaluation of a suite, resumable per entry and per dataset, one
  ``results.json`` per entry (:mod:`ovseg.bench.parts` merges the per-dataset files).
- :mod:`ovseg.bench.fingerprint`: what decides whether finished results are reused (settings, files, hashes).
- :mod:`ovseg.bench.report`: ``RESULTS.md`` and ``results.csv`` from results files + metafiles.
- :mod:`ovseg.bench.commands`: ``ovseg bench run | report | validate``.
"""

from ovseg.bench.metafile import Evaluation, Metafile, MetafileError, load_metafile, load_metafiles

__all__ = ["Evaluation", "Metafile", "MetafileError", "load_metafile", "load_metafiles"]
