"""PAFT — parallel SFT and preference training, merged (Pentyala et al. 2024, "PAFT: A parallel training paradigm for
effective LLM fine-tuning", arXiv:2406.17923).

Instead of SFT then DPO (which pays an "alignment tax"), PAFT trains both from the same starting model independently,
δ_sft and δ_dpo, and merges them: θ = f(θ_start, δ_sft, δ_dpo). The paper finds the DPO delta naturally sparse and the
SFT delta dense, and sparsifies the SFT delta with an L1 penalty during SFT so that the merge interferes less; TIES
merging (and task arithmetic) of the sparse deltas works best.

Here, each training is a LoRA adapter (peft) on the starting checkpoint:

1. **SFT** on the chosen responses of the budget's pairs (TRL ``SFTTrainer``, completion-only loss), plus
   ``sft_l1`` × Σ|LoRA weights| (``sft_l1_penalty``; the paper's L1 on the SFT delta — on the adapter's factors here,
   which makes the product sparse too; 0 turns it off);
2. **DPO** on the same pairs (``harness.train.pairwise``, TRL ``DPOTrainer``, reference = the start, no L1: the
   paper puts none on the preference side);
3. **merge** with peft's ``add_weighted_adapter`` (``combination_type``, ``weights`` = [SFT, DPO], ``density``):
   ``ties_svd`` by default — TIES (trim to ``density``, elect signs, disjoint mean) on each adapter's full delta B·A,
   the result factored back to a LoRA of rank ``svd_rank`` (null: r_sft + r_dpo) — then merged into the weights and
   saved as a full checkpoint. peft's ``ties`` / ``dare_*`` without ``_svd`` combine the A and B factors separately.

The adapters use the budget's LoRA settings when ``budget.lora.enabled``, else ``lora_r`` / ``lora_alpha`` /
``lora_dropout`` here on every linear layer; parameters outside the adapters (embeddings, norms) never change.

**Budget**: each training gets the budget's pairs — the same pairs and the same optimizer steps as DPO — so PAFT
spends about twice DPO's compute: ``policy_tokens`` sums both trainings (SFT's prompt + chosen tokens, DPO's both
sides), ``reference_tokens`` is DPO's reference pass; ``optimizer_steps`` sums both. ``visit_cost`` prices a pair
visit the same way for ``budget.match=tokens|flops``, so there PAFT gets fewer pairs than DPO. Curves: the DPO
adapter's loss as ``loss``, the SFT adapter's as ``sft_loss`` (each with ``adapter``).
"""

from __future__ import annotations

import gc
import shutil
from dataclasses import replace

from harness.errors import HarnessError
from harness.protocols import TrainingJob, TrainingOutcome

COMBINATIONS = ("ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd", "linear", "svd",
                "magnitude_prune", "magnitude_prune_svd")


def sft_l1_penalty(parameters, coefficient: float):
    """``coefficient`` × Σ|w| over ``parameters`` (the LoRA weights of the SFT adapter): the paper's L1 sparsity term
    added to the SFT loss (Pentyala et al. 2024, Sec. 3, L = L_sft + λ·‖δ_sft‖₁)."""
    import torch

    total = sum(parameter.abs().sum() for parameter in parameters)
    return coefficient * (total if isinstance(total, torch.Tensor) else torch.tensor(float(total)))


class PAFT:
    data_view = "pairs"
    reference_based = True

    def __init__(self, name: str = "paft", learning_rate: float = 5e-6, sft_learning_rate: float = 2e-4,
                 beta: float = 0.1, sft_l1: float = 1e-4, combination_type: str = "ties_svd",
                 weights: list | None = None, density: float = 0.5, svd_rank: int | None = None,
                 lora_r: int = 16, lora_alpha: float = 32, lora_dropout: float = 0.05):
        where = f"{name} (conf/method/paft.yaml)"
        if combination_type not in COMBINATIONS:
            raise HarnessError(f"{where}: combination_type={combination_type!r}; choose one of "
                               f"{', '.join(COMBINATIONS)}")
        weights = [1.0, 1.0] if weights is None else [float(w) for w in weights]
        if len(weights) != 2:
            raise HarnessError(f"{where}: weights={weights} must be two numbers, [SFT, DPO]")
        if not 0 < density <= 1:
            raise HarnessError(f"{where}: density={density} must be in (0, 1]")
        if sft_l1 < 0:
            raise HarnessError(f"{where}: sft_l1={sft_l1} must be ≥ 0")
        self.name = name
        self.learning_rate = learning_rate
        self.sft_learning_rate = sft_learning_rate
        self.beta = beta
        self.sft_l1 = sft_l1
        self.combination_type = combination_type
        self.weights = weights
        self.density = density
        self.svd_rank = svd_rank
        self.lora_r = lora_r
        self.lora_alpha = lora_alpha
        self.lora_dropout = lora_dropout

    # cost model for budget.match=tokens|flops (harness.train.matching): a DPO pair plus an SFT example
    def visit_cost(self, prompt_tokens: int, completion_tokens: int, budget, sizes) -> tuple[float, float]:
        pair = 2.0 * (prompt_tokens + completion_tokens)
        return pair + prompt_tokens + completion_tokens, pair

    def adapter_job(self, job: TrainingJob, part: str) -> TrainingJob:
        """``job`` with LoRA on (the budget's adapter settings, or this method's when the budget trains fully) and
        its own scratch folder; ``part`` = sft gets the chosen responses as SFT rows."""
        lora = job.budget.lora
        if not lora.enabled:
            lora = replace(lora, enabled=True, r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout,
                           target_modules="all-linear")
        plan = replace(job.plan, budget=replace(job.budget, lora=lora))
        if part == "sft":
            plan = replace(plan, view="sft",
                           rows=[{"prompt": row["prompt"], "completion": row["chosen"]} for row in job.plan.rows])
        return replace(job, plan=plan, scratch_dir=job.scratch_dir / part)

    def train(self, job: TrainingJob) -> TrainingOutcome:
        if job.plan.world_size > 1:
            raise HarnessError(f"{self.name} trains in one process; run it without launch.processes")
        adapters = job.scratch_dir / "adapters"
        sft = self.train_sft(self.adapter_job(job, "sft"), adapters / "sft")
        gc.collect()
        dpo = self.train_dpo(self.adapter_job(job, "dpo"), adapters / "dpo")
        gc.collect()
        merge = self.merge(job, adapters)
        shutil.rmtree(job.scratch_dir, ignore_errors=True)
        curves = ([{**{k: v for k, v in c.items() if k != "loss"}, "adapter": "sft", "sft_loss": c["loss"]}
                   for c in sft["curves"] if "loss" in c] + [{**c, "adapter": "dpo"} for c in dpo["curves"]])
        return TrainingOutcome(
            optimizer_steps=sft["steps"] + dpo["steps"], examples=sft["examples"] + dpo["examples"],
            pairs=dpo["pairs"], policy_tokens=sft["policy_tokens"] + dpo["policy_tokens"],
            reference_tokens=dpo["reference_tokens"], curves=curves,
            extra={**dpo["extra"], "sft_optimizer_steps": sft["steps"], "dpo_optimizer_steps": dpo["steps"],
                   "sft_policy_tokens": sft["policy_tokens"], "dpo_policy_tokens": dpo["policy_tokens"],
                   "sft_l1": self.sft_l1, "merge": merge})

    def train_sft(self, job: TrainingJob, folder) -> dict:
        from datasets import Dataset
        from harness.inputs.tokenizer_cache import load_tokenizer
        from trl import SFTConfig, SFTTrainer

        from harness.train.trl_support import epochs_fraction, peft_config, to_conversational, trl_arguments

        coefficient = self.sft_l1

        class L1SFTTrainer(SFTTrainer):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                              num_items_in_batch=num_items_in_batch)
                if not coefficient:
                    return result
                lora = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
                penalty = sft_l1_penalty(lora, coefficient)
                if return_outputs:
                    return result[0] + penalty, result[1]
                return result + penalty

        config = SFTConfig(**trl_arguments(job, learning_rate=self.sft_learning_rate), completion_only_loss=True)
        trainer = L1SFTTrainer(model=str(job.start_checkpoint), args=config,
                               train_dataset=Dataset.from_list(to_conversational(job.plan.rows)),
                               processing_class=load_tokenizer(job.start_checkpoint),
                               peft_config=peft_config(job))
        trainer.train()
        trainer.model.save_pretrained(folder)
        passes = epochs_fraction(trainer, job)
        lengths = sum(min(len(ids), config.max_length) for ids in trainer.train_dataset["input_ids"])
        out = {"steps": trainer.state.global_step, "examples": round(passes * len(job.plan.rows)),
               "policy_tokens": round(passes * lengths), "curves": list(trainer.state.log_history)}
        shutil.rmtree(job.scratch_dir, ignore_errors=True)
        return out

    def train_dpo(self, job: TrainingJob, folder) -> dict:
        from harness.train.pairwise import pairwise_trainer, pairwise_usage

        trainer = pairwise_trainer(job, start=job.start_checkpoint, beta=self.beta, learning_rate=self.learning_rate)
        trainer.train()
        trainer.model.save_pretrained(folder)
        usage = pairwise_usage(trainer, job)
        usage.update(steps=trainer.state.global_step,
                     curves=[e for e in trainer.state.log_history if "loss" in e])
        shutil.rmtree(job.scratch_dir, ignore_errors=True)
        return usage

    def merge(self, job: TrainingJob, adapters) -> dict:
        """The two adapters combined by peft's ``add_weighted_adapter``, merged into the start's weights, saved."""
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        from harness.inputs.tokenizer_cache import load_tokenizer

        base = AutoModelForCausalLM.from_pretrained(job.start_checkpoint, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, adapters / "sft", adapter_name="sft")
        model.load_adapter(adapters / "dpo", adapter_name="dpo")
        ranks = [model.peft_config[name].r for name in ("sft", "dpo")]
        svd_rank = self.svd_rank or sum(ranks)
        options = {"density": self.density} if self.combination_type not in ("linear", "svd") else {}
        if self.combination_type.endswith("svd"):
            options["svd_rank"] = svd_rank
        model.add_weighted_adapter(["sft", "dpo"], self.weights, adapter_name="paft",
                                   combination_type=self.combination_type, **options)
        model.set_adapter("paft")
        merged = model.merge_and_unload(adapter_names=["paft"])
        merged.save_pretrained(job.output_dir)
        load_tokenizer(job.start_checkpoint).save_pretrained(job.output_dir)
        return {"combination_type": self.combination_type, "weights": self.weights, "density": self.density,
                "adapter_ranks": ranks, **({"svd_rank": svd_rank} if "svd_rank" in options else {})}
