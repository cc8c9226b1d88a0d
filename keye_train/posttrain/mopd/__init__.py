"""MOPD, multi-teacher on-policy distillation (training_recipe.md §7):

    advantage   the token advantage in four modes, vocab-parallel (and `support_kl_loss`, the distribution form)
    categories  the token-category tagger (format / perception / reasoning / answer)
    repetition  the collapse detector and the localized repetition penalty
    shaping     raw advantage -> the A^_t the loss uses (category scale, repetition tail, SPRR mask)
    teachers    routing by (modality, task), one instance per distinct weights, in-process forward-only scoring
    sprr        the teacher's re-rendered context + the student's ids verbatim, and the alignment checks
    scoring     one pass over a step's responses: route, align, score, shape, count
    metrics     the per-teacher metrics
    batch       MOPDBatch, the packed micro-batch with token advantages
The loss is keye_train/training/objectives/mopd.py; the config keye_train/config/mopd.py (recipes/mopd/)."""
