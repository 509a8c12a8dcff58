"""The LLM experiments end to end through the CLI, drastically shortened (tens of steps, two lambdas, two seeds, a
three-lr ladder), and their bookkeeping on synthetic records.

What is checked is what could silently be wrong: the rise and the integrated decay in results.json are recomputed
from metrics.jsonl, the control's lambda really matches AdamC's integrated decay, AdamW and AdamC runs differ only in
the optimizer type, a deliberately huge lr is flagged as diverged (the trainer's guard stops it with exit 3, a result
that a rerun reuses; other exits still raise) and the ladder stops above it, the per-seed largest stable lr and
Wortsman's sensitivity follow their definitions, runs forked two at a time give bitwise the metrics of their
command.txt run by hand, a failed run stops the pool from starting more while the one beside it finishes, Ctrl-C
ends every run, and bad input is one line with exit code 2.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import SMALL_CORPUS_DIR

import megatron_adamc.cli as cli
from megatron_adamc.core import theory
from megatron_adamc.experiments import adamc_vs_adamw, stability
from megatron_adamc.experiments._trainer_runs import Run, RunQueue
from megatron_adamc.metrics_file import DATA_WAIT_S, STEP_TIME_S, TOKENS_PER_S

DATA = ["vocab_size=512", "max_bytes=400000", f"data_cache_dir={SMALL_CORPUS_DIR}", "seq_len=32", "micro_batch_size=4"]
DATA += ["workers=2"]  # two runs side by side, forked from the fork server (the defaults)
AVW = DATA + ["steps=40", "warmup_steps=2", "seeds=2", "weight_decays=[0.1,2.0]", "tracking_interval=4"]
AVW += ["eval_points=2", "eval_batches=2", "lr=0.01", "long_weight_decay=2.0", "long_lr_wd_steps=1.2", "long_seeds=1"]
AVW += ["equilibrium_steps=60", "equilibrium_weight_decay=5.0", "settled_decay=1.0"]
STAB = DATA + ["steps=60", "warmup_steps=3", "variants=[baseline,qk_norm]", "widths=[64]", "seeds=[0,1]"]
STAB += ["lrs=[0.03,30.0,60.0]", "common_lr=0.03", "tracking_interval=5", "eval_batches=2", "skip_after_diverged=1"]


def experiment(name: str, out, sets: list[str]) -> dict:
    argv = ["experiment", name, "--output-dir", str(out)] + [a for kv in sets for a in ("--set", kv)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "SUBCOMMANDS", ["experiment"])
        assert cli.main(argv) == 0
    return json.loads((out / "results.json").read_text())


def metrics(out, name: str) -> list[dict]:
    lines = (out / "runs" / name / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if "step" in row and "event" not in row]


@pytest.fixture(scope="module")
def avw(tmp_path_factory):
    out = tmp_path_factory.mktemp("avw")
    return out, experiment("adamc-vs-adamw", out, AVW)


@pytest.fixture(scope="module")
def stab(tmp_path_factory):
    out = tmp_path_factory.mktemp("stab")
    return out, experiment("stability", out, STAB)


def test_adamc_vs_adamw_rise_and_decay_match_metrics(avw):
    out, results = avw
    for png in ("adamc_vs_adamw.png", "adam_forms.png"):
        assert (out / png).stat().st_size > 10_000
    phases = [r["phase"] for r in results["runs"]]
    assert phases.count("sweep") == 4 and phases.count("seed") == 2 and phases.count("control") == 2
    assert phases.count("no_decay") == 1 and phases.count("equilibrium") == 1
    assert phases.count("long") == 2 and phases.count("long_control") == 1
    for r in results["runs"]:
        records = metrics(out, r["name"])
        steps = r["steps"]
        mid = [x["grad_norm"] for x in records if 0.4 * steps < x["step"] <= 0.6 * steps]
        end = [x["grad_norm"] for x in records if x["step"] > 0.95 * steps]
        assert r["grad_norm_rise"] == pytest.approx((sum(end) / len(end)) / (sum(mid) / len(mid)), rel=1e-9)
        assert r["integrated_decay"] == pytest.approx(sum(x["lr"] * x["weight_decay"] for x in records), rel=1e-9)
        assert r["lr_wd_steps"] == pytest.approx(0.01 * r["weight_decay"] * steps)
        assert math.isfinite(r["final_val_loss"]) and r["final_val_loss"] < math.log(512)
        assert r["per_layer_grad_norm_rise"], "per-layer norms were tracked"
        # Adam runs: the Adam forms only; none without decay (nothing to predict).
        assert set(r["steady_state"]["forms"]) == (set() if r["weight_decay"] == 0 else {"adam", "kosson"})
    sweep = {(r["optimizer"], r["weight_decay"]): r["final_val_loss"] for r in results["runs"] if r["phase"] == "sweep"}
    for opt, best in results["best"].items():
        assert best["weight_decay"] == min((wd for o, wd in sweep if o == opt), key=lambda wd: sweep[opt, wd])
        assert best["final_val_loss"]["n"] == 2 and best["grad_norm_rise"]["std"] >= 0.0


def test_the_control_matches_adamcs_integrated_decay(avw):
    out, results = avw
    control = results["control"]
    adamc = metrics(out, adamc_vs_adamw.run_name("AdamC", control["adamc_weight_decay"], 0))
    lrs = [x["lr"] for x in adamc]
    matched = theory.matched_adamw_decay(lrs, control["adamc_weight_decay"], 0.01)
    assert control["weight_decay"] == pytest.approx(matched, rel=1e-3) and matched < control["adamc_weight_decay"]
    # Measured from the logged lambda_t of the runs themselves: equal to 4 significant digits (the lambda's rounding).
    adamc_decay = sum(x["lr"] * x["weight_decay"] for x in adamc)
    assert control["control_integrated_decay"]["mean"] == pytest.approx(adamc_decay, rel=1e-3)
    assert control["final_val_loss"]["n"] == 2 and control["adamc_minus_control"]["final_val_loss"]["n"] == 2


def test_long_trio_and_equilibrium_run(avw):
    out, results = avw
    long = results["long"]
    # lr*wd*steps = 1.2 at wd 2: 60 steps; AdamW and AdamC at wd 2, the control at AdamC's integrated decay.
    assert long["steps"] == 60 and long["lr_wd_steps"] == pytest.approx(1.2)
    assert long["AdamW"]["names"] == ["adamw-wd2-seed0-long60"] and long["AdamC"]["weight_decay"] == 2.0
    assert long["AdamW_control"]["integrated_decay"] == pytest.approx(long["AdamC"]["integrated_decay"], rel=1e-3)
    assert long["AdamW_control"]["weight_decay"] == long["control"]["weight_decay"] < 2.0
    assert long["adamc_minus_control"]["final_val_loss"]["n"] == 1
    assert results["no_decay"]["name"] == "adamw-wd0-seed0"
    assert all(r["weight_decay"] == 0 for r in metrics(out, "adamw-wd0-seed0"))
    eq = next(r for r in results["runs"] if r["phase"] == "equilibrium")
    assert eq["name"] == "adamw-wd5-seed0-constant60" and eq["lr_wd_steps"] == pytest.approx(3.0)
    # Settled once sum lr*lambda >= 1: 0.01 * 5 per step after the 2 warmup steps, so from step ~21 on.
    first, last = eq["steady_state"]["settled_steps"]
    assert 20 <= first <= 24 and last == 60
    forms = results["adam_forms"]
    assert eq["name"] in forms["runs"]
    assert set(forms["closer_form"].values()) <= {"adam", "kosson"}
    kinds = forms["measured_over_predicted"]["kosson"]
    ratio = forms["measured_over_predicted"]["adam"]["linear"]["mean"] / kinds["linear"]["mean"]
    assert ratio == pytest.approx(1 / theory.momentum_factor(0.9), rel=1e-6)  # the same measurement, two lines


def test_adamc_vs_adamw_runs_differ_only_in_the_optimizer(avw):
    out, _ = avw
    sets = {
        opt: json.loads((out / "runs" / f"{opt.lower()}-wd2-seed0" / "overrides.json").read_text())
        for opt in ("AdamW", "AdamC")
    }
    assert set(sets["AdamW"]) ^ set(sets["AdamC"]) == {"optimizer.type=AdamW", "optimizer.type=AdamC"}
    adamc, adamw = metrics(out, "adamc-wd2-seed0"), metrics(out, "adamw-wd2-seed0")
    assert adamw[-5]["weight_decay"] == pytest.approx(2.0)  # AdamW: constant lambda
    assert adamc[-5]["weight_decay"] < 0.1  # AdamC: lambda * lr_t / lr_max, near 0 at the end of the cosine


def test_stability_flags_the_huge_lr_and_stops_the_ladder(stab):
    out, results = stab
    assert (out / "stability.png").stat().st_size > 10_000
    assert results["config"]["lrs"] == [0.03, 30.0, 60.0] and results["config"]["seeds"] == [0, 1]
    assert results["config"]["warmup_steps"] == 3
    runs = {r["name"]: r for r in results["runs"]}
    assert len(runs) == 2 * 2 * 3
    for variant in ("baseline", "qk_norm"):
        cell = results["cells"][f"{variant}@d64"]
        for seed in (0, 1):
            small, huge, skipped = (runs[f"{variant}-d64-lr{lr:g}-seed{seed}"] for lr in (0.03, 30.0, 60.0))
            assert not small["diverged"], small["reason"]
            assert huge["diverged"] and not huge["skipped"]
            # The trainer's guard stopped it (exit 3): a result with the step it stopped at, not a crash.
            stopped = huge["stopped_at_step"]
            assert 0 < stopped < 60 and "divergence guard" in huge["reason"]
            assert metrics(out, huge["name"])[-1]["step"] == stopped
            assert skipped["skipped"] and skipped["diverged"] and not (out / "runs" / skipped["name"]).exists()
            assert cell["per_seed"][str(seed)]["max_stable_lr"] == 0.03
        assert cell["max_stable_lr"]["per_seed"] == [0.03, 0.03] and cell["max_stable_lr"]["spread_sqrt2_steps"] == 0
        growth = runs[f"{variant}-d64-lr0.03-seed0"]["activations"]
        assert set(growth) >= {"attn.qkv", "attn.proj", "mlp.fc2"}
        assert cell["lr_sensitivity"]["mean"] > 0.1  # the diverged and skipped lrs count at the initial loss
    assert set(results["lr_ratio_over_qk_norm"]) == {"baseline@d64"}
    assert results["lr_ratio_over_qk_norm"]["baseline@d64"]["per_seed"] == [1.0, 1.0]
    assert 0 < results["divergence_loss"] < math.log(512)  # the unigram entropy is below the uniform one
    # The shared command and a run's own --set items give back that run's command.txt.
    name = "qk_norm-d64-lr30-seed1"
    command = shlex.split(results["command"].replace("<name>", name))
    command += [a for item in results["run_sets"][name] for a in ("--set", item)]
    assert command == shlex.split((out / "runs" / name / "command.txt").read_text())


def test_a_diverged_run_is_reused_and_other_trainer_failures_raise(stab, capsys):
    """Exit 3 (diverged) is a result that a rerun reuses; any other non-zero exit (here 2, bad input) still raises."""
    out, results = stab
    cfg = stability.Config(**results["config"])
    queue = RunQueue(cfg, out, total_steps=60)
    name = "baseline-d64-lr30-seed1"
    records = queue.run(name, stability.overrides(cfg, "baseline", 64, 30.0, 1), 60, may_diverge=True)
    assert "reusing the finished run" in capsys.readouterr().out
    stopped = next(r["stopped_at_step"] for r in results["runs"] if r["name"] == name)
    assert records[-1]["step"] == queue.diverged(name)["step"] == stopped
    assert "diverged" in queue.diverged(name)["error"]
    with pytest.raises(RuntimeError, match="exited with 2: .*optimizer.lr"):
        queue.run("bad-lr", ["optimizer.lr=-1"], 60, may_diverge=True)


def test_a_forked_run_equals_its_command_run_by_hand(stab, tmp_path):
    """The queue forks runs from a server that imported the trainer once, two at a time; the run's command.txt,
    run as a fresh process, gives every logged number bitwise (timings aside)."""
    out, _ = stab
    name = "qk_norm-d64-lr0.03-seed1"
    command = shlex.split((out / "runs" / name / "command.txt").read_text())
    command[command.index("--output-dir") + 1] = str(tmp_path / "by_hand")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    def logged(path) -> list[dict]:
        timings = {TOKENS_PER_S, STEP_TIME_S, DATA_WAIT_S}
        return [{k: v for k, v in row.items() if k not in timings} for row in map(json.loads, path.open())]

    forked, by_hand = logged(out / "runs" / name / "metrics.jsonl"), logged(tmp_path / "by_hand" / "metrics.jsonl")
    assert forked[-1]["step"] == 60 and any("act_rms/layers.0.attn.qkv" in r for r in forked)
    diffs = [(a.get("step"), k, a.get(k), b.get(k)) for a, b in zip(forked, by_hand, strict=True)
             for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]  # fmt: skip
    assert not diffs, f"{len(diffs)} numbers differ, first: {diffs[:8]}"


def test_a_failed_run_stops_the_queue_starting_more(stab, tmp_path):
    """One run fails (exit 2) while another trains beside it: that one finishes and is recorded, its task's next run
    never starts, and the failure is what is raised."""
    out, results = stab
    cfg = stability.Config(**{**results["config"], "workers": 2})
    queue = RunQueue(cfg, tmp_path, total_steps=460)
    good = stability.overrides(cfg, "baseline", 64, 0.03, 0)

    def fails():
        yield Run("bad-lr", ["optimizer.lr=-1"], 60)

    def trains_then_next():
        yield Run("running", good, 200)  # ~2 s: still training when the other fails, at its config check
        yield Run("never-started", good, 200)

    with pytest.raises(RuntimeError, match="bad-lr: the trainer exited with 2: .*optimizer.lr"):
        queue.parallel([fails(), trains_then_next()])
    assert metrics(tmp_path, "running")[-1]["step"] == 200
    assert (tmp_path / "runs" / "running" / "overrides.json").is_file()
    assert not (tmp_path / "runs" / "never-started").exists()


def _writing_to(log: Path) -> list[int]:
    """The processes whose stdout is ``log``: a run's pool worker and its data-loader workers."""
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.readlink(f"/proc/{entry}/fd/1") == str(log):
                pids.append(int(entry))
        except OSError:  # ended meanwhile, or not ours to read
            continue
    return pids


def test_a_killed_run_is_named_and_not_recorded(stab, tmp_path):
    """A run's process killed from outside (SIGKILL, as the out-of-memory killer does): the pool breaks, the error
    names the run, and nothing records it as finished (a rerun trains it again)."""
    out, results = stab
    cfg = stability.Config(**results["config"])
    queue = RunQueue(cfg, tmp_path, total_steps=2000)
    run_dir = tmp_path / "runs" / "victim"

    def kill_once_training() -> None:
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.jsonl").is_file() and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in _writing_to(run_dir / "train.log"):
            os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_once_training)
    killer.start()
    with pytest.raises(RuntimeError, match="victim: its process ended abruptly"):
        queue.run("victim", stability.overrides(cfg, "baseline", 64, 0.03, 0), 2000)
    killer.join()
    assert not (run_dir / "overrides.json").exists() and metrics(tmp_path, "victim")[-1]["step"] < 2000


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = (Path("/proc") / entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):  # ended meanwhile
            continue
        if int(stat.rsplit(")", 1)[1].split()[2]) == pgid:  # field 5: the process group
            members.append(int(entry))
    return members


def test_ctrl_c_ends_the_experiment_and_every_run_it_started(tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while two runs train: exit 130 with one
    line, the fork server and every run gone, and no half-finished run recorded as finished."""
    sets = DATA + ["steps=2000", "warmup_steps=3", "variants=[baseline,qk_norm]", "widths=[64]", "seeds=[0]"]
    sets += ["lrs=[0.01]", "common_lr=0.01", "tracking_interval=50", "eval_batches=2"]
    argv = [sys.executable, "-m", "megatron_adamc.cli", "experiment", "stability", "--output-dir", str(tmp_path)]
    argv += [a for kv in sets for a in ("--set", kv)]
    inherited = signal.getsignal(signal.SIGINT)  # SIG_IGN here would be inherited: the experiment would ignore it
    proc = subprocess.Popen(
        argv, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a terminal's foreground job: the default
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while sum((d / "metrics.jsonl").is_file() for d in tmp_path.glob("runs/*")) < 2:  # both runs training
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, f"SIGINT in the test process: {inherited}\n{err[-3000:]}"
    assert err.strip().splitlines()[-1] == "megatron-adamc experiment: interrupted"
    deadline = time.monotonic() + 10
    while _group_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _group_members(proc.pid) == []
    assert not list(tmp_path.glob("runs/*/overrides.json"))  # a rerun trains both again, from the start


def ladder(lr_losses: list[tuple[float, float | None]], variant: str = "baseline", width: int = 64, seed: int = 0):
    """Synthetic runs: (lr, final val loss) with None = diverged (non-finite); first-step loss 7."""
    return [
        {"variant": variant, "width": width, "seed": seed, "lr": lr, "skipped": False, "diverged": loss is None,
         "initial_loss": 7.0, "final_val_loss": math.nan if loss is None else loss, "activations": {}}
        for lr, loss in lr_losses
    ]  # fmt: skip


def test_ladder_numbers_follow_their_definitions():
    runs = ladder([(0.01, 4.0), (0.02, 3.0), (0.04, 3.5), (0.08, None), (0.16, 4.5)])
    stats = stability.ladder_stats(runs)
    assert stats["max_stable_lr"] == 0.04 and stats["first_diverged_lr"] == 0.08  # 0.16 after a divergence: no
    assert stats["best_loss"] == 3.0 and stats["best_lr"] == 0.02
    # Wortsman: mean of min(L, L0) over the grid (the diverged lr at L0 = 7) minus the best loss.
    assert stats["lr_sensitivity"] == pytest.approx((4.0 + 3.0 + 3.5 + 7.0 + 4.5) / 5 - 3.0)


def test_summary_spread_over_seeds_and_widths():
    cfg = stability.Config(variants=["baseline", "qk_norm"], widths=[64, 128], seeds=[0, 1], lrs=[0.01, 0.02, 0.04],
                           common_lr=0.01)  # fmt: skip
    runs = []
    for width in (64, 128):
        runs += ladder([(0.01, 4.0), (0.02, 3.0), (0.04, None)], "baseline", width, 0)
        runs += ladder([(0.01, 4.1), (0.02, None), (0.04, None)], "baseline", width, 1)
        runs += ladder([(0.01, 4.0), (0.02, 3.2), (0.04, 3.1)], "qk_norm", width, 0)
        runs += ladder([(0.01, 4.0), (0.02, 3.3), (0.04, 3.0)], "qk_norm", width, 1)
    summary = stability.summarize(cfg, runs)
    base = summary["cells"]["baseline@d128"]
    assert base["max_stable_lr"]["per_seed"] == [0.02, 0.01]
    assert base["max_stable_lr"]["geomean"] == pytest.approx(math.sqrt(0.02 * 0.01), rel=1e-3)
    assert base["max_stable_lr"]["spread_sqrt2_steps"] == pytest.approx(2.0)  # a factor 2 = two sqrt(2) steps
    assert base["best_loss"] == {"loss": pytest.approx(4.05), "lr": 0.01}  # lrs stable for every seed only
    assert summary["cells"]["qk_norm@d64"]["best_loss"] == {"loss": pytest.approx(3.05), "lr": 0.04}
    assert summary["lr_ratio_over_qk_norm"]["baseline@d64"]["per_seed"] == [0.5, 0.25]
    assert base["loss_at_common_lr"]["mean"] == pytest.approx(4.05)


@pytest.mark.parametrize(
    ("name", "sets", "message"),
    [
        ("adamc-vs-adamw", ["steps=100", "warmup_steps=50"], "warmup_steps=50"),
        ("adamc-vs-adamw", ["weight_decays=[0.1,-1]"], "weight_decays"),
        ("stability", ["lrs=[0.01]", "common_lr=0.02"], "common_lr"),
        ("stability", ["variants=[nope]"], "variants"),
        ("stability", ["widths=[0]"], "widths"),
        ("adamc-vs-adamw", ["model=huge"], "model"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, name, sets, message):
    argv = ["experiment", name, "--output-dir", str(tmp_path)] + [a for kv in sets for a in ("--set", kv)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "SUBCOMMANDS", ["experiment"])
        assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_default_plans_are_what_the_issue_asks():
    avw = adamc_vs_adamw.Config()
    assert len(avw.weight_decays) >= 4 and max(avw.weight_decays) / min(avw.weight_decays) >= 10 and avw.seeds >= 3
    stab = stability.Config()
    lrs = sorted(stab.lrs)
    assert max(b / a for a, b in zip(lrs, lrs[1:], strict=False)) <= math.sqrt(2) * 1.01  # 3-digit rounding
    assert lrs[-1] / lrs[0] >= 100 and len(stab.seeds) >= 2 and len(stab.widths) >= 2
    assert stab.min_lr_ratio < 1 and stab.warmup_steps > 0  # warmup, then a cosine decay
