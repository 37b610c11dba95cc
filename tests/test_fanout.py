"""A sweep fanned out over Hydra's launchers (``fanout=true``, harness/run/fanout.py) through the real entry point on
``tiny-random``: joblib workers, submitit's local processes and a local Ray instance give records whose metrics equal
the one-process sweep's exactly; a shared stage is built once whichever job gets to it first (``builds.jsonl``,
harness.inputs.cache.build_once); a job killed mid-run is redone by running the same command again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import MODELS_CACHE, REPO, cli_env, run_cli_forked
from harness.errors import HarnessError
from harness.inputs.cache import read_builds
from harness.records import read_records

TINY = ["model=tiny-random", "budget=micro", "budget@stage_budget=micro", "tasks=[truthfulqa_mc]",
        "+task_params.truthfulqa_mc.limit=2", "eval_batch_size=4", "settings=[instruct,sft]", "methods=[dpo,kto]",
        "model.checkpoints.sft=derived:sft:instruct", "name=t"]
UNITS = {(s, m) for s in ("instruct", "sft") for m in ("start", "dpo", "kto")}


def sweep(results: Path, cache: Path, *overrides: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """The real entry point in a session of its own, so that a timeout ends its workers too (joblib's, submitit's)."""
    process = subprocess.Popen([sys.executable, "-m", "harness.cli", "sweep", *TINY, f"paths.results={results}",
                                *overrides], cwd=REPO, env=cli_env(cache), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def measured(folder: Path) -> dict:
    """(setting, method, run id, task key) → what must not depend on how the sweep ran: status, metrics, steps."""
    out = {}
    for r in read_records(folder):
        key = (r["setting"], r["method"], r["run_id"], r["task_key"])
        assert key not in out, f"duplicate record {key}"
        out[key] = (r["status"], r["metrics"], (r.get("consumed") or {}).get("optimizer_steps"))
    return out


def assert_same_measurements(got: dict, expected: dict) -> None:
    """Same keys, statuses and steps; metrics equal to float tolerance (rel 1e-5): concurrent workers and a lone process
    pick different thread counts (harness.evaluate.continuous_batching.ThreadPolicy, torch's own kernels), so sums
    run in another order and the last digits of a float may differ; a real difference is far larger."""
    assert set(got) == set(expected)
    for key, (status, metrics, steps) in got.items():
        other_status, other_metrics, other_steps = expected[key]
        assert (status, steps, set(metrics)) == (other_status, other_steps, set(other_metrics)), key
        for name, metric in metrics.items():
            for part in ("value", "stderr"):
                mine, theirs = metric.get(part), other_metrics[name].get(part)
                if mine is None or theirs is None:
                    assert mine == theirs, (key, name, part)
                else:
                    assert mine == pytest.approx(theirs, rel=1e-5, abs=1e-7), (key, name, part)


def builds(cache: Path) -> dict[tuple[str, str], int]:
    """(folder, entry) → how often it was built, over every ``builds.jsonl`` of the cache (the models folder too)."""
    counts: dict[tuple[str, str], int] = {}
    for folder in {path.parent for path in cache.rglob("builds.jsonl")} | {cache / "models"}:
        for line in read_builds(folder):
            key = (folder.relative_to(cache).as_posix(), line["entry"])
            counts[key] = counts.get(key, 0) + 1
    return counts


@pytest.fixture(scope="module")
def serial(tmp_path_factory, cache_dir) -> dict:
    """The same sweep in one process (``fanout`` off, the default)."""
    results = tmp_path_factory.mktemp("serial")
    result = sweep(results, cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    records = measured(results / "t")
    assert {(k[0], k[1]) for k in records} == UNITS and all(v[0] == "ok" for v in records.values())
    return records


@pytest.fixture(scope="module")
def fresh_cache(tmp_path_factory, tiny_model) -> Path:
    """A cache of its own holding only the embedded model (the tiny-random checkpoints' tokenizer): every other
    stage is built by the fanned-out jobs."""
    cache = tmp_path_factory.mktemp("fanout-cache")
    (cache / "models").mkdir()
    (cache / "models" / "smollm2-135m-instruct").symlink_to(MODELS_CACHE / "smollm2-135m-instruct")
    return cache


@pytest.fixture(scope="module")
def joblib_run(tmp_path_factory, fresh_cache) -> Path:
    results = tmp_path_factory.mktemp("joblib")
    result = sweep(results, fresh_cache, "fanout=true", "hydra/launcher=workers", "hydra.launcher.n_jobs=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"leaderboard: {results / 't' / 'leaderboard.md'}" in result.stdout
    return results


def test_joblib_workers_give_the_serial_metrics_and_build_every_stage_once(serial, joblib_run, fresh_cache):
    assert_same_measurements(measured(joblib_run / "t"), serial)
    counted = builds(fresh_cache)
    assert counted and all(n == 1 for n in counted.values()), counted
    run_ids = {r["run_id"] for r in read_records(joblib_run / "t") if r["method"] != "start"}
    kinds = {}
    for folder in {p.parent for p in fresh_cache.rglob("builds.jsonl")}:
        for line in read_builds(folder):
            kinds.setdefault(line["what"], set()).add(line["entry"])
    assert kinds["checkpoint"] == run_ids  # each trained variant once
    assert len(kinds["derived stage"]) == 1  # the SFT making the sft setting: once, though three jobs need it
    assert kinds["model"] == {"tiny-random-3"}  # the instruct checkpoint, unpacked once for five jobs
    assert len(kinds["reference log-probs"]) == 2  # one per starting checkpoint, shared by DPO and KTO
    assert (joblib_run / "t" / "leaderboard.md").exists()


@pytest.mark.slow  # a process per job, or a Ray instance: ~1-2 min each on 2 idle cores
@pytest.mark.parametrize("launcher", [
    ["hydra/launcher=submitit_local"],
    ["hydra/launcher=ray", "+hydra.launcher.ray.init.num_cpus=2"],
], ids=["submitit_local", "ray"])
def test_submitit_and_ray_give_the_serial_metrics_and_build_nothing_again(serial, joblib_run, fresh_cache, tmp_path,
                                                                          launcher):
    before = builds(fresh_cache)
    result = sweep(tmp_path, fresh_cache, "fanout=true", *launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_measurements(measured(tmp_path / "t"), serial)
    assert builds(fresh_cache) == before  # every stage came from the cache the joblib run filled


@pytest.mark.slow  # two fanned-out runs
def test_a_killed_job_is_redone_by_the_same_command(serial, joblib_run, fresh_cache, tmp_path):
    # the first job to copy its training curves dies there (SIGKILL), after the first wave's records are written
    killed = sweep(tmp_path, fresh_cache, "fanout=true", "hydra/launcher=workers", "debug.kill_at=curve_write:1")
    assert killed.returncode == 2
    assert "run the same command again" in killed.stderr
    assert 0 < len(measured(tmp_path / "t")) < len(serial)
    again = sweep(tmp_path, fresh_cache, "fanout=true", "hydra/launcher=workers")
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_measurements(measured(tmp_path / "t"), serial)  # nothing lost, nothing twice
    assert not [p for p in (tmp_path / "t").rglob("*.tmp")]


@pytest.mark.parametrize("overrides, message", [
    (["unit=pretrained:dpo"], "unit=pretrained:dpo names no unit of this sweep"),
    (["fanout=maybe"], "fanout"),
    (["hydra/sweeper=basic"], "fanout=true chooses its own sweeper"),
])
def test_bad_fanout_input_is_one_line_and_writes_nothing(tmp_path, cache_dir, overrides, message):
    result = run_cli_forked("sweep", *TINY, f"paths.results={tmp_path}", "fanout=true", *overrides, cache=cache_dir)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("align-harness: error:") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not os.listdir(tmp_path)


def _append_many(folder: str, writer: int, count: int) -> None:
    from harness.records import append_record

    for number in range(count):
        append_record(Path(folder), {"run_id": f"run-{writer}", "task_key": f"task-{number}", "sweep": "t",
                                     "family": "f", "setting": "instruct", "method": "dpo", "task": "x",
                                     "status": "ok", "metrics": {}})


def test_records_from_concurrent_writers_are_all_kept_once(tmp_path):
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_append_many, args=(str(tmp_path), writer, 15)) for writer in range(4)]
    for process in writers:
        process.start()
    for process in writers:
        process.join(60)
        assert process.exitcode == 0
    keys = [(r["run_id"], r["task_key"]) for r in read_records(tmp_path)]
    assert sorted(keys) == sorted((f"run-{w}", f"task-{n}") for w in range(4) for n in range(15))


def _record(run_id: str, status: str, finished_at: str, value: float) -> dict:
    return {"run_id": run_id, "task_key": "x-1", "sweep": "t", "family": "f", "setting": "instruct", "method": "dpo",
            "task": "x", "status": status, "finished_at": finished_at,
            "metrics": {"acc": {"value": value, "stderr": None, "higher_is_better": True}},
            "samples_file": f"samples/{run_id}/x-1.jsonl"}


def test_results_folders_from_several_machines_merge_newest_ok_first(tmp_path):
    from harness.records import append_record, merge_results

    first, second, merged = tmp_path / "node1", tmp_path / "node2", tmp_path / "merged"
    append_record(first, _record("a", "ok", "2026-01-01T10:00:00", 0.5))
    append_record(first, _record("b", "ok", "2026-01-01T10:00:00", 0.1))
    append_record(second, _record("a", "failed", "2026-01-02T10:00:00", 0.0))  # newer, but a failure
    append_record(second, _record("b", "ok", "2026-01-02T10:00:00", 0.2))      # newer and ok: replaces
    (second / "samples" / "b").mkdir(parents=True)
    (second / "samples" / "b" / "x-1.jsonl").write_text("{}\n")
    assert merge_results([first, second], merged) == 2
    values = {r["run_id"]: r["metrics"]["acc"]["value"] for r in read_records(merged)}
    assert values == {"a": 0.5, "b": 0.2}
    assert (merged / "samples" / "b" / "x-1.jsonl").exists()


def test_several_leaderboard_folders_need_into(tmp_path, cache_dir):
    result = run_cli_forked("leaderboard", str(tmp_path / "a"), str(tmp_path / "b"), cache=cache_dir)
    assert result.returncode == 2 and "--into" in result.stderr and len(result.stderr.strip().splitlines()) == 1


class _Recording:
    """A stand-in for a Hydra launcher: records each ``launch`` call; every job returns COMPLETED but ``fail``'s."""

    def __init__(self, fail: str | None = None):
        self.calls, self.fail = [], fail

    def launch(self, jobs, initial_job_idx):
        from hydra.core.utils import JobReturn, JobStatus

        self.calls.append(([job[-1] for job in jobs], initial_job_idx))
        returns = []
        for job in jobs:
            result = JobReturn(status=JobStatus.FAILED if job[-1] == self.fail else JobStatus.COMPLETED)
            result._return_value = RuntimeError("out of memory\nsecond line") if job[-1] == self.fail else None
            returns.append(result)
        return returns


class JoblibLauncher(_Recording):  # named as hydra-joblib-launcher's: starts jobs in order on this machine
    pass


class SlurmLauncher(_Recording):  # named as submitit's: may start jobs in any order
    pass


WAVES = [[], [["a=1", "unit=sft:start"], ["a=1", "unit=instruct:dpo"]], [["a=1", "unit=sft:dpo"]]]


def test_an_in_order_pool_gets_every_wave_in_one_launch_others_wave_by_wave():
    from harness.run.fanout import launch_waves

    pool, cluster = JoblibLauncher(), SlurmLauncher()
    launch_waves(pool, WAVES)
    launch_waves(cluster, WAVES)
    assert pool.calls == [(["unit=sft:start", "unit=instruct:dpo", "unit=sft:dpo"], 0)]  # wave two after wave one
    assert cluster.calls == [(["unit=sft:start", "unit=instruct:dpo"], 0), (["unit=sft:dpo"], 2)]
    for launcher in (JoblibLauncher(fail="unit=sft:dpo"), SlurmLauncher(fail="unit=sft:dpo")):
        with pytest.raises(HarnessError, match=r"^unit sft:dpo: RuntimeError: out of memory$"):
            launch_waves(launcher, WAVES)
