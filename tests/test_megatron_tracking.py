"""Per-layer tracking of Megatron runs on the distributed optimizer's FP32 main shards (tracking/megatron_tracker.py).

8 gloo ranks, TP 2 x PP 2 x DP 2, with the shard layout megatron-core's own buffer and range code builds on a CPU
(tests/workers/megatron_tracking_worker.py): after ONE all-reduce, every parameter's norms must equal those of the
whole parameter (its TP slices added, TP-replicated gains counted once, DP shards tiling it exactly once), and the
update norm that of a reference AdamW step on the whole parameter. The metrics file is what `megatron-adamc report`
reads. The optimizer step of Megatron's real DistributedOptimizer needs CUDA: benchmarks/gpu/megatron.py.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from workers.megatron_ranks import run_ranks
from workers.megatron_tracking_worker import CLIP, GRAD_NORM, LR, MIN_LR
from workers.megatron_tracking_worker import run as tracking_rank

from megatron_adamc.tracking.megatron_layout import counted, natural_key, rename

WORLD = 8


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("megatron_tracking")
    run_ranks(tracking_rank, WORLD, str(out))
    data = json.loads((out / "result.json").read_text())
    data["dir"] = str(out)
    return data


def expected_sums(ranks: list[dict]) -> dict[str, list[float]]:
    """Per global name: the whole parameter's sums from the ranks' independent references (any DP replica)."""
    slices: dict[tuple[str, int], list[float]] = {}
    for rank in ranks:
        for ref in rank["reference"]:
            key = (ref["name"], ref["tp_rank"] if ref["split"] else 0)
            if key in slices:
                assert slices[key] == pytest.approx(ref["sums"], rel=1e-12), f"replicas of {key} differ"
            slices[key] = ref["sums"]
    out: dict[str, list[float]] = {}
    for (name, _), sums in slices.items():
        out[name] = [a + b for a, b in zip(out.get(name, [0.0] * 4), sums, strict=True)]
    return out


def test_the_layout_has_uneven_shards_split_between_dp_ranks(result: dict) -> None:
    parts: dict[tuple[str, int], dict[int, int]] = {}
    for rank in result["ranks"]:
        for name, dp_rank, tp_rank, size, numel in rank["shards"]:
            parts.setdefault((name, tp_rank), {})[dp_rank] = size
            assert 0 < size <= numel
    split = [key for key, sizes in parts.items() if len(sizes) == 2 and len(set(sizes.values())) == 2]
    assert split, "no parameter cut unevenly between the two DP ranks"


def test_names_are_global_over_the_pipeline_stages(result: dict) -> None:
    names = result["names"]
    layers = {name.split(".")[2] for name in names if name.startswith("decoder.layers.")}
    assert layers == {"0", "1", "2", "3"}  # stage 1 holds local layers 0, 1 = global 2, 3
    assert "embedding.word_embeddings.weight" in names and "output_layer.weight" in names
    assert names == sorted(names, key=natural_key)


def test_one_all_reduce_gives_the_whole_parameters_norms(result: dict) -> None:
    expected = expected_sums(result["ranks"])
    metrics = result["ranks"][-1]["metrics"]  # the writer rank (Megatron's last rank)
    assert set(expected) == set(result["names"])
    for rank in result["ranks"]:
        assert rank["metrics"] == pytest.approx(metrics, rel=1e-12, nan_ok=True)  # every rank reduced the same
    for name, (w2, g2, wg, u2) in expected.items():
        assert metrics[f"weight_norm/{name}"] == pytest.approx(math.sqrt(w2), rel=1e-6), name
        assert metrics[f"grad_norm/{name}"] == pytest.approx(math.sqrt(g2), rel=1e-6), name  # before clipping
        assert metrics[f"update_norm/{name}"] == pytest.approx(math.sqrt(u2), rel=1e-5), name
        assert metrics[f"cos_weight_grad/{name}"] == pytest.approx(wg / math.sqrt(w2 * g2), rel=1e-4, abs=1e-7)
    assert metrics["tracking/clip_factor"] == pytest.approx((GRAD_NORM + 1e-6) / CLIP)
    total = math.sqrt(sum(s[1] for s in expected.values()))
    assert metrics["tracking/grad_norm"] == pytest.approx(total, rel=1e-6)


def test_excluded_output_layer_is_marked_and_decays_plainly(result: dict) -> None:
    metrics = result["ranks"][-1]["metrics"]
    refs = {r["name"]: r for rank in result["ranks"] for r in rank["reference"]}
    assert metrics["adamc_corrected/output_layer.weight"] == 0.0
    assert metrics["adamc_corrected/decoder.layers.3.mlp.linear_fc2.weight"] == 1.0
    assert "adamc_corrected/decoder.layers.0.input_layernorm.weight" not in metrics  # wd_mult 0: nothing to correct
    refs_embedding = "embedding.word_embeddings.weight"
    plain, corrected = refs["output_layer.weight"]["weight_decay"], refs[refs_embedding]
    assert plain == pytest.approx(0.1)  # lambda itself
    lr = MIN_LR + 0.5 * (LR - MIN_LR)  # half-way down the cosine (scheduler step 55 of 10..100)
    assert corrected["weight_decay"] == pytest.approx(plain * lr / LR, rel=1e-12)  # lambda * lr_t / lr_max
    # The prediction uses the decay each group really got (sqrt(2 lambda_t / lr_t)): the plain one is above AdamC's.
    head, embedding = (metrics[f"predicted_adam_ratio/{n}"] for n in ("output_layer.weight", refs_embedding))
    assert head / embedding == pytest.approx(math.sqrt(LR / lr), rel=1e-9)


def test_the_metrics_file_is_a_run_the_report_reads(result: dict) -> None:
    from megatron_adamc.tracking.forms import by_layer_type
    from megatron_adamc.tracking.report import load_run

    rows = load_run(result["dir"]).rows  # what `megatron-adamc report RUN_DIR` reads first
    assert len(rows) == 1 and rows[0]["step"] == 1 and "weight_norm/output_layer.weight" in rows[0]
    kinds = by_layer_type(rows, "adam")
    assert set(kinds) == {"linear", "embedding", "output"}  # Megatron's names sorted into the report's layer types
    assert kinds["linear"]["params"] == 16  # 4 linears x 4 layers, over both pipeline stages


def test_who_counts_a_copy() -> None:
    split, replicated = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    split.tensor_model_parallel = True
    tied = torch.nn.Parameter(torch.ones(2))
    tied.shared = True
    assert counted(split, sharded=True, tp_rank=1, dp_rank=1)  # a TP slice and a DP shard: always its own
    assert not counted(replicated, sharded=True, tp_rank=1, dp_rank=0)  # a TP duplicate: TP rank 0 counts it
    assert counted(replicated, sharded=True, tp_rank=0, dp_rank=1)
    assert not counted(split, sharded=False, tp_rank=0, dp_rank=1)  # whole replicas without the dist. optimizer
    assert not counted(tied, sharded=True, tp_rank=0, dp_rank=0)  # the last stage's copy of the embedding
    renames = [("decoder.layers.0.", "decoder.layers.6.")]
    name = "module.module.decoder.layers.0.mlp.linear_fc1.weight"
    assert rename(name, renames) == "decoder.layers.6.mlp.linear_fc1.weight"
    assert rename("decoder.layers.0", renames) == "decoder.layers.6"
    assert rename("decoder.layers.01.x", renames) == "decoder.layers.01.x"
