"""keras_accum's benchmark suite: `python -m benchmarks [--quick] [--out DIR]`.

Not part of the installed package. See benchmarks/README.md.
"""
