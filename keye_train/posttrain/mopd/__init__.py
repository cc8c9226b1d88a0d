"""MOPD, multi-teacher on-policy distillation (training_recipe.md §7): the token advantage (`advantage`), token
categories (`categories`), the localized repetition penalty (`repetition`), teachers and routing (`teachers`),
SPRR re-rendering and its checks (`sprr`) and the per-teacher metrics (`metrics`). The loss is
keye_train/training/objectives/mopd.py."""
