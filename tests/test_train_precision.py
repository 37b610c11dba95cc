"""Training precision and throughput settings: ``precision: auto`` resolves by the hardware (mocked here), bf16 runs
as autocast on the CPU through TRL and still moves every parameter, the compact LM head and whole-logit scoring give
TRL's log-probs and gradients from less work, length-sorted micro-batches keep every step's pairs, short sequences
train with eager attention on the CPU, and every budget file says which precision it uses and why."""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from conftest import cache_entries
from harness.errors import HarnessError
from harness.protocols import TrainingJob
from harness.train.budget import Budget
from harness.train.plan import native_bf16, plan_training, resolved_precision
from harness.train.trl_support import trl_arguments

REPO = Path(__file__).resolve().parent.parent
PAIR_METHOD = SimpleNamespace(data_view="pairs")
ROWS = [{"prompt": [{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"}],
         "chosen": f"It is {2 * i}.", "rejected": f"Maybe {2 * i + 1}, I would not like to say."} for i in range(4)]


def micro(**changes) -> Budget:
    return Budget.from_config(OmegaConf.merge(OmegaConf.load(REPO / "conf/budget/micro.yaml"), changes))


def hardware(monkeypatch, *, cuda: bool = False, cuda_bf16: bool = False, cpu: dict | None = None) -> None:
    """Pretend this machine has (or lacks) a CUDA GPU with native bf16 and these CPU capabilities."""
    import torch

    def is_bf16_supported(including_emulation: bool = True):
        return cuda_bf16 or including_emulation  # torch's own: emulation counts unless told otherwise

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: cpu or {})


@pytest.mark.parametrize("machine, expected", [
    ({"cuda": True, "cuda_bf16": True}, "bf16"),
    ({"cuda": True, "cuda_bf16": False, "cpu": {"avx512_bf16": True}}, "fp32"),  # the GPU trains; it only emulates
    ({"cpu": {"avx512_f": True, "avx512_bf16": True}}, "bf16"),   # AMD Zen 4, Intel Cooper Lake
    ({"cpu": {"amx_bf16": True, "amx_tile": True}}, "bf16"),      # Intel Sapphire Rapids
    ({"cpu": {"bf16": True}}, "bf16"),                            # Arm BF16
    ({"cpu": {"avx512_f": True, "avx2": True}}, "fp32"),          # AVX-512 without bf16: emulated, slower than fp32
    ({"cpu": {}}, "fp32"),
])
def test_auto_precision_follows_the_hardware(monkeypatch, machine, expected):
    hardware(monkeypatch, **machine)
    assert resolved_precision("auto") == expected
    assert (native_bf16() is not None) == (expected == "bf16")
    for configured in ("fp32", "bf16", "fp16"):  # an explicit precision is never second-guessed
        assert resolved_precision(configured) == configured


def test_the_plan_carries_and_records_the_resolved_precision(monkeypatch, tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    for capabilities, expected in (({"avx512_bf16": True}, "bf16"), ({}, "fp32")):
        hardware(monkeypatch, cpu=capabilities)
        plan = plan_training(micro(precision="auto"), PAIR_METHOD, ROWS, [], tokenizer)
        assert plan.precision == expected and plan.record()["precision"] == expected
        assert plan.for_rows(plan.rows).precision == expected  # sub-runs (rounds, chunks) keep the run's precision


def test_bf16_maps_onto_cpu_autocast_and_checkpointing_onto_the_budget(monkeypatch, tmp_path, tiny_model):
    from transformers import AutoTokenizer
    from trl import DPOConfig

    hardware(monkeypatch, cpu={"avx512_bf16": True})
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    for budget, bf16, checkpointing in ((micro(precision="auto"), True, False),
                                        (micro(precision="fp32", activation_checkpointing=True), False, True)):
        job = TrainingJob(start_checkpoint=tiny_model, output_dir=tmp_path / "out", seed=0, scratch_dir=tmp_path / "s",
                          plan=plan_training(budget, PAIR_METHOD, ROWS, [], tokenizer))
        arguments = trl_arguments(job, learning_rate=1e-3)
        assert (arguments["bf16"], arguments["use_cpu"], arguments["fp16"]) == (bf16, bf16, False)
        assert arguments["activation_checkpointing"] is checkpointing
        config = DPOConfig(**arguments)  # transformers accepts bf16 on a machine without a GPU
        assert config.bf16 is bf16 and config.activation_checkpointing is checkpointing
    with pytest.raises(HarnessError, match=r"budget\.activation_checkpointing='yes' must be true or false"):
        micro(activation_checkpointing="yes")


def test_bf16_autocast_training_moves_every_parameter(tmp_path, tiny_model):
    """DPO under budget.precision=bf16 on the CPU: the linear layers compute in bf16 (autocast) in the training
    steps, the saved weights stay fp32, every parameter changes, and the reference scored in bf16 is its own cache
    entry (an fp32 run scores its own)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from harness.train.pairwise import pairwise_trainer, pairwise_usage
    from harness.train.trl_support import finish

    budget = micro(precision="bf16", pairs=4, batch_pairs=2, micro_batch_pairs=2)  # 2 optimizer steps
    plan = plan_training(budget, PAIR_METHOD, ROWS, [], AutoTokenizer.from_pretrained(tiny_model))
    job = TrainingJob(start_checkpoint=tiny_model, output_dir=tmp_path / "out", plan=plan, seed=0,
                      scratch_dir=tmp_path / "scratch", reference_cache_dir=tmp_path / "reference")
    trainer = pairwise_trainer(job, start=tiny_model, beta=0.1, learning_rate=1e-2)
    assert trainer.reference_cache_status == {"train": "miss"}
    seen = set()
    layer = trainer.model.model.layers[0].mlp.down_proj
    handle = layer.register_forward_hook(lambda module, inputs, output: seen.add(output.dtype))
    trainer.train()
    handle.remove()
    outcome = finish(trainer, job, **pairwise_usage(trainer, job))
    assert seen == {torch.bfloat16} and outcome.optimizer_steps == 2
    assert all(torch.isfinite(torch.tensor(c["loss"])) for c in outcome.curves if "loss" in c)
    before, after = load_file(tiny_model / "model.safetensors"), load_file(job.output_dir / "model.safetensors")
    assert set(before) == set(after) and {t.dtype for t in after.values()} == {torch.float32}
    unchanged = [key for key in before if torch.equal(before[key], after[key])]
    assert not unchanged, f"parameters bf16 training left unchanged: {unchanged}"
    # the reference was scored in bf16, as the policy trains: a separate cache entry from an fp32 one
    fp32 = pairwise_trainer(TrainingJob(start_checkpoint=tiny_model, output_dir=tmp_path / "o32", seed=0,
                                        scratch_dir=tmp_path / "s32", reference_cache_dir=tmp_path / "reference",
                                        plan=plan_training(micro(pairs=4, batch_pairs=2, micro_batch_pairs=2),
                                                           PAIR_METHOD, ROWS, [], AutoTokenizer.from_pretrained(tiny_model))),
                            start=tiny_model, beta=0.1, learning_rate=1e-2)
    assert fp32.reference_cache_status == {"train": "miss"} and len(cache_entries(tmp_path / "reference")) == 2
    assert trainer._reference_settings()["attention"] == "eager"  # short sequences on the CPU: in the cache key too


def test_compact_lm_head_scores_the_same_log_probs_from_the_scored_rows_only(tiny_model, monkeypatch):
    """TRL's fused LM head on the CPU projects every position; inside ``compact_scoring`` only the labelled ones —
    the same log-probs and gradients (up to fp32 rounding), from fewer rows."""
    import torch
    import trl.trainer.utils as trl_utils
    from transformers import AutoModelForCausalLM

    from harness.train.trl_extensions import compact_scoring

    rows_projected = []
    function = trl_utils._ChunkedLogProbFunction

    class Counting(function):
        @staticmethod
        def forward(ctx, hidden, *args):
            rows_projected.append(hidden.shape[0])
            return function.forward(ctx, hidden, *args)

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", Counting)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    torch.manual_seed(0)
    input_ids = torch.randint(0, model.config.vocab_size, (3, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 9:] = 0  # a padded row
    labels = input_ids.clone()
    labels[:, :7] = -100  # the prompt
    labels[attention_mask == 0] = -100
    results = []
    for context in (contextlib.nullcontext, compact_scoring):
        model.zero_grad()
        with context():
            out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
        out.log_probs.sum().backward()
        results.append((out.log_probs.detach(), out.is_top1, model.lm_head.weight.grad.clone()))
    (full, full_top1, full_grad), (compact, compact_top1, compact_grad) = results
    assert rows_projected == [3 * 11, int((labels[:, 1:] != -100).sum())] and rows_projected[1] < rows_projected[0]
    torch.testing.assert_close(compact, full, rtol=1e-5, atol=1e-5)
    assert torch.equal(compact_top1, full_top1)
    torch.testing.assert_close(compact_grad, full_grad, rtol=1e-4, atol=1e-6)
    assert (full[labels[:, 1:] == -100] == 0).all() and (full[labels[:, 1:] != -100] < 0).all()
    assert trl_utils._use_triton(torch.device("cpu")) is False  # the block restored TRL's own decision


@pytest.mark.parametrize("bf16", [False, True])
def test_whole_logit_scoring_is_trls_kernel_with_fewer_passes(bf16):
    """``WholeLogitScoring`` gives TRL's kernel's five outputs and gradients: equal in fp32 up to rounding; under bf16
    autocast the log-probs still agree to fp32 rounding and the gradients to bf16's (TRL accumulates those in fp32)."""
    import torch
    from trl.kernels import ChunkedLogProbFunction

    from harness.train.trl_extensions import WholeLogitScoring

    torch.manual_seed(0)
    tokens, hidden_size, vocabulary = 24, 16, 300
    hidden, weight = torch.randn(tokens, hidden_size), torch.randn(vocabulary, hidden_size) * 0.3
    targets = torch.randint(0, vocabulary, (tokens,))
    targets[0] = (hidden[0] @ weight.T).argmax()  # one top-1 hit at least
    outputs = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    runs = []
    for kernel in (ChunkedLogProbFunction, WholeLogitScoring):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            # chunk of 128: TRL's kernel folds the vocabulary in three tiles, the harness's does not tile
            result = kernel.apply(h, w, None, targets, 0.7, 128, 30.0, 0.9, outputs)
        (result[0] * torch.linspace(0.5, 1.5, tokens)).sum().backward()
        runs.append((result, h.grad, w.grad))
    (trl, trl_hidden, trl_weight), (ours, our_hidden, our_weight) = runs
    for name, expected, actual in zip(outputs[:4], trl[:4], ours[:4]):
        torch.testing.assert_close(actual.detach(), expected.detach(), rtol=1e-5, atol=1e-5, msg=name)
    assert torch.equal(ours[4], trl[4]) and ours[4].any()
    tolerance = dict(rtol=2e-2, atol=2e-3) if bf16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(our_hidden, trl_hidden, **tolerance)
    torch.testing.assert_close(our_weight, trl_weight, **tolerance)


def test_micro_batches_are_length_sorted_within_each_step_and_keep_its_pairs(tmp_path, tiny_model):
    """Sorting changes which micro-batch a pair lands in, never which optimizer step: the same pairs per step as TRL's
    own order (same seed), each micro-batch padded less or equally; a loss over micro-batch statistics keeps TRL's."""
    from transformers import AutoTokenizer

    from harness.train.pairwise import pairwise_trainer
    from harness.train.trl_extensions import HarnessDPOTrainer, StepSortedSampler

    rows = [{"prompt": [{"role": "user", "content": "Say something" + " more" * (i * 7 % 13)}],
             "chosen": "Sure" + ", sure" * (i * 5 % 11), "rejected": "No" + " way" * (i % 4)} for i in range(12)]
    budget = micro(pairs=12, batch_pairs=4, micro_batch_pairs=1)  # 3 steps of 4 micro-batches of one pair
    plan = plan_training(budget, PAIR_METHOD, rows, [], AutoTokenizer.from_pretrained(tiny_model))
    job = TrainingJob(start_checkpoint=tiny_model, output_dir=tmp_path / "out", plan=plan, seed=0,
                      scratch_dir=tmp_path / "scratch")

    def steps(trainer) -> list[list[tuple[tuple[int, ...], int]]]:
        """Per optimizer step, each micro-batch's (chosen sequence, padded width), in order."""
        batches = [(tuple(b["input_ids"][0][b["attention_mask"][0].bool()].tolist()), b["input_ids"].shape[1])
                   for b in trainer.get_train_dataloader()]
        return [batches[i:i + 4] for i in range(0, len(batches), 4)]

    sorted_steps = steps(trainer := pairwise_trainer(job, start=tiny_model, beta=0.1, learning_rate=1e-3))
    assert isinstance(trainer._get_train_sampler(), StepSortedSampler)
    HarnessDPOTrainer.sort_micro_batches = False
    try:
        random_steps = steps(pairwise_trainer(job, start=tiny_model, beta=0.1, learning_rate=1e-3))
    finally:
        HarnessDPOTrainer.sort_micro_batches = True
    assert len(sorted_steps) == len(random_steps) == 3
    for ours, theirs in zip(sorted_steps, random_steps):
        assert sorted(ours) == sorted(theirs)  # the same pairs in the step
        assert [width for _, width in ours] == sorted((width for _, width in ours), reverse=True)  # longest first
    assert sorted_steps != random_steps  # the order did change somewhere (else this test proves nothing)
    aot = pairwise_trainer(job, start=tiny_model, beta=0.1, learning_rate=1e-3, loss_type=["aot"])
    assert not isinstance(aot._get_train_sampler(), StepSortedSampler)


def test_short_sequences_train_with_eager_attention_on_the_cpu(monkeypatch, tmp_path, tiny_model):
    from transformers import AutoTokenizer

    from harness.train.trl_support import EAGER_ATTENTION_MAX_LENGTH, model_init_kwargs

    hardware(monkeypatch)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)

    def job(**changes):
        return TrainingJob(start_checkpoint=tiny_model, output_dir=tmp_path / "out", seed=0, scratch_dir=tmp_path,
                           plan=plan_training(micro(**changes), PAIR_METHOD, ROWS, [], tokenizer))

    assert model_init_kwargs(job()) == {"attn_implementation": "eager"}
    assert job(max_prompt_tokens=EAGER_ATTENTION_MAX_LENGTH).plan.max_length > EAGER_ATTENTION_MAX_LENGTH
    assert model_init_kwargs(job(max_prompt_tokens=EAGER_ATTENTION_MAX_LENGTH)) is None  # long: transformers' default
    hardware(monkeypatch, cuda=True, cuda_bf16=True)
    assert model_init_kwargs(job()) is None  # a GPU keeps its memory-efficient kernels


def comment_block(lines: list[str], index: int) -> str:
    """The comment of line ``index`` with the comment-only lines right above and below it."""
    start, end = index, index + 1
    while start > 0 and lines[start - 1].startswith("#"):
        start -= 1
    while end < len(lines) and lines[end].startswith("#"):
        end += 1
    return " ".join(line.split("#", 1)[1] for line in lines[start:end] if "#" in line)


def test_every_budget_file_says_which_precision_it_uses_and_why():
    for path in sorted((REPO / "conf" / "budget").glob("*.yaml")):
        lines = path.read_text().splitlines()
        budget = Budget.from_config(OmegaConf.load(path))
        for field in ("precision", "activation_checkpointing"):
            index = next(i for i, line in enumerate(lines) if line.startswith(f"{field}:"))
            why = comment_block(lines, index)
            assert len(why.split()) >= 8, f"{path.name}: {field} needs a comment saying why it is set so"
        why = comment_block(lines, next(i for i, line in enumerate(lines) if line.startswith("precision:")))
        assert budget.precision in why, f"{path.name}: say which precision it uses ({budget.precision})"
        if budget.precision == "auto":
            assert "bf16" in why and "fp32" in why, f"{path.name}: say what auto becomes, and where"
