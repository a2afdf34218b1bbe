"""The task table and task-name resolution."""

from __future__ import annotations

from lmshrink.core.errors import LmshrinkError
from lmshrink.eval.tasks.arc import ARC_CHALLENGE, ARC_EASY, OPENBOOKQA
from lmshrink.eval.tasks.boolq import BOOLQ
from lmshrink.eval.tasks.hellaswag import HELLASWAG
from lmshrink.eval.tasks.lambada import LAMBADA_OPENAI
from lmshrink.eval.tasks.piqa import PIQA
from lmshrink.eval.tasks.spec import TaskSpec
from lmshrink.eval.tasks.sst2 import SST2
from lmshrink.eval.tasks.winogrande import WINOGRANDE

TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    PIQA, ARC_EASY, BOOLQ, WINOGRANDE, LAMBADA_OPENAI, SST2, ARC_CHALLENGE, OPENBOOKQA, HELLASWAG)}


def list_tasks() -> list[str]:
    """Every task name, the ones with data in the shared data folder first."""
    return list(TASKS)


def resolve_task_names(tasks: str | list[str]) -> list[str]:
    """Task names from a list or comma-separated string; "all" means the tasks with shared data.

    Raises LmshrinkError listing the known tasks when a name is unknown.
    """
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t and t.strip()]
    resolved: list[str] = []
    for name in names:
        expanded = [n for n, spec in TASKS.items() if spec.shared] if name.lower() == "all" else [name.lower()]
        resolved.extend(n for n in expanded if n not in resolved)
    unknown = [n for n in resolved if n not in TASKS]
    if unknown or not resolved:
        known = ", ".join(list_tasks())
        what = f"unknown task(s): {', '.join(unknown)}" if unknown else "no task named"
        raise LmshrinkError(f"{what}; known tasks: {known}", fix=f"pass --tasks with names from: {known}, or 'all'")
    return resolved
