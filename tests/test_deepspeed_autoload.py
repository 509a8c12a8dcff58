"""The start-up hook, installed for real: a wheel and an editable install (what ``make test``'s set-up runs), each in a
throwaway venv (tests/workers/autoload_venv.py), exercised by fresh interpreters as a user's shell would start them.

What must hold: both installs carry the start-up files, listed in RECORD (so ``pip uninstall`` removes them); a process
that never imports DeepSpeed loads nothing but the two tiny hook modules; importing DeepSpeed by any route registers
AdamC, so ``"type": "AdamC"`` builds an engine in a script that never names megatron-adamc; MEGATRON_ADAMC_AUTOLOAD=0
restores DeepSpeed's own refusal; ``register()`` and a late ``install()`` keep working; a DeepSpeed that cannot be
patched warns and still imports; a stale package shadowing the installed one on PYTHONPATH makes the ``.pth`` line a
silent no-op; the PEP 829 ``.start`` entry point resolves.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import pkgutil
import subprocess
import sys
import textwrap

import pytest
from conftest import free_port
from workers.autoload_venv import STARTUP_FILES, clean_env, installed_venv, site_packages, venv_python

import megatron_adamc.autoload as autoload

KINDS = ["wheel", "editable"]

# A user's script: one rank, "type": "AdamC" in the JSON, megatron-adamc never named.
ADAMC_SCRIPT = """
import json, sys, torch
{imports}
model = torch.nn.Linear(4, 2)
cfg = {{"train_micro_batch_size_per_gpu": 1, "steps_per_print": 10**9,
        "optimizer": {{"type": "AdamC", "params": {{"lr": 1e-3, "weight_decay": 0.1}}}}}}
try:
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    outcome = type(engine.basic_optimizer).__name__
except AssertionError as err:
    outcome = "AssertionError: " + str(err)
hook = sys.modules.get("megatron_adamc.autoload")
print(json.dumps({{"outcome": outcome, "state": getattr(hook, "state", None)}}))
"""


@pytest.fixture(scope="module")
def venvs(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    return {kind: installed_venv(base / f"autoload-{kind}", kind, scratch=base) for kind in KINDS}


def run_python(venv, code: str, **env: str) -> str:
    dist = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    proc = subprocess.run(
        [venv_python(venv), "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        env=clean_env(**dist, MASTER_PORT=str(free_port()), **env),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", KINDS)
def test_both_installs_carry_the_startup_files_in_record(venvs, kind):
    sp = site_packages(venvs[kind])
    (record,) = sp.glob("megatron_adamc-*.dist-info/RECORD")
    rows = {row[0]: row for row in csv.reader(record.read_text().splitlines())}
    for name in STARTUP_FILES:
        data = (sp / name).read_bytes()
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        assert rows[name][1:] == [f"sha256={digest}", str(len(data))]


@pytest.mark.parametrize("kind", KINDS)
def test_a_process_without_deepspeed_loads_only_the_hook(venvs, kind):
    code = "import sys, json; print(json.dumps(sorted(sys.modules)))"
    loaded = set(json.loads(run_python(venvs[kind], code)))
    assert {m for m in loaded if m.startswith("megatron_adamc")} == {"megatron_adamc", "megatron_adamc.autoload"}
    assert not {m for m in loaded if m.split(".")[0] in {"torch", "deepspeed", "numpy", "transformers", "typing"}}
    state = run_python(venvs[kind], "import sys; print(sys.modules['megatron_adamc.autoload'].state)").strip()
    assert state == "waiting"


def test_unmodified_script_gets_adamc_from_the_wheel(venvs):
    out = last_json(run_python(venvs["wheel"], ADAMC_SCRIPT.format(imports="import deepspeed")))
    assert out == {"outcome": "FusedAdam", "state": "registered"}


def test_engine_module_imported_first_in_the_editable_install(venvs):
    imports = "from deepspeed.runtime.engine import DeepSpeedEngine\nimport deepspeed"
    code = ADAMC_SCRIPT.format(imports=imports) + textwrap.dedent(
        """
        import megatron_adamc, deepspeed.runtime.engine as e
        print(json.dumps({"package": megatron_adamc.__file__, "loader": type(e.__loader__).__name__,
                          "finders": [type(f).__name__ for f in sys.meta_path]}))
        """
    )
    lines = run_python(venvs["editable"], code).strip().splitlines()
    assert json.loads(lines[-2]) == {"outcome": "FusedAdam", "state": "registered"}
    extra = json.loads(lines[-1])
    assert "/source/megatron_adamc/" in extra["package"]  # the editable install's source tree, not a copy
    assert extra["loader"] == "SourceFileLoader"  # the wrapper gave the real loader back
    assert "_EngineImportFinder" not in extra["finders"]  # gone once it fired


def test_switched_off_deepspeed_refuses_and_register_still_works(venvs):
    off_env = {autoload.ENV_VAR: "0"}
    off = last_json(run_python(venvs["wheel"], ADAMC_SCRIPT.format(imports="import deepspeed"), **off_env))
    assert off == {"outcome": "AssertionError: AdamC is not a supported DeepSpeed Optimizer", "state": "off"}
    imports = "import deepspeed, megatron_adamc.deepspeed as mad\nmad.register()\nmad.register()"
    by_hand = last_json(run_python(venvs["wheel"], ADAMC_SCRIPT.format(imports=imports), **off_env))
    assert by_hand["outcome"] == "FusedAdam"


def test_late_install_after_deepspeed_registers_at_once(venvs):
    code = """
        import os, deepspeed, megatron_adamc.autoload as hook
        from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS
        before = "adamc" in DEEPSPEED_OPTIMIZERS
        os.environ[hook.ENV_VAR] = "1"
        hook.install()
        hook.install()
        print(before, hook.state, DEEPSPEED_OPTIMIZERS.count("adamc"))
    """
    out = run_python(venvs["wheel"], code, **{autoload.ENV_VAR: "0"}).split()[-3:]
    assert out == ["False", "registered", "1"]


def test_stale_package_on_pythonpath_makes_the_pth_line_a_silent_no_op(venvs, tmp_path):
    stale = tmp_path / "megatron_adamc"
    stale.mkdir()
    (stale / "__init__.py").write_text("")  # an old checkout without autoload/
    proc = subprocess.run(
        [venv_python(venvs["wheel"]), "-c", "import megatron_adamc; print(megatron_adamc.__file__)"],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(PYTHONPATH=str(tmp_path)),
    )
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.strip() == str(stale / "__init__.py")


def test_pep_829_start_file_names_install(venvs):
    text = (site_packages(venvs["wheel"]) / "megatron_adamc_autoload.start").read_text(encoding="utf-8-sig")
    entries = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert entries == ["megatron_adamc.autoload:install"]  # the strict pkg.mod:callable form PEP 829 requires
    assert pkgutil.resolve_name(entries[0]) is autoload.install


def test_uninstall_removes_the_startup_files(tmp_path, tmp_path_factory):
    venv = installed_venv(tmp_path / "uninstall", "wheel", scratch=tmp_path_factory.getbasetemp())
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", venv_python(venv), "uninstall", "-y", "-q", "megatron-adamc"],
        check=True,
        capture_output=True,
        env=clean_env(),
    )
    assert not any((site_packages(venv) / name).exists() for name in STARTUP_FILES)


def test_a_deepspeed_it_cannot_patch_warns_and_still_imports(venvs):
    code = """
        import json, sys, warnings
        import megatron_adamc.deepspeed.engine_patch as patch

        def broken():  # an injected fault: a DeepSpeed release whose engine no longer has what register() patches
            raise AttributeError("type object 'DeepSpeedEngine' has no attribute '_configure_basic_optimizer'")

        patch.register = broken
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import deepspeed
        runtime = [str(w.message) for w in caught if w.category is RuntimeWarning]
        print(json.dumps({"state": sys.modules["megatron_adamc.autoload"].state, "warnings": runtime}))
    """
    out = last_json(run_python(venvs["wheel"], code))
    assert out["state"].startswith("failed: AttributeError")
    assert len(out["warnings"]) == 1 and out["warnings"][0].startswith("megatron-adamc: AdamC was not registered")
    assert "\n" not in out["warnings"][0]
