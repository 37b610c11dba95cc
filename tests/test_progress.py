"""The sweep's progress: a heartbeat line at least every ``heartbeat_seconds`` while a stage runs, saying what runs,
how far (read from the libraries' own progress bars) and for how long; the bars themselves kept out of the output."""

from __future__ import annotations

import logging
import time

from conftest import run_cli
from harness.run.progress import Heartbeat, busiest_bar, format_seconds


def test_heartbeat_names_the_stage_its_progress_and_elapsed_time(caplog):
    from tqdm import tqdm

    heartbeat = Heartbeat(interval=0.05, logger=logging.getLogger("harness.test"))
    assert heartbeat.beat() is None  # nothing runs: nothing to say
    with caplog.at_level(logging.INFO, logger="harness.test"):
        with heartbeat.stage("scoring gsm8k"):
            with tqdm(total=32, desc="Running generate_until requests", file=open("/dev/null", "w")) as bar:
                bar.update(12)
                assert busiest_bar() == "Running generate_until requests 12/32"
                time.sleep(0.3)
            with heartbeat.stage("inner"):
                assert heartbeat.beat().startswith("  … inner:")
            assert heartbeat.beat().startswith("  … scoring gsm8k:")
        heartbeat.close()
    lines = [r.getMessage() for r in caplog.records]
    assert any("… scoring gsm8k: Running generate_until requests 12/32, 0 s elapsed" == line.strip() for line in lines), lines
    assert format_seconds(75) == "1 min 15 s" and format_seconds(9.7) == "9 s"


def test_sweep_output_has_heartbeats_and_no_library_bars(tmp_path, own_cache):
    result = run_cli("sweep", "model=tiny-random", "budget=micro", "budget@stage_budget=micro", "settings=[instruct]",
                     "methods=[dpo]", "tasks=[truthfulqa_mc]", "+task_params.truthfulqa_mc.limit=2",
                     "heartbeat_seconds=0.05", f"paths.results={tmp_path}", "name=t", cache=own_cache)  # every stage outlasts 0.05 s
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    beats = [line for line in output.splitlines() if " … " in line]
    assert any("… scoring truthfulqa_mc:" in line and "elapsed" in line for line in beats), output[-3000:]
    assert any("… training dpo:" in line for line in beats), output[-3000:]
    assert "it/s" not in output and "%|" not in output  # no tqdm bar drawn
    assert "{'loss'" not in output and "train_runtime" not in output  # no trainer log dicts
