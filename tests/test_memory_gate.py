"""harness.train.memory_gate: a memory-heavy training waits for another on the same machine; light ones never wait."""

import multiprocessing
import time
from types import SimpleNamespace

from harness.train.memory_gate import release_memory, training_bytes, training_slot

GIB = 2 ** 30
PPO = SimpleNamespace(memory_models=(2, 2))
DPO = SimpleNamespace()  # the default: (1, 1)


def test_the_estimate_counts_trained_and_frozen_models():
    assert training_bytes(DPO, 10) == 10 * 16  # the reference's log-probs are cached: only the policy
    assert training_bytes(SimpleNamespace(needs_reward=True), 10) == 10 * (16 + 2 * 4)  # + reference, reward model
    assert training_bytes(PPO, 268_098_176) == 268_098_176 * 40  # Gemma 3 270M: ~10.7 GB
    from methods.ppo import PPO as RealPPO
    assert RealPPO.memory_models == (2, 2)


def _hold(lock_dir, events, name, hold_seconds, method):
    with training_slot(method, 268_098_176, lock_dir, "cpu", total=24 * GIB):
        events.put((name, "in", time.monotonic()))
        time.sleep(hold_seconds)
        events.put((name, "out", time.monotonic()))


def spans(lock_dir, method_a, method_b):
    context = multiprocessing.get_context("spawn")
    events = context.Queue()
    first = context.Process(target=_hold, args=(lock_dir, events, "a", 1.5, method_a))
    first.start()
    assert events.get(timeout=60)[:2] == ("a", "in")
    second = context.Process(target=_hold, args=(lock_dir, events, "b", 0.1, method_b))
    second.start()
    got = [events.get(timeout=60) for _ in range(3)]
    first.join(60)
    second.join(60)
    return [(name, kind) for name, kind, _ in got]


def test_two_heavy_trainings_take_turns(tmp_path):
    # PPO on Gemma (~10.7 GB estimated) is over a fifth of 24 GiB: b enters only after a left
    assert spans(tmp_path, PPO, PPO) == [("a", "out"), ("b", "in"), ("b", "out")]


def test_a_light_training_runs_beside_a_heavy_one(tmp_path):
    assert spans(tmp_path, PPO, DPO) == [("b", "in"), ("b", "out"), ("a", "out")]


def test_no_gate_on_a_gpu_or_a_big_machine(tmp_path):
    with training_slot(PPO, 268_098_176, tmp_path, "cuda:0", total=24 * GIB):
        with training_slot(PPO, 268_098_176, tmp_path, "cuda:0", total=24 * GIB):
            pass  # the same process twice: would deadlock if it locked
    with training_slot(PPO, 268_098_176, tmp_path, "cpu", total=64 * GIB):
        with training_slot(PPO, 268_098_176, tmp_path, "cpu", total=64 * GIB):
            pass
    assert not list(tmp_path.glob(".heavy-training-*"))
    release_memory()  # runs anywhere (glibc: malloc_trim; elsewhere the collector only)
