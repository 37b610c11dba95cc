"""One training run over many devices: the sweep's ``launch`` keys (conf/sweep.yaml) and the worker ``accelerate
launch`` runs.

With ``launch.processes=1`` (the default) a run trains in the sweep's own process, as it always has. With N > 1,
``Sweep.train`` hands the run's ``TrainingJob`` to ``train_in_processes``, which runs ``accelerate launch
--config_file conf/accelerate/<name>.yaml --num_processes N -m harness.run.launch <job file>``: every process unpickles
the job and the method (the method's class is imported after the sweep's plugin folders are active), trains it through
the same ``method.train(job)`` — TRL's trainers and our PPO are data parallel under accelerate — and rank 0 writes the
outcome beside the job file and the checkpoint into ``job.output_dir``. Scoring, records and caches stay in the sweep's
single process: nothing downstream of training knows how many processes trained.

Why a child launch rather than the whole sweep under ``accelerate launch``: scoring, record writing and the caches
would each need a "rank 0 only" guard and barriers around them, and a mistake there corrupts records; here only the
trainers run in many processes, and they are built for it. The cost is the child's start (imports, model load: seconds
on small models, compared with the training it runs).

The global batch is held whatever N: the plan (``harness.train.plan``) is derived with ``world=N``, so
``budget.batch_pairs`` = micro-batch × N × accumulation and every configuration takes the same optimizer steps over the
same pairs. N is in the record (``consumed.processes``), not in the run id: the numbers differ only by the order in
which the processes' gradients are summed (float rounding; tests/test_accelerate.py states the tolerance).

The job travels as a pickle (the harness's own dataclasses, written and read by the same checkout; the method object
pickled by its class's import path): nothing needs a second serialization format.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pickle
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from harness.checks import check_int
from harness.errors import HarnessError
from harness.protocols import TrainingJob, TrainingOutcome
from harness.run.registry import CONF_DIR

ACCELERATE_CONFIGS = CONF_DIR / "accelerate"   # ddp.yaml, fsdp.yaml, zero3.yaml, cpu.yaml (the CPU stand-in of ddp)
SHARDED = {"FSDP": "fsdp", "DEEPSPEED": "zero3"}  # distributed types that split the weights over the processes
DISTRIBUTED_TYPES = ("MULTI_GPU", "MULTI_CPU", *SHARDED)
OUTPUT_TAIL_LINES = 30                          # lines of a failed launch's output kept in the error


@dataclass(frozen=True)
class Launch:
    """How a run's training is launched: ``processes`` data-parallel processes under ``accelerate_config``."""

    processes: int = 1                  # 1 = train in the sweep's process (default); N > 1 = accelerate launch
    accelerate_config: str = "ddp"      # a name in conf/accelerate/ (ddp | fsdp | zero3 | cpu) or a config file

    @property
    def distributed(self) -> bool:
        return self.processes > 1

    def config_file(self) -> Path:
        named = ACCELERATE_CONFIGS / f"{self.accelerate_config}.yaml"
        return named if named.is_file() else Path(self.accelerate_config).expanduser()

    def settings(self) -> dict:
        """The accelerate config file, parsed by accelerate itself (``load_config_from_file``)."""
        from accelerate.commands.config.config_args import load_config_from_file

        path = self.config_file()
        if not path.is_file():
            available = ", ".join(sorted(p.stem for p in ACCELERATE_CONFIGS.glob("*.yaml")))
            raise HarnessError(f"launch.accelerate_config={self.accelerate_config}: no such config; name one of "
                               f"{available} (conf/accelerate/) or a file")
        try:
            return load_config_from_file(str(path)).to_dict()
        except Exception as error:  # accelerate's own parse errors: one line
            raise HarnessError(f"launch.accelerate_config={path}: accelerate cannot read it ({error})") from None

    def distributed_type(self) -> str:
        return str(self.settings().get("distributed_type", "")).split(".")[-1]

    def uses_cpu(self) -> bool:
        return bool(self.settings().get("use_cpu"))

    def record(self) -> dict:
        """What the run's record keeps (``consumed``): beside the plan's numbers, how many processes trained."""
        if not self.distributed:
            return {"processes": 1}
        return {"processes": self.processes, "accelerate_config": self.accelerate_config,
                "distributed_type": self.distributed_type()}


def launch_from_config(cfg) -> Launch:
    """The sweep's ``launch`` keys (absent = one process), each checked in one line."""
    values = cfg.get("launch") if cfg is not None else None
    if values is None:
        return Launch()
    values = dict(values)
    unknown = set(values) - {f.name for f in dataclasses.fields(Launch)}
    if unknown:
        raise HarnessError(f"launch.{sorted(unknown)[0]} is not a launch key; known: processes, accelerate_config")
    launch = Launch(**values)
    check_int("launch.processes", launch.processes, minimum=1)
    if not isinstance(launch.accelerate_config, str) or not launch.accelerate_config:
        raise HarnessError(f"launch.accelerate_config={launch.accelerate_config!r}: name a config in conf/accelerate/ "
                           f"(ddp, fsdp, zero3, cpu) or a file")
    if launch.distributed:
        kind = launch.distributed_type()
        if kind not in DISTRIBUTED_TYPES:
            raise HarnessError(f"launch.accelerate_config={launch.accelerate_config}: distributed_type {kind or None} "
                               f"is not one the harness launches; use one of {', '.join(DISTRIBUTED_TYPES)}")
    return launch


def check_launch(launch: Launch, budget, methods: dict) -> None:
    """What a multi-process launch needs of the budget and the methods, before any work: a global batch the processes
    divide, no LoRA merge into sharded weights, no data-parallel-only method (PPO) under FSDP / ZeRO-3, DeepSpeed
    installed for ZeRO-3."""
    if not launch.distributed:
        return
    from harness.train.plan import check_processes

    check_processes(budget, launch.processes)
    kind = launch.distributed_type()
    if kind in SHARDED and budget.lora.enabled:
        raise HarnessError(f"launch.accelerate_config={launch.accelerate_config} shards the weights and "
                           f"budget.lora.enabled=true merges adapters into them; use launch.accelerate_config=ddp")
    if kind in SHARDED:
        for name, method in methods.items():
            if getattr(method, "data_parallel_only", False):  # an own training loop that holds whole models (PPO)
                raise HarnessError(f"method {name!r} trains data parallel only (every process holds the whole "
                                   f"models); use launch.accelerate_config=ddp (GPUs) or cpu")
    if kind == "DEEPSPEED":
        from importlib.util import find_spec

        if find_spec("deepspeed") is None:
            raise HarnessError(f"launch.accelerate_config={launch.accelerate_config} needs DeepSpeed: pip install "
                               f"deepspeed (a CUDA build), or use launch.accelerate_config=fsdp")


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(launch: Launch, job_file: Path) -> list[str]:
    """The ``accelerate launch`` command line of one run's training."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch.config_file()),
            "--num_processes", str(launch.processes), "--main_process_port", str(_free_port()),
            "-m", "harness.run.launch", str(job_file)]


def train_in_processes(launch: Launch, method, job: TrainingJob, *, plugins: list, work_dir: Path) -> TrainingOutcome:
    """Train ``job`` with ``method`` in ``launch.processes`` processes (``accelerate launch``); the outcome rank 0
    wrote. A failed launch raises with the end of its output (the whole of it stays in ``work_dir/launch.log``)."""
    import os

    work_dir.mkdir(parents=True, exist_ok=True)
    job_file, outcome_file, log_file = work_dir / "job.pkl", work_dir / "outcome.json", work_dir / "launch.log"
    reward = job.reward
    if dataclasses.is_dataclass(reward) and any(f.name == "device" for f in dataclasses.fields(reward)):
        reward = dataclasses.replace(reward, tokens_scored=0)  # a fresh copy: no loaded model travels
    job_file.write_bytes(pickle.dumps({"plugins": [str(p) for p in plugins or []], "method": pickle.dumps(method),
                                       "job": dataclasses.replace(job, reward=None), "reward": pickle.dumps(reward),
                                       "outcome": str(outcome_file), "cpu": launch.uses_cpu()}))
    environment = dict(os.environ)
    if launch.uses_cpu():
        environment["ACCELERATE_USE_CPU"] = "true"  # accelerate's own switch for its child processes: gloo on the CPU
    with log_file.open("w") as log:
        status = subprocess.run(launch_command(launch, job_file), cwd=CONF_DIR.parent, env=environment,
                                stdout=log, stderr=subprocess.STDOUT).returncode
    if status != 0 or not outcome_file.is_file():
        tail = log_file.read_text(errors="replace").splitlines()[-OUTPUT_TAIL_LINES:]
        raise RuntimeError(f"accelerate launch of {launch.processes} processes exited with status {status} "
                           f"(output: {log_file}):\n" + "\n".join(tail))
    outcome = TrainingOutcome(**json.loads(outcome_file.read_text()))
    shutil.rmtree(work_dir, ignore_errors=True)
    return outcome


def main(argv: list[str] | None = None) -> None:
    """The worker every launched process runs: rebuild the method and the job, train, rank 0 writes the outcome."""
    from accelerate import PartialState

    from harness.inputs.paths import atomic_write_text
    from harness.run import registry

    argv = sys.argv[1:] if argv is None else argv
    work = pickle.loads(Path(argv[0]).read_bytes())
    registry.activate_plugins(work["plugins"])  # before the method's class is imported by unpickling it
    method = pickle.loads(work["method"])
    reward = pickle.loads(work["reward"])
    state = PartialState(cpu=work["cpu"])
    if dataclasses.is_dataclass(reward) and any(f.name == "device" for f in dataclasses.fields(reward)):
        reward = dataclasses.replace(reward, device=str(state.device))  # each process scores on its own device
    job = dataclasses.replace(work["job"], reward=reward)
    outcome = method.train(job)
    state.wait_for_everyone()
    if state.is_main_process:
        atomic_write_text(Path(work["outcome"]), json.dumps(dataclasses.asdict(outcome), default=str))


if __name__ == "__main__":
    main()
