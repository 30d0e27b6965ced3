"""Build the optional compiled kernels (vampd/_kernels.c); everything else is in pyproject.toml.

``optional=True``: without a C compiler the install still succeeds and vampd uses its numpy
implementations (same results to float32 rounding, slower; see docs/design.md).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "vampd._kernels",
            ["vampd/_kernels.c"],
            extra_compile_args=["-O3", "-std=c99", "-fno-math-errno"],
            optional=True,
        )
    ]
)
