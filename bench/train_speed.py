"""Training throughput: a smoke DPO step's achieved FLOP/s against this machine's matmul peak, old and new, side by side.

    python -m bench.train_speed                          # the embedded SmolLM2-135M-Instruct, 3 timed steps a setting
    python -m bench.train_speed --threads 1 --clock cpu  # one core, CPU seconds: for a machine other jobs share
    python -m bench.train_speed --steps 5 --model /path/to/hf-folder --profile

1. **Peak**: the best of several large square matmuls (2048, 3072, 4096) in fp32 and in bf16, with torch's threads
   (``--threads``, default torch's own: one per core).
2. **Training**: the harness's own DPO path (``harness.train.pairwise.pairwise_trainer``: ``HarnessDPOTrainer`` on
   TRL's ``DPOTrainer``, the plan from ``plan_training``) on the first pairs of hh-harmless under ``conf/budget/
   smoke.yaml`` (batch 8 pairs, micro-batch 4, prompts ≤ 96 and completions ≤ 64 tokens), ``steps`` + 1 optimizer
   steps per setting (``SETTINGS``):

   * ``old`` — main before issue 12 item 3: fp32; ``adamw_torch``; activation checkpointing on (TRL's default, which
     the harness did not override); TRL's CPU LM head (every position, tiled kernel); random micro-batches; SDPA;
   * ``new`` — ``smoke.yaml`` as shipped (``precision: auto`` = bf16 autocast where the hardware has native bf16,
     ``adamw_torch_fused``, no activation checkpointing) and the harness's trainer as shipped (compact LM head,
     whole-logit scoring, length-sorted micro-batches: ``harness.train.trl_extensions``; eager attention:
     ``harness.train.trl_support.model_init_kwargs``).

   A step's time runs from the end of the previous optimizer step to the end of this one (data, forward and backward
   of every micro-batch, clipping, optimizer, logging). **Excluded** (printed apart): model load, tokenization, the
   reference log-prob precompute (all in the trainer's constructor: ``setup``), and the first step (warm-up: oneDNN
   kernel selection, allocator growth). ``--profile`` profiles the first timed step, which then runs slower.

Achieved FLOP/s use the harness's own accounting (``harness.train.budget.training_flops``): 6·N per trained token,
N = the policy's parameters (tied embeddings once), tokens = prompt + completion of every chosen and rejected
sequence (what ``count_tokens`` counts; padding is not a token). That is model FLOPs utilization in the usual sense:
recomputation (activation checkpointing) and padding count as waste, not work; attention's own FLOPs are not
counted. Needs ALIGN_HARNESS_DATA (or ``--data``) pointing at the data mirror.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

if not __package__:  # run as a file (python bench/train_speed.py): import this checkout's harness
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MATMUL_SIZES = (2048, 3072, 4096)
# wall: elapsed seconds (an idle machine); cpu: this process's CPU seconds (time.process_time), which other jobs
# sharing the cores do not inflate — with threads=1 a per-core measurement robust to a busy machine. (Two threads on
# cores other jobs use wait on each other at every parallel op: measured here, a smoke step's elementwise copies
# averaged 5.4 ms with two threads on a busy machine against 0.47 ms with one.)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
# The two settings timed: budget fields over conf/budget/smoke.yaml, HarnessDPOTrainer's switches, and whether the
# model loads as the harness says (trl_support.model_init_kwargs) or with transformers' defaults
SETTINGS = {
    "old": {"budget": {"precision": "fp32", "activation_checkpointing": True, "optimizer": "adamw_torch"},
            "trainer": {"compact_lm_head": False, "whole_logit_scoring": False, "sort_micro_batches": False},
            "harness_attention": False},
    "new": {"budget": {},
            "trainer": {"compact_lm_head": True, "whole_logit_scoring": True, "sort_micro_batches": True},
            "harness_attention": True},
}


def matmul_peak_gflops(dtype, sizes=MATMUL_SIZES, repeats: int = 3, clock=time.perf_counter) -> float:
    """Best GFLOP/s of ``torch.mm`` on square ``dtype`` matrices of each size (2·n³ FLOPs), warm-up excluded."""
    import torch

    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        out = torch.empty(n, n, dtype=dtype)
        torch.mm(a, b, out=out)  # warm-up
        for _ in range(repeats):
            started = clock()
            torch.mm(a, b, out=out)
            best = max(best, 2 * n**3 / (clock() - started) / 1e9)
    return best


def smoke_budget(pairs: int, **fields):
    from harness.run.registry import CONF_DIR
    from harness.train.budget import Budget

    return Budget.from_config(OmegaConf.merge(OmegaConf.load(CONF_DIR / "budget" / "smoke.yaml"),
                                              {"pairs": pairs, **fields}))


def train_rows(data_mirror: str | None) -> list[dict]:
    from harness.inputs.data import load_preference_rows, split_data
    from harness.run.registry import CONF_DIR

    data_cfg = OmegaConf.load(CONF_DIR / "data" / "hh-harmless.yaml")
    rows, _ = load_preference_rows(data_cfg, data_mirror)
    return split_data(rows, data_cfg)[0]


def time_setting(model: Path, rows: list[dict], steps: int, setting: dict, *, profile: bool = False,
                 clock=time.perf_counter) -> dict:
    """``steps`` + 1 optimizer steps of the smoke DPO run under ``setting``; the first step is not timed."""
    import torch
    from transformers import AutoTokenizer, TrainerCallback

    from harness.protocols import TrainingJob
    from harness.run.registry import instantiate
    from harness.train.pairwise import pairwise_trainer
    from harness.train.plan import plan_training
    from harness.train.trl_extensions import HarnessDPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model)
    method = instantiate("method", "dpo", None, params_key="method_params")
    probe = smoke_budget(1, **setting["budget"])
    configured = smoke_budget((steps + 1) * probe.batch_pairs, **setting["budget"])
    plan = plan_training(configured, method, rows, [], tokenizer)
    scratch = Path(tempfile.mkdtemp(prefix="train-speed-"))
    job = TrainingJob(start_checkpoint=model, output_dir=scratch / "out", plan=plan, seed=0,
                      scratch_dir=scratch / "scratch")
    step_ends: list[float] = []
    tokens: dict[int, int] = {}
    padded: dict[int, int] = {}

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            step_ends.append(clock())

        def on_step_end(self, args, state, control, **kwargs):
            step_ends.append(clock())

    import harness.train.pairwise as pairwise

    previous = {name: getattr(HarnessDPOTrainer, name) for name in setting["trainer"]}
    loading = pairwise.model_init_kwargs
    for name, value in setting["trainer"].items():
        setattr(HarnessDPOTrainer, name, value)
    if not setting["harness_attention"]:
        pairwise.model_init_kwargs = lambda job: None  # transformers' default attention (SDPA), as before
    try:
        started = clock()
        trainer = pairwise_trainer(job, start=model, beta=method.beta, learning_rate=method.learning_rate,
                                   loss_type=[method.loss_type], label_smoothing=method.label_smoothing)
        setup_seconds = clock() - started
        compute_loss = trainer.compute_loss

        def counted(model_, inputs, *args, **kwargs):  # tokens as the budget counts them: prompt + completion
            step = trainer.state.global_step
            tokens[step] = tokens.get(step, 0) + int(inputs["attention_mask"].sum())
            padded[step] = padded.get(step, 0) + inputs["attention_mask"].numel()
            return compute_loss(model_, inputs, *args, **kwargs)

        trainer.compute_loss = counted
        trainer.add_callback(StepClock())
        profiler = None
        if profile:  # the second optimizer step, the first one timed
            from torch.profiler import ProfilerActivity, profile as torch_profile

            profiler = torch_profile(activities=[ProfilerActivity.CPU])

            class ProfileSecondStep(TrainerCallback):
                def on_step_end(self, args, state, control, **kwargs):
                    if state.global_step == 1:
                        profiler.start()
                    elif state.global_step == 2:
                        profiler.stop()

            trainer.add_callback(ProfileSecondStep())
        trainer.train()
        parameters = sum(p.numel() for p in trainer.model.parameters())
        curves = [entry for entry in trainer.state.log_history if "rewards/chosen" in entry]
    finally:
        for name, value in previous.items():
            setattr(HarnessDPOTrainer, name, value)
        pairwise.model_init_kwargs = loading
        shutil.rmtree(scratch, ignore_errors=True)
    durations = [end - start for start, end in zip(step_ends, step_ends[1:])]
    timed = range(1, len(durations))  # step 1 is the warm-up
    seconds = sum(durations[i] for i in timed)
    trained = sum(tokens[i] for i in timed)
    result = {
        "precision": plan.precision,
        "activation_checkpointing": configured.activation_checkpointing,
        **setting["trainer"],
        "attention": trainer.model.config._attn_implementation,
        "parameters": parameters,
        # one-time, not in the step times: model load + tokenization + reference precompute, and the first step
        "setup_seconds": round(setup_seconds, 2),
        "reference_seconds": round(trainer.reference_seconds, 2),
        "warmup_seconds": round(durations[0], 2),
        "seconds_per_step": seconds / len(timed),
        "tokens_per_step": trained / len(timed),
        "padding_share": 1 - trained / sum(padded[i] for i in timed),
        "gflops": 6 * parameters * trained / seconds / 1e9,
        # β·(log π − log π_ref) on step 1's pairs, before any update: 0 up to the rounding of the precision used
        "first_step_rewards": [curves[0]["rewards/chosen"], curves[0]["rewards/rejected"]] if curves else None,
    }
    if profiler is not None:
        result["profile"] = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    return result


def run(steps: int = 3, model: Path | str | None = None, *, data: str | None = None, threads: int | None = None,
        clock: str = "wall", profile: bool = False) -> dict:
    """The matmul peaks and the old and new smoke DPO settings' step times and achieved GFLOP/s (module docstring).
    ``threads``: torch's intra-op threads (default: as torch sets them, one per core); ``clock``: ``CLOCKS``."""
    import torch

    from harness.inputs.models import materialize_embedded
    from harness.inputs.paths import default_cache_dir

    if steps < 1:
        raise ValueError("steps must be at least 1 (one more, untimed, runs first)")
    model = Path(model) if model else materialize_embedded("smollm2-135m-instruct", default_cache_dir())
    rows = train_rows(data or os.environ.get("ALIGN_HARNESS_DATA"))
    if threads:
        torch.set_num_threads(threads)
    fp32_peak = matmul_peak_gflops(torch.float32, clock=CLOCKS[clock])
    bf16_peak = matmul_peak_gflops(torch.bfloat16, clock=CLOCKS[clock])
    settings = {name: time_setting(model, rows, steps, setting, profile=profile and name == "new", clock=CLOCKS[clock])
                for name, setting in SETTINGS.items()}
    old, new = settings["old"], settings["new"]
    return {
        "bf16_peak_gflops": bf16_peak,
        "fp32_peak_gflops": fp32_peak,
        "old_gflops": old["gflops"],
        "new_gflops": new["gflops"],
        "train_peak_share": new["gflops"] / bf16_peak,
        "old_seconds_per_step": old["seconds_per_step"],
        "new_seconds_per_step": new["seconds_per_step"],
        "threads": torch.get_num_threads(),
        "clock": clock,
        "steps_timed": steps,
        "settings": settings,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per setting (default 3; +1 warm-up)")
    parser.add_argument("--model", help="local HF model folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--data", default=os.environ.get("ALIGN_HARNESS_DATA"), help="data mirror folder")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's, one per core)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall seconds (default; an idle machine) or this process's CPU seconds (a busy one)")
    parser.add_argument("--profile", action="store_true", help="print the new setting's top operators of one step")
    arguments = parser.parse_args()
    result = run(arguments.steps, arguments.model, data=arguments.data, threads=arguments.threads,
                 clock=arguments.clock, profile=arguments.profile)
    settings = result.pop("settings")
    print(f"\nmatmul peak ({result['threads']} threads, {result['clock']} clock): bf16 {result['bf16_peak_gflops']:.1f}, "
          f"fp32 {result['fp32_peak_gflops']:.1f} GFLOP/s")
    print(f"smoke DPO, {result['steps_timed']} timed steps a setting (first step and setup excluded):")
    print(f"{'':<4} {'precision':<9} {'ckpt':<5} {'LM head':<13} {'sorted':<6} {'attention':<9} {'setup s':>7} "
          f"{'s/step':>7} {'tokens':>6} {'padding':>7} {'GFLOP/s':>7}  step-1 rewards (chosen, rejected)")
    for name, s in settings.items():
        head = ("compact" if s["compact_lm_head"] else "all") + ("+whole" if s["whole_logit_scoring"] else "+tiled")
        rewards = ", ".join(f"{r:+.1e}" for r in s["first_step_rewards"] or [])
        print(f"{name:<4} {s['precision']:<9} {str(s['activation_checkpointing']):<5} {head:<13} "
              f"{str(s['sort_micro_batches']):<6} {s['attention']:<9} {s['setup_seconds']:>7.1f} "
              f"{s['seconds_per_step']:>7.2f} {s['tokens_per_step']:>6.0f} {s['padding_share']:>7.1%} "
              f"{s['gflops']:>7.1f}  {rewards}")
    speedup = result["old_seconds_per_step"] / result["new_seconds_per_step"]
    print(f"new / bf16 peak = {result['train_peak_share']:.1%}; speed-up {speedup:.2f}× per step")
    if "profile" in settings["new"]:
        print(settings["new"]["profile"])
    print({key: round(value, 4) if isinstance(value, float) else value for key, value in result.items()})


if __name__ == "__main__":
    main()
