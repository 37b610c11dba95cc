"""``HarnessLM``: lm-eval's ``HFLM`` with the harness's prefix-sharing log-likelihood engine
(``harness.evaluate.loglik``) and continuous-batching generation engine (``harness.evaluate.generation``),
registered with lm-eval as the model type ``"harness"``.

Tasks keep lm-eval's own definitions, prompts, tokenization (``TemplateLM.loglikelihood`` / ``_encode_pair``) and
metrics; only ``_loglikelihood_tokens`` and ``generate_until`` of a causal model are replaced, so ``loglikelihood``
and ``loglikelihood_rolling`` requests are scored with each shared prefix encoded once, and generations stop row by
row with freed slots taking the next prompt. Seq2seq models stay lm-eval's.
"""

from __future__ import annotations

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from harness.evaluate.generation import generate_until
from harness.evaluate.loglik import DEFAULT_BATCH_SIZE, PROGRESS, score_continuations

MODEL_NAME = "harness"  # lm-eval's model type: lm_eval.simple_evaluate(model="harness", model_args=...)


@register_model(MODEL_NAME)
class HarnessLM(HFLM):
    """``HFLM`` whose causal log-likelihoods come from ``score_continuations`` (same numbers up to float rounding).

    ``batch_size`` is the rows per forward; lm-eval's ``"auto"`` becomes ``DEFAULT_BATCH_SIZE`` (the engine's
    batches are small: a cached prefix plus the continuation).
    """

    last_stats: dict | None = None  # the engine's counts for the latest call (requests, rows, forwards, fallback)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None,
                              **kwargs) -> list[tuple[float, bool]]:
        if self.backend != "causal":
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs,
                                                 **kwargs)
        batch_size = override_bs or (self.batch_size if isinstance(self.batch_size, int) else DEFAULT_BATCH_SIZE)
        stats: dict = {}
        answers = score_continuations(
            self.model, [(context, continuation) for _, context, continuation in requests],
            batch_size=batch_size, max_length=self.max_length, softmax_dtype=self.softmax_dtype,
            autocast_dtype=self.mixed_precision_dtype,
            progress=None if disable_tqdm or self.rank != 0 else PROGRESS, stats=stats)
        self.last_stats = stats
        for (key, _, _), answer in zip(requests, answers):
            if key is not None:  # loglikelihood_rolling's windows are cached per document by the caller
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return answers

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        if self.backend != "causal":
            return super().generate_until(requests, disable_tqdm=disable_tqdm)
        return generate_until(self, requests, disable_tqdm=disable_tqdm)
