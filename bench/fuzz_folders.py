"""Mutation families for what arrives beside checkpoint files: metadata, folders, configs, run.json.

Used by ``bench/fuzz_loader.py`` (every other case) and by the fast suite. Case ``j`` is family ``j % 6``
with ``random.Random(seed * 1_000_003 + j)``:

0. safetensors metadata holding odd JSON (deep nesting up to 100,000 levels, lists, strings, numbers) under
   ``dynascope`` or another key, in a file and as a run's checkpoint: ``load_checkpoint``,
   ``read_safetensors_metadata``, ``Run.checkpoints`` / ``code_refs``;
1. float8 tensors (e4m3fn / e5m2, NaN sometimes) in a safetensors file: ``load_checkpoint`` into a model;
2. a Hugging Face Trainer folder whose ``trainer_state.json`` holds values of the wrong types (top-level
   lists, strings, huge or negative steps, infinities, deep nesting): ``import_checkpoints``;
3. a Lightning folder whose ``global_step`` / ``epoch`` and ``metrics.csv`` steps are odd (400-digit,
   NaN, Inf, negative, text): ``import_checkpoints``;
4. a Hugging Face ``config.json`` with extreme or wrong-typed sizes (1e6 layers, 1e12 vocabulary, 0,
   negatives, strings), ``auto_map``, an unknown ``model_type`` or a non-object: ``build_from_spec``;
5. a ``run.json`` whose model, dataset and loss specs are random JSON, including references to code
   (``os:system``, a ``helper.py`` that writes a marker): ``Run.open``, ``load_model``, ``load_dataset``.

Outcomes: ``ok`` (it loaded or built) or ``refused:<error class>`` for a ``ValueError`` (``CheckpointError``,
``RunError`` and ``UntrustedCodeError`` are ones) whose message names the file or folder; anything else is
``BAD:...``, and so is a marker file written by code that should not have run.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

MARKER_CODE = "import pathlib\npathlib.Path(__file__).with_name('MARKER').write_text('x')\n"
FAMILIES = ("metadata_json", "float8", "trainer_state", "lightning", "hf_config", "run_json")
ODD = [0, -1, 1, 2, 3.5, 1e6, 10**6, 10**12, 2**63, -(2**63), 10**400, "x", "", None, True, [], {},
       float("nan"), float("inf"), [1, 2], {"a": 1}]  # fmt: skip


def _odd(rng: random.Random) -> Any:
    v = rng.choice(ODD)
    return json.loads(json.dumps(v)) if isinstance(v, (list, dict)) else v


def _nested(rng: random.Random) -> Any:
    """A JSON value nested ``depth`` levels deep (lists or objects)."""
    depth = rng.choice([1, 5, 33, 200, 1000, 5000, 100_000])
    leaf: Any = _odd(rng)
    for _ in range(depth):
        leaf = [leaf] if rng.random() < 0.5 else {"k": leaf}
    return leaf


def _dumps(value: Any) -> str:
    """JSON text of ``value`` (NaN/Inf as Python writes them; deep values built by hand)."""
    depth, inner = 0, value
    while (isinstance(inner, list) and len(inner) == 1) or (isinstance(inner, dict) and list(inner) == ["k"]):
        inner = inner[0] if isinstance(inner, list) else inner["k"]
        depth += 1
    if depth > 500:  # json.dumps recurses: write the nesting as text
        opens, closes, v = [], [], value
        for _ in range(depth):
            if isinstance(v, list):
                opens.append("[")
                closes.append("]")
                v = v[0]
            else:
                opens.append('{"k":')
                closes.append("}")
                v = v["k"]
        return "".join(opens) + json.dumps(v) + "".join(reversed(closes))
    return json.dumps(value)


class FolderCase:
    """The six families above, run in this process (``run(j)`` → outcome)."""

    def __init__(self, folder: Path, seed: int) -> None:
        import torch

        from dynascope.models import build

        self.folder, self.seed = folder, seed
        folder.mkdir(parents=True, exist_ok=True)
        self.model_cfg = {"name": "mlp", "in_dim": 4, "width": 3, "depth": 1, "out_dim": 2}
        model = build(**self.model_cfg)
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.torch = torch

    # ------------------------------------------------------------------ files of each family
    def _safetensors(self, path: Path, metadata: dict[str, str], state: dict | None = None) -> Path:
        from safetensors.torch import save_file

        save_file(state or self.state, str(path), metadata=metadata)
        return path

    def _metadata_json(self, rng: random.Random, where: Path) -> str:
        from dynascope.models import Run, build, load_checkpoint, read_safetensors_metadata

        key = rng.choice(["dynascope", "dynascope", "model_config", "format"])
        value = _nested(rng) if rng.random() < 0.7 else _odd(rng)
        meta = {key: _dumps(value) if not isinstance(value, str) else value}
        f = self._safetensors(where / "meta.safetensors", meta)
        load_checkpoint(f, build(**self.model_cfg))
        read_safetensors_metadata(f)
        run = Run.create(where / "run", model=self.model_cfg, dataset={"name": "digits"})
        shutil.copy(f, run.checkpoint_path(1))
        run = Run.open(run.path)
        run.checkpoints()
        run.code_refs()
        return "ok"

    def _float8(self, rng: random.Random, where: Path) -> str:
        from dynascope.models import build, load_checkpoint

        torch = self.torch
        dtype = rng.choice([torch.float8_e4m3fn, torch.float8_e5m2])
        state = {k: (v.to(dtype) if rng.random() < 0.7 and v.is_floating_point() else v)
                 for k, v in self.state.items()}  # fmt: skip
        if rng.random() < 0.3:
            k = rng.choice(list(state))
            bad = state[k].float().clone()
            bad.view(-1)[0] = float("nan")
            state[k] = bad.to(state[k].dtype) if state[k].is_floating_point() else state[k]
        load_checkpoint(self._safetensors(where / "f8.safetensors", {}, state), build(**self.model_cfg))
        return "ok"

    def _trainer_state(self, rng: random.Random, where: Path) -> str:
        from dynascope.models import import_checkpoints

        src = where / "trainer"
        d = src / f"checkpoint-{rng.choice([0, 5, 10**25])}"
        d.mkdir(parents=True)
        self._safetensors(d / "model.safetensors", {"format": "pt"})
        history = rng.choice([_odd(rng), [{"step": _odd(rng), "loss": _odd(rng)}]])
        state: Any = {"global_step": _odd(rng), "epoch": _odd(rng), "log_history": history}
        if rng.random() < 0.3:
            state = _odd(rng) if rng.random() < 0.5 else _nested(rng)
        (d / "trainer_state.json").write_text(_dumps(state))
        import_checkpoints(src, where / "run", model=self.model_cfg, dataset={"name": "digits"})
        return "ok"

    def _lightning(self, rng: random.Random, where: Path) -> str:
        from dynascope.models import import_checkpoints

        src = where / "lightning"
        (src / "logs").mkdir(parents=True)
        sd = {f"model.{k}": v for k, v in self.state.items()}
        self.torch.save({"state_dict": sd, "global_step": _odd(rng), "epoch": _odd(rng)}, src / "m.ckpt")
        odd_steps = ["1" * 400, "nan", "inf", "-1", "x", "", "3", "1e30", str(2**63)]
        steps = [rng.choice(odd_steps) for _ in range(3)]
        rows = "\n".join(f"{s},{rng.choice(['0.5', 'nan', 'x', '1' * 400])},{rng.choice(['1', 'inf', ''])}"
                         for s in steps)  # fmt: skip
        (src / "logs" / "metrics.csv").write_text("step,train_loss,epoch\n" + rows + "\n")
        import_checkpoints(src, where / "run", model=self.model_cfg, dataset={"name": "digits"})
        return "ok"

    def _hf_config(self, rng: random.Random, where: Path) -> str:
        from dynascope.models import build_from_spec

        folder = where / "hf"
        folder.mkdir()
        cfg: Any = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 1, "n_embd": 8,
                    "n_head": 2, "vocab_size": 16, "n_positions": 16}  # fmt: skip
        sizes = ["n_layer", "n_embd", "n_head", "vocab_size", "n_positions"]
        for key in rng.sample(sizes, rng.randint(1, 3)):
            cfg[key] = _odd(rng)
        r = rng.random()
        if r < 0.1:
            cfg["auto_map"] = {"AutoModel": "evil.Model"}
        elif r < 0.2:
            cfg["model_type"] = rng.choice(["no_such_model", 7, None])
        elif r < 0.3:
            cfg["architectures"] = _odd(rng)
        elif r < 0.4:
            cfg = _nested(rng) if rng.random() < 0.5 else _odd(rng)
        (folder / "config.json").write_text(_dumps(cfg))
        (folder / "evil.py").write_text(MARKER_CODE)
        build_from_spec({"hf": str(folder), "seed": 0})
        return "ok"

    def _run_json(self, rng: random.Random, where: Path) -> str:
        from dynascope.models import Run, build
        from dynascope.probes.losses import resolve_loss

        run = Run.create(where / "run", model=self.model_cfg, dataset={"name": "digits", "n_train": 8})
        run.save_checkpoint(build(**self.model_cfg), 1)
        (run.path / "helper.py").write_text(
            MARKER_CODE + "def f(**k):\n    pass\n"
        )
        refs = ["os:system", f"{run.path}/helper.py:f", "helper:f", "dynascope.models:build"]
        cfg = json.loads((run.path / "run.json").read_text())
        nested: dict[str, str] = {}
        for key in rng.sample(["model", "dataset", "loss"], rng.randint(1, 3)):
            r = rng.random()
            if r < 0.4:
                touch = {"command": f"touch {run.path / 'MARKER'}"}
                cfg[key] = {"factory": rng.choice(refs), "kwargs": touch}
            elif r < 0.6:
                cfg[key] = rng.choice(refs)
            elif r < 0.8:
                cfg[key] = {"name": _odd(rng), "in_dim": _odd(rng)}
            else:
                cfg[key] = f"@nested:{key}"
                nested[f'"@nested:{key}"'] = _dumps(_nested(rng))
        text = json.dumps(cfg)
        for placeholder, value in nested.items():  # deep values spliced in as text (json.dumps recurses)
            text = text.replace(placeholder, value)
        (run.path / "run.json").write_text(text)
        opened = Run.open(run.path)
        opened.code_refs()
        def resolve() -> None:
            with opened.code_scope():
                resolve_loss(opened.loss or "auto", self.torch.zeros(2, dtype=self.torch.long))

        outcome = "ok"
        for call in (lambda: opened.load_model(1), opened.load_dataset, resolve):
            try:
                call()
            except ValueError:
                outcome = "refused:partly"
        return outcome

    # ------------------------------------------------------------------ one case
    def run(self, j: int) -> str:
        family = FAMILIES[j % len(FAMILIES)]
        rng = random.Random(self.seed * 1_000_003 + j)
        where = self.folder / f"case_{j}"
        where.mkdir(parents=True)
        try:
            outcome = getattr(self, f"_{family}")(rng, where)
        except ValueError as e:
            if str(where) not in str(e) and "model spec" not in str(e):
                outcome = f"BAD:{family}: error names no file: {' '.join(str(e).split())[:200]}"
            else:
                outcome = f"refused:{type(e).__name__}"
        except BaseException as e:  # noqa: BLE001 - anything else is what we hunt for
            if isinstance(e, KeyboardInterrupt):
                raise
            outcome = f"BAD:{family}: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
        if any(where.rglob("MARKER")):
            outcome = f"BAD:{family}: code ran (marker written)"
        shutil.rmtree(where, ignore_errors=True)
        return f"{family}:{outcome}" if not outcome.startswith("BAD") else outcome
