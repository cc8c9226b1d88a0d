"""One rank of a run that continues another placement's checkpoint (started by torchrun from test_layouts.py).

argv: out_dir, resume_dir (a run directory holding the step-1 checkpoint, resumed with checkpoint.resume), then
config overrides. The trainer (keye_train/training build_trainer) resumes it and takes two steps (steps 2 and 3 of
the stream); then a second trainer starts from the same checkpoint's weights (checkpoint.init_from) in an empty run
directory and takes one step (the first batch again). The metrics owner writes their losses and grad norms.
"""

import json
import sys
from pathlib import Path

from parallel import cpu_compat

cpu_compat.install()

from megatron.core import parallel_state  # noqa: E402

from keye_train.config.compose import load_config  # noqa: E402
from keye_train.training import build_trainer  # noqa: E402
from parallel import context  # noqa: E402
from parallel.layout import destroy_process_groups  # noqa: E402

CONSTANT_LR = ["optim.warmup_steps=0", "optim.decay_style=constant", "train.steps=3", "checkpoint.interval=0"]


def main(out_dir: str, resume_dir: str, overrides: list[str]):
    out = Path(out_dir)
    cfg = load_config([*overrides, *CONSTANT_LR, f"run_dir={resume_dir}", "checkpoint.resume=true"])
    trainer = build_trainer(cfg)
    resumed_at = trainer.step
    resumed = [trainer.train_step() for _ in range(2)]
    trainer.data.close()
    owner = trainer.is_metrics_owner()
    context.teardown()
    parallel_state.destroy_model_parallel()  # the second trainer builds megatron's groups again

    fresh = out / "init_from_run"
    cfg = load_config(
        [*overrides, *CONSTANT_LR, f"run_dir={fresh}", "checkpoint.resume=false", f"checkpoint.init_from={resume_dir}"]
    )
    trainer = build_trainer(cfg)
    started_at = trainer.step
    first = trainer.train_step()
    trainer.data.close()
    if owner:
        report = {
            "resumed_at": resumed_at,
            "resumed_losses": [m["loss"] for m in resumed],
            "resumed_grad_norms": [m["grad_norm"] for m in resumed],
            "init_from_at": started_at,
            "init_from_loss": first["loss"],
        }
        (out / "load_report.json").write_text(json.dumps(report))
    destroy_process_groups()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
