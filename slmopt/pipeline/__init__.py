"""The pass pipeline: the Pass contract and registry, pipeline strings, the PassContext and PassManager.

Modules: ``pass_base`` (Pass, reports, registry), ``options`` (option value codec), ``parse`` (pipeline
strings), ``instruments`` (dump/time/verify hooks) and ``manager`` (PassContext, PassManager).

Example:
    >>> from slmopt.pipeline import parse_pipeline
    >>> # PassManager(parse_pipeline("mask-2to4{method=wanda}")).run(program, PassContext(calib=tokens))
"""

from __future__ import annotations

from slmopt.pipeline.instruments import DumpGraph, Instrument, TimePasses, VerifyEach
from slmopt.pipeline.manager import PassContext, PassManager
from slmopt.pipeline.options import build_config, format_options, format_value
from slmopt.pipeline.parse import Pipeline, parse_pipeline
from slmopt.pipeline.pass_base import (
    Change,
    Pass,
    PassReport,
    PassResult,
    all_pass_names,
    get_pass_class,
    register_pass,
)

__all__ = [
    "Change",
    "DumpGraph",
    "Instrument",
    "Pass",
    "PassContext",
    "PassManager",
    "PassReport",
    "PassResult",
    "Pipeline",
    "TimePasses",
    "VerifyEach",
    "all_pass_names",
    "build_config",
    "format_options",
    "format_value",
    "get_pass_class",
    "parse_pipeline",
    "register_pass",
]
