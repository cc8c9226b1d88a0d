"""The support form of the MOPD loss (mopd.loss=support): the sampled-token gradient in expectation over Omega.
Its weights sum to A_t; with Omega = the whole vocab its gradient is the exact reverse-KL gradient; it is exactly 0
when the student equals the teacher; descending it lowers the reverse KL on the toy in every support-set mode;
through the objective (logits in, per-response token-mean) it is invariant to the micro-batch split."""

import pytest
import torch
import torch.distributed as dist

from keye_train.posttrain.mopd.advantage import support_set, support_surrogate, token_scores
from tests.keye_train.posttrain.gspo_toy import toy_policy
from tests.keye_train.posttrain.mopd.mopd_toy import VOCAB, context_reverse_kl, logits_of, teacher_policy

SUPPORT_MODES = ["overlap", "student_only", "teacher_on_student"]


def toy_logits():
    student, teacher = toy_policy(0), teacher_policy()
    contexts = torch.arange(VOCAB)
    return student, logits_of(student, contexts), logits_of(teacher, contexts).detach()


@pytest.mark.parametrize("mode", SUPPORT_MODES)
def test_the_weights_sum_to_the_advantage(mode):
    _, s, t = toy_logits()
    ids, teacher = support_set(s.detach(), t, mode, 4)
    logp = torch.log_softmax(s.detach(), -1).requires_grad_()
    support_surrogate(logp, ids, teacher).sum().backward()
    # dL/dlog pi_S(v) = -weight_v, so minus the row sums of the gradient are the weights' sums
    advantage = token_scores(s.detach(), t, torch.zeros(VOCAB, dtype=torch.long), mode, 4).advantage
    torch.testing.assert_close(-logp.grad.sum(-1), advantage, rtol=1e-12, atol=1e-14)


def test_on_the_whole_vocab_the_gradient_is_the_reverse_kl_gradient():
    student, s, t = toy_logits()
    ids = torch.arange(VOCAB).expand(VOCAB, -1)  # Omega = every id
    teacher = torch.log_softmax(t, -1)
    support_surrogate(torch.log_softmax(s, -1), ids, teacher).sum().backward()
    ours = {k: p.grad.clone() for k, p in student.items()}
    for p in student.values():
        p.grad = None
    logp = torch.log_softmax(logits_of(student, torch.arange(VOCAB)), -1)
    (logp.exp() * (logp - teacher)).sum().backward()  # the exact sum over contexts of KL(pi_S || pi_T)
    for k, p in student.items():
        torch.testing.assert_close(ours[k], p.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", SUPPORT_MODES)
def test_a_teacher_equal_to_the_student_gives_exactly_zero_gradient(mode):
    student, s, _ = toy_logits()
    ids, teacher = support_set(s.detach(), s.detach(), mode, 4)
    loss = support_surrogate(torch.log_softmax(s, -1), ids, teacher).sum()
    loss.backward()
    assert loss.item() == 0.0
    assert all(float(p.grad.abs().max()) == 0.0 for p in student.values())


@pytest.mark.parametrize("mode", SUPPORT_MODES)
def test_descending_it_lowers_the_reverse_kl(mode):
    """30 Adam steps on the toy: overlap 3.06 -> 2.18, student_only and teacher_on_student 3.06 -> 0.72."""
    student, _, t = toy_logits()
    optimizer = torch.optim.Adam(list(student.values()), lr=0.05)
    curve = [context_reverse_kl(student, teacher_policy())]
    for _ in range(30):
        optimizer.zero_grad()
        s = logits_of(student, torch.arange(VOCAB))
        ids, teacher = support_set(s.detach(), t, mode, 4)
        support_surrogate(torch.log_softmax(s, -1), ids, teacher).mean().backward()
        optimizer.step()
        curve.append(context_reverse_kl(student, teacher_policy()))
    assert curve[-1] < 0.8 * curve[0], curve


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    if dist.is_initialized():
        yield
        return
    store = tmp_path_factory.mktemp("gloo") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def support_packs(responses, sizes, mode):
    """The toy responses packed with their Omega tensors (teacher_policy as the teacher)."""
    from keye_train.posttrain.mopd.data import attach_support
    from tests.keye_train.posttrain.mopd.mopd_toy import mopd_packs

    packs, at = mopd_packs(responses, sizes), 0
    student, teacher = toy_policy(0), teacher_policy()
    for pack, size in zip(packs, sizes):
        supports = []
        for sample, _, _ in responses[at : at + size]:
            tokens = torch.tensor([*sample.prompt_ids, *sample.response_ids])
            p = len(sample.prompt_ids)
            with torch.no_grad():
                s, t = logits_of(student, tokens[:-1])[p - 1 :], logits_of(teacher, tokens[:-1])[p - 1 :]
            ids, teacher_logp = support_set(s, t, mode, 4)
            supports.append((ids, teacher_logp, torch.full((len(sample.response_ids),), 1.5, dtype=torch.float64)))
        attach_support(pack, supports, 4)
        pack.token_advantages.zero_()
        at += size
    return packs


@pytest.mark.parametrize("mode", SUPPORT_MODES)
def test_the_objective_with_logits_is_the_per_response_mean_for_any_split(one_rank, mode):
    from types import SimpleNamespace

    from keye_train.training.objectives.mopd import MOPDObjective
    from tests.keye_train.posttrain.gspo_toy import WorldPlacement
    from tests.keye_train.posttrain.mopd.mopd_toy import configs, sample_responses

    responses = sample_responses(toy_policy(0), teacher_policy(), mode, 4, 8, seed=3)
    _, rl = configs()
    mopd = SimpleNamespace(outcome_weight=0.0, on_support=True)
    results = []
    for sizes in ([8], [3, 5], [1, 2, 2, 3]):
        policy = toy_policy(0)
        objective = MOPDObjective(WorldPlacement(), "cpu", mopd, rl)
        assert objective.wants_logits
        packs = support_packs(responses, sizes, mode)
        objective.begin_step(packs)
        outputs = []
        for batch in packs:
            loss, logged = objective.loss_func(batch)(logits_of(policy, batch.input_ids)[None])
            (loss / len(packs)).backward()
            outputs.append(logged)
        results.append((objective.end_step(outputs).loss, {k: p.grad.clone() for k, p in policy.items()}))
    # the reference: per response, the token-mean over generated tokens of 1.5 * L_t, averaged over responses
    policy, terms = toy_policy(0), []
    teacher = teacher_policy()
    for sample, _, generated in responses:
        if not any(generated):
            continue
        tokens = torch.tensor([*sample.prompt_ids, *sample.response_ids])
        p = len(sample.prompt_ids)
        s = logits_of(policy, tokens[:-1])[p - 1 :]
        ids, teacher_logp = support_set(s.detach(), logits_of(teacher, tokens[:-1])[p - 1 :].detach(), mode, 4)
        teacher_logp = teacher_logp.float().double()  # the pack stores the teacher's log-probs in float32
        per_token = 1.5 * support_surrogate(torch.log_softmax(s, -1), ids, teacher_logp)
        terms.append(per_token[torch.tensor(generated)].mean())
    reference = torch.stack(terms).sum() / len(terms)
    reference.backward()
    for loss, grads in results:
        assert loss == pytest.approx(reference.item(), rel=1e-10, abs=1e-14)
        for k, g in grads.items():
            torch.testing.assert_close(g, policy[k].grad, rtol=1e-9, atol=1e-12)
    assert any(float(g.abs().max()) > 0 for g in results[0][1].values())
