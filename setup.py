"""Build the optional compiled HUF decoder (``edge_agent.codec._hufc``).

Everything else about the package is in pyproject.toml. The extension is optional: where
it cannot be built (no C compiler or Python headers), the install goes on and the codec
decodes HUF planes with numpy instead, with the same results (docs/codec.md).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "edge_agent.codec._hufc",
            ["edge_agent/codec/_hufc.c"],
            optional=True,
        )
    ]
)
