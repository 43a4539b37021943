"""Build time: make the ladder (``pipeline/``: sources, export, quantization, evaluation) and
train its student (``train/``). Needs the ``build`` extra (torch, transformers, optimum);
the serving path never imports it."""
