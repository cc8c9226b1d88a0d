"""The MOPD stages' data source (the loop's `DataSource`, training_recipe.md §7): the RL data source's prompts and
rollouts on the live student, then per response: route by the record's (modality, task) tags to a teacher,
re-render the teacher's context with SPRR and append the student's ids verbatim, score the teacher forward-only at
the response positions, turn the student/teacher logits into shaped token advantages, pack `MOPDBatch`es.

Per step every rank rolls out its share of `rl.prompts_per_step` prompts, `rl.group_size` responses each (no
dynamic sampling: every response carries a dense signal), runs the student once per response (no_grad, eval) for
its logits at the response positions, then the teachers in the order of mopd.teachers, each distinct instance
loaded once (`TeacherPool`, one resident at a time). The forwards are collective under EP (the MoE all-to-all),
so ranks step in lockstep: every forward is padded to train.seq_length and a rank with fewer responses routed to
a teacher than another runs pad forwards. A response SPRR rejects (or whose teacher rows miss R) is still packed,
with A = 0, and counted by reason.

Teachers here share the student's tokenizer, chat template and media budget (data.*): their renderers are the
student's; a per-teacher processor is not configurable yet. Tags: the record's `modality` (else video / image /
text from its media key) and `task` (else "")."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist

from data_pipeline.batch import PackedBatch
from keye_train.posttrain.batch import TextResponse
from keye_train.posttrain.gspo import group_advantages
from keye_train.posttrain.mopd.advantage import support_set, token_scores
from keye_train.posttrain.mopd.batch import MOPDBatch, pack_mopd_responses
from keye_train.posttrain.mopd.categories import category_weights, tag_response, tagger_for
from keye_train.posttrain.mopd.metrics import SUMS, TeacherMetrics
from keye_train.posttrain.mopd.repetition import repetition_penalty
from keye_train.posttrain.mopd.shaping import shaped_advantages
from keye_train.posttrain.mopd.sprr import REASONS, ChatRenderer, MismatchCounter, RenderedContext, teacher_sequence
from keye_train.posttrain.mopd.teachers import (
    RoutingTable,
    SampleTags,
    TeacherPool,
    forward_logits,
    load_in_process_teacher,
    weights_key,
)
from keye_train.posttrain.rl_data import Group, PromptRecord, RLDataSource, empty_pack


def sample_tags(record: dict) -> SampleTags:
    modality = record.get("modality") or ("video" if "video" in record else "image" if "image" in record else "text")
    return SampleTags(str(modality), str(record.get("task", "")))


def pad_batch(batch: PackedBatch, seq_length: int, pad_id: int) -> PackedBatch:
    """The batch followed by a pad document up to seq_length (the EP dispatch gathers equal-sized inputs)."""
    n = int(batch.input_ids.numel())
    if n > seq_length:
        raise ValueError(f"a MOPD sequence of {n} tokens exceeds train.seq_length={seq_length}")
    tail = seq_length - n
    if not tail:
        return batch
    pad = torch.full((tail,), pad_id, dtype=torch.long)
    visual_mask = None if batch.visual_mask is None else torch.cat([batch.visual_mask, torch.zeros(tail, dtype=bool)])
    return dataclasses.replace(
        batch,
        input_ids=torch.cat([batch.input_ids, pad]),
        labels=torch.cat([batch.labels, pad]),
        loss_mask=torch.cat([batch.loss_mask, torch.zeros(tail)]),
        position_ids=torch.cat([batch.position_ids, torch.arange(tail).expand(3, -1)], dim=1),
        cu_seqlens=torch.tensor([0, n, seq_length], dtype=torch.int32),
        visual_mask=visual_mask,
    )


def as_mopd(pack, token_advantages: torch.Tensor) -> MOPDBatch:
    fields = {f.name: getattr(pack, f.name) for f in dataclasses.fields(pack)}
    return MOPDBatch(**fields, token_advantages=token_advantages, generated=None)


def attach_support(pack: MOPDBatch, supports: list, k: int) -> MOPDBatch:
    """The support-KL tensors of the pack's responses (in response_index order) at their label positions."""
    n = pack.input_ids.numel()
    pack.support_ids = torch.full((n, k), -1, dtype=torch.long)
    pack.support_teacher_logp = torch.zeros(n, k)
    pack.support_weights = torch.zeros(n)
    for r, (ids, teacher, weights) in enumerate(supports):
        at = (pack.response_index == r).nonzero()[:, 0]
        pack.support_ids[at, : ids.shape[1]] = ids.cpu()
        pack.support_teacher_logp[at, : ids.shape[1]] = teacher.float().cpu()
        pack.support_weights[at] = weights.float()
    return pack


@dataclasses.dataclass
class Scored:
    """One student response on its way to the loss."""

    group: Group
    response: list[int]
    rollout_logp: list[float]
    outcome: float  # the group-normalised reward (used with mopd.outcome_weight > 0)
    teacher: str
    student_rows: torch.Tensor | None = None  # [R, V_local]
    advantage: torch.Tensor | None = None  # [R] shaped A^ (support-KL form: the repetition penalty only)
    support: tuple | None = None  # support-KL form: ([R, k] Omega ids, [R, k] log pi_T there, [R] gamma_t)


class MOPDDataSource(RLDataSource):
    def __init__(self, cfg, model, placement, tokenizer, ctx, reward=None, log=print):
        """ctx: the rank's RankContext (dtype, device, layout) the in-process teachers are built with."""
        super().__init__(cfg, model, placement, tokenizer, reward, log)
        self.mopd = cfg.mopd
        self.routing = RoutingTable(self.mopd.routes, self.mopd.default_teacher)
        self.names = [t.name for t in self.mopd.teachers]
        self.order = list(dict.fromkeys(weights_key(t) for t in self.mopd.teachers))  # instance load order

        def loader(teacher):
            on_gpu = ctx.device.type == "cuda"
            return load_in_process_teacher(
                teacher, cfg.parallel, placement, ctx.dtype, on_gpu, ctx.layout, self.tokens, cfg.model
            )

        self.pool = TeacherPool(self.mopd.teachers, loader, resident=1)
        from data_pipeline.loader import media_budget

        self.renderer = ChatRenderer(tokenizer, media_budget(cfg.data))
        self.tagger = tagger_for(tokenizer, self.mopd.format_pattern, self.mopd.perception_pattern)
        self.prompt_dir = Path(self.rl.prompts).parent
        self.device = model.parts.lm.output_layer.weight.device

    # ---- forwards ---------------------------------------------------------------------------------------------

    def _forward(self, parts, batch: PackedBatch) -> torch.Tensor:
        batch = pad_batch(batch, self.cfg.train.seq_length, self.tokens.pad).to(self.device)
        return forward_logits(parts, batch, self.tokens, bool(parts.lm.config.sequence_parallel))

    def _pad_forward(self, parts) -> None:
        """A forward of nothing (a pad pack) so this rank's collectives match a rank with one more response."""
        pack = empty_pack(self.cfg.train.seq_length, self.tokens.pad)
        forward_logits(parts, pack.to(self.device), self.tokens, bool(parts.lm.config.sequence_parallel))

    def _max_over_ranks(self, counts: list[int]) -> list[int]:
        value = torch.tensor(counts or [0], dtype=torch.long, device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return value.tolist()

    @torch.no_grad()
    def _student_rows(self, items: list[Scored]) -> None:
        from keye_train.posttrain.rollout import Sample, sample_batch

        parts = self.model.parts
        modes = [(m, m.training) for m in (parts.lm, parts.vision) if m is not None]
        for m, _ in modes:
            m.eval()
        try:
            (most,) = self._max_over_ranks([len(items)])
            for k in range(most):
                if k >= len(items):
                    self._pad_forward(parts)
                    continue
                item = items[k]
                prompt = self._prompt_of(item.group.prompt)
                batch = sample_batch(prompt, Sample(0, 0, prompt.input_ids, tokens=list(item.response)), self.tokens)
                first, R = int(prompt.input_ids.numel()), len(item.response)
                item.student_rows = self._forward(parts, batch)[first - 1 : first - 1 + R]
        finally:
            for m, mode in modes:
                m.train(mode)

    def _prompt_of(self, record: PromptRecord):
        from keye_train.posttrain.rollout import Prompt

        return record.prompt or Prompt(torch.tensor(record.ids, dtype=torch.long))

    # ---- SPRR and the teachers --------------------------------------------------------------------------------

    def _teacher_context(self, record: PromptRecord) -> RenderedContext:
        """The teacher's rendering of the prompt's raw record (its own template and processor)."""
        content, media = [], {}
        path = record.reference.get("video", record.reference.get("image"))
        if path is not None:
            from keye_train.posttrain.prompts import IMAGE_SUFFIXES

            file = self.prompt_dir / path
            name = f"media{file.suffix.lower()}"
            media[name] = file.read_bytes()
            content.append({"image" if file.suffix.lower() in IMAGE_SUFFIXES else "video": name})
        content.append({"text": record.reference["prompt"]})
        chat = {
            "kind": "chat",
            "messages": [{"role": "user", "content": content}, {"role": "assistant", "content": ""}],
        }
        return self.renderer.render(chat, media, 0)

    @torch.no_grad()
    def _score(self, items: list[Scored], metrics: TeacherMetrics, counter: MismatchCounter) -> None:
        """Every item's shaped advantage; teachers in mopd.teachers order, each instance loaded once."""
        routed = {name: [i for i, it in enumerate(items) if it.teacher == name] for name in self.names}
        most = dict(zip(self.names, self._max_over_ranks([len(routed[n]) for n in self.names])))
        contexts: dict[int, RenderedContext] = {}
        for key in self.order:
            names = [t.name for t in self.mopd.teachers if weights_key(t) == key and most[t.name] > 0]
            if not names:
                continue  # no rank routed a response here: not loaded this step
            teacher = self.pool.instance(names[0])
            for name in names:
                for slot in range(most[name]):
                    if slot >= len(routed[name]):
                        self._pad_forward(teacher.parts)
                        continue
                    item = items[routed[name][slot]]
                    record = item.group.prompt
                    if id(record) not in contexts:
                        contexts[id(record)] = self._teacher_context(record)
                    seq = teacher_sequence(
                        contexts[id(record)],
                        self.tokenizer,
                        record.ids,
                        self.tokenizer,
                        item.response,
                        vocab_size=int(teacher.parts.lm.vocab_size),
                    )
                    zeros = torch.zeros(len(item.response), dtype=torch.float64)
                    if self.mopd.on_support:  # masked: an empty Omega and no weight
                        k = self.mopd.top_k
                        item.support = (
                            torch.full((len(item.response), k), -1),
                            torch.zeros(len(item.response), k),
                            zeros,
                        )
                    if not seq.ok:
                        self._pad_forward(teacher.parts)
                        counter.add(name, seq.reason)
                        item.advantage = zeros
                        continue
                    logits = self._forward(teacher.parts, seq.batch())
                    try:
                        rows = seq.response_rows(logits[: seq.context_length + seq.response_length])
                    except ValueError:
                        counter.add(name, "length")
                        item.advantage = zeros
                        continue
                    counter.add(name, None)
                    ids = torch.as_tensor(item.response, dtype=torch.int64, device=rows.device)
                    scores = token_scores(
                        item.student_rows, rows, ids, str(self.mopd.mode), self.mopd.top_k, chunk=self.mopd.chunk_tokens
                    )
                    cats = tag_response(item.response, self.tokenizer, self.tagger)
                    shaped = shaped_advantages(
                        scores.advantage, item.response, cats, self.mopd.category_weights, self.mopd.repetition
                    )
                    metrics.add(name, scores, shaped)
                    item.advantage = shaped
                    if self.mopd.on_support:  # gamma_t on the support term; the sampled token keeps the penalty
                        rep = self.mopd.repetition
                        omega, teacher_logp = support_set(item.student_rows, rows, str(self.mopd.mode), self.mopd.top_k)
                        gamma = category_weights(cats, self.mopd.category_weights)
                        item.support = (omega, teacher_logp, gamma)
                        item.advantage = repetition_penalty(
                            item.response, rep.penalty, rep.max_period, rep.min_repeats, rep.min_span
                        )

    # ---- packs ------------------------------------------------------------------------------------------------

    def _mopd_packs(self, items: list[Scored]) -> list[MOPDBatch]:
        seq = self.cfg.train.seq_length
        text, visual = [], []
        for item in items:
            record = item.group.prompt
            if len(record.ids) + len(item.response) > seq:
                raise ValueError(
                    f"prompt {record.id}: {len(record.ids)} + {len(item.response)} tokens exceed "
                    f"train.seq_length={seq} (lower rollout.sampling.max_new_tokens)"
                )
            if record.prompt is not None and record.prompt.visual is not None:
                pack = self._visual_pack(record.prompt, item.response, item.rollout_logp, item.outcome)
                adv = torch.zeros(seq)
                adv[pack.loss_mask > 0] = item.advantage.float()
                pack = as_mopd(pack, adv)
                visual.append(attach_support(pack, [item.support], self.mopd.top_k) if item.support else pack)
            else:
                sample = TextResponse(record.ids, item.response, item.outcome, rollout_logp=item.rollout_logp)
                text.append((sample, item.advantage.tolist(), item.support))
        packs, current, used = [], [], 0

        def flush():
            pack = pack_mopd_responses([c[0] for c in current], [c[1] for c in current], seq, self.tokens.pad)
            if self.mopd.on_support:
                pack = attach_support(pack, [c[2] for c in current], self.mopd.top_k)
            packs.append(pack)

        for entry in text:
            n = len(entry[0].prompt_ids) + len(entry[0].response_ids)
            if current and used + n > seq:
                flush()
                current, used = [], 0
            current.append(entry)
            used += n
        if current:
            flush()
        packs += visual
        (most,) = self._max_over_ranks([len(packs)])
        for _ in range(max(most, 1) - len(packs)):
            pack = as_mopd(empty_pack(seq, self.tokens.pad), torch.zeros(seq))
            packs.append(attach_support(pack, [], self.mopd.top_k) if self.mopd.on_support else pack)
        return packs

    # ---- DataSource -------------------------------------------------------------------------------------------

    def next_step(self) -> list[MOPDBatch]:
        groups = self._sample_groups(self.per_rank, 0)
        self.rollout.release()  # the KV cache goes before the scoring and training forwards
        items = []
        for group in groups:
            outcome = group_advantages(
                torch.tensor(group.rewards, dtype=torch.float64), len(group.rewards), eps=self.rl.adv_eps
            ).tolist()
            teacher = self.routing.teacher_for(sample_tags(group.prompt.reference))
            for response, logp, adv in zip(group.responses, group.rollout_logp, outcome):
                if response:
                    items.append(Scored(group, list(response), list(logp), float(adv), teacher))
        self._student_rows(items)
        metrics, counter = TeacherMetrics(self.names, self.mopd.top_k), MismatchCounter()
        loads = self.pool.loads
        self._score(items, metrics, counter)
        for item in items:
            item.student_rows = None  # the full-vocab rows go before the training forward
        packs = self._mopd_packs(items)
        if self.rl.recompute_old_logp:
            self._recompute_old_logp(packs)
        self.last = {
            "rl_reward_sum": float(sum(r for g in groups for r in g.rewards)),
            "rl_rewards_scored": float(sum(len(g.rewards) for g in groups)),
            "rl_response_tokens": float(sum(len(it.response) for it in items)),
            "mopd_teacher_loads": float(self.pool.loads - loads),
        }
        for row, name in enumerate(self.names):  # sums: data_metrics adds them over DP ranks
            for col, key in enumerate(SUMS):
                self.last[f"mopd_{name}_{key}"] = float(metrics.sums[row, col])
            self.last[f"mopd_{name}_checked"] = float(counter.checked[name])
            for reason in REASONS:
                self.last[f"mopd_{name}_mismatch_{reason}"] = float(counter.rejected.get(name, {}).get(reason, 0))
        self.step += 1
        return packs

    def state_dict(self) -> dict:
        return {"kind": "mopd", "drawn": self.drawn, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "mopd":
            raise ValueError("the checkpoint's data state is not a MOPD data source's (resume a MOPD run with mopd)")
        self.drawn, self.step = int(state["drawn"]), int(state["step"])
