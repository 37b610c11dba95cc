"""Seeds as a sweep axis (``seeds=[0,1,2]``): one run per seed with the seed in its budget, run id and record, the
starting row scored once, fan-out jobs and plan units per seed, resume per seed; on the leaderboard a variant's seeds
fold into one row (mean, SD over seeds, seed count) and its differences come from a bootstrap over seeds and items
that is the item bootstrap with one seed."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest

from conftest import run_cli, run_cli_forked
from harness.records import append_record, read_records, write_samples
from harness.report.board import Board, hierarchical_bootstrap, paired_bootstrap, table_rows
from harness.report.leaderboard import build_leaderboard, compare, compare_text
from harness.run.fanout import merged_waves, ranked_unit_waves, unit_waves
from test_run_spec import START_POINT, tiny_sweep

TINY = ["model=tiny-random", "budget=micro", "budget@stage_budget=micro", "tasks=[truthfulqa_mc]",
        "+task_params.truthfulqa_mc.limit=2", "eval_batch_size=4", "name=t"]


# ---------------------------------------------------------------------------------------------
# the sweep: run specs, units, plan, records, resume
def test_a_seed_is_in_the_run_id_and_budget_but_not_the_variant_and_seed_0_keeps_its_run_id():
    one = tiny_sweep()                      # the default: seeds = [budget.seed] = [0]
    three = tiny_sweep("seeds=[0,1,2]")
    assert one.seeds == [0] and three.seeds == [0, 1, 2]
    specs = [three.run_spec("instruct", "dpo", START_POINT, seed=seed) for seed in three.seeds]
    assert specs[0].run_id == one.run_spec("instruct", "dpo", START_POINT).run_id  # cached checkpoints stay valid
    assert len({spec.run_id for spec in specs}) == 3
    assert [(spec.seed, spec.budget["seed"]) for spec in specs] == [(0, 0), (1, 1), (2, 2)]
    assert {spec.variant for spec in specs} == {"dpo"}
    # the starting row has no seed: one run id whatever the seeds
    assert {three.run_spec("instruct", "start", START_POINT, seed=s).run_id for s in three.seeds} == {
        one.run_spec("instruct", "start", START_POINT).run_id}
    # budget.seed stays the one-seed fallback
    assert tiny_sweep("budget.seed=5").seeds == [5]


def test_units_and_fanout_jobs_count_seeds_and_score_the_start_once():
    sweep = tiny_sweep("seeds=[0,1]", "settings=[instruct]")
    assert sweep.units() == [("instruct", "start", None), ("instruct", "dpo", 0), ("instruct", "dpo", 1),
                             ("instruct", "kto", 0), ("instruct", "kto", 1)]
    assert unit_waves(sweep) == [["instruct:start", "instruct:dpo:0", "instruct:dpo:1", "instruct:kto:0",
                                  "instruct:kto:1"]]
    assert unit_waves(tiny_sweep("settings=[instruct]")) == [["instruct:start", "instruct:dpo", "instruct:kto"]]


def test_fanout_hands_out_reward_model_builders_first_across_sweeps():
    """Wave one holds the derived settings' stages and beside them every unit of the settings that derive from nothing;
    wave two the derived settings' units. In each, one reward-needing unit per setting first (it builds the setting's
    reward model, the longest stage), then the rest with the other reward-needing units spread evenly through it;
    several sweeps' waves merge by rank."""
    sweep = tiny_sweep("seeds=[0,1]", "settings=[instruct,sft]", "methods=[dpo,ppo]",
                       "model.checkpoints.sft=derived:sft:instruct")
    assert unit_waves(sweep) == [
        # the derived setting's stage, beside the setting that derives from nothing: its reward-model builder, then
        # the rest with the other reward-needing units spread through it
        ["sft:start", "instruct:ppo:0", "instruct:start", "instruct:dpo:0", "instruct:ppo:1", "instruct:dpo:1"],
        ["sft:ppo:0", "sft:dpo:0", "sft:ppo:1", "sft:dpo:1"]]  # the derived setting's units once its stage exists
    waves = ranked_unit_waves(sweep)

    def fanned(name, weight):
        return SimpleNamespace(waves=[[(rank, [f"model={name}", f"unit={unit}"]) for rank, unit in wave]
                                      for wave in waves], weight=weight)

    def named(merged):
        return [[job[0][-1] + ":" + job[1].split("=")[1] for job in wave] for wave in merged]

    rest = unit_waves(sweep)[0][2:]
    # equal weights: sweep after sweep within a rank
    equal = named(merged_waves([fanned("a", 1.0), fanned("b", 1.0)]))
    assert equal[0][:4] == ["a:sft:start", "b:sft:start", "a:instruct:ppo:0", "b:instruct:ppo:0"]
    assert equal[0][4:] == ["a:" + u for u in rest] + ["b:" + u for u in rest]
    assert equal[1] == ["a:sft:ppo:0", "b:sft:ppo:0", "a:sft:dpo:0", "a:sft:ppo:1", "a:sft:dpo:1",
                        "b:sft:dpo:0", "b:sft:ppo:1", "b:sft:dpo:1"]
    # a larger model's sweep first within each rank (longest processing time first): the short jobs end each wave
    larger_b = named(merged_waves([fanned("a", 1.35e8), fanned("b", 2.68e8)]))
    assert larger_b[0][:4] == ["b:sft:start", "a:sft:start", "b:instruct:ppo:0", "a:instruct:ppo:0"]
    assert larger_b[0][4:] == ["b:" + u for u in rest] + ["a:" + u for u in rest]
    assert larger_b[1] == ["b:sft:ppo:0", "a:sft:ppo:0", "b:sft:dpo:0", "b:sft:ppo:1", "b:sft:dpo:1",
                           "a:sft:dpo:0", "a:sft:ppo:1", "a:sft:dpo:1"]


def test_plan_prices_every_seed(tmp_path, cache_dir):
    def plan(*overrides):
        result = run_cli_forked("plan", "--json", *TINY, f"paths.results={tmp_path}", "settings=[instruct]",
                                "methods=[dpo]", *overrides, cache=cache_dir)
        assert result.returncode == 0, result.stderr[-3000:]
        import json

        return json.loads(result.stdout)["units"]

    one, two = plan(), plan("seeds=[0,1]")
    assert [(u["kind"], u["name"], u["seed"]) for u in two] == [
        ("start", "start", None), ("train", "dpo · seed 0", 0), ("train", "dpo · seed 1", 1)]
    assert two[1]["run_id"] == one[1]["run_id"] != two[2]["run_id"]
    assert two[1]["train_flops"] == two[2]["train_flops"] == one[1]["train_flops"] > 0


@pytest.mark.parametrize("override, message", [
    ("seeds=[]", "seeds=[] must be a non-empty list"),
    ("seeds=[0,0]", "seeds=[0, 0] names a seed twice"),
    ("seeds=[-1]", "seeds=-1 must be a whole number >= 0"),
    ("fanout=true unit=instruct:dpo:7", "unit=instruct:dpo:7 names no unit of this sweep"),
])
def test_bad_seeds_are_one_line(tmp_path, cache_dir, override, message):
    result = run_cli_forked("sweep", *TINY, f"paths.results={tmp_path}", "settings=[instruct]", "methods=[dpo]",
                            *override.split(), cache=cache_dir)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr and not (tmp_path / "t").exists()


def test_two_seeds_train_two_runs_score_the_start_once_fold_into_one_row_and_resume(tmp_path, cache_dir):
    arguments = ["sweep", *TINY, f"paths.results={tmp_path}", "settings=[instruct]", "methods=[dpo]"]
    result = run_cli(*arguments, "seeds=[0,1]", cache=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_records(tmp_path / "t")
    assert sorted((r["method"], r["seed"]) for r in records) == [("dpo", 0), ("dpo", 1), ("start", None)]
    assert all(r["status"] == "ok" for r in records)
    dpo = {r["seed"]: r for r in records if r["method"] == "dpo"}
    assert dpo[0]["run_id"] != dpo[1]["run_id"] and dpo[0]["variant"] == dpo[1]["variant"] == "dpo"
    assert [dpo[s]["run_config"]["seed"] for s in (0, 1)] == [0, 1]
    assert [dpo[s]["budget"]["seed"] for s in (0, 1)] == [0, 1]
    board = Board(tmp_path / "t")
    row = ("tiny-random", "instruct", "dpo")
    assert [key[2] for key in board.keys] == ["start", "dpo"] and board.seeds(row) == 2
    values = [dpo[s]["metrics"]["mc1"]["value"] for s in (0, 1)]
    assert board.metric(row, "truthfulqa_mc/mc1")["value"] == pytest.approx(sum(values) / 2)
    table = (tmp_path / "t" / "leaderboard.md").read_text()
    assert "| variant | unified | rank | seeds |" in table

    again = run_cli(*arguments, "seeds=[0,1,2]", cache=cache_dir)   # a third seed: only it runs
    assert again.returncode == 0, again.stderr[-3000:]
    log = again.stdout + again.stderr
    assert log.count("done before, skipped") == 3 and "seed 2" in log
    after = read_records(tmp_path / "t")
    assert len(after) == 4 and {r["seed"] for r in after if r["method"] == "dpo"} == {0, 1, 2}
    for record in records:  # finished seeds were not redone
        assert next(r for r in after if r["run_id"] == record["run_id"])["finished_at"] == record["finished_at"]
    assert Board(tmp_path / "t").seeds(row) == 3


# ---------------------------------------------------------------------------------------------
# the board: synthetic records as the sweep writes them (run_config carries the seed)
def add_seed(folder, variant: str, seed: int | None, items: list[float], *, task: str = "truthfulqa_mc",
             status: str = "ok", config: dict | None = None) -> None:
    method = variant.split("[")[0]
    run_config = {"method": method, "setting": "instruct", "budget": {"pairs": 8, "seed": seed}, "seed": seed,
                  **(config or {})}
    if method == "start":
        run_config = {"method": "start", "setting": "instruct"}
    run_id = f"{variant}-{seed}-{sorted((config or {}).items())}"
    n = len(items)
    mean = sum(items) / n
    stderr = math.sqrt(sum((v - mean) ** 2 for v in items) / (n - 1) / n)
    task_key = f"{task}-k"
    samples = [{"item_id": str(i), "scores": {"acc": v}} for i, v in enumerate(items)]
    append_record(folder, {"run_id": run_id, "sweep": "s", "family": "f", "setting": "instruct", "method": method,
                           "variant": variant, "seed": seed, "run_config": run_config, "task": task,
                           "task_key": task_key, "measurement_key": "m", "status": status,
                           "reason": None if status == "ok" else "RuntimeError: boom", "consumed": {},
                           "metrics": {"acc": {"value": mean, "stderr": stderr, "higher_is_better": True}}
                           if status == "ok" else {},
                           "samples_file": write_samples(folder, run_id, task_key, samples)})


START_ITEMS = [1, 0, 0, 1, 0, 1, 0, 0]
SEED_ITEMS = {0: [1, 1, 0, 1, 0, 1, 0, 0], 1: [1, 1, 1, 1, 0, 1, 0, 1], 2: [1, 0, 0, 1, 1, 1, 1, 0]}


def test_seeds_fold_into_one_row_with_mean_sd_and_a_seed_and_item_interval(tmp_path):
    add_seed(tmp_path, "start", None, START_ITEMS)
    for seed, items in SEED_ITEMS.items():
        add_seed(tmp_path, "dpo", seed, items)
    add_seed(tmp_path, "kto", 0, [0, 0, 0, 1, 0, 1, 0, 0])
    board = Board(tmp_path)
    dpo, kto, start = ("f", "instruct", "dpo"), ("f", "instruct", "kto"), ("f", "instruct", "start")
    assert board.keys == [start, dpo, kto]
    assert (board.seeds(start), board.seeds(dpo), board.seeds(kto)) == (1, 3, 1)
    means = [sum(v) / 8 for v in SEED_ITEMS.values()]                     # 0.5, 0.75, 0.625
    sd = math.sqrt(sum((m - 0.625) ** 2 for m in means) / 2)              # 0.125
    errors = [math.sqrt(sum((v - m) ** 2 for v in items) / 7 / 8) for items, m in zip(SEED_ITEMS.values(), means)]
    metric = board.metric(dpo, "truthfulqa_mc/acc")
    assert metric["value"] == pytest.approx(0.625) and metric["seed_sd"] == pytest.approx(sd) and metric["seeds"] == 3
    assert metric["stderr"] == pytest.approx(math.sqrt(sum(e * e for e in errors) / 3 + sd ** 2 / 3))
    assert board.unified(dpo) == (pytest.approx(0.625), 1) and board.ranks()[dpo] == 1  # ranked by the seed mean
    # Δ from start: mean over seeds of the mean paired item difference; its interval resamples seeds, then items
    difference = board.paired_difference(dpo, start, "truthfulqa_mc")
    assert difference["difference"] == pytest.approx(0.625 - 3 / 8) and difference["items"] == 8
    assert difference["seeds"] == 3 and difference["seed_sd"] == pytest.approx(sd)
    assert difference["low"] < difference["difference"] < difference["high"]
    one_seed = board.paired_difference(kto, start, "truthfulqa_mc")
    assert one_seed["seeds"] == 1 and one_seed["seed_sd"] is None
    # every format shows it: seeds column, sd beside the value, the CSV's seed columns
    text = build_leaderboard(tmp_path)["markdown"].read_text()
    line = next(line for line in text.splitlines() if line.startswith("| dpo |"))
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    assert cells[3] == "3" and cells[4] == f"0.6250 ± {metric['stderr']:.4f} (sd 0.1250)"
    rows = {row["variant"]: row for row in table_rows(board)}
    assert rows["dpo"]["seeds"] == 3 and rows["kto"]["seeds"] == 1
    assert rows["dpo"]["truthfulqa_mc/acc sd"] == pytest.approx(sd) and rows["kto"]["truthfulqa_mc/acc sd"] is None
    assert rows["dpo"]["delta truthfulqa_mc seeds"] == 3
    assert "seeds" in (tmp_path / "leaderboard.csv").read_text().splitlines()[0].split(",")
    assert "(sd 0.125)" in (tmp_path / "leaderboard.html").read_text()  # the cell: mean ± se (sd over seeds)
    assert "3 seeds, sd 0.1250" in compare_text(compare(board, "dpo", "start"))


def test_a_failed_seed_is_shown_and_left_out_of_the_mean_and_other_configs_stay_apart(tmp_path):
    add_seed(tmp_path, "start", None, START_ITEMS)
    add_seed(tmp_path, "dpo", 0, SEED_ITEMS[0])
    add_seed(tmp_path, "dpo", 1, SEED_ITEMS[1])
    add_seed(tmp_path, "dpo", 2, SEED_ITEMS[2], status="failed")
    add_seed(tmp_path, "dpo", 0, SEED_ITEMS[2], config={"data": "other"})  # not a seed of the same run
    board = Board(tmp_path)
    labels = [key[2] for key in board.keys]
    assert labels[0] == "start" and len(labels) == 3 and all(label.startswith("dpo#") for label in labels[1:])
    folded = next(key for key in board.keys if board.seeds(key) == 2)
    assert board.metric(folded, "truthfulqa_mc/acc")["value"] == pytest.approx(0.625)
    assert board.status(folded) == ("failed", "seed 2: RuntimeError: boom")


def test_one_board_of_one_seed_has_no_seed_columns(tmp_path):
    add_seed(tmp_path, "start", None, START_ITEMS)
    add_seed(tmp_path, "dpo", 0, SEED_ITEMS[0])
    board = Board(tmp_path)
    assert not board.several_seeds and "seeds" not in table_rows(board)[0]
    assert "| seeds |" not in build_leaderboard(tmp_path)["markdown"].read_text()


# ---------------------------------------------------------------------------------------------
# the two-level bootstrap
def scores(values: list[float]) -> dict[str, float]:
    return {str(i): float(v) for i, v in enumerate(values)}


def test_one_seed_is_the_item_bootstrap_and_identical_seeds_are_too():
    generator = random.Random(3)
    a = scores([generator.random() for _ in range(40)])
    b = scores([generator.random() for _ in range(40)])
    c, d = scores([generator.random() for _ in range(25)]), scores([generator.random() for _ in range(25)])
    items = paired_bootstrap(a, b)
    assert hierarchical_bootstrap({"0": a}, {"start": b}) == {**items, "seeds": 1, "seed_sd": None}
    assert hierarchical_bootstrap({"0": a}, {"s": b}, {"0": c}, {"s": d}) == {
        **paired_bootstrap(a, b, c, d), "seeds": 1, "seed_sd": None}
    # the general path with seeds that do not differ: the same numbers (the seed draws have a stream of their own)
    same = hierarchical_bootstrap({"0": a, "1": dict(a), "2": dict(a)}, {"start": b})
    assert {k: same[k] for k in ("difference", "low", "high", "items")} == {k: items[k] for k in items}
    assert same["seeds"] == 3 and same["seed_sd"] == 0.0


def test_more_spread_between_seeds_widens_the_interval():
    generator = random.Random(7)
    base = [generator.random() for _ in range(60)]
    start = scores([generator.random() for _ in range(60)])

    def width(shift: float) -> float:
        seeds = {str(s): scores([v + offset for v in base]) for s, offset in enumerate((-shift, 0.0, shift))}
        result = hierarchical_bootstrap(seeds, {"start": start})
        assert result["difference"] == pytest.approx(sum(base) / 60 - sum(start.values()) / 60)
        assert result["seed_sd"] == pytest.approx(shift)
        return result["high"] - result["low"]

    assert width(0.0) < width(0.05) < width(0.2)
    assert width(0.2) > 0.4  # three seeds ±0.2 apart: the interval covers most of their spread


def test_seeds_are_drawn_once_for_every_task_of_the_unified_difference():
    generator = random.Random(11)
    base = [[generator.random() for _ in range(30)] for _ in range(2)]
    start = [{"start": scores([generator.random() for _ in range(30)])} for _ in range(2)]
    # seed 0 is better on both tasks, seed 1 worse on both: drawn jointly, the spread does not average out
    seeds = [{"0": scores([v + 0.2 for v in task]), "1": scores([v - 0.2 for v in task])} for task in base]
    joint = hierarchical_bootstrap(seeds[0], start[0], seeds[1], start[1])
    apart = hierarchical_bootstrap(seeds[0], start[0], {"2": seeds[1]["0"], "3": seeds[1]["1"]}, start[1])
    assert joint["high"] - joint["low"] > apart["high"] - apart["low"]
    assert joint["seed_sd"] == pytest.approx(math.sqrt(2) * 0.2) and apart["seed_sd"] is None
