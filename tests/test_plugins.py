"""Adding a method and a task from a folder outside the repository (``plugins=[<folder>]``): the two files each
needs, found by the real CLI, and the one-line refusals. Nothing here writes into the repository tree."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO, run_cli
from harness.records import read_records
from harness.run import registry

MY_DPO = '''
"""A throwaway DPO-like method: the DPO loss (Rafailov et al. 2023, eq. 7) through the harness's pair trainer."""
from harness.protocols import TrainingJob, TrainingOutcome
from harness.train.pairwise import train_pairwise


class MyDPO:
    data_view = "pairs"
    reference_based = True

    def __init__(self, name: str = "my_dpo", beta: float = 0.1, learning_rate: float = 1e-3):
        self.name, self.beta, self.learning_rate = name, beta, learning_rate

    def hyperparameters(self) -> dict:
        return {"beta": self.beta, "learning_rate": self.learning_rate}

    def train(self, job: TrainingJob) -> TrainingOutcome:
        return train_pairwise(job, beta=self.beta, learning_rate=self.learning_rate)
'''

MY_TASK = '''
"""A throwaway task: the share of held-out pairs whose chosen response has the higher mean per-token log-prob."""
from harness.evaluate.logprobs import pair_logps
from harness.protocols import Checkpoint, Metric, TaskContext, TaskResult


class MyTask:
    def __init__(self, name: str = "my_task", version: str = "1", limit: int = 3):
        self.name, self.version, self.limit = name, str(version), limit

    def evaluate(self, checkpoint: Checkpoint, context: TaskContext) -> TaskResult:
        pairs = context.heldout_pairs[: self.limit]
        scored = pair_logps(checkpoint.path, pairs, batch_size=context.batch_size, device=context.device)
        wins = [float(s["chosen_logp"] / max(s["chosen_tokens"], 1) > s["rejected_logp"] / max(s["rejected_tokens"], 1))
                for s in scored]
        samples = [{"item_id": str(pair.get("source_row", index)), "prompt": pair["prompt"],
                    "scores": {"chosen_more_likely": win}, **s}
                   for index, (pair, s, win) in enumerate(zip(pairs, scored, wins))]
        mean = sum(wins) / len(wins)
        stderr = (mean * (1 - mean) / len(wins)) ** 0.5
        return TaskResult(metrics={"chosen_more_likely": Metric(mean, stderr, higher_is_better=True)}, samples=samples)
'''


def write_plugin(folder: Path) -> Path:
    """A plugin folder: a method and a task (code + config each) and a budget config for Hydra's search path."""
    files = {
        "methods/my_dpo.py": MY_DPO,
        "conf/method/my_dpo.yaml": "_target_: methods.my_dpo.MyDPO\nname: my_dpo\nbeta: 0.1\nlearning_rate: 1.0e-3\n",
        "tasks/my_task.py": MY_TASK,
        "conf/task/my_task.yaml": "_target_: tasks.my_task.MyTask\nname: my_task\nversion: \"1\"\nlimit: 3\n",
        "conf/budget/my_micro.yaml": (registry.CONF_DIR / "budget" / "micro.yaml").read_text()
                                     .replace("name: micro", "name: my_micro"),
    }
    for relative, text in files.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_text(textwrap.dedent(text).lstrip())
    return folder


def repository_status() -> str:
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout


def test_a_plugin_folder_adds_a_method_a_task_and_a_budget(tmp_path, cache_dir):
    """Adding a method or a task is two files each, in a folder of the user's own: the real CLI trains and scores
    them (and composes with the folder's budget config) without a file of the repository changing."""
    plugin = write_plugin(tmp_path / "my-plugin")
    before = repository_status()
    result = run_cli("sweep", "model=tiny-random", "budget=my_micro", "budget@stage_budget=micro", "settings=[instruct]",
                     "methods=[my_dpo]", "tasks=[my_task]", f"plugins=[{plugin}]", f"paths.results={tmp_path / 'results'}",
                     "name=t", "eval_batch_size=4", cache=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_records(tmp_path / "results" / "t")
    assert {(r["method"], r["task"], r["status"]) for r in records} == {("start", "my_task", "ok"),
                                                                         ("my_dpo", "my_task", "ok")}
    for record in records:
        assert 0 <= record["metrics"]["chosen_more_likely"]["value"] <= 1
        assert record["task_version"] == "1"
    trained = next(r for r in records if r["method"] == "my_dpo")
    assert trained["consumed"]["optimizer_steps"] == 1 and trained["consumed"]["pairs"] == 4
    assert trained["run_config"]["budget"]["name"] == "my_micro"
    assert repository_status() == before


@pytest.mark.parametrize("layout, message", [
    (None, "is not a folder"),
    ({"README.md": "no code here"}, "holds none of conf/, methods/, tasks/"),
    ({"conf/method/dpo.yaml": "_target_: methods.dpo.DPO\n"}, "conf/method/dpo.yaml has the name of "),
    ({"conf/budget/micro.yaml": "name: micro\n"}, "conf/budget/micro.yaml has the name of "),
    ({"methods/dpo.py": "class DPO: ...\n"}, "methods/dpo has the name of the module methods.dpo"),
    ({"tasks/gsm8k.py": "class GSM8K: ...\n"}, "tasks/gsm8k has the name of the module tasks.gsm8k"),
    ({"harness/__init__.py": "", "conf/task/my_task.yaml": ""}, "harness has the name of an importable module"),
])
def test_a_bad_plugin_folder_is_one_line_and_exit_2(tmp_path, cache_dir, layout, message):
    plugin = tmp_path / "plugin"
    for relative, text in (layout or {}).items():
        (plugin / relative).parent.mkdir(parents=True, exist_ok=True)
        (plugin / relative).write_text(text)
    result = run_cli("sweep", "model=tiny-random", "budget=micro", f"plugins=[{plugin}]",
                     f"paths.results={tmp_path / 'results'}", cache=cache_dir, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"align-harness: error: plugins: {plugin}") and message in lines[0], \
        result.stderr[-2000:]
    assert not (tmp_path / "results").exists()


@pytest.fixture
def clean_registry():
    """Undo plugin activation: the registry's list, the packages' search paths, sys.path and imported plugin code."""
    import methods
    import tasks

    saved = (list(registry._plugins), list(methods.__path__), list(tasks.__path__), list(sys.path))
    yield
    registry._plugins[:] = saved[0]
    methods.__path__[:], tasks.__path__[:], sys.path[:] = saved[1], saved[2], saved[3]
    for name in ("methods.my_dpo", "tasks.my_task"):
        sys.modules.pop(name, None)


def test_activation_is_idempotent_and_reaches_every_group(tmp_path, clean_registry):
    """``run_sweep`` activates ``cfg.plugins`` again after the CLI did (a multirun job may be its own process)."""
    import methods

    plugin = write_plugin(tmp_path / "my-plugin")
    assert registry.activate_plugins([str(plugin)]) == registry.activate_plugins(str(plugin)) == [plugin.resolve()]
    assert methods.__path__.count(str(plugin.resolve() / "methods")) == 1
    assert "my_micro" in registry.available("budget") and "micro" in registry.available("budget")
    assert "my_dpo" in registry.available("method") and "dpo" in registry.available("method")
    method = registry.instantiate("method", "my_dpo", {"beta": 0.2}, params_key="method_params")
    assert (method.name, method.beta, method.data_view, method.reference_based) == ("my_dpo", 0.2, "pairs", True)
    task = registry.instantiate("task", "my_task", None, params_key="task_params")
    assert (task.name, task.version, task.limit) == ("my_task", "1", 3)
