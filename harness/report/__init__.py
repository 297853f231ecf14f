"""The study's page: the finished runs read back from the tables (results), the figures drawn
from them (figures), the HTML report with its effects and verdicts (page) and its template,
and what the commands print about a study's runs (summary).

May import: harness.runs, harness.store, harness.study, harness.terminal and ddpm_engine;
never harness.launch (docs/design.md, "Layers").
"""


def __getattr__(name: str):
    # `from harness.report import build_report` keeps working, but the page (matplotlib,
    # seconds to import) loads only when it is asked for, not with every module of the folder
    if name == "build_report":
        from .page import build_report

        return build_report
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
