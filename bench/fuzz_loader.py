"""Checkpoint-loader fuzzing: mutated files must load with identical weights or raise a CheckpointError.

Run:  .venv/bin/python bench/fuzz_loader.py [--n 10000] [--seed 0] [--workers 2] [--mem-gb 3]
      [--case-timeout 20] [--families all|files|folders] [--out fuzz.json]

With ``--families all`` (the default) even cases mutate checkpoint bytes (below) and odd cases are the
folder families of ``bench/fuzz_folders.py`` (odd metadata JSON, float8 tensors, Trainer/Lightning
folders with wrong-typed JSON and CSV, huge or custom-code HF configs, run.json specs naming code).

Seed files (one small model with a BatchNorm, so a float, an integer and several shapes are present):
a zip ``.pt`` and a legacy (pre-1.6) ``.pt`` from ``torch.save``, a ``.safetensors`` with dynascope
metadata, the same bytes named ``.bin``, and a Lightning ``.ckpt``. Case ``i`` mutates seed
``i % 5`` with ``random.Random(seed * 1_000_003 + i)``: bit flips, random or "interesting" bytes
(0, 0xFF, 0x7F, 0x80, u32/u64 extremes, 640/896/1152/1408 as u64), truncation, insertion, deletion and
duplication of a chunk, a splice from another seed, and, for safetensors, edits of the JSON header
(dtype, shape, offsets, step metadata), and for zips, mutations inside ``data.pkl`` (or another
metadata record) with its CRC-32 rewritten so that they reach the unpickler. Positions fall where
the format has structure: anywhere in a zip (every record has a CRC-32, which the loader verifies;
data records are only mutated without fixing the CRC); in the pickles of a legacy file and in
the header of a safetensors file, whose tensor bytes have no checksum (a flipped weight byte there is
undetectable by any loader, so it is not a loader bug and not fuzzed; a mutation that ends up
changing only such bytes is drawn again).

Outcomes: ``identical`` (loaded into the model; every tensor equal to the seed's), the error's
``.kind`` for a ``CheckpointError`` subclass, or a failure: ``BAD:<exception type>`` (any other
exception or different weights), ``timeout`` (a case over ``--case-timeout`` seconds) or ``crash``
(the worker died: segfault, or ``MemoryError`` escaping under the address-space limit). Workers are
subprocesses under ``resource.RLIMIT_AS`` (``--mem-gb``); a hung or dead worker is replaced and the
case it was on is recorded. Exit status 1 if any failure. This is a robustness check, not a timing
benchmark. The fast suite runs the same cases in-process (tests/test_checkpoints.py).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickletools
import random
import selectors
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # fuzz_folders beside this file
SUFFIXES = (".pt", ".pt", ".safetensors", ".bin", ".ckpt")  # zip, legacy, safetensors (x2), lightning
FORMATS = ("zip .pt", "legacy .pt", ".safetensors", "safetensors .bin", "lightning .ckpt")
INTERESTING = [
    b"\x00",
    b"\xff",
    b"\x7f",
    b"\x80",
    b"\xff\xff\xff\xff",
    b"\xff\xff\xff\x7f",
    b"\x00\x00\x00\x80",
    b"\xff" * 8,
    b"\xff\xff\xff\xff\xff\xff\xff\x7f",
    *(n.to_bytes(8, "little") for n in (640, 896, 1152, 1408)),
]
SAFETENSORS_EDITS = [
    (b'"F32"', [b'"I32"', b'"BOOL"', b'"F16"', b'"I64"', b'"F64"', b'"XX"']),
    (b'"I64"', [b'"F64"', b'"I32"', b'"F32"']),
    (b'"shape":[', [b'"shape":[0,', b'"shape":[-1,', b'"shape":[99999999999,', b'"shape":[']),
    (b'"data_offsets":[', [b'"data_offsets":[1,', b'"data_offsets":[', b'"data_offsets":[-8,']),
    (b'\\"step\\": 12', [b'\\"step\\": NaN', b'\\"step\\": 1e999', b'\\"step\\": -3', b'\\"step\\": 1e19']),
]


def build_model():
    from dynascope.models import build

    return build("cnn", in_channels=1, image_size=4, channels=[3], out_dim=2, batchnorm=True, pool="flatten")


def reference_state() -> dict:
    import torch

    model = build_model()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    model.train()
    model(torch.randn(6, 1, 4, 4, generator=g))  # BatchNorm running stats and num_batches_tracked
    return {k: v.clone() for k, v in model.state_dict().items()}


SEED_DIR = Path(__file__).resolve().parents[1] / "tests" / "data" / "fuzz_seeds"
SEED_NAMES = ("seed_zip.pt", "seed_legacy.pt", "seed.safetensors", "seed_st.bin", "seed.ckpt")


def make_seeds(folder: Path) -> list[Path]:
    """Write the five seed files (see module docstring) into ``folder``.

    torch.save writes a random serialization id (zip) and pointer-derived storage keys (legacy), so
    the seeds are generated once and committed (tests/data/fuzz_seeds): the cases are then the same
    bytes on every machine. Regenerate with ``--make-seeds``.
    """
    import torch

    from dynascope.models import model_config, save_checkpoint

    state = reference_state()
    meta = {"step": 12, "epoch": 1, "model_config": model_config(build_model())}
    meta_json = json.dumps(meta, sort_keys=True)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / n for n in SEED_NAMES]
    torch.save({"state_dict": state, "dynascope_metadata": meta_json}, paths[0])
    torch.save(
        {"state_dict": state, "dynascope_metadata": meta_json}, paths[1], _use_new_zipfile_serialization=False
    )
    save_checkpoint(state, paths[2], metadata=meta)
    paths[3].write_bytes(paths[2].read_bytes())
    lightning = {f"model.{k}": v for k, v in state.items()}
    torch.save(
        {"state_dict": lightning, "epoch": 1, "global_step": 12, "dynascope_metadata": meta_json}, paths[4]
    )
    return paths


def structure_ranges(data: bytes) -> list[tuple[int, int]]:
    """Byte ranges [a, b) worth mutating (see module docstring)."""
    if data.startswith(b"PK\x03\x04"):
        return [(0, len(data))]
    n = int.from_bytes(data[:8], "little")
    if data[8:9] == b"{" and 8 + n <= len(data):  # safetensors: the length and the JSON header
        return [(0, 8 + n)]
    f = _Reader(data)
    for _ in range(5):  # legacy: magic, protocol, sys info, object, storage keys; then raw storages
        for _op in pickletools.genops(f):
            pass
    return [(0, f.pos)]


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def read(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += len(out)
        return out

    def readline(self) -> bytes:
        end = self.data.find(b"\n", self.pos)
        end = len(self.data) if end < 0 else end + 1
        out = self.data[self.pos : end]
        self.pos = end
        return out

    def tell(self) -> int:
        return self.pos


def mutate(data: bytes, ranges: list[tuple[int, int]], others: list[bytes], rng: random.Random) -> bytes:
    """One to three seeded mutations of ``data`` at positions inside ``ranges``."""
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        if not buf:
            break
        a, b = rng.choice(ranges)
        b = min(b, len(buf))
        if b <= a:
            a, b = 0, len(buf)
        pos = rng.randrange(a, b)
        op = rng.randrange(12)
        if op == 0:  # bit flips
            for _ in range(rng.randint(1, 8)):
                q = rng.randrange(a, b)
                buf[q] ^= 1 << rng.randrange(8)
        elif op == 1:  # random bytes
            k = rng.randint(1, 16)
            buf[pos : pos + k] = bytes(rng.randrange(256) for _ in range(len(buf[pos : pos + k])))
        elif op == 2:  # an interesting value, overwriting
            v = rng.choice(INTERESTING)
            buf[pos : pos + len(v)] = v
        elif op == 3:  # truncate
            del buf[rng.randrange(0, len(buf)) :]
        elif op == 4:  # insert
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))
        elif op == 5:  # delete
            del buf[pos : pos + rng.randint(1, 32)]
        elif op == 6:  # duplicate a chunk
            k = rng.randint(1, 64)
            buf[pos:pos] = buf[pos : pos + k]
        elif op == 7:  # splice the head of another seed
            other = rng.choice(others)
            k = rng.randint(8, min(len(other), 512))
            buf[:k] = other[:k]
        elif op == 8:  # safetensors header edits (else: a small integer overwrite)
            edits = [(old, new) for old, news in SAFETENSORS_EDITS if old in buf for new in news]
            if edits:
                old, new = rng.choice(edits)
                starts = [i for i in range(len(buf)) if buf.startswith(old, i)]
                i = rng.choice(starts)
                buf[i : i + len(old)] = new
            else:
                buf[pos] = rng.choice((0, 1, 2, 0x7F, 0x80, 0xFF))
        elif op == 9:  # append junk
            buf += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        elif not _mutate_zip_record(buf, rng):  # 10, 11: inside a zip's pickle, CRCs fixed up
            buf[pos] ^= 1 << rng.randrange(8)
    return bytes(buf)


def _mutate_zip_record(buf: bytearray, rng: random.Random) -> bool:
    """Mutate a metadata record of a zip (data.pkl mostly) in place and rewrite its CRC-32 in the local
    and central headers, so that the mutation reaches torch's unpickler instead of the CRC check.
    Tensor data records are left alone: new bytes there with a matching CRC are simply other weights."""
    try:
        infos = zipfile.ZipFile(io.BytesIO(bytes(buf))).infolist()
    except Exception:  # noqa: BLE001 - an earlier mutation broke the zip: nothing to aim at
        return False
    meta = [i for i in infos if "/data/" not in i.filename and i.compress_type == 0 and i.file_size]
    if not meta:
        return False
    pkl = [i for i in meta if i.filename.endswith("data.pkl")]
    info = rng.choice(pkl) if pkl and rng.random() < 0.8 else rng.choice(meta)
    h = info.header_offset
    start = (
        h
        + 30
        + int.from_bytes(buf[h + 26 : h + 28], "little")
        + int.from_bytes(buf[h + 28 : h + 30], "little")
    )
    end = start + info.compress_size
    if h < 0 or end > len(buf) or end <= start:  # offsets from a damaged directory
        return False
    for _ in range(rng.randint(1, 3)):
        q = rng.randrange(start, end)
        kind = rng.randrange(3)
        if kind == 0:
            buf[q] ^= 1 << rng.randrange(8)
        elif kind == 1:
            v = rng.choice(INTERESTING)[: end - q]
            buf[q : q + len(v)] = v
        else:
            buf[q] = rng.randrange(256)
    crc = zlib.crc32(bytes(buf[start:end])).to_bytes(4, "little")
    buf[h + 14 : h + 18] = crc
    name = info.filename.encode()
    i = buf.find(b"PK\x01\x02")
    while i >= 0:
        n = int.from_bytes(buf[i + 28 : i + 30], "little")
        if bytes(buf[i + 46 : i + 46 + n]) == name:
            buf[i + 16 : i + 20] = crc
        i = buf.find(b"PK\x01\x02", i + 4)
    return True


class Case:
    """Everything needed to run cases ``i`` of one fuzz campaign in this process."""

    def __init__(self, folder: Path, seed: int) -> None:
        import torch

        from dynascope.models import load_checkpoint

        self.folder, self.seed = folder, seed
        folder.mkdir(parents=True, exist_ok=True)
        self.seeds = [SEED_DIR / n for n in SEED_NAMES]
        self.datas = [p.read_bytes() for p in self.seeds]
        self.ranges = [structure_ranges(d) for d in self.datas]
        self.model = build_model()
        self.reference = {k: v.clone() for k, v in load_checkpoint(self.seeds[2]).state_dict.items()}
        for p in self.seeds:  # every unmutated seed loads, with the same weights
            load_checkpoint(p, self.model)
            got = self.model.state_dict()
            assert all(torch.equal(got[k], self.reference[k]) for k in self.reference), p

    def file(self, i: int) -> Path:
        k = i % len(self.seeds)
        rng = random.Random(self.seed * 1_000_003 + i)
        others = [d for j, d in enumerate(self.datas) if j != k]
        orig = self.datas[k]
        data = mutate(orig, self.ranges[k], others, rng)
        end = max(b for _, b in self.ranges[k])
        while end < len(orig) and len(data) == len(orig) and data[:end] == orig[:end] and data != orig:
            # only tensor bytes of an unchecksummed format changed (e.g. truncated, then as many bytes
            # appended): other weights, which no loader can tell; draw again
            data = mutate(orig, self.ranges[k], others, rng)
        path = self.folder / f"case_{i}{SUFFIXES[k]}"
        path.write_bytes(data)
        return path

    def run(self, i: int) -> str:
        """Outcome of case ``i``: 'identical', a CheckpointError kind, or 'BAD:...'."""
        import torch

        from dynascope.models import CheckpointError, load_checkpoint

        path = self.file(i)
        with torch.no_grad():
            for v in self.model.state_dict().values():
                v.fill_(-7)  # a successful load must overwrite every tensor
        try:
            load_checkpoint(path, self.model)
        except CheckpointError as e:
            if str(path) not in str(e):
                return f"BAD:error does not name the file: {e}"
            return e.kind
        except BaseException as e:  # noqa: BLE001 - anything else is what we hunt for
            if isinstance(e, KeyboardInterrupt):
                raise
            return f"BAD:{type(e).__name__}: {' '.join(str(e).split())[:200]}"
        finally:
            path.unlink(missing_ok=True)
        got = self.model.state_dict()
        ref = self.reference
        same = got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in got)
        return "identical" if same else "BAD:loaded different weights"


class Campaign:
    """Case ``i`` of ``--families``: ``files`` (checkpoint bytes, :class:`Case`), ``folders`` (metadata,
    float8, Trainer/Lightning folders, HF configs, run.json: ``bench/fuzz_folders.py``) or ``all``
    (even ``i`` files, odd ``i`` folders)."""

    def __init__(self, folder: Path, seed: int, families: str = "all") -> None:
        from fuzz_folders import FolderCase

        self.families = families
        self.files = Case(folder / "files", seed) if families != "folders" else None
        self.folders = FolderCase(folder / "folders", seed) if families != "files" else None

    def which(self, i: int) -> tuple[str, int]:
        if self.families == "all":
            return ("files" if i % 2 == 0 else "folders"), i // 2
        return self.families, i

    def label(self, i: int) -> str:
        from fuzz_folders import FAMILIES

        kind, j = self.which(i)
        return FORMATS[j % len(FORMATS)] if kind == "files" else FAMILIES[j % len(FAMILIES)]

    def run(self, i: int) -> str:
        kind, j = self.which(i)
        return (self.files if kind == "files" else self.folders).run(j)


def _worker(args: argparse.Namespace) -> None:
    import resource

    limit = int(args.mem_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    case = Campaign(Path(args.folder), args.seed, args.families)

    def on_alarm(signum, frame):
        raise TimeoutError("case timeout")

    signal.signal(signal.SIGALRM, on_alarm)
    print(json.dumps({"ready": True}), flush=True)
    for i in range(args.start, args.stop):
        print(json.dumps({"start": i}), flush=True)
        t0 = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, args.case_timeout)
        try:
            outcome = case.run(i)
        except TimeoutError:
            outcome = "timeout"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        print(json.dumps({"i": i, "outcome": outcome, "s": round(time.perf_counter() - t0, 4)}), flush=True)


def _run_range(args: argparse.Namespace, start: int, stop: int, folder: Path, results: dict) -> None:
    """Run cases [start, stop) in worker subprocesses, restarting after a crash or hang."""
    nxt = start
    while nxt < stop:
        cmd = [sys.executable, __file__, "--worker", "--start", str(nxt), "--stop", str(stop)]
        cmd += ["--seed", str(args.seed), "--folder", str(folder), "--mem-gb", str(args.mem_gb)]
        cmd += ["--case-timeout", str(args.case_timeout), "--families", args.families]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        current = None
        deadline = time.monotonic() + 120 + args.case_timeout  # start-up (torch import) + first case
        while True:
            if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                proc.kill()
                if current is not None:
                    results[current] = "timeout"
                    nxt = current + 1
                break
            line = proc.stdout.readline()
            if not line:  # the worker exited
                proc.wait()
                if current is not None:
                    results[current] = "crash"
                    nxt = current + 1
                else:
                    nxt = stop
                break
            msg = json.loads(line)
            if "start" in msg:
                current = msg["start"]
                deadline = time.monotonic() + 2 * args.case_timeout + 5
            elif "i" in msg:
                results[msg["i"]] = msg["outcome"]
                current, nxt = None, msg["i"] + 1
        sel.close()
        proc.stdout.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--mem-gb", type=float, default=3.0, help="RLIMIT_AS of each worker (GiB)")
    ap.add_argument("--case-timeout", type=float, default=20.0, help="seconds per case")
    ap.add_argument("--out", type=Path, default=None, help="write the outcome of every case as JSON")
    ap.add_argument("--families", choices=("all", "files", "folders"), default="all",
                    help="checkpoint-byte mutations, the folder families of fuzz_folders.py, or both")
    ap.add_argument("--make-seeds", action="store_true", help=f"rewrite the seed files in {SEED_DIR}")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--stop", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--folder", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    if args.make_seeds:
        print("\n".join(str(p) for p in make_seeds(SEED_DIR)))
        return 0

    import threading

    t0 = time.perf_counter()
    results: dict[int, str] = {}
    with tempfile.TemporaryDirectory(prefix="dynascope-fuzz-") as tmp:
        bounds = [round(args.n * w / args.workers) for w in range(args.workers + 1)]
        threads = [
            threading.Thread(
                target=_run_range, args=(args, bounds[w], bounds[w + 1], Path(tmp) / f"w{w}", results)
            )
            for w in range(args.workers)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    wall = time.perf_counter() - t0
    missing = [i for i in range(args.n) if i not in results]
    counts = Counter(results.values())
    by_format: dict[str, Counter] = {}
    labels = Campaign.__new__(Campaign)
    labels.families = args.families
    for i, outcome in results.items():
        kind = outcome.split(":")[0] if outcome.startswith("BAD") else outcome.split(":", 1)[-1]
        by_format.setdefault(labels.label(i), Counter())[kind] += 1
    bad = {i: o for i, o in sorted(results.items()) if o.startswith("BAD") or o in ("timeout", "crash")}
    print(f"{len(results)} cases in {wall:.1f} s ({args.workers} workers, RLIMIT_AS {args.mem_gb} GiB)")
    for outcome, c in counts.most_common():
        print(f"  {outcome:<40} {c:6d}")
    for fmt, c in by_format.items():
        print(f"  {fmt:<18} " + ", ".join(f"{k} {v}" for k, v in c.most_common()))
    if missing:
        print(f"  {len(missing)} cases never ran: {missing[:10]}")
    for i, o in list(bad.items())[:20]:
        print(f"  case {i}: {o}")
    if args.out:
        args.out.write_text(json.dumps({"counts": dict(counts), "bad": bad, "wall_s": wall}, indent=1))
    return 1 if bad or missing else 0


if __name__ == "__main__":
    sys.exit(main())
