"""The list view (harness.inputs.data: format list / toy-list, pairs as lists of 2; a list of K counts as K − 1
pairs), its plan and matching, and the listwise losses of LiPO-λ, RRHF and PRO against values worked by hand from
the papers' equations; through the CLI: learning on toy lists, matching by tokens / FLOPs, the sampled variant."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from harness.errors import HarnessError
from harness.inputs.data import (budget_rows, heldout_pairs_of, normalize_list_row, pair_count, toy_list_rows,
                                 view_rows)
from harness.records import read_records
from harness.train.budget import Budget
from harness.train.listwise import sampled_visit_cost
from harness.train.matching import ModelSizes, matched_visits, trained_tokens
from harness.train.plan import _derive, list_batches
from methods.lipo import LiPO, lipo_lambda_loss
from methods.pro import PRO, pro_loss
from methods.rrhf import RRHF, rrhf_loss


def budget(**changes) -> Budget:
    values = dict(name="b", pairs=6, epochs=1, max_prompt_tokens=8, max_completion_tokens=8, batch_pairs=6,
                  micro_batch_pairs=3, optimizer="adamw_torch", lr_scheduler="constant", warmup_ratio=0.0,
                  weight_decay=0.0, max_grad_norm=1.0, seed=0, precision="fp32")
    values.update(changes)
    return Budget(**values)


def row(*scores, prompt="hi"):
    return {"prompt": [{"role": "user", "content": prompt}], "responses": [f"r{i}" for i in range(len(scores))],
            "scores": list(scores)}


# ---------------------------------------------------------------------------------------------------------------
# the losses, worked by hand


def test_lipo_lambda_loss_by_hand():
    """LiPO-λ (Liu et al. 2024, arXiv:2402.01878, §4): Σ_{ψi>ψj} Δij·log(1 + e^−(si−sj)),
    Δij = |Gi − Gj|·|1/D(τi) − 1/D(τj)|, G = 2^ψ − 1, D(τ) = log2(1 + τ), s = β·log π/π_ref."""
    # K = 2, β = 0.5: s = 0.5·([−1, −2] − [−3, −1]) = [1, −0.5]; ranks by s 1, 2; G = [1, 0]
    delta = 1.0 * (1.0 - 1.0 / math.log2(3))                           # 0.36907
    expected = delta * math.log(1 + math.exp(-1.5))                    # 0.36907 · 0.20141 = 0.074335
    loss = lipo_lambda_loss(torch.tensor([[-1.0, -2.0]]), torch.tensor([[3.0, 3.0]]), torch.tensor([[-3.0, -1.0]]),
                            torch.tensor([[1.0, 0.0]]), beta=0.5)
    assert loss.shape == (1,) and loss.item() == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx(0.074335, abs=1e-6)

    # K = 3, β = 1, reference 0: s = [0, 0.5, −1], scores ψ = [2, 1, 0] → G = [3, 1, 0]; the policy ranks y1 first:
    # τ = [2, 1, 3], 1/D = [1/log2 3, 1, 1/log2 4] = [0.63093, 1, 0.5]
    d0, d1, d2 = 1 / math.log2(3), 1.0, 0.5
    terms = [(abs(3 - 1) * abs(d0 - d1), math.log(1 + math.exp(0.5))),   # (0, 1): s0 − s1 = −0.5
             (abs(3 - 0) * abs(d0 - d2), math.log(1 + math.exp(-1.0))),  # (0, 2): s0 − s2 = 1
             (abs(1 - 0) * abs(d1 - d2), math.log(1 + math.exp(-1.5)))]  # (1, 2): s1 − s2 = 1.5
    expected = sum(w * l for w, l in terms)
    assert expected == pytest.approx(0.942766, abs=1e-5)
    loss = lipo_lambda_loss(torch.tensor([[0.0, 0.5, -1.0]]), torch.ones(1, 3), torch.zeros(1, 3),
                            torch.tensor([[2.0, 1.0, 0.0]]), beta=1.0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # ties carry no pair: equal scores give 0
    assert lipo_lambda_loss(torch.tensor([[0.3, -0.2]]), torch.ones(1, 2), torch.zeros(1, 2),
                            torch.tensor([[1.0, 1.0]]), beta=1.0).item() == 0.0


def test_rrhf_loss_by_hand():
    """RRHF (Yuan et al. 2023, arXiv:2304.05302, §3): Σ_{ri<rj} max(0, pi − pj) − Σt log π(y_best,t),
    p = log-prob / length."""
    logps, lengths = torch.tensor([[-4.0, -6.0, -1.0]]), torch.tensor([[4.0, 3.0, 2.0]])  # p = [−1, −2, −0.5]
    scores = torch.tensor([[3.0, 1.0, 2.0]])
    # r1 < r0: max(0, −2 + 1) = 0; r1 < r2: max(0, −2 + 0.5) = 0; r2 < r0: max(0, −0.5 + 1) = 0.5 → L_rank = 0.5
    # best = y0: L_ft = −(−4) = 4
    assert rrhf_loss(logps, lengths, None, scores).item() == pytest.approx(0.5 + 4.0)
    assert rrhf_loss(logps, lengths, None, scores, rank_weight=2.0, sft_weight=0.5).item() == pytest.approx(1.0 + 2.0)
    # correctly ordered p: no ranking loss, only the best response's NLL
    assert rrhf_loss(torch.tensor([[-2.0, -6.0]]), torch.tensor([[2.0, 2.0]]), None,
                     torch.tensor([[1.0, 0.0]])).item() == pytest.approx(2.0)


def test_pro_loss_by_hand():
    """PRO (Song et al. 2023, arXiv:2306.17492, §3): −Σk log[exp(r^k/T^k_k) / Σ_{i≥k} exp(r^i/T^i_k)],
    T^i_k = 1/(rφ^k − rφ^i), T^k_k = min_{i>k} T^i_k; + β·SFT of the best."""
    # r = log-prob / length = [−2/2, −4/2, −9/3] = [−1, −2, −3]; rewards [2, 1, 0]
    # k = 1: 1/T = [max(1, 2), 1, 2] = [2, 1, 2] → logits [−2, −2, −6]: log(2 + e^−4)
    # k = 2: 1/T = [1, 1] → logits [−2, −3]: log(1 + e^−1)
    pro_only = math.log(2 + math.exp(-4)) + math.log(1 + math.exp(-1))
    assert pro_only == pytest.approx(1.015517, abs=1e-5)
    logps, lengths, scores = torch.tensor([[-2.0, -4.0, -9.0]]), torch.tensor([[2.0, 2.0, 3.0]]), torch.tensor([[2.0, 1.0, 0.0]])
    sft = 1.0  # per-token NLL of the best: −(−2)/2
    assert pro_loss(logps, lengths, None, scores, sft_weight=0.05).item() == pytest.approx(pro_only + 0.05 * sft, rel=1e-5)
    # the responses in any order: sorted by score inside
    shuffled = pro_loss(torch.tensor([[-9.0, -2.0, -4.0]]), torch.tensor([[3.0, 2.0, 2.0]]), None,
                        torch.tensor([[0.0, 2.0, 1.0]]), sft_weight=0.05)
    assert shuffled.item() == pytest.approx(pro_only + 0.05, rel=1e-5)
    # "PRO w/o T": plain Plackett–Luce, log(1 + e^−1 + e^−2) + log(1 + e^−1)
    plain = math.log(1 + math.exp(-1) + math.exp(-2)) + math.log(1 + math.exp(-1))
    assert pro_loss(logps, lengths, None, scores, sft_weight=0.0,
                    temperature_weighting=False).item() == pytest.approx(plain, rel=1e-5)


def test_losses_prefer_the_better_ordering():
    """Each loss is lower when the policy orders the list as the scores do, and its gradient raises the best."""
    scores = torch.tensor([[2.0, 1.0, 0.0]])
    lengths = torch.full((1, 3), 2.0)
    good, bad = torch.tensor([[-1.0, -2.0, -3.0]]), torch.tensor([[-3.0, -2.0, -1.0]])
    for loss in (lambda lp: lipo_lambda_loss(lp, lengths, torch.full((1, 3), -2.0), scores, beta=1.0),
                 lambda lp: rrhf_loss(lp, lengths, None, scores, sft_weight=0.0),
                 lambda lp: pro_loss(lp, lengths, None, scores, sft_weight=0.0)):
        assert loss(good).item() < loss(bad).item()
        logps = bad.clone().requires_grad_(True)
        loss(logps).sum().backward()
        assert logps.grad[0, 0] < 0 < logps.grad[0, 2]  # descent raises the best, lowers the worst


# ---------------------------------------------------------------------------------------------------------------
# data: the list view and its budget


def test_list_rows_normalize_and_view():
    where = "f.jsonl:3"
    normalized = normalize_list_row({"prompt": "q", "responses": ["a", [{"role": "assistant", "content": "b"}]],
                                     "ranks": [2, 1]}, where=where)
    assert normalized["responses"] == ["a", "b"] and normalized["scores"] == [-2.0, -1.0]
    for bad, field in [({"prompt": "q", "responses": ["a"], "scores": [1]}, "'responses'"),
                       ({"prompt": "q", "responses": ["a", ""], "scores": [1, 0]}, "'responses' item 1"),
                       ({"prompt": "q", "responses": ["a", "b"], "scores": [1]}, "'scores'"),
                       ({"prompt": "q", "responses": ["a", "b"], "scores": [1, "x"]}, "'scores'"),
                       ({"prompt": "q", "responses": ["a", "b"], "ranks": [0, 1]}, "'ranks'"),
                       ({"prompt": "q", "responses": ["a", "b"], "scores": [1, 1]}, "'scores'"),
                       ({"prompt": "q", "responses": ["a", "b"]}, "'scores'"),
                       ({"responses": ["a", "b"], "scores": [1, 0]}, "'prompt'")]:
        with pytest.raises(HarnessError, match=f"^{where}: .*field {field}"):
            normalize_list_row(bad, where=where)
    lists = view_rows([row(0.0, 2.0, 1.0)], "lists")  # sorted best first
    assert lists[0]["responses"] == ["r1", "r2", "r0"] and lists[0]["scores"] == [2.0, 1.0, 0.0]
    pair = {"prompt": [{"role": "user", "content": "q"}], "chosen": "c", "rejected": "r"}
    assert view_rows([pair], "lists") == [{"prompt": pair["prompt"], "responses": ["c", "r"], "scores": [1.0, 0.0]}]
    with pytest.raises(HarnessError, match="listwise .* list method"):
        view_rows([row(1.0, 0.0)], "pairs")
    assert heldout_pairs_of([row(0.0, 2.0, 1.0)])[0] | {"prompt": None} == {"prompt": None, "chosen": "r1",
                                                                          "rejected": "r0"}
    toy = [r for _, r in toy_list_rows(5)]
    assert all(len(r["responses"]) == 4 and sorted(r["scores"]) == [0.0, 1.0, 2.0, 3.0] for r in toy)
    assert len({tuple(r["responses"]) for r in toy}) == 4  # the order rotates


def test_a_list_of_k_counts_as_k_minus_1_pairs():
    lists = [row(3.0, 2.0, 1.0, 0.0, prompt=f"p{i}") for i in range(10)]
    assert pair_count(lists) == 30
    assert len(budget_rows(lists, 6)) == 2 and len(budget_rows(lists, 7)) == 2 and len(budget_rows(lists, 1)) == 1
    # steps: 6 pairs a step = 2 lists of 4; micro-batch 3 pairs = 1 list; 2 micro-batches a step
    assert list_batches(budget(), 4, 1) == (2, 1, 2)
    plan = _derive(budget(), "lists", view_rows(lists[:4], "lists"), [], epochs=1, examples_per_pair=1, matching={},
                   world=1, precision="fp32")
    assert (plan.optimizer_steps, plan.micro_batch, plan.gradient_accumulation, plan.visits) == (2, 1, 2, 12)
    # pairs as lists of 2: the pair trainer's numbers exactly
    pairs = [{"prompt": [{"role": "user", "content": f"p{i}"}], "chosen": "c", "rejected": "r"} for i in range(12)]
    as_lists = _derive(budget(), "lists", view_rows(pairs, "lists"), [], epochs=1, examples_per_pair=1, matching={},
                       world=1, precision="fp32")
    as_pairs = _derive(budget(), "pairs", view_rows(pairs, "pairs"), [], epochs=1, examples_per_pair=1, matching={},
                       world=1, precision="fp32")
    for field in ("optimizer_steps", "micro_batch", "gradient_accumulation", "visits"):
        assert getattr(as_lists, field) == getattr(as_pairs, field), field


def test_list_matching_by_hand():
    """tokens / flops: the target prices a list of K as its K − 1 adjacent pairs under DPO; a list method's visit
    trains K·prompt + Σ responses."""
    lengths = [(10, 5, 5, 5, 5)] * 2  # lists of 4: prompt 10, every response 5
    # DPO on the adjacent pairs: 3 × (2·10 + 5 + 5) = 90 trained tokens a list; a list method trains 4·10 + 20 = 60
    assert trained_tokens("pairs", lengths[0]) == 90 and trained_tokens("lists", lengths[0]) == 60
    assert trained_tokens("pairs", (10, 5, 5)) == trained_tokens("lists", (10, 5, 5)) == 30  # K = 2: a pair
    lipo, rrhf = SimpleNamespace(data_view="lists", reference_based=True), SimpleNamespace(data_view="lists",
                                                                                        reference_based=False)
    assert matched_visits(budget(match="examples"), lipo, lengths) == 2  # 6 pairs = 2 lists of 4
    assert matched_visits(budget(match="examples"), lipo, [(10, 5, 5)]) == 6  # pairs: lists of 2
    # tokens: target 2 lists × 90 = 180 → 180 / 60 = 3 list visits, whatever the reference
    assert matched_visits(budget(match="tokens"), lipo, lengths) == 3
    assert matched_visits(budget(match="tokens"), rrhf, lengths) == 3
    # flops: target 2 × (6 + 2)·90 = 1440; LiPO (6 + 2)·60 = 480 a visit → 3; RRHF 6·60 = 360 → 4
    assert matched_visits(budget(match="flops"), lipo, lengths) == 3
    assert matched_visits(budget(match="flops"), rrhf, lengths) == 4


def test_sampled_variant_prices_its_generation():
    """list_source=sampled: one budget pair is 1/(K − 1) of a list of K samples, each generated (forward-only) and
    scored by the reward (× N_reward/N), then trained, and for LiPO scored by the reference."""
    sizes = ModelSizes(policy=100, reward=50)
    # K = 4, prompt 10 + completion 5: 4/3 sequences of 15 a pair; trained 20; forward 20·1.5 = 30 (+ 20 reference)
    assert sampled_visit_cost(4, False, 10, 5, sizes) == pytest.approx((20.0, 30.0))
    assert sampled_visit_cost(4, True, 10, 5, sizes) == pytest.approx((20.0, 50.0))
    sampled = RRHF(list_source="sampled", list_size=4)
    assert sampled.needs_reward and sampled.prompts_only
    assert sampled.visit_cost(10, 5, None, sizes) == pytest.approx((20.0, 30.0))
    assert not getattr(RRHF(), "needs_reward") and not hasattr(RRHF(), "visit_cost")
    with pytest.raises(HarnessError, match="list_source='k'"):
        PRO(list_source="k")
    with pytest.raises(HarnessError, match="list_size=1"):
        LiPO(list_size=1)


def test_response_logps_score_only_the_responses(tiny_model):
    """The list trainer's log-probs (projecting only positions from the shortest prompt on) equal the whole-logit
    sum over each response's tokens; token counts are the responses' lengths."""
    from transformers import AutoModelForCausalLM

    from harness.train.listwise import collate_lists, response_logps

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    items = [{"prompt_ids": [1, 5, 7, 9], "completion_ids": [[3, 4], [8, 8, 2]], "scores": [1.0, 0.0]},
             {"prompt_ids": [1, 6], "completion_ids": [[3], [4, 4, 4, 4]], "scores": [1.0, 0.0]}]
    batch = collate_lists(items, 0)
    assert batch["input_ids"].shape == (4, 7) and batch["scores"].shape == (2, 2)
    logps, lengths = response_logps(model, batch)
    whole = torch.log_softmax(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                              .logits[:, :-1].float(), -1)
    expected = (whole.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1) * batch["completion_mask"][:, 1:]).sum(-1)
    assert torch.allclose(logps, expected, atol=1e-5)
    assert lengths.tolist() == [2, 3, 1, 4]


def test_reference_log_probs_go_through_the_shared_cache(tiny_model, tmp_path):
    """LiPO's reference log-probs: scored once into the shared reference cache (a miss), read back by the next run
    on the same start and lists (a hit) — the same numbers as scoring them — ; other lists are another entry; no
    cache folder, no cache."""
    import contextlib

    from transformers import AutoModelForCausalLM

    from harness.train.listwise import cached_reference_scores, reference_scores

    trainer = SimpleNamespace(model=AutoModelForCausalLM.from_pretrained(tiny_model), pad_id=0,
                              args=SimpleNamespace(bf16=False, fp16=False),
                              autocast_smart_context_manager=contextlib.nullcontext)
    items = [{"prompt_ids": [1, 5, 7, 9], "completion_ids": [[3, 4], [8, 8, 2], [5]], "scores": [2.0, 1.0, 0.0]},
             {"prompt_ids": [1, 6], "completion_ids": [[3], [4, 4, 4, 4], [2, 2]], "scores": [2.0, 1.0, 0.0]}]
    scored = reference_scores(trainer, items, 1)
    cache = tmp_path / "reference_logprobs"
    options = dict(reference_path=tiny_model, cache_dir=cache, max_length=16)
    assert cached_reference_scores(trainer, items, 1, **options) == (scored, "miss")
    assert cached_reference_scores(trainer, items, 2, **options) == (scored, "hit")   # batch size is not in the key
    assert [p.name.startswith("lists-") for p in cache.glob("*.safetensors")] == [True]
    other = [items[0], {**items[1], "completion_ids": [[3], [4, 4, 4], [2, 2]]}]
    assert cached_reference_scores(trainer, other, 1, **options)[1] == "miss"
    assert len(list(cache.glob("*.safetensors"))) == 2
    assert cached_reference_scores(trainer, items, 1, **{**options, "cache_dir": None}) == (scored, "off")


# ---------------------------------------------------------------------------------------------------------------
# through the CLI

LISTS = ["model=tiny-random", "data=toy-lists", "budget=toy", "budget@stage_budget=toy", "settings=[instruct]",
         "tasks=[heldout_preference]"]
METHODS = ("lipo", "rrhf", "pro")


@pytest.mark.slow
def test_list_methods_learn_the_toy_lists(tmp_path, cache_dir):
    """On toy lists (K = 4): the loss falls, every parameter changes, held-out accuracy (best vs worst) rises."""
    rates = [f"+method_params.{m}.learning_rate=1e-3" for m in METHODS]
    result = run_cli("sweep", *LISTS, f"methods=[{','.join(METHODS)}]", *rates, f"paths.results={tmp_path}",
                     "name=l", cache=cache_dir, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    records = {r["method"]: r for r in read_records(tmp_path / "l")}
    assert all(r["status"] == "ok" for r in records.values()), records
    start_weights = load_file(next((cache_dir / "models" / "tiny-random-3").glob("*.safetensors")))
    start_avg = records["start"]["metrics"]["avg_logp_accuracy"]["value"]
    for method in METHODS:
        record = records[method]
        consumed = record["consumed"]
        assert consumed["list_size"] == 4 and consumed["pairs"] == 3 * consumed["lists"]
        curves = [json.loads(line) for line in
                  (tmp_path / "l" / "curves" / f"{record['run_id']}.jsonl").read_text().splitlines()]
        losses = [c["loss"] for c in curves if "loss" in c]
        assert losses[-1] < losses[0], (method, losses)
        trained = load_file(next((cache_dir / "checkpoints" / record["run_id"]).glob("*.safetensors")))
        assert not [n for n, t in start_weights.items() if torch.equal(t, trained[n])], method
        metrics = record["metrics"]
        assert metrics["logratio_accuracy"]["value"] > 0.5 or metrics["avg_logp_accuracy"]["value"] > start_avg, \
            (method, metrics)


@pytest.mark.parametrize("mode, key", [("flops", "flops"), ("tokens", "policy_tokens")])
def test_list_methods_match_tokens_and_flops(tmp_path, cache_dir, mode, key):
    """budget.match=tokens|flops on list data: each list method consumes the target (DPO on the lists' adjacent
    pairs) within 10 %: a list visit is the granularity."""
    result = run_cli("sweep", *LISTS, f"methods=[{','.join(METHODS)}]", "include_start=false",
                     "+task_params.heldout_preference.limit=4", "budget.pairs=24", "budget.batch_pairs=3",
                     "budget.micro_batch_pairs=3", f"budget.match={mode}", f"paths.results={tmp_path}", "name=m",
                     cache=cache_dir, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    consumed = {r["method"]: r["consumed"] for r in read_records(tmp_path / "m")}
    assert set(consumed) == set(METHODS)
    for method, c in consumed.items():
        assert c["match"] == mode and abs(c["match_ratio"] - 1) < 0.1, (method, c)
    if mode == "flops":  # LiPO pays the reference: fewer lists than the reference-free ones
        assert consumed["lipo"]["lists"] < consumed["rrhf"]["lists"] == consumed["pro"]["lists"]


def test_list_methods_on_pairs_take_dpo_steps_and_tokens(tmp_path, cache_dir):
    """On pair data a pair is a list of 2: a list method takes DPO's optimizer steps and trains DPO's tokens."""
    result = run_cli("sweep", "model=tiny-random", "data=toy-preference", "budget=micro", "budget@stage_budget=micro",
                     "settings=[instruct]", "include_start=false", "tasks=[heldout_preference]",
                     "+task_params.heldout_preference.limit=4", "methods=[dpo,lipo,rrhf]", f"paths.results={tmp_path}",
                     "name=p", cache=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    consumed = {r["method"]: r["consumed"] for r in read_records(tmp_path / "p")}
    for method in ("lipo", "rrhf"):
        for field in ("optimizer_steps", "pairs", "policy_tokens"):
            assert consumed[method][field] == consumed["dpo"][field], (method, field, consumed)
    assert consumed["lipo"]["reference_tokens"] == consumed["dpo"]["reference_tokens"]
    assert consumed["rrhf"]["reference_tokens"] == 0


def test_sampled_lists_through_the_cli(tmp_path, cache_dir):
    """list_source=sampled: K samples a prompt scored by the reward, generation and reward priced in the record."""
    result = run_cli("sweep", "model=tiny-random", "data=toy-preference", "budget=toy", "budget@stage_budget=toy",
                     "settings=[instruct]", "reward=short-answers", "reward.max_chars=32", "include_start=false",
                     "tasks=[heldout_preference]", "+task_params.heldout_preference.limit=4", "budget.pairs=12",
                     "budget.batch_pairs=6", "budget.micro_batch_pairs=3", "budget.max_completion_tokens=4",
                     "methods=[pro]", "+method_params.pro.list_source=sampled", "+method_params.pro.list_size=4",
                     f"paths.results={tmp_path}", "name=s", cache=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    (record,) = read_records(tmp_path / "s")
    assert record["status"] == "ok", record["reason"]
    consumed = record["consumed"]
    # 12 pairs = 4 lists of 4 samples (3 pairs each); 6 pairs a step = 2 lists → 2 steps
    assert consumed["list_source"] == "sampled" and consumed["prompts_sampled"] == 4 and consumed["lists"] == 4
    assert consumed["list_size"] == 4 and consumed["pairs"] == 12 and consumed["optimizer_steps"] == 2
    assert consumed["generation_tokens"] > 0 and consumed["reward_tokens"] == 0  # a programmatic reward reads none
    assert consumed["reference_tokens"] == consumed["generation_tokens"]  # PRO is reference-free
    assert record["run_config"]["reward"]["kind"] == "short-answers"


def test_pair_methods_are_refused_on_list_data(tmp_path, cache_dir):
    result = run_cli("sweep", *LISTS, "methods=[dpo,lipo]", f"paths.results={tmp_path}", "name=x", cache=cache_dir)
    assert result.returncode == 2
    assert "is listwise" in result.stderr and "'dpo'" in result.stderr
    assert not (tmp_path / "x").exists()
