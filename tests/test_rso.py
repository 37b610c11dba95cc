"""RSO (methods/rso.py): the paper's statistical rejection sampling and pair ranking on hand-worked values, its cost
model, and a run through the real CLI on tiny-random with a programmatic reward: the record is ok, the pairs were
labelled by the reward and drawn towards higher rewards, the costs are counted, and the policy's reward rises."""

from __future__ import annotations

import math

import pytest

from conftest import REPO, run_cli
from harness.run import registry
from harness.errors import HarnessError
from harness.train.matching import ModelSizes
from harness.train.plan import plan_training
from harness.records import read_records
from methods.rso import RSO, anchored_rewards, games_per_prompt, rank_pairs, statistical_rejection_sampling


def sampling_plan(budget):
    """A plan without rows: what ``Sampler`` reads of it (the completion length cap and the sequence batch)."""
    return plan_training(budget, RSO(), [], [], tokenizer=None)


def uniforms(*values: float):
    """A stand-in for ``random.random`` that returns ``values`` in order (and fails if asked for more)."""
    stream = iter(values)
    return lambda: next(stream)


def test_rejection_sampling_by_hand():
    beta = 1.0
    # rewards 2 − ln 2, 2, 2 − ln 4, 2 − ln 8: acceptance probabilities exp((r − r_max)/β) = .5, 1, .25, .125 (r_max 2)
    rewards = [2 - math.log(2), 2.0, 2 - math.log(4), 2 - math.log(8)]
    # pass 1 (r_max = 2): #0 u .6 ≥ .5 rejected; #1 u .9 < 1 accepted; #2 u .2 < .25 accepted; #3 u .5 ≥ .125 rejected.
    # pass 2 recomputes r_max over #0 and #3 = 2 − ln 2: #0 now has probability 1, u .7 → accepted; 3 reached, stop
    assert statistical_rejection_sampling(rewards, 3, beta, uniforms(.6, .9, .2, .5, .7)) == [1, 2, 0]
    # without the recomputed r_max, #0 would have kept probability .5 and been rejected at u = .7
    # one sample: the first pass accepts #0 at u .4 < .5 and stops there (Algorithm 1 breaks at num_samples)
    assert statistical_rejection_sampling(rewards, 1, beta, uniforms(.4)) == [0]
    # β scales the reward gaps: at β = 2 #3's probability is .125^(1/2) ≈ .354, so u .3 accepts it in pass 1
    assert statistical_rejection_sampling(rewards, 2, 2.0, uniforms(.9, .99, .9, .3)) == [1, 3]


def test_rejection_sampling_limits():
    rewards = [1.0, 3.0, 2.0, 3.0]
    # β = 0: only candidates at r_max are accepted, pass after pass: top-k over N (the paper's β → 0)
    assert statistical_rejection_sampling(rewards, 3, 0.0, uniforms(*[.999] * 7)) == [1, 3, 2]
    # β → ∞: every candidate is accepted in the order drawn
    assert statistical_rejection_sampling(rewards, 3, 1e12, uniforms(*[.999] * 3)) == [0, 1, 2]
    with pytest.raises(ValueError, match="cannot accept 5 of 4"):
        statistical_rejection_sampling(rewards, 5, 1.0, uniforms())


def test_rank_pairs_by_hand():
    rewards = [.1, .5, .3, .3, .9, .2, .7]
    # first round: (0, 1) → 1 over 0; (2, 3) tie, dropped; (4, 5) → 4 over 5; #6 has no opponent
    assert rank_pairs(rewards, "first-round") == [(1, 0), (4, 5)]
    # tournament: round 1 as above, advancing 1, 2 (a tie advances the first), 4, 6 (bye);
    # round 2: 1 over 2, 4 over 6; final: 4 over 1. Six games, one tie → five pairs
    assert rank_pairs(rewards, "tournament") == [(1, 0), (4, 5), (1, 2), (4, 6), (4, 1)]
    assert games_per_prompt(7, "tournament") == 6 and games_per_prompt(8, "first-round") == 4
    assert rank_pairs([.4, .4], "first-round") == []  # a tied pair carries no preference


def test_rank_pairs_by_the_pairs_own_preference():
    """A pairwise judge decides each game, whatever the (anchor) rewards say; levels are judged in one batch each."""
    rewards = [.9, .1, .8, .2, .5]
    asked = []

    def games(played):  # prefers the higher index, except that 0 and 1 tie
        asked.append(played)
        return [0.5 if {a, b} == {0, 1} else (0.8 if a > b else 0.3) for a, b in played]

    # first round: (0, 1) tie → dropped; (2, 3) → 3 over 2 (P(2 ≻ 3) = .3), against the rewards' 2 over 3
    assert rank_pairs(rewards, "first-round", games) == [(3, 2)]
    assert asked == [[(0, 1), (2, 3)]]
    # tournament: round 1 advances 0 (tie: the first), 3, 4 (bye); round 2: (0, 3) → 3; final (3, 4) → 4
    asked.clear()
    assert rank_pairs(rewards, "tournament", games) == [(3, 2), (3, 0), (4, 3)]
    assert asked == [[(0, 1), (2, 3)], [(0, 3)], [(3, 4)]]


class FixedProbabilityOracle:
    """A stand-in judge for the pure function: P(output_1 ≻ output_2) read from a table of the two texts."""

    def __init__(self, table):
        self.table, self.items = table, []

    def judge_batch(self, items):
        from harness.evaluate.judges import Judgment

        self.items.extend(items)
        return [Judgment(probability=self.table[(a, b)], output_1_first=self.table[(a, b)],
                         output_1_second=self.table[(a, b)], method="table") for _, a, b in items]


def test_anchored_rewards_by_hand():
    # r = logit P(y ≻ anchor): P = .75 → ln 3; P = .5 → 0; P = 1 is clipped at 1 − 1e-6 → ln(999999)
    oracle = FixedProbabilityOracle({("a", "ref"): .75, ("b", "ref"): .5, ("c", "ref2"): 1.0})
    prompts = [[{"role": "user", "content": "q1"}], [{"role": "user", "content": "q2"}]]
    rewards = anchored_rewards(oracle, prompts, ["ref", "ref2"], [["a", "b", "a"], ["c"]])
    assert rewards[0] == pytest.approx([math.log(3), 0.0, math.log(3)])
    assert rewards[1] == pytest.approx([math.log(999999)])
    # each distinct sample is judged once, against its own prompt's anchor, with the prompt as the instruction
    assert oracle.items == [("q1", "a", "ref"), ("q1", "b", "ref"), ("q2", "c", "ref2")]


def test_config_is_the_papers_and_bad_values_name_the_key():
    method = registry.instantiate("method", "rso", None, params_key="method_params")
    assert (method.loss_type, method.gamma, method.rejection_beta, method.candidates, method.accepted) == \
        ("hinge", 0.05, 0.5, 64, 8)
    assert method.needs_reward and method.reference_based and method.data_view == "pairs"
    text = (REPO / "conf" / "method" / "rso.yaml").read_text()
    assert text.startswith("# Used by: align-harness sweep methods=[rso]") and "arXiv:2309.06657" in text
    with pytest.raises(HarnessError, match=r"loss_type='ipo'; choose one of hinge, sigmoid"):
        registry.instantiate("method", "rso", {"loss_type": "ipo"}, params_key="method_params")
    with pytest.raises(HarnessError, match=r"accepted=16, candidates=8"):
        RSO(candidates=8, accepted=16)


def test_cost_model_by_hand():
    # prompt 10 + completion 5 = 15 tokens; 8 accepted → 4 first-round pairs a prompt, so a pair carries 64/4 = 16
    # candidates: 240 generated tokens, read again by a reward model half the policy's size (+120); the DPO pair
    # trains 2·15 = 30 tokens and its reference scores 30
    sizes = ModelSizes(policy=100, reward=50)
    assert RSO(candidates=64, accepted=8).visit_cost(10, 5, None, sizes) == (30.0, 30.0 + 240 * 1.5)
    assert RSO(candidates=14, accepted=8, ranking="tournament").visit_cost(10, 5, None, ModelSizes()) == (30.0, 60.0)
    # with a judge (estimated policy-sized): each of a pair's 16 candidates read against the anchor, and the pair's
    # own game, each in both orders: 2·(95 template + 10 + 2·5) = 230 tokens a comparison → 30 + 16·(15 + 230) + 230
    judged = RSO(candidates=64, accepted=8, judge={"type": "local_hf", "model": "tiny-random:3"})
    assert judged.visit_cost(10, 5, None, sizes) == (30.0, 30.0 + 16 * 245 + 230)
    assert not judged.needs_reward and judged.judge["type"] == "local_hf"


# Shrunk as the online methods' sweep (tests/test_rewards_and_online.py): 4-token completions scored by characters,
# 8 candidates at a low temperature, 4 accepted (2 first-round pairs a prompt), a learning rate for a random model.
RSO_SWEEP = [
    "model=tiny-random", "data=toy-preference", "budget=toy", "budget@stage_budget=toy", "settings=[instruct]",
    "reward=short-answers", "reward.max_chars=32", "include_start=false", "tasks=[heldout_preference]",
    "+task_params.heldout_preference.limit=4", "budget.pairs=32", "budget.batch_pairs=4", "budget.micro_batch_pairs=4",
    "budget.max_completion_tokens=4", "methods=[rso]", "+method_params.rso.learning_rate=3e-3",
    "+method_params.rso.candidates=8", "+method_params.rso.accepted=4", "+method_params.rso.rejection_beta=0.1",
    "+method_params.rso.temperature=0.5",
]


def test_rso_trains_through_the_cli_on_reward_labelled_pairs(tmp_path, cache_dir):
    from omegaconf import OmegaConf

    from harness.train.budget import Budget
    from harness.train.rewards import ShortAnswers
    from harness.train.rounds import Sampler, score_samples

    result = run_cli("sweep", *RSO_SWEEP, f"paths.results={tmp_path}", "name=r", cache=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    (record,) = read_records(tmp_path / "r")
    assert record["status"] == "ok", record["reason"]
    consumed = record["consumed"]
    assert record["run_config"]["reward"]["kind"] == "short-answers"
    assert record["run_config"]["hyperparameters"]["candidates"] == 8
    # 32 pairs at 2 a prompt: 16 prompts × 8 candidates; more prompts only if ties dropped pairs
    assert consumed["prompts_sampled"] >= 16 and consumed["candidates"] == 8 * consumed["prompts_sampled"]
    assert consumed["accepted"] <= 4 * consumed["prompts_sampled"]
    assert consumed["pairs"] == consumed["pairs_labelled"] == 32
    assert consumed["optimizer_steps"] == 8  # DPO's steps on the budget's 32 pairs, 4 a step
    # labelled by the reward: every chosen response scored above its rejected one; rejection sampling at a small β
    # keeps the higher-reward candidates
    assert consumed["mean_chosen_reward"] > consumed["mean_rejected_reward"]
    assert consumed["mean_accepted_reward"] >= consumed["mean_candidate_reward"]
    assert consumed["generation_tokens"] > 0 and consumed["reward_tokens"] == 0  # a programmatic reward reads none
    assert consumed["reference_tokens"] == consumed["dpo_reference_tokens"] + consumed["generation_tokens"]
    assert consumed["policy_tokens"] > 0 and consumed["flops"] > 0
    assert record["metrics"]["logratio_accuracy"]["value"] is not None

    # the policy's reward rises: the mean reward of 256 completions sampled with the same seeds on unseen prompts,
    # before and after (greedy completions would not tell: the random tiny model greedily repeats one token)
    budget = Budget.from_config({**OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "budget" / "toy.yaml")),
                                 "max_completion_tokens": 4})
    prompts = [[{"role": "user", "content": f"Request {i}: please describe the sea."}] for i in range(200, 216)]
    reward = ShortAnswers(max_chars=32)

    def mean_reward(path) -> float:
        samples = Sampler(sampling_plan(budget), 0.5).samples(path, prompts, 16, seed=7)
        return sum(map(sum, score_samples(reward, prompts, samples))) / (16 * len(prompts))

    before = mean_reward(cache_dir / "models" / "tiny-random-3")
    after = mean_reward(cache_dir / "checkpoints" / record["run_id"])
    print(f"sampled reward {before:.3f} → {after:.3f}")
    assert after > before, (before, after)


def test_rso_labelled_by_a_pairwise_judge_through_the_cli(tmp_path, cache_dir):
    """``judge:`` in the reward's place: candidates scored against the data's chosen response, pairs labelled by the
    judge, its judgments and prompt tokens counted in the consumed budget (a policy-sized judge: one for one)."""
    overrides = [o for o in RSO_SWEEP if not o.startswith(("reward", "+method_params.rso.candidates",
                                                           "+method_params.rso.accepted", "budget.pairs"))]
    result = run_cli("sweep", *overrides, "budget.pairs=8", "+method_params.rso.candidates=4",
                     "+method_params.rso.accepted=2", "+method_params.rso.judge.type=local_hf",
                     "+method_params.rso.judge.model=tiny-random:3", f"paths.results={tmp_path}", "name=j",
                     cache=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    (record,) = read_records(tmp_path / "j")
    assert record["status"] == "ok", record["reason"]
    consumed = record["consumed"]
    assert "reward" not in record["run_config"] and record["run_config"]["hyperparameters"]["judge"]["model"] == \
        "tiny-random:3"
    assert consumed["labels"].startswith("judge") and consumed["oracle"] == "judge"
    assert consumed["pairs"] == consumed["pairs_labelled"] == 8
    # every distinct candidate judged against its anchor, then at most one first-round game a prompt
    assert consumed["distinct_candidates"] < consumed["judgments"] <= \
        consumed["distinct_candidates"] + consumed["prompts_sampled"]
    assert consumed["judge_tokens"] > 2 * 95 * consumed["judgments"]  # both orders of the judging prompt
    assert consumed["judge_parameters"] == consumed["parameters"]
    assert abs(consumed["reference_tokens"] - (consumed["dpo_reference_tokens"] + consumed["generation_tokens"]
                                               + consumed["judge_tokens"])) <= 1


def test_top_k_restricts_sampling(tiny_model):
    """Sampling among the top 1 token is greedy decoding, whatever the temperature; without top-k it is not."""
    from harness.train.budget import Budget
    from omegaconf import OmegaConf

    from harness.train.rounds import Sampler

    budget = Budget.from_config({**OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "budget" / "toy.yaml")),
                                 "max_completion_tokens": 6})
    prompts = [[{"role": "user", "content": f"Tell me about item {i}."}] for i in range(4)]
    plan = sampling_plan(budget)
    greedy = [texts[0] for texts in Sampler(plan, 1.0).complete(tiny_model, prompts)]
    top_1 = Sampler(plan, 5.0, top_k=1).samples(tiny_model, prompts, 2, seed=3)
    assert all(texts == [g, g] for texts, g in zip(top_1, greedy))
    free = Sampler(plan, 5.0).samples(tiny_model, prompts, 2, seed=3)
    assert any(texts != [g, g] for texts, g in zip(free, greedy))
    with pytest.raises(HarnessError, match=r"top_k=0 must be a positive number of tokens or null"):
        RSO(top_k=0)


def test_rso_without_a_reward_names_the_key(tmp_path, tiny_model):
    from harness.protocols import TrainingJob

    job = TrainingJob(start_checkpoint=tiny_model, output_dir=tmp_path / "out", plan=None, seed=0,
                      scratch_dir=tmp_path / "scratch")
    with pytest.raises(HarnessError, match=r"set reward=<name> \(conf/reward/\) or \+method_params\.rso\.judge"):
        RSO().train(job)
