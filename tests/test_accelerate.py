"""One training run over many processes (``harness.run.launch``): two CPU processes (gloo) train like one.

The comparison: the same job planned for 1 and for 2 processes (the plan halves the accumulation, so the global batch
in pairs is the same), trained in this process and through ``accelerate launch`` with ``conf/accelerate/cpu.yaml``.
Consumed budgets must be equal and losses equal within ``LOSS_TOLERANCE``: the two runs take the same optimizer steps
over the same pairs in the same micro-batches, and differ only in the order float sums are taken — gradients of two
processes are summed by the all-reduce instead of one after the other in the accumulation, the logged loss is a mean
of two process means. Measured on the tiny model (lr 1e-3, 2 steps): DPO 1.2e-7, KTO 6e-8, PPO 0 apart.

FSDP and ZeRO-3 need GPUs: their shipped configs are parsed and accepted here, the runs themselves are ``gpu`` tests.
"""

from __future__ import annotations

import dataclasses
from importlib.util import find_spec

import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO
from harness.errors import HarnessError
from harness.protocols import TrainingJob
from harness.run import registry
from harness.run.launch import ACCELERATE_CONFIGS, Launch, check_launch, launch_command, launch_from_config, \
    train_in_processes
from harness.train.budget import Budget
from harness.train.plan import plan_training

LOSS_TOLERANCE = 1e-5    # float summation order only (module docstring); a real difference (a wrong batch) is ≥ 1e-2
WEIGHT_TOLERANCE = 1e-5  # largest difference of any trained weight; the training moves them by ~1e-3
CONSUMED = ("optimizer_steps", "examples", "pairs", "policy_tokens", "reference_tokens")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="gpu: needs 2 CUDA devices")


def budget(**changes) -> Budget:
    """micro.yaml with 8 pairs in global batches of 4, one pair per micro-batch: 4 micro-batches a step on 1 process,
    2 on each of 2."""
    values = dict(pairs=8, batch_pairs=4, micro_batch_pairs=1, **changes)
    return dataclasses.replace(Budget.from_config(OmegaConf.load(REPO / "conf" / "budget" / "micro.yaml")), **values)


ROWS = [{"prompt": [{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"}],
         "chosen": f"It is {2 * i}." + " ok" * (i % 3), "rejected": f"No idea about {i}" + " hmm" * (i % 4)}
        for i in range(8)]


def train_both(tmp_path, start, name: str, reward=None, **overrides):
    """(1-process outcome, 2-process outcome, their plans) of method ``name`` on ``ROWS``."""
    from transformers import AutoTokenizer

    method, _ = registry.build("method", name, {"learning_rate": 1e-3, **overrides}, params_key="method_params")
    tokenizer = AutoTokenizer.from_pretrained(start)
    outcomes, plans = {}, {}
    for processes in (1, 2):
        plan = plan_training(budget(), method, ROWS, [], tokenizer, world=processes)
        folder = tmp_path / f"{name}-{processes}"
        job = TrainingJob(start_checkpoint=start, output_dir=folder / "out", plan=plan, seed=0,
                          scratch_dir=folder / "scratch", reward=reward)
        if processes == 1:
            outcomes[processes] = method.train(job)
        else:
            outcomes[processes] = train_in_processes(Launch(processes=2, accelerate_config="cpu"), method, job,
                                                     plugins=[], work_dir=folder / "launch")
        plans[processes] = plan
    return outcomes[1], outcomes[2], plans


def assert_trained_alike(tmp_path, name, one, two, loss_key="loss"):
    from safetensors.torch import load_file

    assert {k: getattr(one, k) for k in CONSUMED} == {k: getattr(two, k) for k in CONSUMED}
    losses = [[entry[loss_key] for entry in outcome.curves if entry.get(loss_key) is not None] for outcome in (one, two)]
    assert len(losses[0]) == len(losses[1]) >= 2
    assert losses[0][0] != pytest.approx(losses[0][-1], abs=1e-3)  # training moved the loss: the comparison can fail
    assert losses[1] == pytest.approx(losses[0], abs=LOSS_TOLERANCE)
    weights = [load_file(tmp_path / f"{name}-{n}" / "out" / "model.safetensors") for n in (1, 2)]
    assert weights[0].keys() == weights[1].keys()
    assert max((weights[0][k] - weights[1][k]).abs().max().item() for k in weights[0]) < WEIGHT_TOLERANCE
    assert not (tmp_path / f"{name}-2" / "launch").exists()  # the job file and log go once the outcome is read


def test_plan_holds_the_global_batch_whatever_the_processes(tiny_model):
    from transformers import AutoTokenizer

    method = registry.instantiate("method", "dpo", None, params_key="method_params")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    for processes, accumulation in ((1, 4), (2, 2), (4, 1)):
        plan = plan_training(budget(), method, ROWS, [], tokenizer, world=processes)
        assert (plan.world_size, plan.gradient_accumulation, plan.micro_batch) == (processes, accumulation, 1)
        assert plan.micro_batch * plan.gradient_accumulation * plan.world_size == 4  # budget.batch_pairs
        assert plan.optimizer_steps == 2


def test_dpo_on_two_processes_trains_like_one(tmp_path, tiny_model):
    one, two, plans = train_both(tmp_path, tiny_model, "dpo")
    assert (plans[1].gradient_accumulation, plans[2].gradient_accumulation) == (4, 2)
    assert_trained_alike(tmp_path, "dpo", one, two)


def test_kto_on_two_processes_trains_like_one(tmp_path, tiny_model):
    """KTO's z0 stays each process's own micro-batch estimate (methods/kto.py, local_kl_trainer): with TRL's
    cross-process average (TRL's plain KTOTrainer) the second step's loss was 0.4590 instead of 0.4786."""
    one, two, _ = train_both(tmp_path, tiny_model, "kto")
    assert one.examples == 16 and one.pairs == 8  # two examples a pair, counted once, not per process
    assert_trained_alike(tmp_path, "kto", one, two)


def test_ppo_on_two_processes_trains_like_one(tmp_path, tiny_model):
    """Our PPO: rank 0 samples and scores each rollout batch, the processes split its micro-batches and sum their
    gradients, so the run is the 1-process run (the same samples, the same steps)."""
    from harness.train.rewards import build_reward

    reward = build_reward({"kind": "short-answers", "max_chars": 40}, None)
    one, two, _ = train_both(tmp_path, tiny_model, "ppo", reward=reward, ppo_epochs=2)
    assert one.extra["generation_tokens"] == two.extra["generation_tokens"] > 0  # sampled once, not per process
    assert_trained_alike(tmp_path, "ppo", one, two)


# the shipped configs and the refusals ---------------------------------------------------------------------------

@pytest.mark.parametrize("name,kind", [("ddp", "MULTI_GPU"), ("cpu", "MULTI_GPU"), ("fsdp", "FSDP"),
                                       ("zero3", "DEEPSPEED")])
def test_shipped_accelerate_configs_parse_and_start_with_their_command(name, kind):
    launch = Launch(processes=2, accelerate_config=name)
    assert launch.distributed_type() == kind
    assert launch.uses_cpu() is (name == "cpu")
    text = (ACCELERATE_CONFIGS / f"{name}.yaml").read_text()
    assert text.startswith(f"# align-harness sweep ") and f"launch.accelerate_config={name}" in text.splitlines()[0]
    command = launch_command(launch, REPO / "job.pkl")
    assert command[command.index("--config_file") + 1] == str(ACCELERATE_CONFIGS / f"{name}.yaml")
    assert command[command.index("--num_processes") + 1] == "2"
    assert command[-3:] == ["-m", "harness.run.launch", str(REPO / "job.pkl")]
    assert launch.record() == {"processes": 2, "accelerate_config": name, "distributed_type": kind}


def accelerate_environment(name: str, monkeypatch) -> dict:
    """What ``accelerate launch --config_file conf/accelerate/<name>.yaml`` hands its processes (accelerate's own
    parsing, up to the spawn), set in this process's environment."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    arguments = launch_command_parser().parse_args(launch_command(Launch(2, name), REPO / "job.pkl")[3:])
    arguments, defaults, _ = _validate_launch_command(arguments)
    if name == "zero3":  # as accelerate's launch_command does before its DeepSpeed launcher
        arguments.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
    environment = prepare_deepspeed_cmd_env(arguments)[1] if name == "zero3" else prepare_multi_gpu_env(arguments)
    for key, value in environment.items():
        if key.startswith(("ACCELERATE_", "FSDP_")):
            monkeypatch.setenv(key, value)
    return environment


def test_fsdp_config_reaches_accelerates_fsdp_plugin(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin

    environment = accelerate_environment("fsdp", monkeypatch)
    assert environment["ACCELERATE_USE_FSDP"] == "true"
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert "FULL_STATE_DICT" in str(plugin.state_dict_type)


@pytest.mark.skipif(find_spec("deepspeed") is None, reason="DeepSpeed is not installed (pip install deepspeed)")
def test_zero3_config_reaches_accelerates_deepspeed_plugin(monkeypatch):
    from accelerate.utils import DeepSpeedPlugin

    environment = accelerate_environment("zero3", monkeypatch)
    assert environment["ACCELERATE_USE_DEEPSPEED"] == "true"
    plugin = DeepSpeedPlugin()
    zero = plugin.deepspeed_config["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert plugin.deepspeed_config["gradient_accumulation_steps"] == "auto"  # TRL's, from the plan


def test_launch_keys_are_checked_in_one_line(tmp_path):
    assert launch_from_config(OmegaConf.create({})) == Launch()
    assert not Launch().distributed and Launch().record() == {"processes": 1}
    refusals = [({"processes": 0}, "launch.processes"), ({"threads": 2}, "launch.threads is not a launch key"),
                ({"processes": 2, "accelerate_config": "tpu"}, "launch.accelerate_config=tpu: no such config"),
                ({"processes": 2, "accelerate_config": ""}, "launch.accelerate_config=''")]
    for values, message in refusals:
        with pytest.raises(HarnessError, match=message):
            launch_from_config(OmegaConf.create({"launch": {"accelerate_config": "ddp", **values}}))
    own = tmp_path / "mine.yaml"
    own.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: XLA\nnum_processes: 2\n")
    with pytest.raises(HarnessError, match="distributed_type XLA is not one the harness launches"):
        launch_from_config(OmegaConf.create({"launch": {"processes": 2, "accelerate_config": str(own)}}))


def test_check_launch_refuses_what_the_processes_cannot_train():
    dpo = registry.instantiate("method", "dpo", None, params_key="method_params")
    ppo = registry.instantiate("method", "ppo", None, params_key="method_params")
    check_launch(Launch(processes=4, accelerate_config="ddp"), budget(), {"dpo": dpo, "ppo": ppo})
    with pytest.raises(HarnessError, match=r"batch_pairs=4 is not a multiple of micro_batch_pairs×processes=3"):
        check_launch(Launch(processes=3, accelerate_config="ddp"), budget(), {})
    lora = budget(lora=dataclasses.replace(budget().lora, enabled=True))
    check_launch(Launch(processes=2, accelerate_config="ddp"), lora, {})
    with pytest.raises(HarnessError, match="shards the weights and budget.lora.enabled=true"):
        check_launch(Launch(processes=2, accelerate_config="fsdp"), lora, {})
    with pytest.raises(HarnessError, match="method 'ppo' trains data parallel only"):
        check_launch(Launch(processes=2, accelerate_config="fsdp"), budget(), {"dpo": dpo, "ppo": ppo})


# the real entry point --------------------------------------------------------------------------------------------

def test_sweep_trains_on_two_processes_and_records_them(tmp_path, cache_dir):
    """``launch.processes=2 launch.accelerate_config=cpu``: the run id is the 1-process run's, the record says how many
    processes trained it."""
    from conftest import run_cli
    from harness.records import read_records

    arguments = ["sweep", "model=tiny-random", "budget=micro", "budget@stage_budget=micro", "methods=[dpo]", "tasks=[heldout_preference]",
                 "settings=[instruct]", "include_start=false", "+task_params.heldout_preference.limit=4"]
    records = {}
    for processes in (1, 2):
        cache = tmp_path / f"cache-{processes}"  # its own checkpoints (the run ids are equal), the shared models
        cache.mkdir()
        (cache / "models").symlink_to(cache_dir / "models", target_is_directory=True)
        result = run_cli(*arguments, f"paths.results={tmp_path / str(processes)}", f"launch.processes={processes}",
                         "launch.accelerate_config=cpu", cache=cache)
        assert result.returncode == 0, result.stderr[-3000:]
        (record,) = [r for r in read_records(next((tmp_path / str(processes)).iterdir()))]
        records[processes] = record
    one, two = records[1], records[2]
    assert one["run_id"] == two["run_id"] and one["status"] == two["status"] == "ok"
    assert (one["consumed"]["processes"], two["consumed"]["processes"]) == (1, 2)
    assert two["consumed"]["distributed_type"] == "MULTI_GPU" and two["consumed"]["gradient_accumulation"] == 1
    assert {k: one["consumed"][k] for k in CONSUMED} == {k: two["consumed"][k] for k in CONSUMED}
    for name, metric in one["metrics"].items():
        assert two["metrics"][name]["value"] == pytest.approx(metric["value"], abs=1e-4)


# GPUs --------------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@two_gpus
@pytest.mark.parametrize("config", ["ddp", "fsdp", pytest.param("zero3", marks=pytest.mark.skipif(
    find_spec("deepspeed") is None, reason="DeepSpeed is not installed"))])
def test_dpo_on_two_gpus_trains_like_one(tmp_path, tiny_model, config):
    from transformers import AutoTokenizer

    method, _ = registry.build("method", "dpo", {"learning_rate": 1e-3}, params_key="method_params")
    plan = plan_training(budget(), method, ROWS, [], AutoTokenizer.from_pretrained(tiny_model), world=2)
    job = TrainingJob(start_checkpoint=tiny_model, output_dir=tmp_path / "out", plan=plan, seed=0,
                      scratch_dir=tmp_path / "scratch")
    outcome = train_in_processes(Launch(processes=2, accelerate_config=config), method, job, plugins=[],
                                 work_dir=tmp_path / "launch")
    assert outcome.optimizer_steps == 2 and outcome.pairs == 8
    assert (tmp_path / "out" / "model.safetensors").is_file()
