"""Shared fixtures: random Hugging Face GPT-2 models of several shapes, converted with the CLI."""
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def default_sigint():
    """preexec_fn for a child that a test sends Ctrl-C (SIGINT): the default disposition. A shell
    runs background jobs with SIGINT ignored and children inherit that, so a test run from
    `cmd &` would see the child ignore the signal (Python installs its KeyboardInterrupt handler
    only when SIGINT is not ignored at startup)."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_DFL)
try:
    import tinygpt  # noqa: F401  (installed with `pip install -e .`)
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(REPO / "host_tools"))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def resolve_env_paths(environ, start):
    """Make the build paths the tests read from the environment (MICROPY_BIN, TINYGPT_QEMU_FIRMWARE,
    any *_BIN or *_FIRMWARE) absolute, against `start`: the directory the user ran the tests from.
    The tests run their tools in temporary directories, where a relative path finds nothing."""
    for name, value in list(environ.items()):
        if (name.endswith("_BIN") or name.endswith("_FIRMWARE")) and value and not os.path.isabs(value):
            environ[name] = os.path.normpath(os.path.join(start, os.path.expanduser(value)))


# scripts/test changes into the repository; it passes the user's directory on in TINYGPT_USER_CWD.
resolve_env_paths(os.environ, os.environ.get("TINYGPT_USER_CWD") or os.getcwd())

# The shapes the engine must handle (issue 2): n_inner != 4*n_embd, head_dim 16 and 32, both GELU
# kinds, a vocab that is not a multiple of 16, a non-default epsilon.
SHAPES = {
    "v509_hd16_gelunew": dict(vocab_size=509, n_embd=64, n_head=4, n_layer=2, n_inner=96, n_positions=64,
                              activation="gelu_new"),
    "v300_hd32_gelu": dict(vocab_size=300, n_embd=64, n_head=2, n_layer=3, n_inner=256, n_positions=64,
                           activation="gelu"),
    "v512_e128_hd32": dict(vocab_size=512, n_embd=128, n_head=4, n_layer=2, n_inner=200, n_positions=64,
                           activation="gelu_new", layer_norm_epsilon=1e-6),
}


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """name -> (hf_dir, model_file): each shape made once per session and converted by the CLI."""
    from tinygpt import cli, testing

    cache = {}

    def get(name):
        if name not in cache:
            d = tmp_path_factory.mktemp(name)
            # init_std 0.05: 2.5x GPT-2's own initializer_range, so logits spread out (std ~0.5)
            # without the unrealistically large activations of a much wider init.
            testing.make_random_hf_model(d / "hf", seed=1, init_std=0.05, **SHAPES[name])
            out = d / "model.bin"
            assert cli.main(["convert", str(d / "hf"), "-o", str(out), "--quiet", "--no-check"]) == 0
            cache[name] = (d / "hf", out)
        return cache[name]
    return get


def pytest_configure(config):
    # Board tests carry @pytest.mark.timeout (pytest-timeout, the `test` extra); without the
    # plugin the mark is only a label.
    if not config.pluginmanager.hasplugin("timeout"):
        config.addinivalue_line("markers", "timeout(seconds): time limit (needs pytest-timeout)")
