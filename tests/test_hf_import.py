"""Hugging Face -> project, and the round trips, with the real transformers on tiny random models (no downloads).

HF Llama / Qwen3 -> import-hf -> the project's Llama gives HF's logits; project -> export -> import gives the same
tensors, import -> export the same HF tensors; the written train.yaml is a valid config that rebuilds the model; every
unsupported HF config, bad weight directory and mismatched weight file fails with one line and writes nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from megatron_adamc.cli import main
from megatron_adamc.config.train import load_config
from megatron_adamc.errors import CheckpointError
from megatron_adamc.hf import export_hf, import_hf
from megatron_adamc.hf.files import read_safetensors
from megatron_adamc.model import Llama, LlamaConfig
from megatron_adamc.model.weights import load_weights, read_weights, save_weights

transformers = pytest.importorskip("transformers")

LOGITS_TOL = 1e-5  # fp32, logits of size ~1-10 (weights drawn with std 0.1)
HF_SHAPE = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=128, max_position_embeddings=64, rope_theta=5e5, rms_norm_eps=1e-5, initializer_range=0.1,
)  # fmt: skip

pytestmark = pytest.mark.unit  # make test-fast
OURS = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=128, max_seq_len=64, init_std=0.1)


def perturb_norms(model: torch.nn.Module) -> None:
    """Norm gains away from 1, so a swapped or dropped norm changes the logits."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.copy_(1 + 0.3 * torch.randn(param.shape, generator=gen))


def hf_model(arch: str = "llama", **overrides):
    torch.manual_seed(0)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**HF_SHAPE, **overrides}))
    else:
        config = transformers.Qwen3Config(**{**HF_SHAPE, "head_dim": 16, **overrides})
        model = transformers.Qwen3ForCausalLM(config)
    perturb_norms(model)
    return model.eval()


def tokens(vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 48), generator=torch.Generator().manual_seed(2))


@torch.no_grad()
def max_logit_gap(ours: Llama, theirs) -> float:
    toks = tokens(ours.config.vocab_size)
    return float((ours(toks) - theirs(toks).logits).abs().max())


def import_cli(hf_dir: Path, out: Path, capsys) -> tuple[int, str]:
    rc = main(["import-hf", str(hf_dir), "--output", str(out)])
    return rc, capsys.readouterr().err.strip()


@pytest.mark.parametrize(
    "arch,overrides",
    [("llama", {}), ("llama", {"tie_word_embeddings": True}), ("llama", {"num_key_value_heads": 4}), ("qwen3", {})],
    ids=["llama-gqa-untied", "llama-tied", "llama-mha", "qwen3-qk-norm"],
)
def test_import_gives_hf_logits_and_a_train_config(tmp_path, capsys, arch, overrides):
    theirs = hf_model(arch, **overrides)
    theirs.save_pretrained(tmp_path / "hf")
    assert main(["import-hf", str(tmp_path / "hf"), "--output", str(tmp_path / "imported")]) == 0
    config = load_config(tmp_path / "imported" / "train.yaml")  # the YAML the user trains with validates
    assert config.checkpoint.init_from == str((tmp_path / "imported" / "model.safetensors").resolve())
    assert config.data.default_corpus is False and config.data.train.startswith("EDIT/")
    assert config.train.seq_len <= 64
    ours = Llama(LlamaConfig.from_preset(config.model.preset, **config.model.overrides()))
    assert load_weights(ours, config.checkpoint.init_from) == {}  # the model section matches the weights exactly
    assert ours.config.qk_norm == (arch == "qwen3")
    assert ours.config.tie_embeddings == overrides.get("tie_word_embeddings", False)
    assert ours.config.rope_theta == 5e5 and ours.config.norm_eps == 1e-5
    gap = max_logit_gap(ours, theirs)
    assert gap < LOGITS_TOL, gap
    assert "imported" in capsys.readouterr().out


@pytest.mark.parametrize(
    "options",
    [{}, {"tie_embeddings": True}, {"n_kv_heads": 1}, {"qk_norm": True}, {"qk_norm": True, "tie_embeddings": True}],
    ids=["gqa-untied", "tied", "mqa", "qk-norm", "qk-norm-tied"],
)
def test_export_logits_and_both_round_trips(tmp_path, options):
    config = LlamaConfig(**{**OURS, "rope_theta": 2e4, "norm_eps": 1e-6, **options})
    ours = Llama(config, seed=3)
    perturb_norms(ours)
    state = ours.state_dict()
    exported = export_hf(state, config, tmp_path / "hf", max_shard_bytes=60_000)  # several shards + index
    assert "model.safetensors.index.json" in exported.files
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(theirs).__name__ == ("Qwen3ForCausalLM" if config.qk_norm else "LlamaForCausalLM")
    gap = max_logit_gap(ours, theirs)
    assert gap < LOGITS_TOL, gap
    # project -> export -> import: the same tensors and config
    imported = import_hf(tmp_path / "hf", tmp_path / "imported")
    tensors, stored = read_weights(imported.weights)
    assert tensors.keys() == state.keys() and all(torch.equal(tensors[k], state[k]) for k in state)
    assert LlamaConfig(**stored) == config.model_copy(update={"init_std": 0.02})  # init_std does not travel
    # import -> export: the same HF tensors
    export_hf(tensors, LlamaConfig(**stored), tmp_path / "again")
    first, second = read_safetensors(tmp_path / "hf"), read_safetensors(tmp_path / "again")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf") / "llama"
    hf_model().save_pretrained(path)
    return path


def edited(hf_dir: Path, tmp_path: Path, **changes) -> Path:
    copy = tmp_path / "edited"
    shutil.copytree(hf_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    config.update(changes)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize(
    "changes,field",
    [
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "rope_parameters"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"head_dim": 32}, "head_dim"),
        ({"model_type": "mistral"}, "model_type"),
        ({"quantization_config": {"quant_method": "bitsandbytes"}}, "quantization_config"),
        ({"num_attention_heads": 3}, "n_heads"),
    ],
)
def test_unsupported_hf_configs_are_refused_by_field(hf_dir, tmp_path, capsys, changes, field):
    rc, err = import_cli(edited(hf_dir, tmp_path, **changes), tmp_path / "out", capsys)
    assert rc == 2 and field in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_bad_weight_directories_are_refused(hf_dir, tmp_path, capsys):
    from safetensors.torch import save_file

    weights = read_safetensors(hf_dir)
    cases = {
        "bias": {**weights, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)},
        "missing": {k: v for k, v in weights.items() if k != "model.layers.1.mlp.up_proj.weight"},
        "shape": {**weights, "model.layers.0.mlp.up_proj.weight": torch.zeros(95, 64)},
    }
    expected = {"bias": "q_proj.bias", "missing": "up_proj.weight", "shape": "(191, 64)"}
    for name, tensors in cases.items():
        source = tmp_path / name
        shutil.copytree(hf_dir, source)
        save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
        rc, err = import_cli(source, tmp_path / f"out-{name}", capsys)
        assert rc == 4 and expected[name] in err and len(err.splitlines()) == 1, (name, err)
        assert not (tmp_path / f"out-{name}").exists()
    pickled = tmp_path / "pickled"
    shutil.copytree(hf_dir, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    rc, err = import_cli(pickled, tmp_path / "out-pickled", capsys)
    assert rc == 4 and "pytorch_model.bin" in err and "safe_serialization" in err
    rc, err = import_cli(tmp_path / "nowhere", tmp_path / "out-nowhere", capsys)
    assert rc == 2 and "nothing downloads" in err


def test_output_must_be_new_and_is_left_alone_on_refusal(hf_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, err = import_cli(hf_dir, out, capsys)
    assert rc == 2 and "not an empty directory" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_load_weights_is_strict_and_names_the_field(tmp_path):
    config = LlamaConfig(**OURS)
    source = Llama(config, seed=4)
    save_weights(source.state_dict(), config, tmp_path / "w.safetensors")

    deeper = Llama(config.model_copy(update={"n_layers": 3}), seed=5)
    before = {k: v.clone() for k, v in deeper.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"made for model\.n_layers=2, this model has 3: set --set model\.n_la"):
        load_weights(deeper, tmp_path / "w.safetensors")
    assert all(torch.equal(before[k], v) for k, v in deeper.state_dict().items())  # untouched

    longer = Llama(config.model_copy(update={"max_seq_len": 128, "rope_theta": 1e6}), seed=5)
    assert load_weights(longer, tmp_path / "w.safetensors") == {"max_seq_len": (64, 128), "rope_theta": (1e4, 1e6)}
    assert all(torch.equal(a, b) for a, b in zip(longer.parameters(), source.parameters(), strict=True))

    from safetensors.torch import save_file  # a file without the config: names and shapes still checked

    bare = {k: v for k, v in source.state_dict().items() if k != "norm.weight"}
    save_file(bare, tmp_path / "bare.safetensors")
    with pytest.raises(CheckpointError, match="missing norm.weight"):
        load_weights(Llama(config), tmp_path / "bare.safetensors")
    save_file({**bare, "norm.weight": torch.ones(32)}, tmp_path / "bare.safetensors")
    with pytest.raises(CheckpointError, match=r"norm.weight has shape \(32,\), the model wants \(64,\)"):
        load_weights(Llama(config), tmp_path / "bare.safetensors")
    with pytest.raises(CheckpointError, match="no such file"):
        load_weights(Llama(config), tmp_path / "nothing.safetensors")


def test_a_sentencepiece_tokenizer_travels_and_a_tiktoken_one_is_skipped(tmp_path, capsys):
    from megatron_adamc.data.tokenizer import train_tokenizer

    sources = sorted((Path(__file__).parents[1] / "megatron_adamc").rglob("*.py"))
    spm = train_tokenizer((p.read_text() for p in sources), str(tmp_path / "spm"), vocab_size=400)
    hf_model(vocab_size=400).save_pretrained(tmp_path / "hf")
    shutil.copyfile(spm.path, tmp_path / "hf" / "tokenizer.model")
    assert main(["import-hf", str(tmp_path / "hf"), "--output", str(tmp_path / "a")]) == 0
    config = load_config(tmp_path / "a" / "train.yaml")
    assert config.data.tokenizer == str((tmp_path / "a" / "tokenizer.model").resolve())
    assert (tmp_path / "a" / "tokenizer.model").read_bytes() == Path(spm.path).read_bytes()

    (tmp_path / "hf" / "tokenizer.model").write_text("IHdoYXQ= 0\n")  # a tiktoken file: base64 token, rank
    assert main(["import-hf", str(tmp_path / "hf"), "--output", str(tmp_path / "b")]) == 0
    assert "not a SentencePiece model" in capsys.readouterr().out
    assert not (tmp_path / "b" / "tokenizer.model").exists()
    assert load_config(tmp_path / "b" / "train.yaml").data.tokenizer.startswith("EDIT/")
