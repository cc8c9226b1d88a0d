"""The RL stages' data source (the loop's `DataSource`): prompts -> rollouts on the policy -> rewards -> dynamic
sampling -> group advantages and pi_old -> packed `RLBatch` micro-batches for the GSPO objective.

Per step, each data-parallel rank takes its share of `rl.prompts_per_step` prompts from a prompt JSONL (its own
stride of a seeded per-epoch permutation), samples `rl.group_size` responses per prompt with the rollout engine
on the training model parts themselves (no weight copy: the last optimizer step is the policy), scores them with
`rl.rewards`, keeps the groups whose rewards differ (over-sampling in rounds, every rank stepping each round in
lockstep, because the engine's forwards and the EP all-to-all are collective), normalises the rewards per group,
recomputes log pi_old with a no-grad trainer forward of the packs, and frees the KV cache before the training
forward. The rollout samples at temperature 1, unfiltered (root config check): the trainer's log pi is the CE of
the raw logits, so pi_old and pi_rollout are the same distribution up to numerics.

With `rl.recovered_samples=conditioned` (ContextRL, rewards/context_rl.py), every group whose rewards are all below
`rl.positive_threshold` is shown to the judge, whose mistake report (on the group's best response) opens a second
user turn after that response; the policy answers G times again in that context, and the new group replaces the
old one: its packs are [conditioned prompt | response], so pi_old and the rollout log-probs are those of the
context the response was sampled in. It then goes through dynamic sampling like any other group.

With `rl.routing_replay`, each response's rollout routes travel in its pack (`RLBatch.routes`) and the pi_old
recompute replays them, as the GSPO step's forward does (rollout/routing.py `micro_batch_replay`).

Resume is exact: the state is the number of prompts this rank has drawn and the step; sampling seeds are a
function of (rl seed, step, round, global prompt number), so nothing else has to be saved (a judge must be
deterministic for re-sampling to resume exactly).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from data_pipeline.tokenizer import KeyeTokenizer
from keye_train.posttrain.batch import RLBatch, TextResponse, document_routes, pack_text_responses
from keye_train.posttrain.dynamic_sampling import SamplingReport, split_groups
from keye_train.posttrain.evaluation.jsonl import read_jsonl
from keye_train.posttrain.gspo import group_advantages
from keye_train.posttrain.rewards import WeightedReward, build_weighted
from keye_train.posttrain.rewards.context_rl import RETRY_TEMPLATE, resample_requests
from keye_train.posttrain.rewards.context_rl import Group as JudgedGroup
from keye_train.posttrain.rollout import Prompt, Rollout, SamplingParams

RECOVERY_COUNTERS = (
    "rl_groups_all_negative",  # groups whose rewards are all < rl.positive_threshold
    "rl_resample_reports_unusable",  # of those: no report, or a report that gives the answer away
    "rl_resample_too_long",  # the conditioned prompt + max_new_tokens fits no pack or cache
    "rl_groups_resampled",  # re-sampled in the conditioned context (they replace the originals)
    "rl_groups_recovered",  # of those: at least one response >= rl.positive_threshold
    "rl_recovered_reward_sum",
    "rl_recovered_responses",
)


@dataclass
class PromptRecord:
    id: str
    ids: list[int]  # the ChatML prompt up to and including "<|im_start|>assistant\n"
    reference: dict  # the whole record: the keys its rewards read (answer, options, ...)
    prompt: Prompt | None = None  # with its media's patches, when the record names a `video` or `image`


def chat_prompt_ids(tokenizer: KeyeTokenizer, text: str) -> list[int]:
    """`<|im_start|>user\\n{text}<|im_end|>\\n<|im_start|>assistant\\n` (Qwen ChatML, the chat kind's template)."""
    ids = tokenizer.ids
    return [
        ids.im_start,
        *tokenizer.encode("user\n"),
        *tokenizer.encode(text),
        ids.im_end,
        *tokenizer.encode("\n"),
        ids.im_start,
        *tokenizer.encode("assistant\n"),
    ]


def conditioned_prompt_ids(tokenizer: KeyeTokenizer, prompt_ids: list[int], failed: list[int], report: str):
    """ContextRL's re-sampling context in ChatML (context_rl.conditioned_prompt): the prompt, the failed answer's
    own ids closed by `<|im_end|>`, the mistake report as a new user turn, then `<|im_start|>assistant\n`."""
    ids = tokenizer.ids
    retry = RETRY_TEMPLATE.format(report=report)
    return [
        *prompt_ids,
        *failed,
        ids.im_end,
        *tokenizer.encode("\n"),
        *chat_prompt_ids(tokenizer, retry),
    ]


def read_prompts(path: str, tokenizer: KeyeTokenizer, budget=None) -> list[PromptRecord]:
    """One record per line; a `video` or `image` path (relative to the file's folder) goes through the data
    pipeline's chat rendering with `budget` (data.*: fps, frame tokens), as in training."""
    from pathlib import Path

    from keye_train.posttrain.prompts import chat_prompt

    records = []
    for line, record in read_jsonl(path):
        if not isinstance(record.get("prompt"), str) or not record["prompt"]:
            raise ValueError(f"rl.prompts={path} line {line}: needs a non-empty string 'prompt'")
        rid = str(record.get("id", line))
        media = record.get("video", record.get("image"))
        if media is None:
            records.append(PromptRecord(rid, chat_prompt_ids(tokenizer, record["prompt"]), record))
            continue
        prompt = chat_prompt(tokenizer, record["prompt"], budget, Path(path).parent / media)
        records.append(PromptRecord(rid, prompt.input_ids.tolist(), record, prompt))
    if not records:
        raise ValueError(f"rl.prompts={path} holds no prompts")
    return records


def judge_runtime(spec: str) -> dict:
    """rl.judge 'module:factory' -> {'judge': factory()} for the context_judge reward (empty: no judge)."""
    if not spec:
        return {}
    import importlib

    module, _, name = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"rl.judge={spec!r}: {err}") from err
    return {"judge": factory()}


@dataclass
class Group:
    prompt: PromptRecord
    responses: list[list[int]]
    rollout_logp: list[list[float]]
    rewards: list[float] = field(default_factory=list)
    routes: list[torch.Tensor | None] = field(default_factory=list)  # per response, with rl.routing_replay
    number: int = 0  # the global draw number of the prompt (its sampling seeds)
    recovered: bool = False  # re-sampled in the report-conditioned context (ContextRL)
    terms: list[dict[str, float]] = field(default_factory=list)  # per response, each reward term's raw score


def empty_pack(seq_length: int, pad_id: int) -> RLBatch:
    """A pack with nothing to learn (every rank runs the same number of micro-batches: EP and DDP are collective)."""
    return RLBatch(
        input_ids=torch.full((seq_length,), pad_id, dtype=torch.long),
        labels=torch.full((seq_length,), pad_id, dtype=torch.long),
        loss_mask=torch.zeros(seq_length),
        position_ids=torch.arange(seq_length).expand(3, -1).clone(),
        cu_seqlens=torch.tensor([0, seq_length], dtype=torch.int32),
        response_index=torch.full((seq_length,), -1, dtype=torch.long),
        advantages=torch.zeros(1),
        old_logp=torch.zeros(seq_length),
        rollout_logp=torch.zeros(seq_length),  # a correction (TIS / IcePop) asks every pack for them
    )


class RLDataSource:
    def __init__(self, cfg, model, placement, tokenizer: KeyeTokenizer, reward=None, log=print):
        """model: the rank's TrainModel (its parts are the policy); reward: a callable (response, reference) ->
        float replacing the one built from rl.rewards (e.g. with a ContextRL judge)."""
        self.cfg, self.rl, self.model, self.placement = cfg, cfg.rl, model, placement
        self.tokenizer, self.tokens, self.log = tokenizer, tokenizer.ids, log
        self.decode = tokenizer.decode  # response ids -> the text the rewards score
        group = placement.data_parallel_group()
        self.dp_rank, self.dp_size = dist.get_rank(group), dist.get_world_size(group)
        if self.rl.prompts_per_step % self.dp_size:
            raise ValueError(
                f"rl.prompts_per_step={self.rl.prompts_per_step} must divide over {self.dp_size} data-parallel ranks"
            )
        if self.rl.group_size > cfg.rollout.slots:
            raise ValueError(f"rl.group_size={self.rl.group_size} must be <= rollout.slots={cfg.rollout.slots}")
        self.per_rank = self.rl.prompts_per_step // self.dp_size
        from data_pipeline.loader import media_budget

        self.prompts = read_prompts(self.rl.prompts, tokenizer, media_budget(cfg.data))
        runtime = judge_runtime(self.rl.judge)
        self.judge = runtime.get("judge")  # writes the mistake reports of rl.recovered_samples=conditioned
        self.reward = reward or build_weighted(self.rl.rewards, self.rl.reward_gates, **runtime)
        self.rollout = Rollout(
            model.parts,
            cfg.model,
            self.tokens,
            slots=cfg.rollout.slots,
            capacity=cfg.rollout.capacity,
            prefill_tokens=cfg.rollout.prefill_tokens,
            record_routes=self.rl.routing_replay,
        )
        sampling = SamplingParams.from_config(cfg.rollout.sampling)
        stops = sampling.stop_ids or (self.tokens.im_end, self.tokens.pad)
        self.sampling = SamplingParams(max_new_tokens=sampling.max_new_tokens, stop_ids=stops, seed=sampling.seed)
        self.drawn = 0  # prompts this rank has taken
        self.step = 0
        self.last: dict = {}
        self.recovery: dict[str, float] = {}  # this step's ContextRL re-sampling counters
        self.term_sums: dict[str, float] = {}  # this step's raw score of each reward term (rl_term_<name>_sum)

    # ---- prompts ----------------------------------------------------------------------------------------------

    def _prompt(self, k: int) -> tuple[int, PromptRecord]:
        """This rank's k-th prompt: global draw number k * dp + rank of the epoch-wise seeded permutation."""
        number = k * self.dp_size + self.dp_rank
        epoch, at = divmod(number, len(self.prompts))
        order = torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(self.cfg.train.seed + epoch))
        return number, self.prompts[int(order[at])]

    def _sample_groups(self, count: int, round_: int) -> list[Group]:
        """`count` new prompts, G responses each, rewarded. Called on every rank in lockstep (count may be 0)."""
        drawn = [self._prompt(self.drawn + i) for i in range(count)]
        self.drawn += count
        return self._generate(drawn, round_)

    def _generate(self, drawn: list[tuple[int, PromptRecord]], round_: int) -> list[Group]:
        """G rewarded responses to each (global prompt number, record); collective (every rank calls it)."""
        params = [
            SamplingParams(
                max_new_tokens=self.sampling.max_new_tokens,
                stop_ids=self.sampling.stop_ids,
                seed=(self.sampling.seed * 1_000_033 + self.step * 7_919 + round_) * 104_729 + number,
            )
            for number, _ in drawn
        ]
        prompts = [p.prompt or Prompt(torch.tensor(p.ids, dtype=torch.long)) for _, p in drawn]
        out = self.rollout.generate(prompts, params, self.rl.group_size)
        G = self.rl.group_size
        groups = []
        for i, (number, record) in enumerate(drawn):
            samples = out.samples[i * G : (i + 1) * G]
            group = Group(record, [list(s.tokens) for s in samples], [list(s.logprobs) for s in samples])
            group.number = number
            group.routes = [s.routes for s in samples]
            for response in group.responses:
                text = self._text(response)
                if isinstance(self.reward, WeightedReward):
                    reward, terms = self.reward.scored(text, record.reference)
                    group.terms.append(terms)
                else:
                    reward = self.reward(text, record.reference)
                group.rewards.append(float(reward))
            groups.append(group)
        return groups

    def _recover(self, groups: list[Group], round_: int) -> list[Group]:
        """ContextRL: the all-negative groups whose judge report is usable (non-empty, not giving the answer away)
        are re-sampled in the report-conditioned context and replaced by the new groups. Collective: every rank
        generates (maybe nothing) when any rank has a request. Seeds: round `max_sampling_rounds + round_`."""
        threshold, counts = self.rl.positive_threshold, self.recovery
        negative = [i for i, g in enumerate(groups) if max(g.rewards) < threshold]
        judged = [
            JudgedGroup(
                [{"role": "user", "content": str(g.prompt.reference.get("prompt", ""))}],
                g.prompt.reference,
                [self._text(r) for r in g.responses],
                g.rewards,
            )
            for g in groups
        ]
        requests = resample_requests(judged, self.judge, threshold) if negative else []
        drawn, used = [], []
        budget = min(self.cfg.train.seq_length, self.cfg.rollout.capacity + 1) - self.sampling.max_new_tokens
        for request in requests:
            old = groups[request.group_index]
            failed = old.responses[request.failed_index]
            if failed and failed[-1] in self.sampling.stop_ids:
                failed = failed[:-1]
            ids = conditioned_prompt_ids(self.tokenizer, old.prompt.ids, failed, request.report)
            if len(ids) > budget:  # the conditioned prompt and its responses must fit the rollout and a pack
                counts["rl_resample_too_long"] = counts.get("rl_resample_too_long", 0.0) + 1
                continue
            visual = old.prompt.prompt.visual if old.prompt.prompt is not None else None
            prompt = Prompt(torch.tensor(ids, dtype=torch.long), visual) if visual is not None else None
            drawn.append((old.number, PromptRecord(old.prompt.id, ids, old.prompt.reference, prompt)))
            used.append(request.group_index)
        for key, value in (
            ("rl_groups_all_negative", len(negative)),
            ("rl_resample_reports_unusable", len(negative) - len(requests)),
        ):
            counts[key] = counts.get(key, 0.0) + value
        if not self._any_rank(bool(drawn)):
            return groups
        recovered = self._generate(drawn, self.rl.max_sampling_rounds + round_)
        out = list(groups)
        for index, group in zip(used, recovered):
            group.recovered = True
            out[index] = group
        rewards = [r for g in recovered for r in g.rewards]
        for key, value in (
            ("rl_groups_resampled", len(recovered)),
            ("rl_groups_recovered", sum(max(g.rewards) >= threshold for g in recovered)),  # a positive appeared
            ("rl_recovered_reward_sum", sum(rewards)),
            ("rl_recovered_responses", len(rewards)),
        ):
            counts[key] = counts.get(key, 0.0) + float(value)
        return out

    def _text(self, response: list[int]) -> str:
        stops = set(self.sampling.stop_ids)
        kept = response[:-1] if response and response[-1] in stops else response
        return self.decode(kept)

    def _any_rank(self, flag: bool) -> bool:
        value = torch.tensor([int(flag)], dtype=torch.long, device=self.model.parts.lm.output_layer.weight.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def _collect(self) -> tuple[list[Group], SamplingReport, list[float]]:
        kept: list[Group] = []
        rounds = generated = dropped = 0
        scored: list[float] = []
        max_rounds = self.rl.max_sampling_rounds if self.rl.dynamic_sampling else 1
        while True:
            missing = self.per_rank - len(kept) if rounds < max_rounds else 0
            if not self._any_rank(missing > 0):
                break
            want = math.ceil(missing * self.rl.oversample_factor) if self.rl.dynamic_sampling else missing
            groups = self._sample_groups(want, rounds)
            scored += [r for g in groups for r in g.rewards]  # the original prompts' rewards (the policy's)
            for terms in (t for g in groups for t in g.terms):
                for name, value in terms.items():
                    self.term_sums[name] = self.term_sums.get(name, 0.0) + value
            if self.rl.recovered_samples == "conditioned":
                groups = self._recover(groups, rounds)
            rounds, generated = rounds + 1, generated + want
            if self.rl.dynamic_sampling:
                good, bad = split_groups(groups)
                dropped += len(bad)  # a prompt whose group (or its re-sampled replacement) ties
            else:
                good = groups
            kept += good
        surplus = max(0, len(kept) - self.per_rank)
        kept = kept[: self.per_rank]
        recovered = sum(g.recovered for g in kept)
        report = SamplingReport(rounds, generated, dropped, recovered, surplus, max(0, self.per_rank - len(kept)))
        return kept, report, scored

    # ---- packs ------------------------------------------------------------------------------------------------

    def _packs(self, groups: list[Group]) -> list[RLBatch]:
        """Text samples packed into train.seq_length; a sample with media is its own pack (its patches)."""
        seq = self.cfg.train.seq_length
        samples, visual = [], []
        for group in groups:
            advantages = group_advantages(
                torch.tensor(group.rewards, dtype=torch.float64), len(group.rewards), eps=self.rl.adv_eps
            )
            routes = group.routes or [None] * len(group.responses)
            for response, logp, adv, route in zip(group.responses, group.rollout_logp, advantages.tolist(), routes):
                if len(group.prompt.ids) + len(response) > seq:
                    raise ValueError(
                        f"prompt {group.prompt.id}: {len(group.prompt.ids)} + {len(response)} tokens exceed "
                        f"train.seq_length={seq} (lower rollout.sampling.max_new_tokens)"
                    )
                if not response:
                    continue
                if group.prompt.prompt is not None and group.prompt.prompt.visual is not None:
                    visual.append(self._visual_pack(group.prompt.prompt, response, logp, float(adv), route))
                else:
                    sample = TextResponse(group.prompt.ids, response, float(adv), rollout_logp=logp, routes=route)
                    samples.append(sample)
        packs, current, used = [], [], 0
        for sample in samples:
            n = len(sample.prompt_ids) + len(sample.response_ids)
            if current and used + n > seq:
                packs.append(pack_text_responses(current, seq, self.tokens.pad))
                current, used = [], 0
            current.append(sample)
            used += n
        if current:
            packs.append(pack_text_responses(current, seq, self.tokens.pad))
        packs += visual
        count = torch.tensor([len(packs)], dtype=torch.long, device=self.model.parts.lm.output_layer.weight.device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        packs += [empty_pack(seq, self.tokens.pad) for _ in range(max(int(count.item()), 1) - len(packs))]
        return packs

    def _visual_pack(self, prompt: Prompt, response: list[int], logp: list[float], advantage: float, routes=None):
        """One [prompt | response] document with its patches (rollout.sample_batch), as an RLBatch (with its
        rollout routes padded to the pack when given)."""
        import dataclasses

        from keye_train.posttrain.rollout import Sample, sample_batch

        packed = sample_batch(prompt, Sample(0, 0, prompt.input_ids, tokens=list(response)), self.tokens)
        index = torch.where(packed.loss_mask > 0, 0, -1).long()
        rollout = torch.zeros(packed.loss_mask.numel())
        rollout[packed.loss_mask > 0] = torch.tensor(logp, dtype=torch.float32)
        fields = {f.name: getattr(packed, f.name) for f in dataclasses.fields(packed)}
        length, tail = int(packed.input_ids.numel()), self.cfg.train.seq_length - int(packed.input_ids.numel())
        if tail > 0:  # every rank's packs are seq_length long: the EP dispatch gathers equal-sized inputs
            pad = torch.full((tail,), self.tokens.pad, dtype=torch.long)
            fields["input_ids"] = torch.cat([packed.input_ids, pad])
            fields["labels"] = torch.cat([packed.labels, pad])
            fields["loss_mask"] = torch.cat([packed.loss_mask, torch.zeros(tail)])
            fields["position_ids"] = torch.cat([packed.position_ids, torch.arange(tail).expand(3, -1)], dim=1)
            fields["cu_seqlens"] = torch.tensor([0, length, length + tail], dtype=torch.int32)
            if packed.visual_mask is not None:
                fields["visual_mask"] = torch.cat([packed.visual_mask, torch.zeros(tail, dtype=torch.bool)])
            index = torch.cat([index, torch.full((tail,), -1, dtype=torch.long)])
            rollout = torch.cat([rollout, torch.zeros(tail)])
        padded = max(length, self.cfg.train.seq_length)
        return RLBatch(
            **fields,
            response_index=index,
            advantages=torch.tensor([advantage], dtype=torch.float32),
            old_logp=torch.zeros_like(rollout),
            rollout_logp=rollout,
            routes=document_routes(routes, length, padded) if routes is not None else None,
        )

    @torch.no_grad()
    def _recompute_old_logp(self, packs: list[RLBatch]) -> None:
        """log pi_old(labels) of the policy that sampled, by the trainer's own forward (the same path and
        numerics as the training step's log pi, the same replayed routes with rl.routing_replay)."""
        from keye_train.model.keye_vl import embed_inputs, lm_token_losses
        from keye_train.posttrain.rollout.routing import micro_batch_replay

        lm, vision = self.model.parts.lm, self.model.parts.vision
        device = lm.output_layer.weight.device
        sequence_parallel = lm.config.sequence_parallel
        modes = [(m, m.training) for m in (lm, vision) if m is not None]
        for m, _ in modes:
            m.eval()
        try:
            with micro_batch_replay(lm, packs) as replay:
                for pack in packs:
                    batch = pack.to(device)
                    replay(batch)
                    embeds = embed_inputs(lm, vision, batch, self.tokens, sequence_parallel)
                    logp = -lm_token_losses(lm, batch, embeds).view(-1).float()
                    pack.old_logp = (logp * batch.loss_mask.to(logp.dtype)).cpu()
        finally:
            for m, mode in modes:
                m.train(mode)

    # ---- DataSource -------------------------------------------------------------------------------------------

    def next_step(self) -> list[RLBatch]:
        self.recovery, self.term_sums = {}, {}
        groups, report, scored = self._collect()
        self.rollout.release()  # the KV cache goes before the training forward
        packs = self._packs(groups)
        gap = 0.0
        if self.rl.recompute_old_logp:
            self._recompute_old_logp(packs)
            for pack in packs:  # the engine's T=1 log-probs against the trainer's: the same distribution
                if pack.rollout_logp is not None:
                    gap += float(((pack.old_logp - pack.rollout_logp).abs() * pack.loss_mask).sum())
        self.last = {
            "rl_groups_generated": float(report.generated),
            "rl_groups_dropped": float(report.dropped),
            "rl_groups_short": float(report.short),
            "rl_reward_sum": float(sum(scored)),
            "rl_rewards_scored": float(len(scored)),
            "rl_kept_reward_sum": float(sum(r for g in groups for r in g.rewards)),
            "rl_kept_responses": float(sum(len(g.rewards) for g in groups)),
            "rl_logp_gap_sum": gap,  # sum over response tokens of |log pi_old - log pi_rollout|
            "rl_response_tokens": float(sum(float(p.loss_mask.sum()) for p in packs)),
        }
        # each reward term's raw score summed like rl_reward_sum (the original prompts' responses, every round)
        self.last.update({f"rl_term_{name}_sum": value for name, value in self.term_sums.items()})
        if self.rl.recovered_samples == "conditioned":  # sums over the step's rounds (data_metrics adds ranks)
            self.last.update({key: self.recovery.get(key, 0.0) for key in RECOVERY_COUNTERS})
            self.last["rl_recovered_kept"] = float(report.recovered)  # re-sampled groups in the batch
        self.step += 1
        return packs

    def counters(self) -> dict:
        """This step's sums (data_metrics adds them over DP ranks): the mean reward of every scored response is
        rl_reward_sum / rl_rewards_scored."""
        return dict(self.last)

    def state_dict(self) -> dict:
        return {"kind": "rl", "drawn": self.drawn, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "rl":
            raise ValueError("the checkpoint's data state is not an RL data source's (resume an RL run with rl)")
        self.drawn, self.step = int(state["drawn"]), int(state["step"])

    def close(self) -> None:
        self.rollout.release()


def rl_data_source(cfg, model, placement, log=print, reward=None) -> RLDataSource:
    return RLDataSource(cfg, model, placement, KeyeTokenizer(cfg.data.tokenizer), reward, log)
