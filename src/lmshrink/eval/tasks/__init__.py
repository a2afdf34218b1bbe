"""Zero-shot task accuracy (PIQA, ARC, BoolQ, WinoGrande, LAMBADA, SST-2, ...) scored as lm-evaluation-harness
scores it: same prompts, same tokenization split, same acc / acc_norm / perplexity."""

from .datafiles import DATA_ENV, load_docs, resolve_data_dir
from .registry import TASKS, list_tasks, resolve_task_names
from .runner import evaluate_tasks, score_task
from .scoring import encode_pair, loglikelihoods, max_length_of
from .spec import Item, TaskSpec

__all__ = ["TASKS", "DATA_ENV", "Item", "TaskSpec", "encode_pair", "evaluate_tasks", "list_tasks", "load_docs",
           "loglikelihoods", "max_length_of", "resolve_data_dir", "resolve_task_names", "score_task"]
