"""The Python API behind the CLI: one function per command, each one recorded run in the store.

Each pipeline lives in its own module under `epcli/pipelines/`; this module gathers their entry points so
that scripts can write `from epcli import api; api.attack(model="vit", store=store)`.
"""

from epcli.pipelines.attack import attack, compare, mcnemar_p
from epcli.pipelines.common import NORMS, Progress, check_eps, eps_label, parse_eps, resolve_device, resolve_model
from epcli.pipelines.corrupt import corrupt, export_corruptions
from epcli.pipelines.demo import DEMO, demo
from epcli.pipelines.report import report
from epcli.pipelines.train import train

__all__ = ["DEMO", "NORMS", "Progress", "attack", "check_eps", "compare", "corrupt", "demo", "eps_label",
           "export_corruptions", "mcnemar_p", "parse_eps", "report", "resolve_device", "resolve_model", "train"]
