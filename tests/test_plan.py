"""``megatron-adamc plan``: model states against DeepSpeed's estimators, activations against torch's memory tracker,
the real-size configs against their hardware, and the CLI's exit codes and JSON."""

from __future__ import annotations

import json
import re
import shlex

import pytest
import torch
from conftest import REPO

from megatron_adamc.cli import main
from megatron_adamc.config.train import load_config
from megatron_adamc.model import Llama, LlamaConfig
from megatron_adamc.plan import GiB, Hardware, plan_json, plan_run
from megatron_adamc.plan.activations import activation_memory
from megatron_adamc.plan.measure import measure_activation_memory
from megatron_adamc.plan.model_states import ZERO_DEFAULTS, ZeroSetup, model_states

pytestmark = pytest.mark.unit  # make test-fast

CONFIGS = REPO / "configs" / "train"
# config, nodes, GPUs per node: the hardware each real-size config states (H100 80GB)
REAL_RUNS = [("llama_125m", 1, 1), ("llama_1b", 1, 8), ("llama3_8b", 4, 8), ("llama3_70b", 16, 8)]


# --- model states vs DeepSpeed's estimators ---------------------------------------------------------------------


def test_deepspeed_defaults_are_the_installed_ones():
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    for stage in (1, 2, 3):
        ds = DeepSpeedZeroConfig(stage=stage)
        assert ds.reduce_bucket_size == ZERO_DEFAULTS["reduce_bucket_size"]
        assert ds.contiguous_gradients == ZERO_DEFAULTS["contiguous_gradients"]
        assert ds.prefetch_bucket_size == ZERO_DEFAULTS["stage3_prefetch_bucket_size"]
        assert ds.sub_group_size == ZERO_DEFAULTS["sub_group_size"]
        assert ds.overlap_comm == (stage == 3)  # ZERO_DEFAULTS["overlap_comm"] None means exactly this


SIZES = [(134_105_856, 24_576_000), (8_030_261_248, 525_336_576), (70_553_706_496, 1_050_673_152)]
LAYOUTS = [(1, 1), (1, 8), (4, 8), (16, 8)]


@pytest.mark.parametrize("params,largest", SIZES)
@pytest.mark.parametrize("nodes,gpus", LAYOUTS)
def test_zero2_equals_deepspeed_estimator(params, largest, nodes, gpus):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    world = nodes * gpus
    for offload in (False, True):
        _, want = estimate_zero2_model_states_mem_needs(params, gpus, nodes, cpu_offload=offload)
        ours = model_states(params, largest, world, ZeroSetup(2, "bf16", offload_optimizer=offload), grad_accum=8)
        assert abs(ours.total - want) <= 2, (offload, ours, want)
        # ZeRO-1 is ZeRO-2 while gradients do not accumulate; with accumulation the full 16-bit gradients stay
        zero1 = model_states(params, largest, world, ZeroSetup(1, "bf16", offload_optimizer=offload), grad_accum=1)
        assert abs(zero1.total - want) <= 2
    zero1 = model_states(params, largest, world, ZeroSetup(1, "bf16"), grad_accum=8)
    _, want = estimate_zero2_model_states_mem_needs(params, gpus, nodes, cpu_offload=False)
    assert abs(zero1.total - want - (2 * params - 2 * params / world)) <= 2


@pytest.mark.parametrize("params,largest", SIZES)
@pytest.mark.parametrize("nodes,gpus", LAYOUTS)
def test_zero3_equals_deepspeed_estimator_plus_the_16bit_gradient_partition(params, largest, nodes, gpus):
    """DeepSpeed's ZeRO-3 estimator counts 18P/N + 4L. It leaves out the 16-bit gradient partition (2P/N,
    ``grad_partitions_flat_buffer`` in stage3.py) that ZeRO-3 allocates on the GPU when the optimizer is there, and
    counts the fp32 gradient of the whole partition where ZeRO-3 holds it for one ``sub_group_size`` (1e9
    elements) at a time."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    world = nodes * gpus
    shard = params / world
    unsaid = 2 * shard - 4 * max(0.0, shard - ZERO_DEFAULTS["sub_group_size"])
    for offload_opt, offload_param, missing in ((False, False, unsaid), (True, False, 0), (True, True, 0)):
        _, want, _ = estimate_zero3_model_states_mem_needs(
            params, largest, gpus, nodes, cpu_offload=offload_opt, cpu_offload_params=offload_param
        )
        setup = ZeroSetup(3, "bf16", offload_optimizer=offload_opt, offload_param=offload_param)
        ours = model_states(params, largest, world, setup, grad_accum=1)
        assert abs(ours.total - want - missing) <= 3, (offload_opt, offload_param, ours, want)


def _estimator_table_gb(printed: str, options: str) -> float:
    """The per-GPU column of the row of ``options`` in a table printed by DeepSpeed's *_all_cold estimators."""
    for line in printed.splitlines():
        if line.rstrip().endswith(options):
            return float(line.split("|")[1].strip().removesuffix("GB"))
    raise AssertionError(f"no row {options!r} in:\n{printed}")


def test_plan_of_real_configs_agrees_with_the_all_cold_estimators(capsys):
    """The planner's model-state terms for llama3_8b (ZeRO-2) and llama3_70b (ZeRO-3) on their hardware, against
    the tables DeepSpeed's estimators print (GB there is 2^30 bytes, two decimals)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    plan = plan_run(load_config(CONFIGS / "llama3_8b.yaml"), Hardware(4, 8, 80))
    capsys.readouterr()
    estimate_zero2_model_states_mem_needs_all_cold(plan.facts.params, num_gpus_per_node=8, num_nodes=4)
    table = _estimator_table_gb(capsys.readouterr().out, "offload_optimizer=none")
    assert plan.states.total / GiB == pytest.approx(table, abs=0.006)

    plan = plan_run(load_config(CONFIGS / "llama3_70b.yaml"), Hardware(16, 8, 80))
    estimate_zero3_model_states_mem_needs_all_cold(plan.facts.params, plan.facts.largest_layer, 8, 16)
    table = _estimator_table_gb(capsys.readouterr().out, "offload_param=none, offload_optimizer=none, zero_init=1")
    grad_partition = 2 * plan.facts.params / 128
    assert (plan.states.total - grad_partition) / GiB == pytest.approx(table, abs=0.006)


# --- activations vs measured -------------------------------------------------------------------------------------

OPTIONS = [
    {},
    {"n_kv_heads": None},
    {"qk_norm": True},
    {"qkv_norm": True},
    {"qkv_norm": True, "qk_norm": True},
    {"post_proj_norm": True, "post_fc2_norm": True},
    {"embedding_norm": True, "embedding_scale": "sqrt_d"},
    {"z_loss": 1e-4},
    {"softmax_cap": 30.0},
    {"softmax_cap": 30.0, "qk_norm": True},
    {"tie_embeddings": True},
]
BATCH, SEQ = 2, 64


def _measure(options: dict, dtype: torch.dtype, mode: str):
    cfg = LlamaConfig.from_preset("tiny", vocab_size=512, n_layers=2, **options)
    torch.manual_seed(0)
    model = Llama(cfg).to(dtype)
    if mode != "none":
        from megatron_adamc.model import apply_activation_checkpointing

        apply_activation_checkpointing(model, mode)
    tokens, labels = torch.randint(0, 512, (2, BATCH, SEQ))
    measured = measure_activation_memory(model, tokens, labels)
    planned = activation_memory(cfg, SEQ, BATCH, mode, 2 if dtype == torch.bfloat16 else 4)
    return measured, planned


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "standard")
def test_activations_without_checkpointing_equal_the_measured_bytes(options, dtype):
    """Kept bytes to the byte per token, save the loss scalars (under 1 byte per token) and the 4 bytes of LayerNorm
    statistics a CPU keeps in bf16 instead of fp32; the peak is kept + logits temporaries within 0.5%."""
    measured, planned = _measure(options, dtype, "none")
    tokens = BATCH * SEQ
    assert -4 <= (measured.kept - planned.kept) / tokens <= 1, (measured, planned)
    assert measured.peak == pytest.approx(planned.kept + planned.logits_temporaries, rel=0.005)


def _has_checkpointing() -> bool:
    import megatron_adamc.model as model_package

    return hasattr(model_package, "apply_activation_checkpointing")


@pytest.mark.skipif(
    not _has_checkpointing(),
    reason="megatron_adamc.model.apply_activation_checkpointing(model, mode) is not merged yet (helper model-scale)",
)
@pytest.mark.parametrize("mode", ["full", "selective"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("options", [{}, {"qk_norm": True}, {"softmax_cap": 30.0}], ids=["standard", "qk", "cap"])
def test_activations_with_checkpointing_match_the_measured_bytes(options, dtype, mode):
    """Kept bytes as without checkpointing (to the byte per token); the peak lies between kept + logits temporaries
    (the start of the backward) and the plan's bound, which adds one block's recomputation."""
    measured, planned = _measure(options, dtype, mode)
    assert -4 <= (measured.kept - planned.kept) / (BATCH * SEQ) <= 1, (measured, planned)
    assert planned.kept + planned.logits_temporaries <= measured.peak * 1.001
    assert measured.peak <= planned.total + planned.logits_temporaries


def test_tiny_config_activations_equal_the_measured_bytes():
    """The planner's own activation term for configs/train/llama_tiny.yaml against the real model at its size."""
    config = load_config(CONFIGS / "llama_tiny.yaml")
    plan = plan_run(config, Hardware(1, 1, 80))
    tc = config.train
    torch.manual_seed(0)
    model = Llama(plan.shape.model)
    tokens, labels = torch.randint(0, plan.shape.model.vocab_size, (2, tc.micro_batch_size, tc.seq_len))
    measured = measure_activation_memory(model, tokens, labels)
    assert measured.kept == pytest.approx(plan.activations.kept, abs=64)
    assert measured.peak == pytest.approx(plan.activations.kept + plan.activations.logits_temporaries, rel=0.005)


# --- the real-size configs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,nodes,gpus", REAL_RUNS)
def test_real_config_fits_its_hardware(name, nodes, gpus, capsys):
    path = CONFIGS / f"{name}.yaml"
    code = main(["plan", "--config", str(path), "--nodes", str(nodes), "--gpus-per-node", str(gpus),
                 "--gpu-memory-gb", "80", "--json"])  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["fits"] is True
    assert out["per_gpu_gb"]["total"] <= 80 * 0.9, "keep 10% headroom below the H100's 80 GiB"
    assert out["deepspeed"]["precision"] == "bf16"
    # the token budget the header states: about 20 tokens per parameter (Chinchilla)
    assert 19 <= out["tokens_total"] / out["params"] <= 21
    config = load_config(path)
    assert config.data.default_corpus is False and config.data.train.startswith("/path/to/")
    assert config.scheduler.min_lr == pytest.approx(0.1 * config.optimizer.lr)


def test_70b_is_zero3_with_full_checkpointing_and_8b_needs_checkpointing(capsys):
    plan = plan_run(load_config(CONFIGS / "llama3_70b.yaml"), Hardware(16, 8, 80))
    assert plan.shape.zero.stage == 3 and plan.shape.checkpointing == "full"
    config = load_config(CONFIGS / "llama3_8b.yaml", ["train.activation_checkpointing=none"])
    assert not plan_run(config, Hardware(4, 8, 80)).fits


# --- CLI: exit codes, the one line, the JSON ---------------------------------------------------------------------


def _plan(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["plan", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_does_not_fit_names_the_largest_term_and_a_fix_that_fits(capsys):
    base = ["--config", str(CONFIGS / "llama3_8b.yaml"), "--nodes", "4", "--gpus-per-node", "8",
            "--gpu-memory-gb", "80", "--set", "train.activation_checkpointing=none"]  # fmt: skip
    code, out, err = _plan(capsys, *base)
    assert code == 1 and "DOES NOT FIT" in out
    assert len(err.strip().splitlines()) == 1
    assert "largest term activations" in err and "fix: --set train.activation_checkpointing=selective" in err
    fix = re.search(r"fix: (--set \S+)", err).group(1)
    code, _, _ = _plan(capsys, *base, *shlex.split(fix))
    assert code == 0


def test_model_states_too_large_suggest_zero3(capsys):
    code, out, err = _plan(capsys, "--config", str(CONFIGS / "llama3_70b.yaml"), "--nodes", "16", "--gpus-per-node",
                           "8", "--gpu-memory-gb", "80", "--set", "train.deepspeed=configs/deepspeed/zero1_bf16.json",
                           "--json")  # fmt: skip
    report = json.loads(out)
    assert code == 1 and report["fits"] is False and report["largest_term"] == "params"
    assert "ZeRO-3" in report["advice"] and "zero3_bf16.json" in report["advice"]
    assert report["advice_total_gb"] <= 80
    assert len(err.strip().splitlines()) == 1 and "largest term params" in err


@pytest.mark.parametrize(
    "args,field",
    [
        (["--nodes", "0"], "--nodes"),
        (["--gpu-memory-gb", "-1"], "--gpu-memory-gb"),
        (["--mfu", "1.5"], "--mfu"),
        (["--set", "train.micro_batch_size=0"], "train.micro_batch_size"),
        (["--set", "train.seq_len=16384"], "train.seq_len"),
        (["--set", "train.deepspeed=configs/deepspeed/nope.json"], "train.deepspeed"),
        (["--set", "model.preset=llama9"], "model.preset"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, args, field):
    base = ["--config", str(CONFIGS / "llama_1b.yaml"), "--nodes", "1", "--gpus-per-node", "8", "--gpu-memory-gb", "80"]
    code, out, err = _plan(capsys, *base, *args)  # a flag given twice: argparse keeps the last
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and field in err


def test_json_terms_add_up_and_time_follows_from_flops(capsys):
    code, out, _ = _plan(capsys, "--config", str(CONFIGS / "llama_1b.yaml"), "--nodes", "1", "--gpus-per-node", "8",
                         "--gpu-memory-gb", "80", "--mfu", "0.5", "--json")  # fmt: skip
    report = json.loads(out)
    assert code == 0 and isinstance(report["params"], int) and isinstance(report["fits"], bool)
    terms = report["per_gpu_bytes"]
    assert set(terms) == {"params", "grads", "optimizer", "activations", "buffers", "total"}
    assert sum(v for k, v in terms.items() if k != "total") == pytest.approx(terms["total"], abs=8)
    assert report["global_batch"] == 8 * 16 * 8 and report["tokens_per_step"] == 1024 * 2048
    with torch.device("meta"):
        model = Llama(LlamaConfig.from_preset("1B"))
    assert report["params"] == model.num_params()
    assert report["flops_per_token"] == model.flops_per_token(2048)
    seconds = report["steps"] * report["tokens_per_step"] * report["flops_per_token"] / (8 * 989e12 * 0.5)
    assert report["time_to_train_s"] == pytest.approx(seconds, rel=1e-6)


def test_plan_json_is_stable_for_the_gpu_check():
    """Issue 14 reads these keys; the object has them all and serialises."""
    plan = plan_run(load_config(CONFIGS / "llama_tiny.yaml"), Hardware(1, 1, 80))
    report = json.loads(json.dumps(plan_json(plan, "configs/train/llama_tiny.yaml")))
    for key in ("schema", "fits", "params", "per_gpu_gb", "per_gpu_bytes", "buffers_gb", "activations_gb",
                "largest_term", "advice", "deepspeed", "micro_batch_size", "seq_len", "activation_checkpointing",
                "tokens_per_step", "flops_per_token", "time_to_train_s", "assumptions"):  # fmt: skip
        assert key in report, key
    assert report["schema"] == 1 and report["advice"] is None


def test_json_stdout_is_one_object_in_a_fresh_process():
    """The GPU check parses stdout: DeepSpeed's import-time log lines must not reach it."""
    import subprocess
    import sys

    from conftest import subprocess_env

    cmd = [sys.executable, "-m", "megatron_adamc.cli", "plan", "--config", str(CONFIGS / "llama3_70b.yaml"),
           "--nodes", "16", "--gpus-per-node", "8", "--gpu-memory-gb", "80", "--json"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["fits"] is True
