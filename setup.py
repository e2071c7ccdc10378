"""Builds the C engine (usercmodule/tinygpt) into tinygpt._engine; everything else is in pyproject.toml."""
from setuptools import Extension, setup

ENGINE = "usercmodule/tinygpt"

setup(
    ext_modules=[
        Extension(
            "tinygpt._engine",
            sources=[f"{ENGINE}/tinygpt.c", f"{ENGINE}/tg_port_posix.c", "host_tools/tinygpt/_shim.c"],
            include_dirs=[ENGINE],
            # -ffp-contract=off: the format spec fixes every float32 rounding (no fused multiply-add).
            extra_compile_args=["-std=c99", "-O3", "-ffp-contract=off", "-Wall", "-Wextra"],
        )
    ]
)
