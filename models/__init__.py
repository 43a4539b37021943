"""The model ladder, split by audience: ``runtime/`` runs built variants (what serving
imports), ``build/`` makes them (export, quantization, training); ``data/`` and ``default/``
hold the committed held-out text, task set and the default student's own weights."""

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent  # models/: data/ and default/ live here
