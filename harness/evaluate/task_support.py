"""What the tasks share: checks of their config values (one-line errors naming the key) and the
route through lm-eval for tasks that are lm-eval task YAMLs (``truthfulqa_mc``, ``gsm8k``).
"""

from __future__ import annotations

from harness.errors import HarnessError
from harness.evaluate.engines import DEFAULT_ENGINE, check_engine, vllm_lm_eval_model
from harness.protocols import Checkpoint, Metric, TaskContext


def whole_number(task: str, key: str, value, *, minimum: int = 1, optional: bool = False, unit: str = "") -> None:
    """``value`` must be an int ≥ ``minimum`` (``None`` too when ``optional``: "all of them")."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = f"a positive number of {unit}" if unit and minimum == 1 else f"a whole number >= {minimum}"
        raise HarnessError(f"{task}: {key}={value!r} must be {what}" + (", or null for all" if optional else ""))


def limit_fits(task: str, limit: int | None, available: int, source: str, unit: str) -> None:
    """A ``limit`` larger than the data is a config error, not a silent cap."""
    if limit is not None and limit > available:
        raise HarnessError(f"{task}: limit={limit} but {source} has only {available} {unit}; "
                           f"set limit=null to score all of them")


def make_lm(path, *, device: str, batch_size: int, engine: str = DEFAULT_ENGINE):
    """The lm-eval model object for the checkpoint folder ``path``: ``HarnessLM`` in fp32 (``engine="harness"``:
    prefix-sharing log-likelihoods, continuous-batching generation), lm-eval's stock ``HFLM`` in fp32
    (``engine="hf"``, kept for parity checks and benches) or lm-eval's ``vllm`` backend (``engine="vllm"``, GPUs)."""
    check_engine(engine)
    if engine == "vllm":
        return vllm_lm_eval_model(path)
    if engine == "harness":  # the tokenizer parsed once per process (harness.inputs.tokenizer_cache)
        from harness.evaluate.lm_backend import HarnessLM
        from harness.inputs.tokenizer_cache import load_tokenizer

        return HarnessLM(pretrained=str(path), tokenizer=load_tokenizer(path), device=device, batch_size=batch_size,
                         dtype="float32")
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(path), device=device, batch_size=batch_size, dtype="float32")


def run_lm_eval(checkpoint: Checkpoint, context: TaskContext, task_files, engine: str | None = None,
                **options) -> dict:
    """lm-eval's ``simple_evaluate`` on our task YAMLs with the checkpoint in ``make_lm(engine=...)`` (default: the
    sweep's ``context.engine``).

    Only ``task_files`` are indexed (scanning all of lm-eval's tasks takes ~7 s). The chat template is
    applied when the checkpoint's setting asks for it; a tokenizer without one is an error, not a silent
    plain-text prompt. lm-eval shows its own progress bars (it has no switch for them) and seeds Python,
    NumPy and torch.
    """
    lm = make_lm(checkpoint.path, device=context.device, batch_size=context.batch_size,
                 engine=engine or context.engine)
    if checkpoint.use_chat_template and not lm.tokenizer.chat_template:
        raise HarnessError(
            f"{checkpoint.path}: the checkpoint is to be prompted through its chat template "
            f"but its tokenizer has none; add one or use a setting without the template"
        )
    return evaluate_lm(lm, task_files, chat=checkpoint.use_chat_template, **options)


def evaluate_lm(lm, task_files, *, chat: bool, **options) -> dict:
    """``simple_evaluate`` of the lm-eval model ``lm`` on the task YAMLs ``task_files`` (samples logged)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model=lm,
        tasks=[str(path) for path in task_files],
        task_manager=TaskManager(include_defaults=False),
        apply_chat_template=chat,
        log_samples=True,
        **options,
    )


def lm_eval_metric(out: dict, task_name: str, metric: str, filter_name: str = "none") -> Metric:
    """One of lm-eval's aggregated metrics with its standard error and direction."""
    scores = out["results"][task_name]
    stderr = scores.get(f"{metric}_stderr,{filter_name}")
    return Metric(
        value=float(scores[f"{metric},{filter_name}"]),
        stderr=None if stderr in (None, "N/A") else float(stderr),
        higher_is_better=bool(out["higher_is_better"][task_name][metric]),
    )
