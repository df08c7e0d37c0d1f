"""The run report: one self-contained HTML file per run directory, and the same headline
numbers as a table in the terminal.

- `load`: reading a run directory (`load_run` -> `RunData`); nothing in it is required;
- `text`: numbers as text; `verdict`: the headline verdict, worded once for every output;
- `reward_model`: did the reward model learn its labels; `headline`: the headline rows;
- `html` (+ `report.css`, `plots`): the HTML page; `terminal`: the terminal table.
"""

from openrlaif.evaluation.report.html import REPORT_FILE, build_report, pick_samples, render_html
from openrlaif.evaluation.report.load import ReportError, RunData, load_run
from openrlaif.evaluation.report.reward_model import RewardModelCheck, check_reward_model
from openrlaif.evaluation.report.terminal import print_summary
from openrlaif.evaluation.report.verdict import Verdict, verdict

__all__ = [
    "REPORT_FILE",
    "ReportError",
    "RewardModelCheck",
    "RunData",
    "Verdict",
    "build_report",
    "check_reward_model",
    "load_run",
    "pick_samples",
    "print_summary",
    "render_html",
    "verdict",
]
