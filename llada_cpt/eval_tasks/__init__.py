"""lm-evaluation-harness tasks shipped with the project (harness YAML, found via ``--include_path``).

They read the bundled files under ``llada_cpt/data/bundled/`` through
``custom_dataset`` loaders (:mod:`.docs`), so they run without a network:

* ``llada_arith``: the bundled arithmetic questions as a generation task (exact match
  of the answer, generation stops at a newline);
* ``llada_arith_mc``: the same questions as 4-way multiple choice (the answers of
  other questions are the distractors);
* ``llada_text_ppl``: rolling-window perplexity of the bundled SFT responses.

``llada-cpt lm-eval`` adds :data:`TASKS_DIR` to the harness's include paths.
"""
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent

__all__ = ["TASKS_DIR"]
