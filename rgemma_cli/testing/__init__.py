"""Support code for the tests, the benchmarks and the fixture scripts (not used by rgemma itself).

    synth       random checkpoints in the exact Hugging Face layout (NumPy only), from the tiny
                parity configs to 2B / 9B shapes streamed to disk
    references  transformers and Google's recurrentgemma run on such a checkpoint (needs the
                `reference` extra; imported lazily)

Importable wherever rgemma is installed (`from rgemma_cli.testing import synth`), as numpy.testing
is: the tests and bench/ need no sys.path edits.
"""
