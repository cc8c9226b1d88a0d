"""The MOPD token advantage (training_recipe.md §7) from the student's and the teacher's logits at the response
positions, vocab-parallel correct.

For the student S and teacher T at one position, with a support set Omega of token ids:

    A = sum_{v in Omega} pibar_S(v) (log pi_T(v) - log pi_S(v)),   pibar_S(v) = pi_S(v) / sum_{u in Omega} pi_S(u)

and A = 0 when Omega is empty. The modes pick Omega:
    overlap             TopK(T) & TopK(S)  (KEYE's estimator: a restricted-support -KL(S || T))
    student_only        TopK(S)            (the teacher scores the student's top-k ids)
    teacher_on_student  TopK(T)            (the student is read at the teacher's top-k ids; Miles' only-teacher)
    sampled_token       {y_t}, weight 1    (MiMo's k1: log pi_T(y_t) - log pi_S(y_t))
The advantage is a constant of the loss (everything here runs under no_grad).

Vocab parallelism: `logits` may be this rank's shard [T, V/tp] of a vocab split over `group` (ids
vocab_start .. vocab_start + V/tp - 1). The log-softmax uses the global logsumexp (a max and a sum over ranks), the
top-k is a local top-k followed by a gather of the k candidates of every rank and a top-k of those, and a log-prob
at a global id is read on the rank that owns it and summed over ranks. The pure pieces (`shard_*`, `merge_*`) are
what the collectives compose, so a test can split a vocab by hand and merge.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

# -- pure pieces over one vocab shard ------------------------------------------------------------------------------


def shard_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """[T] logsumexp over this shard's vocab."""
    return torch.logsumexp(logits, dim=-1)


def merge_logsumexp(parts: torch.Tensor) -> torch.Tensor:
    """[n, T] per-shard logsumexps -> [T] the whole vocab's."""
    return torch.logsumexp(parts, dim=0)


def shard_topk(logp: torch.Tensor, vocab_start: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This shard's top-min(k, width) log-probs and their global ids, [T, k'] each."""
    values, ids = torch.topk(logp, min(k, logp.shape[-1]), dim=-1)
    return values, ids + vocab_start


def merge_topk(values: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k over every shard's candidates, concatenated on the last dim: [T, n*k'] -> [T, min(k, n*k')]."""
    best, at = torch.topk(values, min(k, values.shape[-1]), dim=-1)
    return best, ids.gather(-1, at)


def shard_values_at(logp: torch.Tensor, vocab_start: int, ids: torch.Tensor) -> torch.Tensor:
    """[T, m] logp at the global `ids` this shard owns, 0 at the others (summing over shards gives every value)."""
    local = ids - vocab_start
    owned = (local >= 0) & (local < logp.shape[-1])
    return torch.where(owned, logp.gather(-1, local.clamp(0, logp.shape[-1] - 1)), torch.zeros((), dtype=logp.dtype))


# -- the collectives ------------------------------------------------------------------------------------------------


class VocabShard:
    """Log-probs of one rank's vocab shard: `group` None (or of size 1) means this rank holds the whole vocab."""

    def __init__(self, logits: torch.Tensor, vocab_start: int = 0, group=None):
        self.vocab_start = vocab_start
        self.group = group if group is not None and dist.get_world_size(group) > 1 else None
        lse = shard_logsumexp(logits)
        if self.group is not None:
            parts = [torch.empty_like(lse) for _ in range(dist.get_world_size(self.group))]
            dist.all_gather(parts, lse.contiguous(), group=self.group)
            lse = merge_logsumexp(torch.stack(parts))
        self.logp = logits - lse[:, None]

    def _sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.group is not None:
            dist.all_reduce(value, group=self.group)
        return value

    def topk(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        values, ids = shard_topk(self.logp, self.vocab_start, k)
        if self.group is not None:
            if values.shape[-1] < k:  # a shard narrower than k: pad so every rank gathers k candidates
                pad = k - values.shape[-1]
                values = torch.nn.functional.pad(values, (0, pad), value=float("-inf"))
                ids = torch.nn.functional.pad(ids, (0, pad), value=-1)
            world = dist.get_world_size(self.group)
            all_values = [torch.empty_like(values) for _ in range(world)]
            all_ids = [torch.empty_like(ids) for _ in range(world)]
            dist.all_gather(all_values, values.contiguous(), group=self.group)
            dist.all_gather(all_ids, ids.contiguous(), group=self.group)
            values, ids = torch.cat(all_values, dim=-1), torch.cat(all_ids, dim=-1)
        return merge_topk(values, ids, k)

    def at(self, ids: torch.Tensor) -> torch.Tensor:
        return self._sum(shard_values_at(self.logp, self.vocab_start, ids))

    def kl_to(self, other: VocabShard) -> torch.Tensor:
        """[T] KL(self || other) over the whole vocab."""
        return self._sum((self.logp.exp() * (self.logp - other.logp)).sum(-1))


# -- the advantage ---------------------------------------------------------------------------------------------------


@dataclass
class TokenScores:
    """Per response position: the advantage and what the per-teacher metrics need."""

    advantage: torch.Tensor  # [T] A_t (before category scaling and the repetition penalty)
    support: torch.Tensor  # [T] |Omega_t| (1 for sampled_token)
    overlap: torch.Tensor  # [T] |TopK(T) & TopK(S)|, whatever the mode
    student_mass: torch.Tensor  # [T] sum of pi_S over TopK(S)
    teacher_mass: torch.Tensor  # [T] sum of pi_T over TopK(T)
    reverse_kl: torch.Tensor  # [T] KL(pi_S || pi_T) over the whole vocab

    @staticmethod
    def cat(parts: list[TokenScores]) -> TokenScores:
        return TokenScores(*(torch.cat([getattr(p, f) for p in parts]) for f in TokenScores.__dataclass_fields__))


def weighted_gap(student: torch.Tensor, teacher: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """[T] sum over the members of pibar_S (teacher - student), pibar_S renormalised on the members; 0 for none."""
    logits = student.masked_fill(~member, float("-inf"))
    empty = ~member.any(-1)
    weights = torch.softmax(logits.masked_fill(empty[:, None], 0.0), dim=-1) * member
    gap = torch.where(member, teacher - student, torch.zeros((), dtype=student.dtype))
    return torch.where(empty, torch.zeros((), dtype=student.dtype), (weights * gap).sum(-1))


def _scores(student: VocabShard, teacher: VocabShard, sampled: torch.Tensor, mode: str, k: int) -> TokenScores:
    s_values, s_ids = student.topk(k)
    t_values, t_ids = teacher.topk(k)
    in_teacher = (s_ids[:, :, None] == t_ids[:, None, :]).any(-1)  # [T, k]: student top-k ids also in TopK(T)
    overlap = in_teacher.sum(-1)
    if mode == "overlap":
        advantage = weighted_gap(s_values, teacher.at(s_ids), in_teacher)
        support = overlap
    elif mode == "student_only":
        advantage = weighted_gap(s_values, teacher.at(s_ids), torch.ones_like(in_teacher))
        support = torch.full_like(overlap, s_ids.shape[-1])
    elif mode == "teacher_on_student":
        advantage = weighted_gap(
            student.at(t_ids), t_values, torch.ones(t_ids.shape, dtype=torch.bool, device=t_ids.device)
        )
        support = torch.full_like(overlap, t_ids.shape[-1])
    elif mode == "sampled_token":
        ids = sampled[:, None]
        advantage = (teacher.at(ids) - student.at(ids))[:, 0]
        support = torch.ones_like(overlap)
    else:
        raise ValueError(f"mopd.mode={mode!r} is not an advantage mode")
    return TokenScores(
        advantage=advantage,
        support=support,
        overlap=overlap,
        student_mass=s_values.exp().sum(-1),
        teacher_mass=t_values.exp().sum(-1),
        reverse_kl=student.kl_to(teacher),
    )


@torch.no_grad()
def token_scores(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    sampled: torch.Tensor,
    mode: str,
    k: int,
    vocab_start: int = 0,
    group=None,
    chunk: int = 1024,
) -> TokenScores:
    """student_logits, teacher_logits: [T, V_local] at the same T response positions (the same vocab shard);
    sampled: [T] the student's sampled ids (global). Positions are scored `chunk` at a time (full-vocab float copies
    of a chunk are live at once). Collective over `group` when it has more than one rank."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} != teacher's {tuple(teacher_logits.shape)}")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    parts = []
    for at in range(0, student_logits.shape[0], chunk):
        rows = slice(at, at + chunk)
        s = VocabShard(student_logits[rows].to(dtype), vocab_start, group)
        t = VocabShard(teacher_logits[rows].to(dtype), vocab_start, group)
        parts.append(_scores(s, t, sampled[rows], mode, k))
    if not parts:
        empty = student_logits.new_zeros(0, dtype=dtype)
        return TokenScores(empty, *(empty.long() for _ in range(2)), empty, empty, empty)
    return TokenScores.cat(parts)


@torch.no_grad()
def support_set(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mode: str, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, k] the Omega ids of a support-set mode (-1 where a slot is not in Omega) and log pi_T there (0 at -1);
    one rank holds the whole vocab."""
    if mode not in ("overlap", "student_only", "teacher_on_student"):
        raise ValueError(f"support set: mode={mode!r} has no support set")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    logp = torch.log_softmax(student_logits.to(dtype), -1)
    teacher = torch.log_softmax(teacher_logits.to(dtype), -1)
    s_ids = torch.topk(logp, k, -1).indices
    t_ids = torch.topk(teacher, k, -1).indices
    if mode == "teacher_on_student":
        ids = t_ids
    elif mode == "student_only":
        ids = s_ids
    else:
        ids = torch.where((s_ids[:, :, None] == t_ids[:, None, :]).any(-1), s_ids, -1)
    return ids, torch.where(ids >= 0, teacher.gather(-1, ids.clamp(min=0)), 0.0)


def support_surrogate(student_logp: torch.Tensor, ids: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """[T] the support form of the MOPD loss per position, from the student's [T, V] log-probs (with gradient),
    Omega's ids ([T, k], -1 outside) and the teacher's log-probs there (constants):

        L_t = -sum_{v in Omega} sg[pibar_S(v) (log pi_T(v) - log pi_S(v))] log pi_S(v)

    The sampled-token (k1) gradient taken in expectation over Omega under pibar_S instead of at the sampled token:
    its weights sum to A_t, it is 0 when the student equals the teacher on Omega, and with Omega = the whole
    vocab its gradient is exactly grad KL(pi_S || pi_T). 0 for an empty Omega."""
    member = ids >= 0
    at = student_logp.gather(-1, ids.clamp(min=0))
    with torch.no_grad():
        empty = ~member.any(-1)
        pbar = torch.softmax(at.masked_fill(~member, float("-inf")).masked_fill(empty[:, None], 0.0), -1) * member
        weight = pbar * torch.where(member, teacher_logp.to(at.dtype) - at, torch.zeros((), dtype=at.dtype))
    return -(weight * at).sum(-1)


def support_kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mode: str, k: int) -> torch.Tensor:
    """[T] the distribution-level alternative to the sampled-token loss in a support-set mode (the ablation of
    training_recipe.md §7): L_t = -A_t = sum_{v in Omega} pibar_S(v) (log pi_S(v) - log pi_T(v)) as a function of
    the student's logits, with Omega and the teacher held constant. Its gradient moves the student's distribution at
    every position, which the sampled-token loss with a state-only A_t cannot (objectives/mopd.py). One rank holds
    the whole vocab here; the objective does not use it yet (it needs the student's logits in the loss)."""
    if mode not in ("overlap", "student_only", "teacher_on_student"):
        raise ValueError(f"support_kl_loss: mode={mode!r} has no support set")
    logp = torch.log_softmax(student_logits.float() if student_logits.dtype == torch.half else student_logits, -1)
    with torch.no_grad():
        teacher = torch.log_softmax(teacher_logits.to(logp.dtype), -1)
        s_ids = torch.topk(logp, k, -1).indices
        t_ids = torch.topk(teacher, k, -1).indices
        if mode == "teacher_on_student":
            ids, member = t_ids, torch.ones(t_ids.shape, dtype=torch.bool, device=t_ids.device)
        else:
            ids = s_ids
            member = (
                (s_ids[:, :, None] == t_ids[:, None, :]).any(-1)
                if mode == "overlap"
                else torch.ones_like(s_ids, dtype=torch.bool)
            )
    return -weighted_gap(logp.gather(-1, ids), teacher.gather(-1, ids), member)
