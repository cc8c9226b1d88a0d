"""Evaluation: TimeLens-style temporal grounding (`grounding.py`) and video multiple-choice accuracy (`mcq.py`),
as pure functions over (responses, references) and runners that take a `generate` callable (the rollout engine,
or any model behind `list[EvalRequest] -> list[str]`)."""
