"""The ``greenroute`` command line: one lazily imported module per subcommand.

:mod:`cli.main` builds the parser from argparse alone; only the chosen subcommand's module is
imported, so ``greenroute serve`` imports neither the build pipeline nor the benchmarks.
"""
