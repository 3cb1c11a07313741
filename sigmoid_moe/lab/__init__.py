"""Balance lab: bias-correction dynamics at DeepSeek-V3 scale, without a model.

``sweep`` (:mod:`.simulate`) runs routing + bias updates over synthetic
(:mod:`.streams`) or explicit logits in one ``lax.scan``; :mod:`.rules` holds the control
laws; :mod:`.report` the summaries, tables and plots; :mod:`.cli` the ``simulate`` command.
"""

from sigmoid_moe.lab.report import Summary, markdown_table, save_plots, save_run, summarize
from sigmoid_moe.lab.rules import RULES
from sigmoid_moe.lab.simulate import Trajectory, grid, sweep
from sigmoid_moe.lab.streams import StreamConfig, StreamParams, init_stream, stream_logits

__all__ = [
    "RULES",
    "StreamConfig",
    "StreamParams",
    "Summary",
    "Trajectory",
    "grid",
    "init_stream",
    "markdown_table",
    "save_plots",
    "save_run",
    "stream_logits",
    "summarize",
    "sweep",
]
