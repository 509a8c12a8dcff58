"""``megatron-adamc export``: real DeepSpeed checkpoints of ZeRO 0-3 (and offload, bf16) from the trainer on 2 gloo
ranks -> Hugging Face directories that the real transformers loads, with the project's logits and tokenizer ids.

Consolidation is checked without the code under test as well: ZeRO-2 fp32 weights equal the full module copy
DeepSpeed stores beside them, bf16 masters round to the stored bf16 weights, and fp32 ZeRO 0, 2 and 3 land on the
same weights (the same seed and data) while training moved them a hundred times further. Export also runs with
huggingface_hub hidden, and the run directory is never written to.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, SMALL_CORPUS_DIR, SMALL_TRAIN_SETS, free_port, subprocess_env

from megatron_adamc.cli import main
from megatron_adamc.data.tokenizer import Tokenizer
from megatron_adamc.errors import ConfigError
from megatron_adamc.hf import consolidate_fp32, export_hf
from megatron_adamc.hf.consolidate import group_names
from megatron_adamc.hf.files import read_safetensors
from megatron_adamc.hf.mapping import UNSUPPORTED
from megatron_adamc.hf.tokenizer import PROBE_TEXT
from megatron_adamc.model import Llama, LlamaConfig

transformers = pytest.importorskip("transformers")

LOGITS_TOL = 1e-5  # fp32 logits, HF vs the project's Llama on the same weights
CONFIG = REPO / "configs" / "train" / "llama_tiny.yaml"
SEED = 1234  # llama_tiny.yaml's: the trainer initialises Llama(config, seed=SEED)
# Each run: 3 steps on 2 ranks at a constant lr after 2 warmup steps; checkpoints at steps 2 and 3 (for --step).
RUN_SETS = [
    *SMALL_TRAIN_SETS, "train.steps=3", "eval.interval=3", "checkpoint.interval=2", "tracking.enabled=false",
    "scheduler.type=constant",
]  # fmt: skip
# Five runs cover the stages and formats: fp32 ZeRO 0, 2 and 3 (with parameter and optimizer offload) train the
# same model to the same weights; ZeRO-1 in bf16 (DeepSpeed's bf16 partitions); ZeRO-0 in bf16 with FusedAdam
# (FP16_Optimizer's flat fp32 masters per param group, unflattened by this project) on a QK-norm tied model.
RUNS = {
    "zero0": ["train.deepspeed=configs/deepspeed/zero0.json"],
    "zero1_bf16": ["train.deepspeed=configs/deepspeed/zero1_bf16.json"],
    "zero2": ["train.deepspeed=configs/deepspeed/zero2.json"],
    "zero3_offload": ["train.deepspeed=configs/deepspeed/zero3_offload.json"],
    "zero0_bf16_qk_tied": ["optimizer.torch_adam=false", "model.qk_norm=true", "model.tie_embeddings=true"],
}  # fmt: skip


class Runs:
    """Trainer runs made on first use and shared by the module's tests."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.done: dict[str, Path] = {}

    def __call__(self, name: str) -> Path:
        if name not in self.done:
            out = self.root / name
            sets = [*RUN_SETS, *RUNS[name]]
            if name == "zero0_bf16_qk_tied":
                ds = self.root / "zero0_bf16.json"
                ds.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 0}}))
                sets.append(f"train.deepspeed={ds}")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--rdzv-backend=c10d",
                   f"--rdzv-endpoint=127.0.0.1:{free_port()}", "-m", "megatron_adamc.cli", "train",
                   "--config", str(CONFIG), "--output-dir", str(out)]  # fmt: skip
            for item in sets:
                cmd += ["--set", item]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=subprocess_env(), timeout=600)
            if proc.returncode != 0:
                pytest.fail(f"training {name} exited {proc.returncode}:\n{proc.stderr[-5000:]}")
            self.done[name] = out
        return self.done[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("runs"))


def snapshot(run_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest() for p in run_dir.rglob("*")
            if p.is_file()}  # fmt: skip


def export(run_dir: Path, out: Path, *extra: str) -> Path:
    before = snapshot(run_dir)
    assert main(["export", str(run_dir), "--format", "hf", "--output", str(out), *extra]) == 0
    assert snapshot(run_dir) == before  # nothing in RUN_DIR written, moved or deleted
    return out


def run_model_config(run_dir: Path, vocab_size: int = 512) -> LlamaConfig:
    overrides = json.loads((run_dir / "run.json").read_text())["config"]["model"]
    return LlamaConfig.from_preset(overrides.pop("preset"), vocab_size=vocab_size, **overrides)


def consolidated(run_dir: Path, step: int = 3) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        names = group_names(Llama(run_model_config(run_dir)))  # the trainer's groups (exclude_embeddings off)
    return consolidate_fp32(run_dir / "checkpoints" / f"step_{step}", names)


def project_model(run_dir: Path, state: dict[str, torch.Tensor]) -> Llama:
    model = Llama(run_model_config(run_dir, state["tok_embeddings.weight"].shape[0]))
    model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def logit_gap(ours: Llama, hf_dir: Path) -> float:
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tokens = torch.randint(0, ours.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    return float((ours(tokens) - theirs(tokens).logits.float()).abs().max())


def relative_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in a)) / torch.sqrt(sum((b[k] ** 2).sum() for k in b)))


def delta(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: a[k] - b[k] for k in a}


@pytest.mark.parametrize("name", ["zero0", "zero2", "zero3_offload"])
def test_fp32_zero_stages_export_to_transformers_with_equal_logits(runs, tmp_path, name):
    run_dir = runs(name)
    hf_dir = export(run_dir, tmp_path / "hf")
    state = consolidated(run_dir)
    ours = project_model(run_dir, state)
    gap = logit_gap(ours, hf_dir)
    assert gap < LOGITS_TOL, gap
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_key_value_heads"] == 1
    assert config["rms_norm_eps"] == 1e-5 and config["tie_word_embeddings"] is False
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2) and config["vocab_size"] == 512
    if name == "zero2":  # DeepSpeed also stores the full fp32 module: the joined partitions must equal it
        module = torch.load(run_dir / "checkpoints/step_3/mp_rank_00_model_states.pt", weights_only=False)["module"]
        assert module.keys() == state.keys() and all(torch.equal(module[k], state[k]) for k in state)
    # Same seed and data: every stage trains to the same weights (ZeRO-3 up to reduction order), far from init.
    reference = consolidated(runs("zero0"))
    init = Llama(ours.config, seed=SEED).state_dict()
    assert relative_distance(delta(state, init), delta(reference, init)) < 1e-2
    assert relative_distance(reference, init) > 1e-3


def test_step_picks_an_earlier_checkpoint(runs, tmp_path):
    run_dir = runs("zero2")
    export(run_dir, tmp_path / "step2", "--step", "2")
    step2, step3 = (consolidated(run_dir, step) for step in (2, 3))
    assert not torch.equal(step2["layers.0.attn.qkv.weight"], step3["layers.0.attn.qkv.weight"])
    exported = read_safetensors(tmp_path / "step2")
    assert torch.equal(exported["model.layers.0.self_attn.q_proj.weight"], step2["layers.0.attn.qkv.weight"][:64])
    assert torch.equal(exported["model.norm.weight"], step2["norm.weight"])


@pytest.mark.parametrize("name", ["zero1_bf16", "zero0_bf16_qk_tied"])
def test_bf16_checkpoints_export_their_fp32_masters(runs, tmp_path, name):
    run_dir = runs(name)
    state = consolidated(run_dir)
    module = torch.load(run_dir / "checkpoints/step_3/mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert module.keys() == state.keys()
    assert all(module[k].dtype == torch.bfloat16 and torch.equal(state[k].bfloat16(), module[k]) for k in state)
    assert any(not torch.equal(state[k], module[k].float()) for k in state)  # the masters hold more than bf16
    hf_dir = export(run_dir, tmp_path / "fp32")
    ours = project_model(run_dir, state)
    gap = logit_gap(ours, hf_dir)
    assert gap < LOGITS_TOL, gap
    config = json.loads((hf_dir / "config.json").read_text())
    if name == "zero0_bf16_qk_tied":
        assert ours.config.qk_norm and ours.config.tie_embeddings
        assert config["architectures"] == ["Qwen3ForCausalLM"] and config["tie_word_embeddings"] is True
        assert "lm_head.weight" not in read_safetensors(hf_dir)
    export(run_dir, tmp_path / "bf16", "--dtype", "bfloat16")
    halves = read_safetensors(tmp_path / "bf16")
    assert torch.equal(halves["model.embed_tokens.weight"], state["tok_embeddings.weight"].bfloat16())
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


HIDE_HUB = """
import importlib.abc, sys
class HideHub(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "huggingface_hub":
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)")
sys.meta_path.insert(0, HideHub())
from megatron_adamc.cli import main
code = main(sys.argv[1:])
assert "huggingface_hub" not in sys.modules
sys.exit(code)
"""


def tokenizer_texts() -> list[str]:
    docs = [json.loads(line)["text"] for line in (SMALL_CORPUS_DIR / "train.jsonl").open()][:40]
    return [PROBE_TEXT, "  two leading spaces", "\n\n\t\ttabs\n", "<s>a</s><pad><unk>", "🤗🤗 x", *docs]


def test_export_needs_no_huggingface_hub_and_tokenizers_encode_like_sentencepiece(runs, tmp_path):
    run_dir = runs("zero3_offload")
    cmd = [sys.executable, "-c", HIDE_HUB, "export", str(run_dir), "--format", "hf", "--output", str(tmp_path / "bare")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=subprocess_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bare = tmp_path / "bare"
    assert (bare / "tokenizer.model").is_file() and not (bare / "tokenizer.json").exists()  # no transformers there
    full = export(run_dir, tmp_path / "full")
    assert (full / "tokenizer.json").is_file()
    assert read_safetensors(bare).keys() == read_safetensors(full).keys()
    assert all(torch.equal(a, read_safetensors(full)[k]) for k, a in read_safetensors(bare).items())

    ours = Tokenizer(str(SMALL_CORPUS_DIR / "tokenizer.model"))
    texts = tokenizer_texts()
    for hf_dir in (bare, full):  # tokenizer.model converted at load time; tokenizer.json as written
        theirs = transformers.AutoTokenizer.from_pretrained(hf_dir)
        assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (1, 2, 3)
        for text in texts:
            ids = ours.encode(text)
            assert theirs.encode(text, add_special_tokens=False) == ids, text[:80]
            assert theirs(text)["input_ids"] == ids  # the default call adds no BOS either, as in training
            assert theirs.decode(ids) == text


@pytest.mark.parametrize("option", sorted(UNSUPPORTED))
def test_options_hf_lacks_are_refused_by_name(tmp_path, option):
    value = {"softmax_cap": 50.0, "embedding_scale": "sqrt_d"}.get(option, True)
    config = LlamaConfig(dim=32, n_layers=1, n_heads=2, ffn_dim=64, vocab_size=64, **{option: value})
    with pytest.raises(ConfigError, match=rf"model\.{option}={value}") as err:
        export_hf(Llama(config).state_dict(), config, tmp_path / "hf")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "hf").exists()


def test_bad_export_requests_fail_with_one_line(runs, tmp_path, capsys):
    run_dir = runs("zero0")
    before = snapshot(run_dir)

    def fails(*args: str) -> tuple[int, str]:
        code = main(["export", *args, "--format", "hf"])
        return code, capsys.readouterr().err.strip()

    code, err = fails(str(run_dir), "--output", str(tmp_path / "a"), "--step", "7")
    assert code == 4 and "step_2, step_3" in err and len(err.splitlines()) == 1
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    code, err = fails(str(run_dir), "--output", str(tmp_path / "busy"))
    assert code == 2 and "not an empty directory" in err
    code, err = fails(str(tmp_path), "--output", str(tmp_path / "b"))
    assert code == 2 and "no run.json" in err
    code, err = fails(str(run_dir), "--output", str(tmp_path / "c"), "--tokenizer", str(tmp_path / "gone.model"))
    assert code == 2 and "gone.model" in err
    assert snapshot(run_dir) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]  # no partial outputs left
