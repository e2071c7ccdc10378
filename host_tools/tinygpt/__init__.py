"""tinygpt host tools: the C engine binding (Model), converter, numpy reference, training, CLI.

``tinygpt.Model`` has the same API as the MicroPython module ``tinygpt`` on the board, so the
device scripts in py/ run unchanged on a PC.
"""
__version__ = "0.1.0"


def __getattr__(name):
    # Lazy: importing tinygpt for the CLI or the converter must not need the compiled engine.
    if name == "Model":
        from .engine import Model
        return Model
    if name == "FORMAT_VERSION":  # as the board's module has it
        from .modelfile import FORMAT_VERSION
        return FORMAT_VERSION
    raise AttributeError("module 'tinygpt' has no attribute %r" % name)
