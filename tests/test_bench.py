"""`tinygpt bench --mcu`: the JSON has its keys and plausible, self-consistent numbers, the
emulated run is bit-identical to the host engine, and a missing toolchain gives a clear error
naming the Debian packages. (The numbers themselves are a benchmark: docs/performance.md.)"""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

from tinygpt import bench, cli
from tinygpt.engine import Model
from tinygpt.presets import PRESETS
from test_mcu import require_mcu_tools

CLI = "import sys\nfrom tinygpt.cli import main\nsys.exit(main(sys.argv[1:]))\n"


def test_bench_mcu_json(capsys):
    require_mcu_tools()
    assert cli.main(["bench", "--mcu", "--preset", "tiny", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert list(results) == ["tiny"]
    r = results["tiny"]
    hp = dict(PRESETS["tiny"])
    hp["n_vocab"] = hp.pop("vocab_size")
    model_bytes = bench.random_model_bytes(hp)
    with Model(model_bytes) as m:
        info = m.info()

    assert r["bit_identical_to_host"] is True
    assert r["model_bytes"] == len(model_bytes)
    assert r["weight_bytes_per_token"] == bench.bytes_read(info, 1)
    E, I, L, V = hp["n_embd"], hp["n_inner"], hp["n_layer"], hp["n_vocab"]
    assert r["matmul_macs_per_token"] == L * (4 * E * E + 2 * E * I) + V * E
    assert r["prefill_tokens"] == 8 and r["decode_tokens"] == 6 and r["decode_positions"] == [8, 13]
    for key in ("instructions_per_token", "portable_kernel_instructions_per_token"):
        counts = r[key]
        assert set(counts) == {"decode", "prefill"}
        # every multiply-add costs at least one instruction, and no kernel needs 20
        for v in counts.values():
            assert r["matmul_macs_per_token"] < v < 20 * r["matmul_macs_per_token"], (key, counts)
    # the Cortex-M4F default (DSP) kernel executes fewer instructions than the portable one
    assert r["instructions_per_token"]["decode"] < r["portable_kernel_instructions_per_token"]["decode"]
    assert r["decode_instructions_per_mac"]["default"] == r["instructions_per_token"]["decode"] / r[
        "matmul_macs_per_token"]
    assert r["load_instructions"] > 0 and r["greedy_sample_instructions"] > 0
    assert "Cortex-M4F" in r["cpu"] and "arm-none-eabi-gcc" in r["compiler"]


def test_bench_mcu_names_missing_packages(tmp_path):
    """Without arm-none-eabi-gcc on PATH the error names the Debian packages; nothing else runs."""
    env = dict(os.environ, PATH=str(tmp_path), PYTHONPATH=str(REPO / "host_tools"))
    p = subprocess.run([sys.executable, "-c", CLI, "bench", "--mcu", "--preset", "tiny"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("tinygpt: error: arm-none-eabi-gcc not found"), p.stderr
    assert "gcc-arm-none-eabi libnewlib-arm-none-eabi" in p.stderr and "Traceback" not in p.stderr


def test_bench_mcu_refuses_n_ctx(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--mcu", "--preset", "tiny", "--n-ctx", "16"])
    assert e.value.code == 2
    assert "--n-ctx does not apply to --mcu" in capsys.readouterr().err
