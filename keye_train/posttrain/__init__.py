"""Post-training: rollouts, RL objectives, rewards, evaluation, distillation."""
